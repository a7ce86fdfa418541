"""meta.k8s.io/v1 Tables, which `kubectl get` asks for to print columns."""

from __future__ import annotations

import datetime as dt

from .resources import Resource
from .schema import column_value


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery's duration.HumanDuration."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m" if s % 60 == 0 else f"{minutes}m{s % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d" if hours % 24 == 0 else f"{hours // 24}d{hours % 24}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if days == 0 else f"{hours // 24 // 365}y{days}d"
    return f"{hours // 24 // 365}y"


def age(timestamp: str | None) -> str:
    when = parse_time(timestamp)
    if when is None:
        return "<unknown>"
    return human_duration((dt.datetime.now(dt.timezone.utc) - when).total_seconds())


def _column(name: str, kind: str = "string", priority: int = 0, fmt: str = "") -> dict:
    return {"name": name, "type": kind, "format": fmt, "description": name, "priority": priority}


def _name_column() -> dict:
    column = _column("Name", fmt="name")
    column["description"] = "Name must be unique within a namespace."
    return column


def _pod_cells(pod: dict) -> list:
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for s in statuses if s.get("ready"))
    reason = status.get("reason") or status.get("phase") or "Pending"
    for container in statuses:
        state = container.get("state") or {}
        if "waiting" in state and state["waiting"].get("reason"):
            reason = state["waiting"]["reason"]
        elif "terminated" in state:
            term = state["terminated"]
            reason = term.get("reason") or f"ExitCode:{term.get('exitCode')}"
    if pod["metadata"].get("deletionTimestamp"):
        reason = "Terminating"
    restarts = sum(int(s.get("restartCount") or 0) for s in statuses)
    containers = len(spec.get("containers") or [])
    created = pod["metadata"].get("creationTimestamp")
    return [f"{ready}/{containers}", reason, restarts, age(created)]


def _job_cells(job: dict) -> list:
    spec, status = job.get("spec") or {}, job.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    if conditions.get("Complete") == "True":
        state = "Complete"
    elif conditions.get("Failed") == "True":
        state = "Failed"
    elif spec.get("suspend"):
        state = "Suspended"
    else:
        state = "Running"
    completions = spec.get("completions")
    done = f"{status.get('succeeded', 0)}/{completions if completions is not None else 1}"
    start, end = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
    duration = ""
    if start:
        end = end or dt.datetime.now(dt.timezone.utc)
        duration = human_duration((end - start).total_seconds())
    return [state, done, duration, age(job["metadata"].get("creationTimestamp"))]


def _event_cells(event: dict) -> list:
    regarding = event.get("involvedObject") or event.get("regarding") or {}
    last = (
        event.get("lastTimestamp")
        or event.get("deprecatedLastTimestamp")
        or event.get("eventTime")
        or event["metadata"].get("creationTimestamp")
    )
    target = f"{(regarding.get('kind') or '').lower()}/{regarding.get('name', '')}"
    message = event.get("message") or event.get("note") or ""
    return [age(last), event.get("type", ""), event.get("reason", ""), target, message]


def _columns_and_cells(resource: Resource):
    if resource.crd is not None:
        columns, paths = [], []
        for column in resource.printer_columns:
            columns.append(
                _column(
                    column["name"],
                    column.get("type", "string"),
                    int(column.get("priority", 0)),
                    column.get("format", ""),
                )
            )
            columns[-1]["description"] = column.get("description", column["name"])
            paths.append((column["jsonPath"], column.get("type", "string")))
        if not resource.printer_columns:
            columns.append(_column("Age", "date"))
            paths.append((".metadata.creationTimestamp", "date"))

        def cells(obj: dict) -> list:
            row = []
            for path, kind in paths:
                value = column_value(obj, path)
                if kind == "date" and value is not None:
                    value = age(str(value))
                row.append(value)
            return row

        return columns, cells
    if resource.kind == "Pod":
        columns = [_column("Ready"), _column("Status"), _column("Restarts", "string"),
                   _column("Age")]  # fmt: skip
        return columns, _pod_cells
    if resource.kind == "Job" and resource.group == "batch":
        columns = [_column("Status"), _column("Completions"), _column("Duration"), _column("Age")]
        return columns, _job_cells
    if resource.kind == "Event":
        columns = [_column("Last Seen"), _column("Type"), _column("Reason"), _column("Object"),
                   _column("Message")]  # fmt: skip
        return columns, _event_cells
    if resource.kind == "Namespace":
        return [_column("Status"), _column("Age")], lambda obj: [
            (obj.get("status") or {}).get("phase", ""),
            age(obj["metadata"].get("creationTimestamp")),
        ]
    if resource.kind == "PersistentVolumeClaim":
        return [_column("Status"), _column("Volume"), _column("Age")], lambda obj: [
            (obj.get("status") or {}).get("phase", ""),
            (obj.get("spec") or {}).get("volumeName", ""),
            age(obj["metadata"].get("creationTimestamp")),
        ]
    return [_column("Age")], lambda obj: [age(obj["metadata"].get("creationTimestamp"))]


def _row_object(obj: dict, include: str) -> dict | None:
    if include == "None":
        return None
    if include == "Object":
        return obj
    return {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata", {}),
    }


def to_table(
    resource: Resource,
    objects: list[dict],
    resource_version: str,
    include_object: str = "PartialObjectMetadata",
    headers: bool = True,
) -> dict:
    columns, cells = _columns_and_cells(resource)
    rows = [
        {
            "cells": [obj["metadata"].get("name")] + cells(obj),
            "object": _row_object(obj, include_object),
        }
        for obj in objects
    ]
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": [_name_column()] + columns if headers else [],
        "rows": rows,
    }

"""Label and field selectors as the API server parses them (list and watch)."""

from __future__ import annotations

import re
from collections.abc import Callable

Predicate = Callable[[dict], bool]


class SelectorError(ValueError):
    """A selector the server cannot parse (answered with 400 BadRequest)."""


def _split_terms(text: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        terms.append(current.strip())
    return terms


_SET_TERM = re.compile(r"^([^\s!=]+)\s+(in|notin)\s*\((.*)\)$")
_EQ_TERM = re.compile(r"^([^\s!=]+)\s*(==|=|!=)\s*(\S*)$")


def label_selector(text: str | None) -> Predicate:
    """A predicate on an object's metadata.labels for `=,==,!=,in,notin,key,!key`."""
    checks: list[Callable[[dict], bool]] = []
    for term in _split_terms(text or ""):
        if match := _SET_TERM.match(term):
            key, op, values = match.group(1), match.group(2), match.group(3)
            allowed = {value.strip() for value in values.split(",") if value.strip()}
            if op == "in":
                checks.append(lambda labels, k=key, a=allowed: k in labels and labels[k] in a)
            else:
                checks.append(lambda labels, k=key, a=allowed: labels.get(k) not in a)
        elif match := _EQ_TERM.match(term):
            key, op, value = match.groups()
            if op == "!=":
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif re.fullmatch(r"![^\s!=(),]+", term):
            absent = term[1:].strip()
            checks.append(lambda labels, k=absent: k not in labels)
        elif re.fullmatch(r"[^\s!=(),]+", term):
            checks.append(lambda labels, k=term: k in labels)
        else:
            raise SelectorError(f"unable to parse requirement: {term!r}")

    def predicate(obj: dict) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(check(labels) for check in checks)

    return predicate


def _field(obj: dict, path: str) -> str:
    value: object = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def field_selector(text: str | None) -> Predicate:
    """A predicate for `path=value,path!=value` on any dotted field of the object."""
    checks: list[Callable[[dict], bool]] = []
    for term in _split_terms(text or ""):
        match = _EQ_TERM.match(term)
        if not match:
            raise SelectorError(f"invalid field selector: {term!r}")
        path, op, value = match.groups()
        if op == "!=":
            checks.append(lambda obj, p=path, v=value: _field(obj, p) != v)
        else:
            checks.append(lambda obj, p=path, v=value: _field(obj, p) == v)
    return lambda obj: all(check(obj) for check in checks)

"""Log lines on stderr: one JSON object per line in a pod, the human format on a terminal."""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import datetime, timezone
from typing import TextIO

HUMAN_FORMAT = "%(levelname)s %(name)s: %(message)s"

log = logging.getLogger("instseg")


class JsonFormatter(logging.Formatter):
    """{"time": ISO-8601 UTC, "level", "logger", "message"}, plus "exception" (the traceback)
    when there is one: what a cluster's log collector parses without a pattern."""

    def format(self, record: logging.LogRecord) -> str:
        time = datetime.fromtimestamp(record.created, tz=timezone.utc)
        entry = {
            "time": time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def logs_json(stream: TextIO | None = None) -> bool:
    """True unless a person reads `stream` (default stderr): in a pod it is a pipe or file."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not (isatty and isatty())


def configure_logging(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Logs at `level` to `stream` (default stderr), as JSON lines unless it is a terminal.

    As `logging.basicConfig`, it leaves an existing configuration alone (a program that
    embeds the trainer, or pytest's capture). In JSON mode, Python warnings, uncaught
    exceptions and torch's own loggers are JSON lines too.
    """
    root = logging.getLogger()
    if root.handlers:
        return
    stream = sys.stderr if stream is None else stream
    formatter = JsonFormatter() if logs_json(stream) else logging.Formatter(HUMAN_FORMAT)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level)
    if isinstance(formatter, JsonFormatter):
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
        _format_torch_loggers(formatter)


def log_failure(message: str) -> None:
    """The CLI's last words: a plain line on a terminal (no level or logger to read past),
    a JSON line otherwise."""
    if logs_json():
        message = JsonFormatter().format(
            log.makeRecord(log.name, logging.ERROR, "", 0, message, (), None)
        )
    # One write, as logging's handlers do: print() writes the newline apart, and the lines of
    # the processes that share the pod's stderr would run into each other.
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _log_uncaught(kind, error, traceback) -> None:
    # The message is the traceback's last line, which the operator shows as the failure.
    log.critical("%s: %s", kind.__name__, error, exc_info=(kind, error, traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if not issubclass(args.exc_type, SystemExit):
        _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)


def _format_torch_loggers(formatter: logging.Formatter) -> None:
    """torch's loggers write to stderr through handlers of their own (propagate=False) in
    torch's format; they get ours instead. torch registers them when it is imported."""
    import torch  # noqa: F401

    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.split(".")[0] == "torch" and isinstance(logger, logging.Logger):
            for handler in logger.handlers:
                if getattr(handler, "stream", None) is sys.stderr:
                    handler.setFormatter(formatter)

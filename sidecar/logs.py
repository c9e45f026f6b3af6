"""JSON logs: one JSON object per line on stderr, for the sidecar's own records and the audit trail.

A record's structured fields travel in the LogRecord attribute `telemetry_guard` (a dict), the
convention of interceptors/audit.py: the audit log's message is already that dict as JSON text,
so it is reused, not encoded twice. Exceptions are logged by type and frames only: an
exception's message can quote the data it failed on, and no removed value may reach a log.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from typing import IO, Any

from interceptors.audit import AUDIT_LOGGER_NAME

FIELDS = "telemetry_guard"  # the LogRecord attribute holding a record's structured fields
LEVELS = ("debug", "info", "warning", "error")


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a structured record: log.info("serving", extra=fields(port=port))."""
    return {FIELDS: values}


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "pid", "message", ...fields} on one line."""

    def __init__(self) -> None:
        super().__init__()
        self._stamp = (-1, "")  # (second, its time text): one attribute, replaced whole
        self._heads: dict[tuple[str, str, int | None], str] = {}

    def _head(self, record: logging.LogRecord) -> str:
        """json.dumps(head) without its closing brace, for an audit record (one per message): the
        time text is made once per second, the level, logger and pid part once per logger."""
        second, stamp = self._stamp
        if int(record.created) != second:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            self._stamp = (int(record.created), stamp)
        key = (record.levelname, record.name, record.process)
        rest = self._heads.get(key)
        if rest is None:
            rest = self._heads[key] = json.dumps(
                {"level": record.levelname.lower(), "logger": record.name, "pid": record.process}
            )[1:-1]
        return f'{{"time": "{stamp}.{int(record.msecs):03d}Z", {rest}'

    def format(self, record: logging.LogRecord) -> str:
        extra = getattr(record, FIELDS, None)
        message = record.getMessage()
        if record.name == AUDIT_LOGGER_NAME and isinstance(extra, dict) and message.startswith("{"):
            # The message is json.dumps(extra): splice it instead of encoding the dict again.
            return self._head(record) + (", " + message[1:] if len(message) > 2 else "}")
        head = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        out: dict[str, Any] = {**head, "message": message}
        if isinstance(extra, dict):
            out.update((key, value) for key, value in extra.items() if key not in head)
        if record.exc_info and record.exc_info[0] is not None:
            kind, _, tb = record.exc_info
            out["exception"] = kind.__name__
            out["frames"] = [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_tb(tb)][-8:]
        return json.dumps(out, default=str)


def configure(level: str = "info", stream: IO[str] | None = None) -> None:
    """JSON lines on `stream` (stderr) for every logger; DEBUG also logs removed key names (audit)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # These lines carry no thread name, multiprocessing name or caller (file, function, line): let
    # logging not gather them for every record (the logging HOWTO's "Optimization"; an audit record
    # is written per message). The pid stays: it is in every line.
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    # grpc's own logger can quote call details at debug level; keep it at warning.
    logging.getLogger("grpc").setLevel(max(logging.WARNING, root.level))

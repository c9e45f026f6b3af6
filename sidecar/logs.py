"""JSON logs: one JSON object per line on stderr, for the sidecar's own records and the audit trail.

A record's structured fields travel in the LogRecord attribute `telemetry_guard` (a dict), the
convention of interceptors/audit.py: the audit log's message is already that dict as JSON text,
so it is reused, not encoded twice. Exceptions are logged by type and frames only: an
exception's message can quote the data it failed on, and no removed value may reach a log.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from typing import IO, Any

from telemetry_guard.interceptors.audit import AUDIT_LOGGER_NAME, Sink

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

    def audit_line(self, levelname: str, name: str, pid: int | None, message: str, created: float) -> str:
        """The line of an audit record whose message is json.dumps of its fields (spliced, not re-encoded).

        json.dumps of the head, its closing brace left out, then the message's fields: the time text is made
        once per second, the level, logger and pid part once per logger (an audit record is written per message).
        """
        whole = int(created)
        second, stamp = self._stamp
        if whole != second:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
            self._stamp = (whole, stamp)
        key = (levelname, name, pid)
        rest = self._heads.get(key)
        if rest is None:
            rest = self._heads[key] = json.dumps({"level": levelname.lower(), "logger": name, "pid": pid})[1:-1]
        msecs = int((created - whole) * 1000)  # as logging.LogRecord computes it
        if len(message) > 2:
            return f'{{"time": "{stamp}.{msecs:03d}Z", {rest}, {message[1:]}'
        return f'{{"time": "{stamp}.{msecs:03d}Z", {rest}}}'

    def format(self, record: logging.LogRecord) -> str:
        extra = getattr(record, FIELDS, None)
        message = record.getMessage()
        if record.name == AUDIT_LOGGER_NAME and isinstance(extra, dict) and message.startswith("{"):
            return self.audit_line(record.levelname, record.name, record.process, message, record.created)
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


_configured: list[logging.StreamHandler[IO[str]]] = []  # the handler configure() installed


def configure(level: str = "info", stream: IO[str] | None = None) -> None:
    """JSON lines on `stream` (stderr) for every logger; DEBUG also logs removed key names (audit)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    _configured[:] = [handler]
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


def audit_sink() -> Sink | None:
    """The audit trail's lines written straight to the stream configure() set up: the same text as
    through logging, without a LogRecord and a handler chain per message (about a tenth of the
    sidecar's CPU per message). None before configure() (the audit trail then goes through
    logging). Call it in the process that writes (after any fork: the pid is taken here)."""
    if not _configured:
        return None
    handler = _configured[0]
    formatter = handler.formatter
    if not isinstance(formatter, JsonFormatter):
        return None
    pid = os.getpid()
    stream = handler.stream
    lock = handler.lock or threading.RLock()  # whole lines, between the records other threads log through it
    names = {level: logging.getLevelName(level) for level in (logging.DEBUG, logging.INFO, logging.WARNING)}
    line = formatter.audit_line

    def write(level: int, message: str) -> None:
        text = line(names.get(level) or logging.getLevelName(level), AUDIT_LOGGER_NAME, pid, message, time.time())
        with lock:
            stream.write(text + "\n")
            stream.flush()

    return write

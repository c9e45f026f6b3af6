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

from telemetry_guard.interceptors.audit import AUDIT_LOGGER_NAME

FIELDS = "telemetry_guard"  # the LogRecord attribute holding a record's structured fields
LEVELS = ("debug", "info", "warning", "error")
_MILLIS = tuple(f"{n:03d}" for n in range(1000))  # a line's milliseconds, as "%03d" writes them


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a structured record: log.info("serving", extra=fields(port=port))."""
    return {FIELDS: values}


def _seconds(whole: int) -> str:
    """The time text of a line up to its milliseconds (UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def _head(levelname: str, name: str, pid: int | None) -> str:
    """The level, logger and pid of a line, as json.dumps of the head writes them (no braces)."""
    return json.dumps({"level": levelname.lower(), "logger": name, "pid": pid})[1:-1]


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "pid", "message", ...fields} on one line."""

    def __init__(self) -> None:
        super().__init__()
        self._stamp = (-1, "")  # (second, its time text): one attribute, replaced whole
        self._heads: dict[tuple[str, str, int | None], str] = {}

    def audit_line(self, levelname: str, name: str, pid: int | None, message: str, created: float) -> str:
        """The line of an audit record whose message is json.dumps of its fields (spliced, not re-encoded).

        json.dumps of the head, its closing brace left out, then the message's fields: the time text is made
        once per second, the level, logger and pid part once per logger. (The sidecar's own audit trail does not
        come here: its AuditSink makes each line in one format, with the same parts.)
        """
        whole = int(created)
        second, stamp = self._stamp
        if whole != second:
            stamp = _seconds(whole)
            self._stamp = (whole, stamp)
        key = (levelname, name, pid)
        rest = self._heads.get(key)
        if rest is None:
            rest = self._heads[key] = _head(levelname, name, pid)
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


class AuditSink:
    """The audit trail's lines written straight to the stream configure() set up: the text logging writes, without
    a LogRecord and a handler chain per record (an audit record is written per message).

    opening() is a line's head (time, level, logger, pid) followed by the record's fields, which the record's
    encoder writes in the same format (interceptors.audit.DecisionLines): one pass over a line. The line up to its
    milliseconds is made once per second, the rest of the head once per level, and the milliseconds are looked up,
    not formatted.
    """

    __slots__ = ("_flush", "_heads", "_lock", "_pid", "_prefix", "_second", "_write")

    def __init__(self, stream: IO[str], lock: threading.RLock, pid: int) -> None:
        self._write = stream.write
        self._flush = stream.flush
        self._lock = lock
        self._pid = pid
        self._heads: dict[int, str] = {}  # level -> 'Z", "level": ..., "pid": ..., ': the head after the time
        self._second = -1
        self._prefix = ""  # the line up to its milliseconds, in that second

    def opening(self, level: int) -> str:
        now = time.time()
        whole = int(now)
        if whole != self._second:
            self._prefix = f'{{"time": "{_seconds(whole)}.'
            self._second = whole
        head = self._heads.get(level)
        if head is None:
            head = self._heads[level] = f'Z", {_head(logging.getLevelName(level), AUDIT_LOGGER_NAME, self._pid)}, '
        return self._prefix + _MILLIS[int((now - whole) * 1000)] + head  # msecs as LogRecord computes them

    def write(self, line: str) -> None:
        with self._lock:  # whole lines, between the records other threads log through the handler
            self._write(line + "\n")
            self._flush()


def audit_sink() -> AuditSink | None:
    """The audit trail's sink on the stream configure() set up (about a tenth of the sidecar's CPU per message
    if it went through logging). None before configure() (the audit trail then goes through logging). Call it in
    the process that writes (after any fork: the pid is taken here)."""
    if not _configured:
        return None
    handler = _configured[0]
    if not isinstance(handler.formatter, JsonFormatter):
        return None
    return AuditSink(handler.stream, handler.lock or threading.RLock(), os.getpid())

"""Where one payload's microseconds go in the running sidecar, beside the bare pass-through proxy.

    python -m bench.profile                 # 100-event payloads, one stream, 8 s per proxy
    python -m bench.profile --seconds 20    # steadier figures
    python -m bench.profile --workers 2     # both proxies with two serving processes

It starts the upstream, the pass-through proxy and `telemetry-guard serve` (one worker unless
--workers says more; the default policy and logging) as bench.sidecar does, drives one RecordEvents stream of 100-event
payloads from bench/workload.py through each proxy in turn, and samples the proxy's processes
with Linux `perf record` while it does. Each sample is charged to the shared object it was
taken in (the C walk of policy/_wirefilter.c, the Python interpreter, protobuf's upb, grpc's
core, libc, the kernel) and the table gives microseconds of CPU per payload: samples times the
sampling period, over the payloads sent. "Python" is the interpreter running the proxy's own
code and asyncio; what Python code calls in C is charged to that C.

It needs `perf` (Debian's linux-perf) and the right to sample another process (root, or
kernel.perf_event_paranoid at 1 or lower); without them it says so and exits 2. A sample
period is 1/FREQ seconds of one core's time, so the figures carry perf's own overhead (a few
per cent) alike for both proxies.

With --python (py-spy: `pip install -e '.[profile]'`), a second run of each proxy is sampled by
py-spy instead, and a second table charges each sample to the Python function that was running,
the C it called included (the C walk shows as FastPlan.filter, grpc's writes as the line that
awaits them): where the interpreter's share of the first table goes, function by function.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.sidecar import Process, _children, drive, start_passthrough, start_sidecar, start_upstream

BATCH = 100
FREQ = 4000  # samples per second of CPU time
PY_RATE = 1000  # py-spy's samples per second of a running thread
TOP = 15  # functions in the Python table

# Shared objects by what they do, in the order of the table; anything else is "other".
GROUPS = (
    ("C walk (_wirefilter)", ("_wirefilter",)),
    ("Python interpreter", ("libpython", "python3")),
    ("protobuf (upb)", ("_message.abi3",)),
    ("grpc core (cygrpc)", ("cygrpc",)),
    ("libc (memcpy, malloc)", ("libc.so", "libc-")),
    ("kernel (sockets, scheduling)", ("[kernel", "kallsyms")),
)


def _group(dso: str) -> str:
    for name, needles in GROUPS:
        if any(needle in dso for needle in needles):
            return name
    return "other"


def _samples_by_group(data: Path) -> dict[str, int]:
    """perf report's sample counts per shared object, added up by group."""
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "-n", "--sort", "dso", "--stdio"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    counts: collections.Counter[str] = collections.Counter()
    for line in report.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith("%") and parts[1].isdigit():
            counts[_group(" ".join(parts[2:]))] += int(parts[1])
    return dict(counts)


async def _profile(proxies: list[Process], seconds: float, out: Path) -> tuple[int, dict[str, int]]:
    """(payloads sent, samples by group) for one proxy (its processes, workers included) driven for `seconds`
    under perf."""
    pids = [pid for proxy in proxies for pid in (proxy.process.pid, *_children(proxy.process.pid))]
    perf = subprocess.Popen(
        ["perf", "record", "-F", str(FREQ), "-o", str(out), "-p", ",".join(map(str, pids))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(0.5)  # perf attached
        result = await drive(proxies[0].target, BATCH, 1, seconds, 0.5)
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(30)
    return result.payloads, _samples_by_group(out)


async def _py_profile(proxy: Process, seconds: float, out: Path) -> tuple[int, dict[str, int]]:
    """(payloads sent, py-spy samples by the function running) for one proxy driven for `seconds`."""
    pid = ([*_children(proxy.process.pid)] or [proxy.process.pid])[-1]  # the worker, where the calls run
    duration = str(int(seconds + 2))
    command = ["py-spy", "record", "-p", str(pid), "-r", str(PY_RATE), "-d", duration, "-f", "raw", "-o", str(out)]
    spy = subprocess.Popen([*command, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await asyncio.sleep(1.0)  # py-spy attached
    result = await drive(proxy.target, BATCH, 1, seconds, 0.2)
    spy.wait(seconds + 30)
    counts: collections.Counter[str] = collections.Counter()
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():  # not a stack line (py-spy may write a note of its own into the file)
            continue
        function = _function(stack.rsplit(";", 1)[-1])
        if function is not None:
            counts[function] += int(n)
    return result.payloads, dict(counts)


# Frames where a thread waits rather than runs (py-spy counts a thread in epoll_wait as active).
WAITING = ("EpollSelector.select", "Thread.run")


def _function(frame: str) -> str | None:
    """'name (path:line)' as 'name (path)'; None for a frame that waits."""
    name, _, where = frame.partition(" (")
    if name in WAITING:
        return None
    return f"{name} ({where.split(':', 1)[0]})" if where else name


def _perf_usable() -> str | None:
    """Why perf cannot sample here, or None."""
    if shutil.which("perf") is None:
        return "perf is not installed (Debian: apt-get install linux-perf)"
    paranoid = Path("/proc/sys/kernel/perf_event_paranoid")
    if os.geteuid() != 0 and paranoid.exists() and int(paranoid.read_text()) > 1:
        return "perf may not sample other processes here (kernel.perf_event_paranoid > 1; run as root)"
    return None


Found = dict[str, tuple[int, dict[str, int]]]  # proxy -> (payloads, samples by group or function)


async def _run(seconds: float, python: bool, workers: int) -> tuple[Found, Found]:
    upstream = start_upstream()
    found: Found = {}
    functions: Found = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("pass-through", "sidecar"):
                proxies = (
                    start_passthrough(upstream.target, workers)
                    if name == "pass-through"
                    else [start_sidecar(upstream.target, workers)]
                )
                try:
                    await drive(proxies[0].target, BATCH, 1, 1.0, 0.5)  # warm-up, not sampled
                    found[name] = await _profile(proxies, seconds, Path(tmp) / f"{name}.data")
                    if python:
                        functions[name] = await _py_profile(proxies[0], seconds, Path(tmp) / f"{name}.txt")
                finally:
                    for proxy in proxies:
                        proxy.stop()
    finally:
        upstream.stop()
    return found, functions


def _per_payload(found: Found, rate: int) -> tuple[dict[str, float], dict[str, float]]:
    """(pass-through, sidecar): us per payload of each group or function, from samples taken `rate` times a second."""
    period_us = 1e6 / rate
    per = {
        proxy: {name: n * period_us / max(1, payloads) for name, n in samples.items()}
        for proxy, (payloads, samples) in found.items()
    }
    return per["pass-through"], per["sidecar"]


def table(found: Found) -> list[str]:
    """The markdown table: us of CPU per payload by group, for each proxy, and the difference."""
    names = [name for name, _ in GROUPS] + ["other"]
    base, side = _per_payload(found, FREQ)
    lines = [
        "| where | pass-through us/payload | sidecar us/payload | sidecar - pass-through |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        a, b = base.get(name, 0.0), side.get(name, 0.0)
        if a or b:
            lines.append(f"| {name} | {a:,.0f} | {b:,.0f} | {b - a:+,.0f} |")
    total_a, total_b = sum(base.values()), sum(side.values())
    lines.append(f"| **all** | **{total_a:,.0f}** | **{total_b:,.0f}** | **{total_b - total_a:+,.0f}** |")
    return lines


def python_table(functions: Found) -> list[str]:
    """The TOP functions by the sidecar's us per payload (py-spy), beside the pass-through's."""
    base, side = _per_payload(functions, PY_RATE)
    lines = [
        "| Python function running (with the C it calls) | pass-through us/payload | sidecar us/payload |",
        "|---|---:|---:|",
    ]
    for name in sorted(side, key=side.__getitem__, reverse=True)[:TOP]:
        lines.append(f"| `{name}` | {base.get(name, 0.0):,.1f} | {side[name]:,.1f} |")
    lines.append(f"| all functions | {sum(base.values()):,.0f} | {sum(side.values()):,.0f} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="sampled seconds per proxy (default: 8)")
    parser.add_argument("--python", action="store_true", help="also sample with py-spy, function by function")
    parser.add_argument("--workers", type=int, default=1, help="serving processes of each proxy (default: 1)")
    args = parser.parse_args(argv)
    if args.workers < 1 or (args.python and args.workers != 1):
        parser.error("--workers: 1 or more, and 1 with --python (py-spy samples one serving process)")
    why = _perf_usable()
    if why is None and args.python and shutil.which("py-spy") is None:
        why = "py-spy is not installed (pip install -e '.[profile]')"
    if why is not None:
        print(f"bench.profile: {why}", file=sys.stderr)
        return 2
    found, functions = asyncio.run(_run(args.seconds, args.python, args.workers))
    workers = "one worker" if args.workers == 1 else f"{args.workers} workers"
    print(
        f"# one payload in the running sidecar: {BATCH}-event payloads, one stream, {workers}, "
        f"{args.seconds:g} s sampled at {FREQ} Hz per proxy"
    )
    _print(table(found), found, "sampled")
    if functions:
        _print(python_table(functions), functions, f"sampled by py-spy at {PY_RATE} Hz")
    return 0


def _print(lines: list[str], found: Found, sampled: str) -> None:
    """A table, then how many payloads each proxy's figures cover."""
    print()
    for line in lines:
        print(line)
    print()
    for proxy, (payloads, _) in found.items():
        print(f"{proxy}: {payloads:,} payloads {sampled}")


if __name__ == "__main__":
    sys.exit(main())

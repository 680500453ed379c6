"""Printing helpers shared by the benchmark scripts."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform as host_platform
from pathlib import Path

from bench._load import Result, percentile
from bench._stack import tree_state


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:,.{digits}f}"


def p50(r: Result) -> float:
    return percentile(r.latencies, 50)


def p99(r: Result) -> float:
    return percentile(r.latencies, 99)


def cpu_per_req(r: Result) -> float | None:
    return r.cpu * 1000 / r.ok if r.cpu is not None and r.ok else None


def redis_us_per_req(r: Result) -> float | None:
    """Redis CPU (every client's work during the window: the platform's scripts, the usage
    writer's reads) per answer, in microseconds."""
    return r.redis_cpu * 1e6 / r.ok if r.redis_cpu is not None and r.ok else None


def core_other(r: Result) -> str:
    return f"{r.core_other / r.elapsed:.0%}" if r.core_other is not None and r.elapsed else "-"


def client_busy(r: Result) -> str:
    """How busy the client core was: near 100% means the load generator, the fake upstream and
    the usage writer, not the platform, bounded the req/s of that side."""
    return f"{r.client_busy / r.elapsed:.0%}" if r.client_busy is not None and r.elapsed else "-"


def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "FAIL")


def header(title: str, details: str) -> None:
    print()
    print(f"{title}, {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {host_platform.node()}, "
          f"{os.cpu_count()} cores, Python {host_platform.python_version()}; {details}; {tree_state()}")
    print()


def table(columns: list[tuple[str, int]], rows: list[list[str]]) -> None:
    print(" | ".join(name.rjust(width) for name, width in columns))
    print("-+-".join("-" * width for _, width in columns))
    for cells in rows:
        print(" | ".join(cell.rjust(width) for cell, (_, width) in zip(cells, columns, strict=True)))


def print_problems(results: list[Result], label=lambda r: r.target) -> int:
    """Every failed request, by cell, with samples; returns how many failed."""
    bad = [r for r in results if r.bad]
    total = sum(r.sent for r in results)
    if not bad:
        print(f"\nErrors: none ({total:,} requests, every answer 200 and complete).")
        return 0
    print(f"\nErrors: {sum(r.bad for r in bad):,} of {total:,} requests failed:")
    for r in bad:
        kinds = [f"HTTP {s} x{n}" for s, n in sorted(r.statuses.items())]
        kinds += [f"{k} x{n}" for k, n in r.problems.most_common()]
        print(f"  {label(r)} {'stream' if r.stream else 'non-stream'} c={r.concurrency}: {', '.join(kinds)}")
        for sample in r.samples:
            print(f"      e.g. {sample}")
    return sum(r.bad for r in bad)


NOISE = ("Started server process", "Waiting for application startup", "Application startup complete",
         "Uvicorn running on", "Shutting down", "Waiting for application shutdown",
         "Application shutdown complete", "Finished server process", "usage writer ")


def log_problems(paths: list[Path], name: str) -> None:
    """Warnings and errors logged (LOG_LEVEL=WARNING keeps only those), over one or more logs."""
    lines = []
    for path in paths:
        try:
            lines += [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            continue
    lines = [line for line in lines if not any(n in line for n in NOISE)]
    if lines:
        print(f"\n{name} logged {len(lines)} line(s) at WARNING or above; the first ones:")
        for line in lines[:5]:
            print(f"  {line[:300]}")
            error = _exception_of(line)
            if error:
                print(f"    raised at {error}")


def _exception_of(line: str) -> str:
    """Where a JSON log line's exception was raised, and what it was: the traceback's last two lines."""
    try:
        record = json.loads(line)
    except ValueError:
        return ""
    trace = [part.strip() for part in str(record.get("exc") or "").splitlines() if part.strip()]
    return " / ".join(trace[-2:])


def warn_busy(results: list[Result], limit: float = 0.15) -> None:
    busy = [r.core_other / r.elapsed for r in results if r.core_other is not None and r.elapsed]
    if busy and max(busy) > limit:
        print(f"\nWARNING: other processes used up to {max(busy):.0%} of the platform's core during the "
              f"measured windows (column core0 other): the platform's req/s and latencies are lower than "
              f"on a quiet machine; its CPU ms/request is the figure least affected.")


def gw_note(overridden: tuple[str, ...] = ()) -> None:
    gw_vars = sorted(k for k in os.environ if k.startswith("GW_"))
    if gw_vars:
        text = ", ".join(f"{k} (overridden per side)" if k in overridden else k for k in gw_vars)
        print(f"\nNote: GW_* settings inherited from the environment: {text}")

"""The load generator of the benchmarks: closed-loop workers over one aiohttp session per target.

Each worker sends the next request when its previous answer is complete; answers are checked
(status, `choices` and `usage`, a stream's usage event and final `[DONE]`, and any response
header the target expects) and timed from just before sending to the last byte, and to the first
`data:` event for streams. `run_phase` measures one target (bench/overhead.py);
`run_interleaved` measures several in alternating slices (bench/limits.py, bench/resilience.py).
"""

from __future__ import annotations

import asyncio
import math
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

from bench._stack import ROUTE, core_busy_seconds, cpu_seconds

CHUNKS = 20
REQUEST_TIMEOUT = 30.0
MESSAGES = [{"role": "user", "content": "hello benchmark"}]


# -- load generation ------------------------------------------------------------------------

@dataclass
class Target:
    name: str  # "direct" or "platform"
    url: str
    model: str
    key: str
    pid: int | None = None  # the process whose CPU is charged to this path (platform only)
    headers: dict = field(default_factory=dict)  # extra request headers (e.g. Idempotency-Key)
    expect: dict = field(default_factory=dict)  # response headers every good answer must carry
    protocol: str = "openai"  # the front door's: openai (chat completions), anthropic, responses


@dataclass
class Result:
    target: str
    stream: bool
    concurrency: int
    ok: int = 0  # good answers completed inside the measured window
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)  # ms, good answers in the window
    ttfts: list[float] = field(default_factory=list)  # ms, streams only
    sent: int = 0  # every request of the phase, warm-up included
    good: int = 0  # good answers of the phase, warm-up included
    statuses: Counter = field(default_factory=Counter)  # non-200 statuses (whole phase)
    problems: Counter = field(default_factory=Counter)  # exceptions, broken answers (whole phase)
    samples: list[str] = field(default_factory=list)  # first few bad answers, for diagnosis
    cpu: float | None = None  # CPU seconds of the target process inside the window
    core_other: float | None = None  # platform core busy time not spent by the platform
    redis_cpu: float | None = None  # Redis's CPU seconds inside the window (every client's work)
    client_busy: float | None = None  # busy seconds of the client core (load, upstream, writer) inside the window
    by_role: dict[str, float] = field(default_factory=dict)  # CPU seconds inside the window, by process role
    # run_interleaved: (seconds, answers, p50, target's CPU seconds or None) per measured slice
    slices: list[tuple[float, int, float, float | None]] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def bad(self) -> int:
        return sum(self.statuses.values()) + sum(self.problems.values())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = math.ceil(q / 100 * len(ordered))  # nearest rank
    return ordered[max(0, min(len(ordered), rank) - 1)]


def request_body(model: str, stream: bool, protocol: str = "openai") -> bytes:
    if protocol == "anthropic":  # /v1/messages
        return orjson.dumps({"model": model, "max_tokens": 256, "messages": MESSAGES, "stream": stream})
    if protocol == "responses":  # /v1/responses
        return orjson.dumps({"model": model, "input": MESSAGES, "stream": stream, "store": False})
    body: dict = {"model": model, "messages": MESSAGES, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def check_answer(stream: bool, body: bytes, protocol: str = "openai") -> str | None:
    """Why a 200 answer is not a complete, well-formed one (None when it is)."""
    if protocol == "anthropic":
        if stream:
            if not body.endswith(b'data: {"type":"message_stop"}\n\n'):
                return "stream without message_stop"
            return None if body.count(b"event: content_block_delta") >= CHUNKS else "stream with missing events"
        return None if b'"content"' in body and b'"output_tokens"' in body else "answer without content or usage"
    if protocol == "responses":
        if stream:
            if b"event: response.completed" not in body:
                return "stream without response.completed"
            return None if body.count(b"event: response.output_text.delta") >= CHUNKS else "stream with missing events"
        return None if b'"output"' in body and b'"output_tokens"' in body else "answer without output or usage"
    if stream:
        if not body.endswith(b"data: [DONE]\n\n"):
            return "stream without [DONE]"
        if body.count(b"data: ") < CHUNKS + 3:
            return "stream with missing events"
        if b'"completion_tokens"' not in body:
            return "stream without usage"
        return None
    if b'"choices"' not in body or b'"completion_tokens"' not in body:
        return "answer without choices or usage"
    return None


async def one_request(session: aiohttp.ClientSession, target: Target, body: bytes, headers: dict,
                      stream: bool, result: Result, window: list) -> None:
    started = time.perf_counter()
    ttft = None
    try:
        async with session.post(target.url, data=body, headers=headers) as response:
            if stream and response.status == 200:
                parts = []
                async for data in response.content.iter_any():
                    if ttft is None and b"data:" in (b"".join(parts) + data if parts else data):
                        ttft = time.perf_counter() - started
                    parts.append(data)
                payload = b"".join(parts)
            else:
                payload = await response.read()
            status = response.status
            answer_headers = response.headers
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        result.problems[type(exc).__name__] += 1
        if len(result.samples) < 3:
            result.samples.append(f"{type(exc).__name__}: {exc}")
        return
    finished = time.perf_counter()
    if status != 200:
        result.statuses[status] += 1
        if len(result.samples) < 3:
            result.samples.append(f"HTTP {status}: {payload[:300].decode(errors='replace')}")
        return
    problem = check_answer(stream, payload, target.protocol)
    if problem is not None:
        result.problems[problem] += 1
        if len(result.samples) < 3:
            result.samples.append(f"{problem}: …{payload[-300:].decode(errors='replace')}")
        return
    for name, value in target.expect.items():
        if answer_headers.get(name) != value:
            problem = f"{name} not {value}"
            result.problems[problem] += 1
            if len(result.samples) < 3:
                result.samples.append(f"{problem}: got {answer_headers.get(name)!r}")
            return
    result.good += 1
    window.append((finished, (finished - started) * 1000, None if ttft is None else ttft * 1000))


async def run_phase(target: Target, stream: bool, concurrency: int, warmup: float, duration: float,
                    platform_cpu: int | None) -> Result:
    """C workers in a closed loop for warmup + duration seconds; the window is the last part."""
    result = Result(target.name, stream, concurrency)
    body = request_body(target.model, stream, target.protocol)
    headers = {"Authorization": f"Bearer {target.key}", "Content-Type": "application/json", **target.headers}
    window: list[tuple[float, float, float | None]] = []
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    marks: dict[str, tuple[float, float | None, float | None]] = {}

    def mark(name: str) -> None:
        proc_cpu = cpu_seconds(target.pid) if target.pid else None
        core = core_busy_seconds(platform_cpu) if platform_cpu is not None else None
        marks[name] = (time.perf_counter(), proc_cpu, core)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        start = time.perf_counter()
        stop_at = start + warmup + duration

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                result.sent += 1
                await one_request(session, target, body, headers, stream, result, window)

        async def marker() -> None:
            await asyncio.sleep(max(0.0, start + warmup - time.perf_counter()))
            mark("begin")
            await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
            mark("end")

        everything = asyncio.gather(marker(), *(worker() for _ in range(concurrency)))
        # On Ctrl-C the workers are cancelled: mark the outcome seen, so asyncio does not log it.
        everything.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.wait_for(everything, timeout=warmup + duration + REQUEST_TIMEOUT + 10)
    (t0, cpu0, core0), (t1, cpu1, core1) = marks["begin"], marks["end"]
    inside = [w for w in window if t0 <= w[0] <= t1]
    result.elapsed = t1 - t0
    result.ok = len(inside)
    result.latencies = [w[1] for w in inside]
    result.ttfts = [w[2] for w in inside if w[2] is not None]
    if cpu0 is not None and cpu1 is not None:
        result.cpu = cpu1 - cpu0
        if core0 is not None and core1 is not None:
            result.core_other = max(0.0, (core1 - core0) - result.cpu)
    return result


# Set by the harness: Redis's own CPU seconds so far (INFO cpu), read at each slice's edges.
redis_cpu_seconds: Callable[[], float | None] | None = None


# Set by the harness: the core of the load generator, fake upstream and usage writer.
client_core: int | None = None


# Set by the harness: {pid: (role, CPU seconds so far)} of the processes around the platform
# (the platform processes under the role PLATFORM_ROLE), read at each slice's edges.
process_cpu: Callable[[], dict[int, tuple[str, float]]] | None = None
PLATFORM_ROLE = "platform"
OTHER_PLATFORM_ROLE = "other platform"  # a platform process other than the measured one


def _mark(pid: int | None, platform_cpu: int | None) -> tuple:
    return (time.perf_counter(), cpu_seconds(pid) if pid else None,
            core_busy_seconds(platform_cpu) if platform_cpu is not None else None,
            redis_cpu_seconds() if redis_cpu_seconds is not None else None,
            core_busy_seconds(client_core) if client_core is not None else None,
            process_cpu() if process_cpu is not None else None)


def _add_roles(by_role: dict[str, float], target_pid: int | None, begin: dict | None, end: dict | None) -> None:
    """Each process's CPU inside the window under its role; the platform processes other than
    the target's (the side without load) under "other platform". Processes that started or
    ended inside the window are left out."""
    if begin is None or end is None:
        return
    for pid, (role, before) in begin.items():
        if pid not in end:
            continue
        if role == PLATFORM_ROLE and pid != target_pid:
            role = OTHER_PLATFORM_ROLE
        by_role[role] = by_role.get(role, 0.0) + end[pid][1] - before


async def _slice(session: aiohttp.ClientSession, target: Target, stream: bool, concurrency: int,
                 seconds: float, platform_cpu: int | None, result: Result, measured: bool) -> None:
    """C workers on one target for `seconds`; answers completed inside are added to `result`
    when `measured` (requests in flight at the end finish, uncounted, before the next slice)."""
    body = request_body(target.model, stream, target.protocol)
    headers = {"Authorization": f"Bearer {target.key}", "Content-Type": "application/json", **target.headers}
    window: list[tuple[float, float, float | None]] = []
    begin = _mark(target.pid, platform_cpu)
    stop_at = begin[0] + seconds

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            result.sent += 1
            await one_request(session, target, body, headers, stream, result, window)

    async def marker():
        await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
        return _mark(target.pid, platform_cpu)

    everything = asyncio.gather(marker(), *(worker() for _ in range(concurrency)))
    everything.add_done_callback(lambda f: f.cancelled() or f.exception())
    end = (await asyncio.wait_for(everything, timeout=seconds + REQUEST_TIMEOUT + 10))[0]
    if not measured:
        return
    inside = [w for w in window if w[0] <= end[0]]
    result.elapsed += end[0] - begin[0]
    result.ok += len(inside)
    result.latencies += [w[1] for w in inside]
    result.ttfts += [w[2] for w in inside if w[2] is not None]
    cpu = None
    if begin[1] is not None and end[1] is not None:
        cpu = end[1] - begin[1]
        result.cpu = (result.cpu or 0.0) + cpu
        if begin[2] is not None and end[2] is not None:
            result.core_other = (result.core_other or 0.0) + max(0.0, end[2] - begin[2] - cpu)
    if begin[3] is not None and end[3] is not None:
        result.redis_cpu = (result.redis_cpu or 0.0) + end[3] - begin[3]
    if begin[4] is not None and end[4] is not None:
        result.client_busy = (result.client_busy or 0.0) + end[4] - begin[4]
    _add_roles(result.by_role, target.pid, begin[5], end[5])
    result.slices.append((end[0] - begin[0], len(inside), percentile([w[1] for w in inside], 50), cpu))


async def run_interleaved(targets: list[Target], stream: bool, concurrency: int, warmup: float, duration: float,
                          platform_cpu: int | None, slice_s: float = 0.5) -> list[Result]:
    """Several targets in turns of `slice_s` seconds each, the order reversed every other turn
    (A B C | C B A | A B …), so that the machine's changing load hits them alike: `warmup`
    unmeasured, then `duration` measured seconds each. C workers per target, each target with
    its own keep-alive session for the whole cell (a turn must stay under the servers'
    keep-alive timeout: uvicorn's is 5 s)."""
    results = [Result(t.name, stream, concurrency) for t in targets]
    warm_turns = math.ceil(warmup / slice_s) if warmup > 0 else 0
    turns = max(1, math.ceil(duration / slice_s))
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency),
                                      timeout=timeout, auto_decompress=False) for _ in targets]
    try:
        for turn in range(warm_turns + turns):
            order = range(len(targets)) if turn % 2 == 0 else reversed(range(len(targets)))
            for i in order:
                await _slice(sessions[i], targets[i], stream, concurrency, slice_s, platform_cpu, results[i],
                             measured=turn >= warm_turns)
    finally:
        for session in sessions:
            await session.close()
    return results


def first_request(url: str, key: str, model: str = ROUTE, headers: dict | None = None) -> tuple[float, dict]:
    """Latency (ms) and headers of one chat request (the platform's very first, or the one that
    stores an idempotent answer); fails loudly if it is refused or incomplete."""
    request = urllib.request.Request(url, data=request_body(model, False), method="POST", headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json", **(headers or {})})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            payload = response.read()
            answer_headers = {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"the first request through the platform failed: HTTP {exc.code} {exc.read()[:500]!r}") from None
    elapsed = (time.perf_counter() - started) * 1000
    problem = check_answer(False, payload)
    if problem:
        raise RuntimeError(f"the first request through the platform: {problem}: {payload[:500]!r}")
    return elapsed, answer_headers


def merge(parts: list[Result]) -> Result:
    """One cell measured over several visits (platform processes): windows and counts added up."""
    first = parts[0]
    out = Result(first.target, first.stream, first.concurrency)
    for r in parts:
        out.ok += r.ok
        out.elapsed += r.elapsed
        out.latencies += r.latencies
        out.ttfts += r.ttfts
        out.sent += r.sent
        out.good += r.good
        out.statuses.update(r.statuses)
        out.problems.update(r.problems)
        out.samples += r.samples[: max(0, 3 - len(out.samples))]
        if r.cpu is not None:
            out.cpu = (out.cpu or 0.0) + r.cpu
        if r.core_other is not None:
            out.core_other = (out.core_other or 0.0) + r.core_other
        if r.redis_cpu is not None:
            out.redis_cpu = (out.redis_cpu or 0.0) + r.redis_cpu
        if r.client_busy is not None:
            out.client_busy = (out.client_busy or 0.0) + r.client_busy
        out.slices += r.slices
        for role, seconds in r.by_role.items():
            out.by_role[role] = out.by_role.get(role, 0.0) + seconds
    return out

"""The platform's own overhead: the same chat request sent direct to a fast fake upstream and
through the platform, closed-loop, on one core each; prints one table and the targets.

    .venv/bin/python bench/overhead.py [--duration 5] [--concurrency 1,8,32]
                                        [--server uvicorn|daphne] [--quick]
                                        [--baseline REF [--rounds 2] [--slice 0.5]]

What runs (bench/README.md has the details and the meaning of each column):
- PostgreSQL and Redis: DATABASE_URL / REDIS_URL if set, else the machine's on their default
  ports, else embedded ones started for this run. The benchmark uses its own database
  (`gw_bench`, dropped and created at start) and Redis db 15 (flushed at start and end).
- a fake OpenAI-compatible upstream (bench/fake_upstream.py: precomputed bytes, no delay,
  20 chunks per stream), the usage writer and this load generator on the second core;
- one platform process (uvicorn, or daphne) on the first core, with authentication and usage
  recording on, as in production.
Everything started here is stopped on exit, also on Ctrl-C, SIGTERM or an error; the whole run
is bounded by an alarm. Only loopback addresses are used. bench/_stack.py starts the stack,
bench/_load.py sends the load.

With --baseline REF (a commit, HEAD~1, a branch) there is no direct path: commit REF is
extracted into the run's temporary folder and each round starts two platform processes on the
platform core, `before` from that checkout and `after` from this working tree; in every cell
the load alternates between them in slices (before after | after before | …), as in
bench/limits.py, and the table gives both sides, after/before req/s, the p50 difference and a
verdict against issue 19's targets (within 3% req/s, within 0.1 ms p50). `--baseline HEAD` on
a clean tree is the A/A run: what two identical trees differ by is the noise floor.
"""

from __future__ import annotations

import argparse
import math
import signal
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import Bench, Platform, run_bench  # noqa: E402
from bench._load import (  # noqa: E402
    CHUNKS,
    Result,
    Target,
    first_request,
    merge,
    percentile,
    run_interleaved,
    run_phase,
)
from bench._report import (  # noqa: E402
    core_other,
    cpu_per_req,
    fmt,
    gw_note,
    header,
    log_problems,
    p50,
    p99,
    print_problems,
    table,
    verdict,
    warn_busy,
)
from bench._stack import (  # noqa: E402
    DB_NAME,
    REDIS_DB,
    ROOT,
    ROUTE,
    ROUTES_YAML,
    UPSTREAM_KEY,
    UPSTREAM_KEY_ENV,
    UPSTREAM_MODEL,
    cpu_seconds,
    migrations,
    say,
    start_profile,
    tree_state,
    vm_hwm_mib,
)

TARGETS = {"rps": 400.0, "streams": 300.0, "added_p50_ms": 2.0, "rss_mib": 150.0}
# --baseline: issue 19's "no regression beyond noise", after (this tree) against before (REF)
BASELINE_TARGETS = {"rps_ratio": 0.97, "p50_ms": 0.1}
SIDES = ("before", "after")
BASELINE_DB = DB_NAME + "_base"  # REF's own database, when its migrations differ from this tree's


# -- report ---------------------------------------------------------------------------------

def print_table(pairs: list[tuple[Result, Result]]) -> None:
    columns = [
        ("mode", 10), ("c", 3), ("direct req/s", 12), ("platform req/s", 14), ("ratio", 6),
        ("direct p50", 10), ("direct p99", 10), ("plat p50", 9), ("plat p99", 9), ("added p50", 9),
        ("TTFT p50 dir", 12), ("TTFT p50 plat", 13), ("plat CPU ms/req", 15), ("core0 other", 11),
    ]
    rows = []
    for direct, plat in pairs:
        added = percentile(plat.latencies, 50) - percentile(direct.latencies, 50)
        cells = [
            "stream" if plat.stream else "non-stream", str(plat.concurrency),
            fmt(direct.rps, 0), fmt(plat.rps, 0),
            fmt(plat.rps / direct.rps, 2) if direct.rps else "-",
            fmt(percentile(direct.latencies, 50), 2), fmt(percentile(direct.latencies, 99), 2),
            fmt(percentile(plat.latencies, 50), 2), fmt(percentile(plat.latencies, 99), 2),
            fmt(added, 2),
            fmt(percentile(direct.ttfts, 50), 2) if plat.stream else "-",
            fmt(percentile(plat.ttfts, 50), 2) if plat.stream else "-",
            fmt(plat.cpu * 1000 / plat.ok, 2) if plat.cpu is not None and plat.ok else "-",
            f"{plat.core_other / plat.elapsed:.0%}" if plat.core_other is not None and plat.elapsed else "-",
        ]
        rows.append(cells)
    table(columns, rows)
    print("(latencies in ms; req/s for streams = complete 20-chunk streams per second)")


def print_targets(pairs: list[tuple[Result, Result]], rss: float) -> None:
    def best(stream: bool) -> Result | None:
        candidates = [p for _, p in pairs if p.stream == stream]
        return max(candidates, key=lambda r: r.rps) if candidates else None

    def added_at_c1(stream: bool) -> float | None:
        for d, p in pairs:
            if p.stream == stream and p.concurrency == 1:
                return percentile(p.latencies, 50) - percentile(d.latencies, 50)
        return None

    print("\nTargets (platform on one core):")
    non_stream, streams = best(False), best(True)
    def cpu_bound(r: Result) -> str:
        if r.cpu is None or not r.ok or r.cpu <= 0:
            return ""
        return f"; {r.ok / r.cpu:,.0f}/s if it had the core to itself (1000 / {r.cpu * 1000 / r.ok:.2f} ms CPU)"

    if non_stream:
        print(f"  {verdict(non_stream.rps >= TARGETS['rps'])}  non-streaming req/s >= {TARGETS['rps']:.0f}: "
              f"{non_stream.rps:,.0f} (best, at c={non_stream.concurrency}){cpu_bound(non_stream)}")
    if streams:
        print(f"  {verdict(streams.rps >= TARGETS['streams'])}  streams/s >= {TARGETS['streams']:.0f}: "
              f"{streams.rps:,.0f} (best, at c={streams.concurrency}){cpu_bound(streams)}")
    added = added_at_c1(False)
    print(f"  {verdict(None if added is None or added != added else added <= TARGETS['added_p50_ms'])}  "
          f"added p50 at c=1 <= {TARGETS['added_p50_ms']:.0f} ms: "
          + ("c=1 not run" if added is None else f"{added:.2f} ms non-stream")
          + ("" if added_at_c1(True) is None else f" ({added_at_c1(True):.2f} ms stream, for information)"))
    print(f"  {verdict(rss <= TARGETS['rss_mib'])}  peak RSS <= {TARGETS['rss_mib']:.0f} MiB: {rss:.1f} MiB")


# -- the run --------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure the platform's own overhead (bench/README.md).")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell (default 5)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per cell (default 1, 0.3 with --quick)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrencies (default 1,8,32)")
    parser.add_argument("--server", choices=("uvicorn", "daphne"), default="uvicorn")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 s per cell, c=1,8")
    parser.add_argument("--embedded", action="store_true", help="use embedded PostgreSQL/Redis even if others answer")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="record the platform with py-spy (if installed) during each platform cell, as "
                             "collapsed stacks in DIR (figures are then slightly lower)")
    parser.add_argument("--doors", default="",
                        help="other front doors to measure beside chat completions, on the same lane: "
                             "messages,responses (issue 21's /v1/messages and /v1/responses); default none")
    parser.add_argument("--baseline", metavar="REF", default=None,
                        help="compare this working tree (after) with commit REF (before: HEAD~1, a hash, a branch), "
                             "checked out in a temporary folder, in alternating slices; no direct path")
    parser.add_argument("--baseline-db", choices=("auto", "shared", "own"), default="auto",
                        help=f"with --baseline: REF's PostgreSQL database: {DB_NAME} shared with this tree, or its "
                             f"own {BASELINE_DB}; auto = own when REF's migration files differ (default)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="with --baseline: rounds, each with a fresh pair of processes; --duration is split "
                             "over them (default 2)")
    parser.add_argument("--slice", type=float, default=0.5,
                        help="with --baseline: seconds of load on one side before switching (default 0.5)")
    args = parser.parse_args(argv)
    args.doors = [d.strip() for d in args.doors.split(",") if d.strip()]
    if any(d not in DOORS for d in args.doors):
        parser.error(f"--doors takes {','.join(DOORS)}")
    if args.quick:
        args.duration, args.concurrency = 1.0, "1,8"
    if args.warmup is None:
        args.warmup = 0.3 if args.quick else 1.0
    try:
        args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error("--concurrency takes integers, e.g. 1,8,32")
    if not args.levels or min(args.levels) < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("need concurrency >= 1, duration > 0, warmup >= 0")
    if args.rounds < 1 or not 0.05 <= args.slice <= 2:
        parser.error("need rounds >= 1 and a slice of 0.05 to 2 s (a turn must stay under uvicorn's 5 s keep-alive)")
    args.cells = [(stream, c) for stream in (False, True) for c in args.levels]
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cells = len(args.levels) * 2 * (2 + len(args.doors))
    if args.baseline is not None:
        measured = cells * (args.rounds * (args.warmup + args.slice) + args.duration + 10)
        return run_bench(300 + args.rounds * 90 + measured * 1.5, args.embedded, measure_baseline, args)
    budget = 300 + cells * (args.warmup + args.duration + 15)
    return run_bench(budget, args.embedded, measure, args)


# Other front doors `--doors` measures beside chat completions: (path, protocol of the load).
DOORS = {"messages": ("/v1/messages", "anthropic"), "responses": ("/v1/responses", "responses")}
DOOR_P50_TARGET_MS = 0.3  # issue 21: within 0.3 ms p50 of chat completions at c=1


def measure(bench: Bench, args: argparse.Namespace) -> int:
    upstream_root = bench.start_upstream()
    key = bench.prepare(ROUTES_YAML.format(route=ROUTE, upstream_model=UPSTREAM_MODEL,
                                           base_url=upstream_root, key_env=UPSTREAM_KEY_ENV))
    plat = bench.start_platform(server=args.server)
    bench.start_writer()
    say(f"{args.server} pid {plat.pid} on core {bench.platform_cpu}, upstream + writer + load on core "
        f"{bench.client_cpu}; healthy after {bench.elapsed():.1f} s, RSS {plat.rss_ready:.0f} MiB")
    first_ms = first_request(plat.chat_url, key)[0]

    direct = Target("direct", f"{upstream_root}/chat/completions", UPSTREAM_MODEL, UPSTREAM_KEY)
    through = Target("platform", plat.chat_url, ROUTE, key, pid=plat.pid)
    doors = [Target(door, f"{plat.url}{DOORS[door][0]}", ROUTE, key, pid=plat.pid, protocol=DOORS[door][1])
             for door in args.doors]
    pairs: list[tuple[Result, Result]] = []
    door_pairs: dict[str, list[tuple[Result, Result]]] = {door.name: [] for door in doors}
    results: list[Result] = []

    async def run_all() -> None:
        for stream in (False, True):
            for c in args.levels:
                say(f"{'stream' if stream else 'non-stream'} c={c}: direct, then through the platform "
                    f"({args.warmup:g} s warm-up + {args.duration:g} s each)")
                d = await run_phase(direct, stream, c, args.warmup, args.duration, None)
                bench.check_alive()
                spy = start_profile(bench.procs, args.profile, plat.pid,
                                    f"{'stream' if stream else 'nonstream'}-c{c}", bench.env, bench.client_cpu)
                p = await run_phase(through, stream, c, args.warmup, args.duration, bench.platform_cpu)
                if spy is not None:
                    bench.procs.stop(spy, signal.SIGINT)
                bench.check_alive()
                pairs.append((d, p))
                results.extend((d, p))
                for door in doors:  # the same call through another front door, same lane
                    q = await run_phase(door, stream, c, args.warmup, args.duration, bench.platform_cpu)
                    bench.check_alive()
                    door_pairs[door.name].append((d, q))
                    results.append(q)

    bench.run(run_all)

    rss_peak = vm_hwm_mib(plat.pid)
    cpu_total = cpu_seconds(plat.pid) - plat.cpu_ready
    served = 1 + sum(r.good for r in results if r.target != "direct")  # 1: the first request
    in_windows = [r for r in results if r.target != "direct" and r.cpu is not None]
    window_cpu = sum(r.cpu for r in in_windows)
    window_ok = sum(r.ok for r in in_windows)
    left, pending, rows, cost = bench.usage()
    writer_cpu = cpu_seconds(bench.writer.pid)

    header("Platform overhead", f"server {args.server}; {args.duration:g} s per cell after {args.warmup:g} s "
                                f"warm-up; {CHUNKS}-chunk streams")
    print_table(pairs)
    print()
    print(f"Platform process ({args.server}, pid {plat.pid}): peak RSS (VmHWM) {rss_peak:.1f} MiB "
          f"(at ready {plat.rss_ready:.1f} MiB); CPU {window_cpu:.2f} s for {window_ok:,} answers in the measured "
          f"windows = {window_cpu * 1000 / max(window_ok, 1):.2f} ms/request "
          f"(since ready, warm-ups included: {cpu_total:.2f} s / {served:,} = {cpu_total * 1000 / max(served, 1):.2f} ms/request); "
          f"first request after start {first_ms:.1f} ms")
    print(f"Usage recording: {rows:,} rows in {DB_NAME}.billing_usagerecord for {served:,} good platform "
          f"answers, total cost ${cost}; {left} left in the stream, {pending} pending; "
          f"usage writer CPU {writer_cpu:.2f} s (start-up included) = {writer_cpu * 1000 / max(rows, 1):.2f} ms/row")
    print_targets(pairs, rss_peak)
    for name, door_rows in door_pairs.items():
        print()
        header(f"Through {DOORS[name][0]}", "the same lane and calls; the direct column is the run above")
        print_table(door_rows)
        for (_, chat), (_, door) in zip(pairs, door_rows, strict=True):
            if chat.concurrency == 1:
                gap = p50(door) - p50(chat)
                verdict = "PASS" if gap <= DOOR_P50_TARGET_MS else "FAIL"
                print(f"  {verdict}  {name} {mode(chat.stream)} c=1: p50 {p50(door):.2f} ms vs chat completions "
                      f"{p50(chat):.2f} ms ({gap:+.2f} ms; target <= +{DOOR_P50_TARGET_MS} ms)")
    bad = print_problems(results, label=lambda r: f"{r.target:8s}")
    warn_busy([p for _, p in pairs])
    if rows < served:
        print(f"WARNING: {served - rows} platform answers have no usage row")
        bad = True
    elif rows > served:
        print(f"WARNING: {rows - served} more usage rows than platform answers: something else wrote "
              f"to Redis db {REDIS_DB}'s usage stream during the run")
    gw_note()
    log_problems(bench.platform_logs, "The platform")
    log_problems([bench.logs / "usage_writer.log"], "The usage writer")
    return 1 if bad else 0


# -- --baseline REF: before and after in one run ----------------------------------------------

def mode(stream: bool) -> str:
    return "stream" if stream else "non-stream"


def judge(before: Result, after: Result) -> tuple[float, float, bool]:
    """(after/before req/s, after - before p50 in ms, within the targets)."""
    ratio = after.rps / before.rps if before.rps else float("nan")
    delta = p50(after) - p50(before)
    return ratio, delta, ratio >= BASELINE_TARGETS["rps_ratio"] and delta <= BASELINE_TARGETS["p50_ms"]


# Student's t, two-sided 95%, by degrees of freedom (few slice pairs: wider than 2 standard errors)
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 12: 2.18,
       15: 2.13, 20: 2.09, 30: 2.04, 60: 2.00}


def noise(befores: list[Result], afters: list[Result]) -> tuple[float, float, float]:
    """Half-widths of the ~95% intervals of after/before req/s, of Δp50 and of after/before CPU
    per answer, from the pairs of adjacent slices (one turn of the alternation): t x standard error."""
    ratios, deltas, cpus = [], [], []
    for b, a in zip(befores, afters, strict=True):
        for (tb, nb, pb, cb), (ta, na, pa, ca) in zip(b.slices, a.slices, strict=False):
            if nb and na:
                ratios.append((na / ta) / (nb / tb))
                deltas.append(pa - pb)
                if cb and ca:
                    cpus.append((ca / na) / (cb / nb))

    def half_width(values: list[float]) -> float:
        if len(values) < 3:
            return float("nan")
        t = next((v for df, v in T95.items() if df >= len(values) - 1), 1.96)
        return t * statistics.stdev(values) / math.sqrt(len(values))

    return half_width(ratios), half_width(deltas), half_width(cpus)


def cpu_ratio(before: Result, after: Result) -> float:
    b, a = cpu_per_req(before), cpu_per_req(after)
    return a / b if a and b else float("nan")


def print_baseline_table(cells: list[tuple[bool, int]], runs: dict) -> dict[tuple[bool, int], dict[str, Result]]:
    merged = {cell: {side: merge(runs[side, *cell]) for side in SIDES} for cell in cells}
    columns = [("mode", 10), ("c", 3), ("req/s before", 12), ("req/s after", 11), ("after/before", 12), ("±", 5),
               ("p50 before", 10), ("p50 after", 9), ("Δp50", 6), ("±", 5), ("Δp50 by round", 20), ("p99 before", 10),
               ("p99 after", 9), ("CPU ms/req before", 17), ("after", 5), ("after/before", 12), ("±", 5),
               ("core0 other b/a", 15), ("verdict", 7)]
    rows = []
    for cell in cells:
        before, after = merged[cell]["before"], merged[cell]["after"]
        ratio, delta, ok = judge(before, after)
        ratio_hw, delta_hw, cpu_hw = noise(runs["before", *cell], runs["after", *cell])
        by_round = [p50(a) - p50(b) for b, a in zip(runs["before", *cell], runs["after", *cell], strict=True)]
        rows.append([
            mode(cell[0]), str(cell[1]), fmt(before.rps, 0), fmt(after.rps, 0), fmt(ratio, 3), fmt(ratio_hw, 3),
            fmt(p50(before), 2), fmt(p50(after), 2), f"{delta:+.2f}", fmt(delta_hw, 2),
            " ".join(f"{d:+.2f}" for d in by_round),
            fmt(p99(before), 2), fmt(p99(after), 2), fmt(cpu_per_req(before), 3), fmt(cpu_per_req(after), 3),
            fmt(cpu_ratio(before, after), 3), fmt(cpu_hw, 3),
            f"{core_other(before)} / {core_other(after)}", verdict(ok),
        ])
    table(columns, rows)
    print("(latencies in ms; Δ = after - before; the second after/before is the platform's CPU per answer; ± = ~95% "
          "noise of the figure to its left: t x standard error of the differences between adjacent before/after "
          "slices; req/s for streams = complete 20-chunk streams per second)")
    return merged


def pm(half_width: float, digits: int) -> str:
    return "" if half_width != half_width else f" ±{half_width:.{digits}f}"


def resolution(ok: bool, ratio: float, ratio_hw: float, delta: float, delta_hw: float) -> str:
    """Whether this run's noise lets the verdict stand."""
    t = BASELINE_TARGETS
    if ratio_hw != ratio_hw or delta_hw != delta_hw:
        return "too few slices to estimate the noise"
    if ok:
        if ratio - ratio_hw >= t["rps_ratio"] and delta + delta_hw <= t["p50_ms"]:
            return "the noise interval is inside the targets"
        return "but the noise interval reaches past a target: a regression that size is not excluded"
    if ratio + ratio_hw < t["rps_ratio"] or delta - delta_hw > t["p50_ms"]:
        return "beyond this run's noise"
    return "within this run's noise: not resolved"


def print_baseline_targets(merged: dict, runs: dict, same_code: bool) -> None:
    t = BASELINE_TARGETS
    print(f"\nTargets (issue 19: no regression beyond noise; after against before, platform on one core): "
          f"after/before req/s >= {t['rps_ratio']:.2f}, Δp50 <= +{t['p50_ms']:.1f} ms")
    for (stream, c), sides in merged.items():
        ratio, delta, ok = judge(sides["before"], sides["after"])
        ratio_hw, delta_hw, cpu_hw = noise(runs["before", stream, c], runs["after", stream, c])
        print(f"  {verdict(ok)}  {mode(stream)} c={c}: req/s {ratio:.3f}{pm(ratio_hw, 3)} ({sides['after'].rps:,.0f} vs "
              f"{sides['before'].rps:,.0f}), p50 {delta:+.2f}{pm(delta_hw, 2)} ms ({p50(sides['after']):.2f} vs "
              f"{p50(sides['before']):.2f}); {resolution(ok, ratio, ratio_hw, delta, delta_hw)}; CPU per answer "
              f"{cpu_ratio(sides['before'], sides['after']):.3f}{pm(cpu_hw, 3)}")
    pooled = {side: [s[side] for s in merged.values()] for side in SIDES}
    cpu = {side: sum(r.cpu or 0 for r in rs) * 1000 / max(1, sum(r.ok for r in rs)) for side, rs in pooled.items()}
    print(f"  info  platform CPU per answer, all cells pooled: before {cpu['before']:.3f} ms, after "
          f"{cpu['after']:.3f} ms ({cpu['after'] - cpu['before']:+.3f} ms, the figure least moved by other work)")
    print("  info  the ± intervals hold the noise between adjacent slices only, not drift slower than a turn (other "
          "work on the machine coming and going): an A/A run (--baseline HEAD) shows what is left")
    if same_code:
        print("  info  A/A: both sides run the same code, so every difference above is the harness's noise floor")


def measure_baseline(bench: Bench, args: argparse.Namespace) -> int:
    tree, commit = bench.checkout(args.baseline)
    schema_differs = migrations(tree) != migrations(ROOT)
    own_db = args.baseline_db == "own" or (args.baseline_db == "auto" and schema_differs)
    say(f"before: {args.baseline} = {commit[:10]} in {tree}; its migrations "
        f"{'differ from' if schema_differs else 'equal'} this tree's: "
        f"{'its own database ' + BASELINE_DB if own_db else 'shared database ' + DB_NAME}")
    upstream_root = bench.start_upstream()
    routes = ROUTES_YAML.format(route=ROUTE, upstream_model=UPSTREAM_MODEL, base_url=upstream_root,
                                key_env=UPSTREAM_KEY_ENV)
    key = bench.prepare(routes)
    base = bench.side_services(tree, BASELINE_DB if own_db else None)
    sides = {"before": (base, bench.prepare(routes, side=base) if own_db else key), "after": ({}, key)}
    bench.start_writer()
    bench.start_writer(base, label="before")
    # An even number of turns per round (b a | a b | …): each side gets as many slices right after
    # the other side's as right after its own (a switch costs the incoming process its caches).
    turns = max(2, math.ceil(args.duration / args.rounds / args.slice - 1e-9))
    turns += turns % 2
    per_round = turns * args.slice
    args.duration = per_round * args.rounds
    runs: dict[tuple, list[Result]] = {(side, *cell): [] for side in SIDES for cell in args.cells}
    plats_seen: dict[str, list[Platform]] = {side: [] for side in SIDES}
    for r in range(args.rounds):
        order = SIDES if r % 2 == 0 else SIDES[::-1]  # which side starts first and leads each turn alternates by round
        plats = {side: bench.start_platform(sides[side][0], label=side, server=args.server, key=sides[side][1])
                 for side in order}
        for side in SIDES:
            plats_seen[side].append(plats[side])
        say(f"round {r + 1}/{args.rounds}: before pid {plats['before'].pid}, after pid {plats['after'].pid} on core "
            f"{bench.platform_cpu}; {len(args.cells)} cells of {args.warmup:g} s warm-up + {per_round:g} s per side, "
            f"in {args.slice:g} s slices")
        targets = [Target(side, plats[side].chat_url, ROUTE, sides[side][1], pid=plats[side].pid) for side in order]

        async def cells(targets=targets, plats=plats, r=r, order=order) -> None:
            for stream, c in args.cells:
                bench.quiet()
                spies = [bench.profile(args.profile, plats[side], f"{side}-r{r + 1}-{mode(stream)}-c{c}")
                         for side in SIDES]
                results = await run_interleaved(targets, stream, c, args.warmup, per_round - args.slice / 2,
                                                bench.platform_cpu, args.slice)
                for spy in spies:
                    bench.end_profile(spy)
                bench.check_alive()
                for side, result in zip(order, results, strict=True):
                    runs[side, stream, c].append(result)

        bench.run(cells)
        for plat in plats.values():
            bench.stop_platform(plat)

    usage = {"after": bench.usage()}
    if own_db:
        usage["before"] = bench.usage(base)
    else:
        left, pending, _, _ = bench.usage(base)  # before's stream; its rows are in the shared database
        usage["after"] = (usage["after"][0] + left, usage["after"][1] + pending, *usage["after"][2:])
    served = {side: sum(r.good for (s, *_), rs in runs.items() if s == side for r in rs) + len(plats_seen[side])
              for side in SIDES}  # + each process's first request
    same_code = commit == head_commit() and "uncommitted" not in tree_state()
    header("Chat completions before and after",
           f"before = {args.baseline} ({commit[:10]}), after = this working tree; server {args.server}; "
           f"{args.rounds} round(s) of fresh before/after processes, {args.duration:g} s measured per cell and side "
           f"in {args.slice:g} s slices alternating between the sides, after {args.warmup:g} s warm-up per round; "
           f"{CHUNKS}-chunk streams")
    merged = print_baseline_table(args.cells, runs)
    print()
    for side in SIDES:
        ps = plats_seen[side]
        print(f"{side.capitalize()}: {len(ps)} process(es) from "
              f"{'the checkout of ' + commit[:10] if side == 'before' else 'this working tree'}, Redis "
              f"{(base if side == 'before' else bench.env)['REDIS_URL'].rsplit('/', 1)[-1]}, healthy "
              f"{min(p.start_s for p in ps):.1f}-{max(p.start_s for p in ps):.1f} s after spawn, RSS at ready "
              f"{min(p.rss_ready for p in ps):.0f}-{max(p.rss_ready for p in ps):.0f} MiB, first request "
              f"{min(p.first_ms for p in ps):.0f}-{max(p.first_ms for p in ps):.0f} ms")
    print(f"Schema: {args.baseline}'s migration files {'differ from' if schema_differs else 'equal'} this tree's; "
          + (f"before runs on its own database {BASELINE_DB}, migrated and set up by its own code" if own_db
             else f"both sides share {DB_NAME}") + "; each side has its own Redis database and usage writer "
          "(its own code's)")
    bad_usage = []
    for side, (left, pending, rows, cost) in usage.items():
        expected = served["before"] + served["after"] if not own_db else served[side]
        who = "both sides" if not own_db else side
        print(f"Usage recording ({who}): {rows:,} rows for {expected:,} good answers, total cost ${cost}; "
              f"{left} left in the stream(s), {pending} pending")
        if rows != expected:
            bad_usage.append(f"{rows:,} usage rows for {expected:,} good answers ({who}): every answer must have "
                             f"exactly one")
    print(f"{bench.quiet_wait_s:.1f} s spent waiting for the usage writers to catch up before cells")
    print_baseline_targets(merged, runs, same_code)
    bad = print_problems([merge(v) for v in runs.values()], label=lambda r: f"{r.target:6s}")
    for text in bad_usage:
        print(f"WARNING: {text}")
    warn_busy([r for rs in runs.values() for r in rs])
    gw_note()
    log_problems(bench.platform_logs, "The platform processes")
    log_problems(bench.writer_logs, "The usage writers")
    return 1 if bad or bad_usage else 0


def head_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          timeout=10).stdout.strip()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

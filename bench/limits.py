"""What limits cost: the platform with limits on vs off, side by side in one run.

    .venv/bin/python bench/limits.py [--duration 12] [--rounds 4] [--slice 0.5]
                                      [--non-stream 1,8,32] [--stream 1,8] [--quick] [--profile DIR]
                                      [--baseline TREE] [--compare VAR=ON,OFF]

The bench tenant has real, generous limits that never refuse (requests per minute and hour,
tokens per minute, concurrency, daily and monthly budget), so every call runs the admission
script and settles through the settle script. Each round starts two fresh platform processes on
the platform core, one with GW_LIMITS_ENABLED=1 (on), one with =0 (off); in every cell the load
alternates between them in slices (on off | off on | …, 0.5 s each), so the machine's changing
load hits both sides alike, and both processes are stopped at the end of the round. The table
gives p50, p99, req/s and CPU per request of each side, the p50 difference (also per round) and
the throughput ratio, then PASS/FAIL against the issue's targets: limits add at most 0.5 ms to
p50 and cost at most 10% of non-streaming throughput. Any 429 is an error (the limits must not
refuse).

With --baseline TREE both sides have limits on and the off side runs the code in TREE (another
checkout, e.g. `git worktree add --detach /tmp/base HEAD~1`): a change measured against the code
before it under the same noise, which separate runs on this VM cannot resolve.

With --compare VAR=A,B both sides have limits on, from this tree, and differ in one setting: the
on side runs with VAR=A, the off side with VAR=B (e.g. `--compare GW_REDIS_CLIENT=redis-py,resp`:
the hot path's Redis client stacks).

The stack is the one of bench/overhead.py (bench/README.md): platform on core 0; fake upstream,
usage writer and load on core 1; database gw_bench, Redis db 15; loopback only. Everything is
stopped on exit, also on Ctrl-C, and the run is bounded by an alarm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import SIDE_TREE, Bench, run_bench  # noqa: E402
from bench._load import (  # noqa: E402
    CHUNKS,
    OTHER_PLATFORM_ROLE,
    PLATFORM_ROLE,
    Result,
    Target,
    first_request,
    merge,
    run_interleaved,
)
from bench._report import (  # noqa: E402
    client_busy,
    core_other,
    cpu_per_req,
    fmt,
    gw_note,
    header,
    log_problems,
    p50,
    p99,
    print_problems,
    redis_us_per_req,
    table,
    verdict,
    warn_busy,
)
from bench._stack import ROUTE, ROUTES_YAML, UPSTREAM_KEY_ENV, UPSTREAM_MODEL, say  # noqa: E402

TARGETS = {"added_p50_ms": 0.5, "rps_ratio": 0.90}
GENEROUS = ("--rpm", "10000000", "--rph", "100000000", "--tpm", "1000000000", "--concurrency", "100000",
            "--daily-budget", "1000000", "--monthly-budget", "10000000", "--max-tokens", "none", "--models", "")
SIDES = {"on": {"GW_LIMITS_ENABLED": "1"}, "off": {"GW_LIMITS_ENABLED": "0"}}
LIMIT_HEADER = "x-ratelimit-limit-requests"  # sent only when admission ran


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Platform overhead with limits on vs off (bench/README.md).")
    parser.add_argument("--duration", type=float, default=None,
                        help="measured seconds per cell and side, split over the rounds (default 12; 1.5 with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds, each with a fresh pair of platform processes (default 4; 1 with --quick)")
    parser.add_argument("--slice", type=float, default=0.5, help="seconds of load on one side before switching (0.5)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds per cell, side and round (0.5)")
    parser.add_argument("--non-stream", default=None, help="non-streaming concurrencies (default 1,8,32; 1,8 with --quick)")
    parser.add_argument("--stream", default="1,8", help="streaming concurrencies (default 1,8; '' for none)")
    parser.add_argument("--quick", action="store_true", help="smoke run (~30 s)")
    parser.add_argument("--embedded", action="store_true", help="use embedded PostgreSQL/Redis even if others answer")
    parser.add_argument("--baseline", metavar="TREE", default=None,
                        help="compare two versions with limits on: the off side becomes limits on, running the code "
                             "in TREE (a checkout of another commit: git worktree add --detach /tmp/base HEAD~1)")
    parser.add_argument("--compare", metavar="VAR=ON,OFF", default=None,
                        help="compare two values of one setting with limits on: VAR=ON on the on side, VAR=OFF on "
                             "the off side (e.g. GW_REDIS_CLIENT=redis-py,resp)")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="record both platform processes with py-spy (if installed) during each cell, as "
                             "collapsed stacks in DIR")
    args = parser.parse_args(argv)
    args.duration = args.duration or (1.5 if args.quick else 12.0)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 4)
    args.non_stream = args.non_stream if args.non_stream is not None else ("1,8" if args.quick else "1,8,32")
    try:
        args.cells = [(False, int(c)) for c in args.non_stream.split(",") if c.strip()]
        args.cells += [(True, int(c)) for c in args.stream.split(",") if c.strip()]
    except ValueError:
        parser.error("concurrencies are comma-separated integers, e.g. 1,8,32")
    if not args.cells or min(c for _, c in args.cells) < 1 or args.duration <= 0 or args.rounds < 1 or args.warmup < 0:
        parser.error("need concurrency >= 1, duration > 0, rounds >= 1, warmup >= 0")
    if args.baseline is not None:
        tree = Path(args.baseline).resolve()
        if not (tree / "llm_platform" / "asgi.py").is_file():
            parser.error(f"--baseline {args.baseline}: not a checkout of this project")
        args.baseline = str(tree)
    if args.compare is not None:
        var, _, values = args.compare.partition("=")
        pair = values.split(",")
        if not var.startswith("GW_") or len(pair) != 2 or args.baseline is not None:
            parser.error("--compare takes GW_VAR=ON,OFF (two values), and not with --baseline")
        args.compare = (var, pair[0], pair[1])
    if not 0.05 <= args.slice <= 2:
        parser.error("--slice must be between 0.05 and 2 s (a turn must stay under uvicorn's 5 s keep-alive)")
    return args


def mode(stream: bool) -> str:
    return "stream" if stream else "non-stream"


def print_table(cells: list[tuple[bool, int]], runs: dict) -> dict[tuple[bool, int], dict[str, Result]]:
    merged = {cell: {side: merge(runs[side, *cell]) for side in SIDES} for cell in cells}
    columns = [("mode", 10), ("c", 3), ("p50 on", 7), ("p50 off", 7), ("Δp50", 6), ("Δp50 by round", 27),
               ("p99 on", 7), ("p99 off", 7), ("req/s on", 8), ("req/s off", 9), ("on/off", 6),
               ("CPU ms/req on", 13), ("off", 5), ("Redis µs/req on/off", 19), ("core0 other on/off", 18),
               ("core1 busy on/off", 17)]
    rows = []
    for cell in cells:
        on, off = merged[cell]["on"], merged[cell]["off"]
        by_round = [p50(a) - p50(b) for a, b in zip(runs["on", *cell], runs["off", *cell], strict=True)]
        rows.append([
            mode(cell[0]), str(cell[1]), fmt(p50(on), 2), fmt(p50(off), 2), f"{p50(on) - p50(off):+.2f}",
            " ".join(f"{d:+.2f}" for d in by_round), fmt(p99(on), 2), fmt(p99(off), 2),
            fmt(on.rps, 0), fmt(off.rps, 0), fmt(on.rps / off.rps, 2) if off.rps else "-",
            fmt(cpu_per_req(on), 2), fmt(cpu_per_req(off), 2),
            f"{fmt(redis_us_per_req(on), 0)} / {fmt(redis_us_per_req(off), 0)}", f"{core_other(on)} / {core_other(off)}",
            f"{client_busy(on)} / {client_busy(off)}",
        ])
    table(columns, rows)
    print("(latencies in ms; Δ = on - off; req/s for streams = complete 20-chunk streams per second)")
    return merged


ROLES = (PLATFORM_ROLE, "Redis", "usage writer", "PostgreSQL", "fake upstream", "load generator", OTHER_PLATFORM_ROLE)


def roles_per_answer(r: Result) -> dict[str, float]:
    """CPU µs per answer of each process role in this side's windows (Redis from INFO)."""
    seconds = {**r.by_role, "Redis": r.redis_cpu or 0.0}
    return {role: seconds.get(role, 0.0) * 1e6 / r.ok for role in ROLES} if r.ok else {}


def print_roles(merged: dict) -> None:
    """Where the on side's extra CPU goes: every process's CPU per answer, on minus off."""
    print("\nCPU per answer by process, on - off (µs; total = the processes listed, on / off):")
    columns = [("mode", 10), ("c", 3), ("total on / off", 15), ("Δ total", 7)] + [(role, max(6, len(role))) for role in ROLES]
    rows = []
    for (stream, c), sides in merged.items():
        on, off = roles_per_answer(sides["on"]), roles_per_answer(sides["off"])
        if not on or not off:
            continue
        total_on, total_off = sum(on.values()), sum(off.values())
        rows.append([mode(stream), str(c), f"{total_on:,.0f} / {total_off:,.0f}", f"{total_on - total_off:+,.0f}"]
                    + [f"{on[role] - off[role]:+,.0f}" for role in ROLES])
    table(columns, rows)


def print_targets(merged: dict, limited: int) -> None:
    print("\nTargets (limits on vs off, platform on one core):")
    for stream in (False, True):
        cell = (stream, 1)
        if cell in merged:
            d = p50(merged[cell]["on"]) - p50(merged[cell]["off"])
            print(f"  {verdict(d <= TARGETS['added_p50_ms'])}  limits add <= {TARGETS['added_p50_ms']} ms to p50 "
                  f"({mode(stream)}, c=1): {d:+.2f} ms")
    for (stream, c), sides in merged.items():
        if stream or c == 1:
            continue  # at c=1 req/s is 1 / latency: the p50 target covers it
        on, off = sides["on"], sides["off"]
        ratio = on.rps / off.rps if off.rps else float("nan")
        cpu_on, cpu_off = cpu_per_req(on), cpu_per_req(off)
        cpu = f"; CPU per request {cpu_on:.2f} vs {cpu_off:.2f} ms ({cpu_off / cpu_on:.2f} by CPU)" if cpu_on and cpu_off else ""
        print(f"  {verdict(ratio >= TARGETS['rps_ratio'])}  limits cost <= {1 - TARGETS['rps_ratio']:.0%} of "
              f"non-streaming throughput (c={c}): on/off = {ratio:.2f} ({on.rps:,.0f} vs {off.rps:,.0f} req/s){cpu}")
    on_cells = [s["on"] for s in merged.values()]
    on_cpu = sum(r.cpu or 0 for r in on_cells) * 1000 / max(1, sum(r.ok for r in on_cells))
    off_cells = [s["off"] for s in merged.values()]
    off_cpu = sum(r.cpu or 0 for r in off_cells) * 1000 / max(1, sum(r.ok for r in off_cells))
    print(f"  info  platform CPU per answer, all cells pooled: on {on_cpu:.2f} ms, off {off_cpu:.2f} ms "
          f"(limits: {on_cpu - off_cpu:+.2f} ms)")
    print(f"  {verdict(limited == 0)}  no 429 with limits on: {limited} refused")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    measured = 2 * len(args.cells) * (args.duration + args.rounds * (args.warmup + args.slice) + 10)
    budget = 180 + args.rounds * 120 + measured * 1.5
    return run_bench(budget, args.embedded, measure, args)


def sides_for(args: argparse.Namespace) -> dict[str, dict]:
    """Each side's platform settings; with --baseline, the off side is limits on, from TREE; with
    --compare, both are limits on, with the setting's two values."""
    if args.compare is not None:
        var, on, off = args.compare
        return {"on": {**SIDES["on"], var: on}, "off": {**SIDES["on"], var: off}}
    if args.baseline is None:
        return SIDES
    return {"on": SIDES["on"], "off": {**SIDES["on"], SIDE_TREE: args.baseline}}


def measure(bench: Bench, args: argparse.Namespace) -> int:
    sides = sides_for(args)
    upstream_root = bench.start_upstream()
    key = bench.prepare(ROUTES_YAML.format(route=ROUTE, upstream_model=UPSTREAM_MODEL, base_url=upstream_root,
                                           key_env=UPSTREAM_KEY_ENV), GENEROUS)
    bench.start_writer()
    per_round = args.duration / args.rounds
    runs: dict[tuple, list[Result]] = {(side, *cell): [] for side in SIDES for cell in args.cells}
    starts: dict[str, list[float]] = {side: [] for side in SIDES}
    firsts: dict[str, list[float]] = {side: [] for side in SIDES}
    header_seen: dict[str, set[bool]] = {side: set() for side in SIDES}
    for r in range(args.rounds):
        plats = bench.start_sides(sides, r, "limits", key=None)
        for side, plat in plats.items():
            first_ms, first_headers = first_request(plat.chat_url, key)
            header_seen[side].add(LIMIT_HEADER in first_headers)
            starts[side].append(plat.start_s)
            firsts[side].append(first_ms)
        say(f"round {r + 1}/{args.rounds}: limits on pid {plats['on'].pid}, off pid {plats['off'].pid}; "
            f"{len(args.cells)} cells of {args.warmup:g} s warm-up + {per_round:g} s per side, in {args.slice:g} s slices")
        targets = [Target(f"limits {side}", plat.chat_url, ROUTE, key, pid=plat.pid) for side, plat in plats.items()]

        async def cells(targets=targets, plats=plats, r=r) -> None:
            for stream, c in args.cells:
                bench.quiet()
                spies = [bench.profile(args.profile, plat, f"limits-{side}-r{r + 1}-{mode(stream)}-c{c}")
                         for side, plat in plats.items()]
                results = await run_interleaved(targets, stream, c, args.warmup, per_round, bench.platform_cpu,
                                                args.slice)
                for spy in spies:
                    bench.end_profile(spy)
                bench.check_alive()
                for side, result in zip(plats, results, strict=True):
                    runs[side, stream, c].append(result)

        bench.run(cells)
        for plat in plats.values():
            bench.stop_platform(plat)

    left, pending, rows, cost = bench.usage()
    both_on = args.baseline is not None or args.compare is not None
    if args.compare is not None:
        title = f"{args.compare[0]}={args.compare[1]} (on) vs ={args.compare[2]} (off), limits on in both"
    elif args.baseline is not None:
        title = f"This tree (on) vs the tree in {args.baseline} (off), limits on in both"
    else:
        title = "Limits on vs off"
    header(title, f"{args.rounds} round(s) of fresh on/off processes, {args.duration:g} s measured per "
                               f"cell and side in {args.slice:g} s slices alternating between the sides, after "
                               f"{args.warmup:g} s warm-up per round; {CHUNKS}-chunk streams")
    merged = print_table(args.cells, runs)
    print_roles(merged)
    print()
    print("Tenant limits (on side): " + " ".join(GENEROUS[:12]).replace("--", ""))
    for side in SIDES:
        seen = header_seen[side]
        print(f"Limits {side}: {len(starts[side])} process(es), healthy {min(starts[side]):.1f}-{max(starts[side]):.1f} s "
              f"after spawn, first request {min(firsts[side]):.0f}-{max(firsts[side]):.0f} ms; {LIMIT_HEADER} "
              f"{'sent' if seen == {True} else 'absent' if seen == {False} else 'sometimes sent'}")
    print(f"Usage recording: {rows:,} rows in gw_bench.billing_usagerecord, total cost ${cost}; "
          f"{left} left in the stream, {pending} pending; {bench.quiet_wait_s:.1f} s spent waiting for the "
          f"writer to catch up before cells")
    everything = [r for results in runs.values() for r in results]
    served = sum(r.good for r in everything) + sum(len(v) for v in firsts.values())  # + the first requests
    limited = sum(r.statuses.get(429, 0) for (side, *_), results in runs.items() if side == "on" for r in results)
    if not both_on:
        print_targets(merged, limited)
    else:
        print("\nTargets: not judged when both sides have limits on (on/off here names the two variants)")
    problems = []
    if header_seen["on"] != {True}:
        problems.append(f"limits on: {LIMIT_HEADER} missing, so admission did not run")
    if header_seen["off"] != {both_on}:
        problems.append(f"limits off: {LIMIT_HEADER} present, so GW_LIMITS_ENABLED=0 was not honoured"
                        if not both_on else f"off side: {LIMIT_HEADER} missing, so admission did not run")
    if rows != served:
        problems.append(f"{rows:,} usage rows for {served:,} good answers: every answer must have exactly one")
    for text in problems:
        print(f"WARNING: {text}")
    bad = print_problems([merge(v) for v in runs.values()], label=lambda r: f"{r.target:10s}")
    warn_busy(everything)
    gw_note(overridden=("GW_LIMITS_ENABLED",))
    log_problems(bench.platform_logs, "The platform")
    log_problems([bench.logs / "usage_writer.log"], "The usage writer")
    return 1 if bad or problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

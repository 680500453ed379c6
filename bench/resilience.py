"""What the resilience layer costs, and how fast the platform answers around a broken lane.

    .venv/bin/python bench/resilience.py [--duration 8] [--rounds 2] [--slice 0.5]
                                          [--concurrency 1,8] [--quick] [--profile DIR]

Non-streaming, closed loop, at each concurrency (bench/README.md has the details). Each round
starts two fresh platform processes on the platform core, GW_RESILIENCE_ENABLED=1 (on) and =0
(off), and at each concurrency measures five scenarios, the load moving from one to the next in
slices (0.5 s, the order reversed every other turn) so the machine's changing load hits them
alike:
- `healthy` (one lane to the fast fake upstream) on the off process, and on the on process;
- on the on process:
  - `refused-primary`: lane 1 is a closed port on 127.0.0.1 (connection refused; one attempt,
    a breaker that never opens), lane 2 the fake upstream;
  - `open-primary`: lane 1 (another upstream model on the fake) has its breaker forced open in
    Redis before the first round, lane 2 the fake upstream;
  - idempotent replay: one request with `Idempotency-Key: k1` first, then the same request with
    that key again and again (each answer must say `x-idempotent-replayed: true`), against the
    plain requests of `healthy`.
Every answer is checked (200, complete, `x-upstream-model` of the lane that should answer).
The table gives p50, p99, req/s and CPU per request, with the p50 difference to the baseline,
then PASS/FAIL: resilience on a healthy lane adds at most 0.3 ms to p50, an open breaker adds at
most 2 ms over a healthy single lane (both judged at c=1).

The stack is bench/overhead.py's: platform on core 0; fake upstream, usage writer and load on
core 1; database gw_bench, Redis db 15; loopback only. Everything started is stopped on exit,
also on Ctrl-C, and the run is bounded by an alarm.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import Bench, run_bench  # noqa: E402
from bench._load import Result, Target, first_request, merge, run_interleaved  # noqa: E402
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
from bench._stack import HOST, UPSTREAM_KEY_ENV, UPSTREAM_MODEL, manage, say  # noqa: E402
from llm_platform.embedded import free_port, port_open  # noqa: E402

TARGETS = {"resilience_p50_ms": 0.3, "open_p50_ms": 2.0}
SIDES = {"on": {"GW_RESILIENCE_ENABLED": "1"}, "off": {"GW_RESILIENCE_ENABLED": "0"}}
IDEM_KEY = "k1"
LANE = """\
      - provider: openai-compatible
        upstream_model: {model}
        base_url: {base_url}
        api_key_env: {key_env}
        context_window: 128000
        prices: {{input: "0.15", output: "0.60", cached_input: "0.075"}}
"""
# Every lane gets the refused lane's policy (one attempt, a breaker that never opens), not only
# the refused lane: gateway/lane_policy.py `policy_for` caches policies by id(lane.options), and
# after a route-table refresh (every GW_LOCAL_CACHE_SECONDS) a new options dict can reuse a freed
# one's id and get another lane's policy, which opened the refused lane's breaker mid-run with
# the default min_calls. With one policy for all, such a swap changes nothing here. The other
# lanes never fail, so one attempt and the breaker threshold do not change what they do.
POLICY = """\
        retry: {max_attempts: 1}
        breaker: {min_calls: 1000000}
"""
# (label, route, resilience side, baseline label, expected response headers)
SCENARIOS = [
    ("healthy, resilience off", "healthy", "off", None, {}),
    ("healthy, resilience on", "healthy", "on", "healthy, resilience off", {}),
    ("refused primary", "refused-primary", "on", "healthy, resilience on", {"x-gateway-retries": "1"}),
    ("open primary", "open-primary", "on", "healthy, resilience on", {}),
    ("idempotent replay", "healthy", "on", "healthy, resilience on", {"x-idempotent-replayed": "true"}),
]
BREAKER_KEYS = """
from gateway.resilience import _keys
from gateway.routing import load_table
table = load_table()
print("BREAKER", _keys(table["open-primary"].lanes[0])["breaker"])
print("BREAKER", _keys(table["refused-primary"].lanes[0])["breaker"])
"""


def routes_yaml(upstream: str, closed_port: int) -> str:
    def lane(model: str, base_url: str) -> str:
        return LANE.format(model=model, base_url=base_url, key_env=UPSTREAM_KEY_ENV) + POLICY

    good = lane(UPSTREAM_MODEL, upstream)
    return ("routes:\n"
            "  - model: healthy\n    lanes:\n" + good +
            "  - model: refused-primary\n    lanes:\n" + lane("gpt-4o-mini-refused", f"http://{HOST}:{closed_port}/v1") + good +
            "  - model: open-primary\n    lanes:\n" + lane("gpt-4o-mini-open", upstream) + good)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Resilience layer overhead and failover latency (bench/README.md).")
    parser.add_argument("--duration", type=float, default=None,
                        help="measured seconds per cell, split over the rounds (default 8; 1.5 with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds, each with a fresh pair of platform processes (default 2; 1 with --quick)")
    parser.add_argument("--slice", type=float, default=0.5, help="seconds of load on one scenario before the next (0.5)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds per cell and round (0.5)")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated concurrencies (default 1,8)")
    parser.add_argument("--quick", action="store_true", help="smoke run (~35 s)")
    parser.add_argument("--embedded", action="store_true", help="use embedded PostgreSQL/Redis even if others answer")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="record both platform processes with py-spy (if installed) during each concurrency, "
                             "as collapsed stacks in DIR (the on process serves four scenarios)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (1.5 if args.quick else 8.0)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    try:
        args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error("--concurrency takes integers, e.g. 1,8")
    if not args.levels or min(args.levels) < 1 or args.duration <= 0 or args.rounds < 1 or args.warmup < 0:
        parser.error("need concurrency >= 1, duration > 0, rounds >= 1, warmup >= 0")
    if not 0.05 <= args.slice <= 0.9:
        parser.error("--slice must be between 0.05 and 0.9 s (a turn of five must stay under uvicorn's 5 s keep-alive)")
    return args


def print_table(levels: list[int], runs: dict) -> dict:
    merged = {(label, c): merge(runs[label, c]) for label, *_ in SCENARIOS for c in levels}
    columns = [("scenario", 23), ("c", 3), ("p50", 6), ("p99", 6), ("req/s", 5), ("Δp50", 6), ("vs", 23),
               ("Δp50 by round", 27), ("req/s ratio", 11), ("CPU ms/req", 10), ("core0 other", 11)]
    rows = []
    for c in levels:
        for label, _, _, base, _ in SCENARIOS:
            r = merged[label, c]
            if base is None:
                delta = by_round = ratio = vs = "-"
            else:
                b = merged[base, c]
                delta, vs = f"{p50(r) - p50(b):+.2f}", base
                by_round = " ".join(f"{p50(x) - p50(y):+.2f}" for x, y in zip(runs[label, c], runs[base, c], strict=True))
                ratio = fmt(r.rps / b.rps, 2) if b.rps else "-"
            rows.append([label, str(c), fmt(p50(r), 2), fmt(p99(r), 2), fmt(r.rps, 0), delta, vs, by_round, ratio,
                         fmt(cpu_per_req(r), 2), core_other(r)])
    table(columns, rows)
    print("(latencies in ms; non-streaming; Δp50 and req/s ratio against the scenario named in `vs`, "
          "measured in alternating slices of the same rounds)")
    return merged


def print_targets(levels: list[int], merged: dict, checks: list[tuple[bool, str]]) -> None:
    def delta(label: str, base: str, c: int) -> float:
        return p50(merged[label, c]) - p50(merged[base, c])

    print("\nTargets (platform on one core; judged at c=1, where Δp50 is the per-call cost; at c>1 it "
          "also includes queueing behind the other calls on the single core):")
    for label, base, limit, text in (
            ("healthy, resilience on", "healthy, resilience off", TARGETS["resilience_p50_ms"],
             "resilience on a healthy lane adds"),
            ("open primary", "healthy, resilience on", TARGETS["open_p50_ms"],
             "an open breaker adds, over a healthy single lane,")):
        for c in levels:
            d = delta(label, base, c)
            if c == 1:
                print(f"  {verdict(d <= limit)}  {text} <= {limit:g} ms to p50 (c=1): {d:+.2f} ms")
            else:
                print(f"  info  {text} {d:+.2f} ms to p50 at c={c} (queueing included)")
    for c in levels:
        d = delta("refused primary", "healthy, resilience on", c)
        print(f"  info  a refused primary (breaker closed) adds {d:+.2f} ms to p50 (c={c}); "
              f"p99 {p99(merged['refused primary', c]):.2f} ms")
    for c in levels:
        r, b = merged["idempotent replay", c], merged["healthy, resilience on", c]
        print(f"  info  idempotent replay (c={c}): p50 {p50(r):.2f} vs {p50(b):.2f} ms plain, {r.rps:,.0f} vs "
              f"{b.rps:,.0f} req/s ({r.rps / b.rps if b.rps else float('nan'):.2f}x), CPU "
              f"{fmt(cpu_per_req(r), 2)} vs {fmt(cpu_per_req(b), 2)} ms/req")
    for ok, text in checks:
        print(f"  {verdict(ok)}  {text}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    measured = len(args.levels) * len(SCENARIOS) * (args.duration + args.rounds * (args.warmup + args.slice) + 10)
    budget = 180 + args.rounds * 120 + measured * 1.5
    return run_bench(budget, args.embedded, measure, args)


def force_open(bench: Bench) -> tuple[str, str]:
    """Open open-primary's first lane breaker for the whole run; (its key, refused lane's key)."""
    output = manage(bench.env, "shell", "-c", BREAKER_KEYS)
    keys = [line.split()[1] for line in output.splitlines() if line.startswith("BREAKER ")]
    if len(keys) != 2:
        raise RuntimeError(f"could not compute the lanes' breaker keys: {output[-1000:]}")
    open_key, refused_key = keys
    client = bench.redis()
    try:
        until = int(time.time() * 1000) + 10 * 86_400_000
        client.hset(open_key, mapping={"state": "open", "until": until, "reason": "forced by bench/resilience.py"})
    finally:
        client.close()
    return open_key, refused_key


def breaker_checks(bench: Bench, open_key: str, refused_key: str, runs: dict) -> list[tuple[bool, str]]:
    client = bench.redis()
    try:
        opened = {k.decode(): v.decode() for k, v in client.hgetall(open_key).items()}
        refused = {k.decode(): v.decode() for k, v in client.hgetall(refused_key).items()}
        events = [{k.decode(): v.decode() for k, v in fields.items()}
                  for _, fields in client.xrange(os.environ.get("GW_BREAKER_STREAM") or "gw:breaker-events", count=100)]
    finally:
        client.close()
    failures = sum(int(v) for k, v in refused.items() if k.startswith("e"))
    calls = sum(int(v) for k, v in refused.items() if k[:1] == "n" and k[1:].isdigit())
    sent = sum(r.sent for (label, _), rs in runs.items() if label == "refused primary" for r in rs)
    import psycopg  # the usage writer moves breaker events from the stream into this table

    with psycopg.connect(bench.services.database_url, connect_timeout=10) as conn:
        events += [dict(zip(("lane", "from", "to", "reason"), row, strict=True)) for row in conn.execute(
            "SELECT lane, from_state, to_state, reason FROM gateway_breakerevent ORDER BY id LIMIT 100")]
    moves = "; ".join(f"{e.get('lane')} {e.get('from')}->{e.get('to')} ({e.get('reason')})" for e in events[:3])
    return [
        (not events, f"no breaker moved during the run ({len(events)} transition(s){': ' + moves if moves else ''})"),
        (opened.get("state") == "open", f"open-primary's lane 1 breaker stayed open (state {opened.get('state')!r})"),
        (refused.get("state", "closed") == "closed",
         f"refused-primary's lane 1 breaker stayed closed (state {refused.get('state', 'closed')!r}; "
         f"{failures:,} failures of {calls:,} calls in its last minute of window, {sent:,} requests sent)"),
    ]


def measure(bench: Bench, args: argparse.Namespace) -> int:
    upstream = bench.start_upstream()
    closed_port = free_port()  # bound, then closed: nothing listens there
    key = bench.prepare(routes_yaml(upstream, closed_port))
    open_key, refused_key = force_open(bench)
    bench.start_writer()
    if port_open(HOST, closed_port):
        raise RuntimeError(f"port {closed_port}, chosen to refuse connections, answers")
    per_round = args.duration / args.rounds
    runs: dict[tuple[str, int], list[Result]] = {(label, c): [] for label, *_ in SCENARIOS for c in args.levels}
    starts: list[float] = []
    for r in range(args.rounds):
        plats = bench.start_sides(SIDES, r, "resilience", key=key, model="healthy")
        starts += [plat.start_s for plat in plats.values()]
        if r == 0:  # the answer the replays repeat
            _, first = first_request(plats["on"].chat_url, key, "healthy", {"Idempotency-Key": IDEM_KEY})
            if first.get("x-idempotent-replayed"):
                raise RuntimeError(f"the first request with Idempotency-Key {IDEM_KEY} was a replay: {first}")
        say(f"round {r + 1}/{args.rounds}: resilience on pid {plats['on'].pid}, off pid {plats['off'].pid}; "
            f"{len(args.levels)} x {len(SCENARIOS)} scenarios of {args.warmup:g} s warm-up + {per_round:g} s, "
            f"in {args.slice:g} s slices")
        targets = []
        for label, route, side, _, expect in SCENARIOS:
            headers = {"Idempotency-Key": IDEM_KEY} if label == "idempotent replay" else {}
            targets.append(Target(label, plats[side].chat_url, route, key, pid=plats[side].pid, headers=headers,
                                  expect={"x-upstream-model": UPSTREAM_MODEL, **expect}))

        async def cells(targets=targets, plats=plats, r=r) -> None:
            for c in args.levels:
                bench.quiet()
                spies = [bench.profile(args.profile, plat, f"resilience-{side}-r{r + 1}-c{c}")
                         for side, plat in plats.items()]
                results = await run_interleaved(targets, False, c, args.warmup, per_round, bench.platform_cpu,
                                                args.slice)
                for spy in spies:
                    bench.end_profile(spy)
                bench.check_alive()
                for (label, *_), result in zip(SCENARIOS, results, strict=True):
                    runs[label, c].append(result)

        bench.run(cells)
        for plat in plats.values():
            bench.stop_platform(plat)

    left, pending, rows, cost = bench.usage()
    checks = breaker_checks(bench, open_key, refused_key, runs)
    header("Resilience", f"{args.rounds} round(s) of fresh on/off processes, {args.duration:g} s measured per "
                         f"scenario and concurrency in {args.slice:g} s slices alternating between the scenarios, "
                         f"after {args.warmup:g} s warm-up per round; non-streaming")
    merged = print_table(args.levels, runs)
    print()
    print(f"Platform processes: {len(starts)}, healthy {min(starts):.1f}-{max(starts):.1f} s after spawn. "
          f"Refused lane: {HOST}:{closed_port}; forced-open breaker: {open_key}")
    print(f"Usage recording: {rows:,} rows in gw_bench.billing_usagerecord, total cost ${cost}; "
          f"{left} left in the stream, {pending} pending; {bench.quiet_wait_s:.1f} s spent waiting for the "
          f"writer to catch up before cells")
    print_targets(args.levels, merged, checks)
    bad = print_problems(list(merged.values()), label=lambda r: f"{r.target:23s}")
    warn_busy([r for rs in runs.values() for r in rs])
    gw_note(overridden=("GW_RESILIENCE_ENABLED",))
    log_problems(bench.platform_logs, "The platform")
    log_problems([bench.logs / "usage_writer.log"], "The usage writer")
    return 1 if bad or not all(ok for ok, _ in checks) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

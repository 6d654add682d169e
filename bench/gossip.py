"""Gossip membership benchmark on the in-memory simulator (not a timed test).

    python bench/gossip.py --sites 1000 --loss 0.1 [--slow 0.05] [--outbound 0.1] [--seconds 600] [--seed 1] --json

Starts ``--sites`` sites that know each other (as after a restart), lets them settle for
``--warmup`` simulated seconds, then during ``--seconds`` lets ``--joins`` new sites join (each
through 3 random seeds) and crashes ``--crashes`` sites, both spread over the first half of the
run, and measures:

- ``convergence_s``: from a join until 99.9% of the live sites have reported it (MemberJoined),
  i.e. all but ``floor(0.001 * sites)`` of the live sites that were running at the join;
  ``convergence_all_s``: until every one of them has;
- ``detection_s``: from a crash until every live site has declared it dead (MemberDead);
- ``false_deaths``: sites that were running but were declared dead by someone (distinct sites;
  ``false_death_events`` counts every declaration);
- ``bytes_per_site_per_s``: msgpack bytes sent per site over the measured period.

Prints one JSON object with ``--json``, a readable summary otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from meshd.testing.sim import Simulator
from meshd.swim import MemberDead, MemberJoined, MemberSuspect, SwimConfig
from meshd.swim.events import Event
from meshd.swim.util import suspicion_timeout


def _pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    v = sorted(values)

    def q(p: float) -> float:
        return round(v[min(len(v) - 1, max(0, math.ceil(p * len(v)) - 1))], 3)

    return {"p50": q(0.5), "p99": q(0.99), "max": round(v[-1], 3), "n": len(v)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = SwimConfig()
    first_joined: dict[bytes, dict[bytes, float]] = {}
    first_dead: dict[bytes, dict[bytes, float]] = {}
    false_victims: set[bytes] = set()
    counts = {"false_death_events": 0, "suspicions": 0}
    crashed_at: dict[bytes, float] = {}
    joined_at: dict[bytes, float] = {}

    def on_event(now: float, observer: bytes, e: Event) -> None:
        t = type(e)
        if t is MemberJoined:
            d = first_joined.get(e.node)  # type: ignore[union-attr]
            if d is not None and observer not in d:
                d[observer] = now
        elif t is MemberDead:
            node = e.node  # type: ignore[union-attr]
            if node in crashed_at:
                first_dead[node].setdefault(observer, now)
            else:
                counts["false_death_events"] += 1
                false_victims.add(node)
        elif t is MemberSuspect:
            counts["suspicions"] += 1

    sim = Simulator(seed=args.seed, config=cfg, loss=args.loss, record_events=False, on_event=on_event,
                    delay=args.delay, jitter=args.jitter)
    t_real = time.perf_counter()
    ids = sim.bootstrap(args.sites - args.joins, slow_fraction=args.slow, unreachable_fraction=args.outbound)
    reachable = [x for x in ids if sim.nodes[x].reachable]
    setup_s = time.perf_counter() - t_real
    sim.run_for(args.warmup)
    start = sim.now
    bytes0 = {x: sim.nodes[x].bytes_sent for x in ids}
    rng = sim.rng
    victims = rng.sample(ids, args.crashes)
    span = args.seconds / 2
    for i in range(args.joins):
        when = start + span * (i + 0.5) / max(1, args.joins)
        new_id = sim.make_id(args.sites + 1000 + i)

        def do_join(new_id: bytes = new_id) -> None:
            seeds = [x for x in rng.sample(reachable, min(6, len(reachable)))
                     if not sim.nodes[x].crashed][:3]
            first_joined[new_id] = {}
            joined_at[new_id] = sim.now
            sim.add_node(new_id, join=seeds)

        sim.call_at(when, do_join)
    for i, v in enumerate(victims):
        when = start + span * (i + 0.25) / max(1, args.crashes)

        def do_crash(v: bytes = v) -> None:
            crashed_at[v] = sim.now
            first_dead[v] = {}
            sim.crash(v)

        sim.call_at(when, do_crash)
    sim.run_for(args.seconds)
    real_s = time.perf_counter() - t_real
    duration = sim.now - start

    live = [x for x in sim.live_ids()]
    live_set = set(live)
    convergence: list[float] = []
    convergence_all: list[float] = []
    not_converged = 0
    for j, t0 in joined_at.items():
        observers = [x for x in live if x != j and sim.nodes[x].started <= t0]
        need = len(observers) - int(0.001 * args.sites)  # 99.9% of the sites: all but 1 in 1000
        times = sorted(first_joined[j][o] - t0 for o in observers if o in first_joined[j])
        if len(times) == len(observers) and times:
            convergence_all.append(times[-1])
        if len(times) >= need > 0:
            convergence.append(times[need - 1])
        else:
            not_converged += 1
    detection: list[float] = []
    undetected = 0
    for v, t0 in crashed_at.items():
        observers = [x for x in live if sim.nodes[x].started <= t0]
        times = [first_dead[v][o] - t0 for o in observers if o in first_dead[v]]
        if observers and len(times) == len(observers):
            detection.append(max(times))
        else:
            undetected += 1
    per_site = [(sim.nodes[x].bytes_sent - bytes0[x]) / duration for x in ids if x in live_set]
    n = args.sites
    susp_min = suspicion_timeout(cfg.suspicion_mult, n, cfg.probe_interval)
    detect_target = susp_min + 3 * cfg.probe_interval
    conv = _pct(convergence)
    det = _pct(detection)
    conv_target = 3.0 if args.loss == 0 else 5.0
    return {
        "sites": n,
        "loss": args.loss,
        "slow": args.slow,
        "outbound": args.outbound,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "seed": args.seed,
        "joins": args.joins,
        "crashes": args.crashes,
        "convergence_s": conv,
        "not_converged": not_converged,
        "convergence_all_s": _pct(convergence_all),
        "detection_s": det,
        "undetected": undetected,
        "false_deaths": len(false_victims),
        "false_death_events": counts["false_death_events"],
        "suspicion_events": counts["suspicions"],
        "bytes_per_site_per_s": _pct(per_site),
        "messages_delivered": sim.delivered,
        "messages_dropped": sim.dropped,
        "targets": {
            "convergence_target_s": conv_target,
            "convergence_met": conv["max"] is not None and not_converged == 0 and conv["max"] <= conv_target,
            "detection_target_s": detect_target,
            "detection_met": det["max"] is not None and undetected == 0 and det["max"] <= detect_target,
            "suspicion_timeout_min_s": susp_min,
            "suspicion_timeout_max_s": susp_min * cfg.suspicion_max_timeout_mult,
            "false_deaths_met": len(false_victims) == 0,
        },
        "setup_real_s": round(setup_s, 2),
        "real_s": round(real_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=1000)
    p.add_argument("--loss", type=float, default=0.0, help="drop probability per message")
    p.add_argument("--slow", type=float, default=0.0, help="fraction of slow sites")
    p.add_argument("--outbound", type=float, default=0.0, help="fraction of outbound-only sites")
    p.add_argument("--seconds", type=float, default=60.0, help="measured simulated seconds")
    p.add_argument("--warmup", type=float, default=5.0, help="simulated seconds before measuring")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--joins", type=int, default=None,
                   help="sites that join during the run (default: 5, at most a fifth of --sites)")
    p.add_argument("--crashes", type=int, default=None,
                   help="sites that crash during the run (default: 5, at most a fifth of --sites)")
    p.add_argument("--delay", type=float, default=0.005, help="base one-way delay, s")
    p.add_argument("--jitter", type=float, default=0.005, help="uniform extra delay, s")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    cap = max(1, args.sites // 5)
    args.joins = min(5, cap) if args.joins is None else args.joins
    args.crashes = min(5, cap) if args.crashes is None else args.crashes
    if args.joins + args.crashes >= args.sites:
        p.error("--joins plus --crashes must leave some sites running")
    r = run(args)
    if args.json:
        print(json.dumps(r))
        return 0
    t = r["targets"]
    print(f"{r['sites']} sites, loss {r['loss']:.0%}, slow {r['slow']:.0%}, outbound-only {r['outbound']:.0%}, "
          f"{r['seconds']:.0f} s simulated "
          f"(+{r['warmup']:.0f} s warm-up), seed {r['seed']}: {r['real_s']} s real")
    c, d, b = r["convergence_s"], r["detection_s"], r["bytes_per_site_per_s"]
    print(f"  join -> 99.9% of sites: p50 {c['p50']} s, p99 {c['p99']} s, max {c['max']} s over {c['n']} joins"
          f" ({r['not_converged']} not converged); target {t['convergence_target_s']} s: "
          f"{'met' if t['convergence_met'] else 'NOT met'}")
    print(f"  crash -> dead at all: p50 {d['p50']} s, p99 {d['p99']} s, max {d['max']} s over {d['n']} crashes"
          f" ({r['undetected']} undetected); target {t['detection_target_s']:.1f} s: "
          f"{'met' if t['detection_met'] else 'NOT met'}")
    print(f"  false deaths: {r['false_deaths']} sites ({r['false_death_events']} declarations), "
          f"{r['suspicion_events']} suspicion events")
    print(f"  bytes/site/s: p50 {b['p50']}, p99 {b['p99']}, max {b['max']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

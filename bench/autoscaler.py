"""The autoscaler's decisions under simulated load, with its default windows (stable 60 s, panic 6 s) and
target (4 requests in flight per replica), beside Knative's and Kubernetes HPA's defaults.

The real :class:`cloudml_os.serving.autoscaler.Scaler` is fed one tick a second, as the monitor feeds it;
the load is the version's total requests in flight, each second's value drawn with ``--noise`` relative
spread (log-normal) around its level. Decisions take effect at once (node creation is excluded, as the
target asks). Over ``--seeds`` runs it prints:

- seconds from a load step (12 → 40 requests in flight: 3 → 10 replicas) to the first scale-out decision
  (target: at most one panic window, 6 s), and to the full count;
- scale events during 5 minutes of steady noisy load at 3 replicas' worth (target: 0);
- seconds from the end of the load to the decision back at minNodes (the stable window, by design).

    .venv/bin/python -m bench.autoscaler [--seeds 20] [--noise 0.15]
"""

from __future__ import annotations

import argparse
import random
import statistics

from cloudml_os.serving.autoscaler import (
    CPU_USAGE,
    DEFAULT_PANIC_WINDOW,
    DEFAULT_STABLE_WINDOW,
    DEFAULT_TARGETS,
    REQUESTS_IN_FLIGHT,
    Policy,
    Scaler,
)

TARGET = DEFAULT_TARGETS[REQUESTS_IN_FLIGHT]


def run(seed: int, noise: float) -> dict[str, float]:
    draw = random.Random(seed)
    scaler = Scaler(Policy(1, 20, ((REQUESTS_IN_FLIGHT, TARGET),), DEFAULT_STABLE_WINDOW, DEFAULT_PANIC_WINDOW))
    current, events, result = 3, [], {}

    def tick(t: int, level: float) -> None:
        nonlocal current
        load = level * draw.lognormvariate(0, noise) if level else 0.0
        decision = scaler.observe(float(t), current, current, {REQUESTS_IN_FLIGHT: load, CPU_USAGE: 0.0})
        if decision is not None:
            current = decision.replicas
            events.append((t, current))

    for t in range(0, 120):  # settle at 3 replicas' worth
        tick(t, 3 * TARGET)
    settled = len(events)
    for t in range(120, 420):  # five minutes of steady load
        tick(t, 3 * TARGET)
    result["steady_events"] = len(events) - settled
    step = 420
    for t in range(step, step + 120):
        tick(t, 10 * TARGET)
    outs = [(t, n) for t, n in events if t >= step]
    result["first_out"] = outs[0][0] - step if outs else float("inf")
    result["full_out"] = next((t - step for t, n in outs if n >= 10), float("inf"))
    end = step + 120
    for t in range(end, end + 240):
        tick(t, 0.0)
    result["at_min"] = next((t - end for t, n in events if t >= end and n == 1), float("inf"))
    result["final"] = current
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--noise", type=float, default=0.15)
    args = parser.parse_args()
    results = [run(seed, args.noise) for seed in range(args.seeds)]

    def spread(key: str) -> str:
        values = [r[key] for r in results]
        return f"median {statistics.median(values):5.1f}  range {min(values):g}-{max(values):g}"

    print(f"\nAutoscaler decisions, {args.seeds} runs, load noise {args.noise:.0%} (log-normal per second); "
          f"target {TARGET:g} in flight per replica, windows {DEFAULT_STABLE_WINDOW:g} s / {DEFAULT_PANIC_WINDOW:g} s")
    print(f"  load step 3 -> 10 replicas' worth: first scale-out after s   {spread('first_out')}  (target <= 6 s)")
    print(f"                                      at 10 replicas after s     {spread('full_out')}")
    print(f"  5 min of steady load: scale events                            {spread('steady_events')}  (target 0)")
    print(f"  load ends: back at minNodes after s                           {spread('at_min')}  "
          f"(by design: the stable window + the panic window)")
    print(f"  final count (minNodes 1): {sorted({r['final'] for r in results})}")
    print("  Knative defaults: stable window 60 s, panic window 6 s (10 %), panic threshold 200 %, scale-to-zero "
          "grace 30 s;\n  Kubernetes HPA defaults: sync every 15 s, tolerance 10 %, scale-down stabilisation "
          "300 s, scale-up none")


if __name__ == "__main__":
    main()

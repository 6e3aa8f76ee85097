"""CPU forward throughput with glibc's default malloc thresholds vs the raised ones that the
`hardnet` torch commands set (producer/cli.py). Each variant runs in its own process (glibc reads
the variables at start-up), alternating, and the ratio is printed per round.

    python -m benchmarks.bench_malloc [--model hardnet39ds] [--seconds 12] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = r"""
import sys, time, torch
from worker.model import load_model
m = load_model(sys.argv[1], "random")
x = torch.randn(16, 3, 224, 224)
with torch.inference_mode():
    m(x)
    t = time.perf_counter(); n = 0
    while time.perf_counter() - t < float(sys.argv[2]):
        m(x); n += 16
dt = time.perf_counter() - t
rss = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
print(f"{n / dt:.2f} {rss:.0f}")
"""
TUNED = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"}


def run(model: str, seconds: float, tuned: bool) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k not in TUNED}
    if tuned:
        env.update(TUNED)
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", CHILD, model, str(seconds)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="hardnet39ds")
    ap.add_argument("--seconds", type=float, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    print(f"{a.model}, batch 16, fp32 CPU, {a.seconds:.0f} s per process")
    for r in range(a.rounds):
        d, drss = run(a.model, a.seconds, False)
        t, trss = run(a.model, a.seconds, True)
        print(f"round {r + 1}: default {d:6.1f} img/s (RSS {drss:.0f} MiB)   tuned {t:6.1f} img/s "
              f"(RSS {trss:.0f} MiB)   ratio {t / d:.2f}x")


if __name__ == "__main__":
    main()

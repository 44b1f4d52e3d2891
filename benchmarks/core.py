"""The core figures: load(i) against a bare slice and picomap 0.1's loader, opening cost, build memory.

    python benchmarks/core.py [--quick]

Contenders run interleaved in one process, several rounds; figures are medians, speed as ratios to
the bare-slice baseline measured in the same run (the machines are shared and noisy).
"""
import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import picomap as pm  # noqa: E402


def per_call_ns(fn, indices) -> float:
    start = time.perf_counter_ns()
    for i in indices:
        fn(i)
    return (time.perf_counter_ns() - start) / len(indices)


def bench_load(folder: Path, n_items: int, rounds: int) -> None:
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 50_000, int(n), dtype=np.int32) for n in rng.integers(16, 1025, n_items)]
    path = folder / "tokens"
    pm.build_map(items, path, progress=False)
    load, n = pm.get_loader_fn(path)
    flat, bounds = np.asarray(load.data), load.starts.tolist()  # the baseline: an ndarray and a Python list
    starts_np = load.starts

    def bare_slice(i):
        return flat[bounds[i]:bounds[i + 1]]

    def legacy_01(i):  # what picomap 0.1 did on every call: a fresh np.memmap, then a copy
        mm = np.memmap(f"{path}.dat", dtype=np.int32, mode="r", shape=(len(flat),))
        return np.array(mm[starts_np[i]:starts_np[i + 1]])

    contenders = {"bare slice (baseline)": bare_slice, "load(i)": load, "load(i, copy=True)":
                  lambda i: load(i, copy=True), "picomap 0.1 load": legacy_01}
    indices = rng.integers(0, n, 50_000).tolist()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():  # interleaved: every contender sees the same machine state
            times[name].append(per_call_ns(fn, indices[:5_000] if "0.1" in name else indices))
    base = statistics.median(times["bare slice (baseline)"])
    print(f"\nload latency: {n:,} int32 token items, lengths 16..1024, {rounds} rounds, medians")
    for name, samples in times.items():
        med = statistics.median(samples)
        print(f"  {name:<24} {med:>9.0f} ns   {med / base:6.2f}x baseline")
    print(f"  load(i) is {statistics.median(times['picomap 0.1 load']) / statistics.median(times['load(i)']):.0f}x "
          "faster than picomap 0.1's loader")


def bench_open(folder: Path, n_items: int, rounds: int) -> None:
    path = folder / "many"
    pm.build_map((np.full(1, i, np.int32) for i in range(n_items)), path, progress=False)
    samples = []
    for _ in range(rounds):
        gc.collect()
        start = time.perf_counter()
        pm.get_loader_fn(path)
        samples.append(time.perf_counter() - start)
    print(f"\nopen: {n_items:,} items, median of {rounds}: {statistics.median(samples) * 1e3:.1f} ms")


def traced_peak(work) -> int:
    """Peak bytes allocated while work() runs, as tracemalloc sees them (numpy reports its buffers)."""
    gc.collect()
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def bench_build_memory(folder: Path, n_items: int) -> None:
    def items():  # 1 KiB each, made on the fly
        return (np.full(256, i, np.int32) for i in range(n_items))
    consume = traced_peak(lambda: all(True for _ in items()))
    build = traced_peak(lambda: pm.build_map(items(), folder / "mem", progress=False))
    print(f"\nbuild peak memory: {n_items:,} items of 1 KiB streamed from a generator (tracemalloc)")
    print(f"  peak: build {build / 1e6:.1f} MB, consuming the generator alone {consume / 1e6:.3f} MB "
          f"-> {(build - consume) / 1e6:.1f} MB beyond the items (one batch, whatever the count)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("PICOMAP_BENCH_DIR")) as tmp:
        folder = Path(tmp)
        if args.quick:
            bench_load(folder, 2_000, rounds=3)
            bench_open(folder, 100_000, rounds=3)
            bench_build_memory(folder, 50_000)
        else:
            bench_load(folder, 20_000, rounds=9)
            bench_open(folder, 2_000_000, rounds=7)
            bench_build_memory(folder, 1_000_000)


if __name__ == "__main__":
    main()

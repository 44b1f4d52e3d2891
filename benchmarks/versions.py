"""This picomap.py against other versions of it, side by side in one process: no change of code may
cost speed unnoticed.

    python benchmarks/versions.py --before OLD.py [--before OLDER.py] [--rounds 5] [--quick]

For token items (16-1024 int32), tiny items (1-8 int64) and spectrograms ((100-1000, 80) float32) it
times build_map, verify_hash and merge_maps (4 shards), and load(i) as a view and as a copy. Each round
runs every version in turn on the same items, each round starting with the next version, so every
version sees the same machine state; figures are medians over rounds, each as a ratio to this one's.
"""
import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1] / "picomap.py"


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def workloads(scale: float) -> dict:
    rng = np.random.default_rng(0)
    return {
        "tokens": [rng.integers(0, 50_000, int(n), dtype=np.int32) for n in rng.integers(16, 1025, int(20_000 * scale))],
        "tiny": [rng.integers(0, 1000, int(n), dtype=np.int64) for n in rng.integers(1, 9, int(200_000 * scale))],
        "spectrograms": [rng.standard_normal((int(n), 80), dtype=np.float32)
                         for n in rng.integers(100, 1001, int(300 * scale))],
    }


def seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def per_item_ns(load, indices, copy) -> float:
    start = time.perf_counter_ns()
    for i in indices:
        load(i, copy)
    return (time.perf_counter_ns() - start) / len(indices)


def measure(pm, items: list, folder: Path) -> dict:
    """One round of one version on one workload: seconds for build, verify, merge; ns for loads."""
    path = folder / "map"
    out = {"build": seconds(lambda: pm.build_map(items, path, progress=False)),
           "verify": seconds(lambda: pm.verify_hash(path, progress=False))}
    quarter = -(-len(items) // 4)
    shards = [folder / f"shard{k}" for k in range(4)]
    for k, shard in enumerate(shards):
        pm.build_map(items[k * quarter:(k + 1) * quarter], shard, progress=False)
    out["merge"] = seconds(lambda: pm.merge_maps(shards, folder / "merged", progress=False))
    load, n = pm.get_loader_fn(path)
    indices = np.random.default_rng(1).integers(0, n, 50_000).tolist()
    out["load view"] = per_item_ns(load, indices, False) * 1e-9
    out["load copy"] = per_item_ns(load, indices, True) * 1e-9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", action="append", default=[], help="another picomap.py (repeatable)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a tenth of the items, 2 rounds")
    args = parser.parse_args()
    versions = {"this": load_module(HERE, "picomap_this")}
    for k, path in enumerate(args.before):
        versions[Path(path).name] = load_module(Path(path).resolve(), f"picomap_before{k}")
    rounds = 2 if args.quick else args.rounds
    for name, items in workloads(0.1 if args.quick else 1.0).items():
        times = {version: {} for version in versions}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(rounds):
                order = list(versions.items())
                for version, pm in order[r % len(order):] + order[:r % len(order)]:  # each goes first in turn
                    folder = Path(tmp) / version
                    folder.mkdir(exist_ok=True)
                    for figure, value in measure(pm, items, folder).items():
                        times[version].setdefault(figure, []).append(value)
        print(f"\n{name}: {len(items):,} items, medians of {rounds} rounds; ratio to this picomap.py")
        figures = list(times["this"])
        print(f"  {'':<14}" + "".join(f"{figure:>16}" for figure in figures))
        for version, by_figure in times.items():
            cells = []
            for figure in figures:
                med, base = statistics.median(by_figure[figure]), statistics.median(times["this"][figure])
                unit = (f"{med * 1e9:.0f} ns" if figure.startswith("load") else f"{med * 1e3:.0f} ms")
                cells.append(f"{unit} {med / base:4.2f}x")
            print(f"  {version:<14}" + "".join(f"{cell:>16}" for cell in cells))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

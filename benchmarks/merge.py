"""merge_maps against its physical limit: cat of the shards' .dat files plus one xxh3_128 pass.

    python benchmarks/merge.py [--quick] [--shards 8] [--shard-mib 64]

Shards hold int32 token items of 16..1024 rows. Contenders run interleaved, several rounds; the
figure is the median ratio to the baseline of the same round. merge_maps also fsyncs its output
(that is its crash safety), so the ratio is given against the baseline with an fsync too.
"""
import argparse
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import picomap as pm  # noqa: E402


def make_shards(folder: Path, shards: int, shard_bytes: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for k in range(shards):
        lengths = rng.integers(16, 1025, shard_bytes // (4 * 520))
        pm.build_map((rng.integers(0, 50_000, int(n), dtype=np.int32) for n in lengths), folder / f"shard{k}",
                     progress=False)
        paths.append(folder / f"shard{k}")
    return paths


def cat_and_hash(shards: list[Path], out: Path, fsync: bool) -> None:
    with open(out, "wb") as target:
        subprocess.run(["cat", *(f"{s}.dat" for s in shards)], stdout=target, check=True)
        if fsync:
            os.fsync(target.fileno())
    with open(out, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        xxhash.xxh3_128(data).hexdigest()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    shards, shard_mib, rounds = (4, 4, 3) if args.quick else (args.shards, args.shard_mib, args.rounds)
    with tempfile.TemporaryDirectory(dir=os.environ.get("PICOMAP_BENCH_DIR")) as tmp:
        folder = Path(tmp)
        paths = make_shards(folder, shards, shard_mib << 20)
        contenders = {
            "cat + xxh3 (baseline)": lambda: cat_and_hash(paths, folder / "cat.dat", fsync=False),
            "cat + fsync + xxh3": lambda: cat_and_hash(paths, folder / "cat.dat", fsync=True),
            "merge_maps": lambda: pm.merge_maps(paths, folder / "merged", progress=False),
        }
        times = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, fn in contenders.items():
                times[name].append(timed(fn))
        total = sum(os.path.getsize(f"{p}.dat") for p in paths)
        items = pm.get_loader_fn(folder / "merged")[1]
    print(f"merge: {shards} shards, {total / 2**20:.0f} MiB, {items:,} int32 token items, medians of {rounds} rounds")
    for name, samples in times.items():
        print(f"  {name:<22} {statistics.median(samples):7.3f} s")
    for base in ("cat + xxh3 (baseline)", "cat + fsync + xxh3"):
        ratios = [m / b for m, b in zip(times["merge_maps"], times[base])]
        print(f"  merge_maps / ({base}): {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()

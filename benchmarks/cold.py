"""Cold random reads of a map larger than what a round touches: picomap's two read paths against the
best exact reads, and a DataLoader over a cold map (Linux).

    python benchmarks/cold.py [--gib 2] [--rounds 3] [--reads 500] [--folder DIR]

One file of random bytes (--gib GiB) is read as three maps of uint8 items: 2 KiB, 64 KiB and 1 MiB.
Before every round of every contender the file's pages are dropped (posix_fadvise(DONTNEED), no
mapping of it alive, which would keep them), then --reads items at random positions (the same for
every contender in a round) are read: picomap's loader with access="cached" and "cold" (a copy;
for "cold" also a view whose every page is touched), one os.preadv into a new array, and a plain
mapping advised MADV_RANDOM with one madvise(MADV_WILLNEED) an item before copying it. Medians of
--rounds; ratios to the better of the last two, measured alongside.
"""
import argparse
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import picomap as pm  # noqa: E402


def drop_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def craft(folder: Path, dat: Path, item_bytes: int) -> Path:
    """A map of the shared .dat (a hard link) cut into uint8 items of item_bytes."""
    base = folder / f"items{item_bytes}"
    os.link(dat, f"{base}.dat")
    count = dat.stat().st_size // item_bytes
    np.save(f"{base}.starts.npy", np.arange(count + 1, dtype=np.uint64) * item_bytes)
    Path(f"{base}.json").write_text(f'{{"trail_dim": [], "hash": "{"0" * 32}", "creation_time": "", '
                                    f'"dtype": "uint8", "count": {count}, "total_rows": {count * item_bytes}}}')
    return base


def picomap_reads(access, how):
    def run(base, picks, item_bytes):
        with pm.MapLoader(base, access=access) as load:
            for i in picks:
                if how == "copy":
                    load(i, copy=True)
                else:  # a view, every page of it touched
                    int(load(i)[::mmap.PAGESIZE].sum())
    return run


def preadv_reads(base, picks, item_bytes):
    fd = os.open(f"{base}.dat", os.O_RDONLY)
    try:
        for i in picks:
            out = np.empty(item_bytes, np.uint8)
            os.preadv(fd, [out], i * item_bytes)
    finally:
        os.close(fd)


def willneed_reads(base, picks, item_bytes):
    with open(f"{base}.dat", "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mapping.madvise(mmap.MADV_RANDOM)
    data = np.frombuffer(mapping, np.uint8)
    for i in picks:
        start = i * item_bytes
        aligned = start - start % mmap.PAGESIZE
        mapping.madvise(mmap.MADV_WILLNEED, aligned, start + item_bytes - aligned)
        data[start:start + item_bytes].copy()
    del data
    mapping.close()


CONTENDERS = {"cached path, copy": picomap_reads("cached", "copy"), "cold path, copy": picomap_reads("cold", "copy"),
              "cold path, view + touch": picomap_reads("cold", "view"), "preadv": preadv_reads,
              "MADV_WILLNEED + copy": willneed_reads}


class PreadvItems:
    """A dataset reading each item with one preadv: the DataLoader figure's baseline."""

    def __init__(self, base, item_bytes, count):
        self.path, self.item_bytes, self.count, self.fd = f"{base}.dat", item_bytes, count, None

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        out = np.empty(self.item_bytes, np.uint8)
        os.preadv(self.fd, [out], i * self.item_bytes)
        return out

    def __getstate__(self):
        return {**self.__dict__, "fd": None}


def dataloader_rate(dataset, items: int) -> float:
    from torch.utils.data import DataLoader
    sampler = pm.Sampler(len(dataset), seed=1)
    loader = DataLoader(dataset, sampler=sampler, batch_size=64, num_workers=2, collate_fn=np.stack)  # copies
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch)
        if seen >= items:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reads", type=int, default=500)
    parser.add_argument("--loader-items", type=int, default=20_000)
    parser.add_argument("--folder", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        folder = Path(tmp)
        dat = folder / "random.bin"
        with open(dat, "wb") as f:
            rng = np.random.default_rng(0)
            for _ in range(int(args.gib * 1024) // 64):
                f.write(rng.integers(0, 256, 64 << 20, dtype=np.uint8).tobytes())
        print(f"cold random reads of a {dat.stat().st_size / 2**30:.1f} GiB file, {args.reads} a round, "
              f"medians of {args.rounds} (x: to the better of preadv and MADV_WILLNEED)")
        for item_bytes in (2 << 10, 64 << 10, 1 << 20):
            base = craft(folder, dat, item_bytes)
            count = dat.stat().st_size // item_bytes
            times = {name: [] for name in CONTENDERS}
            for round_ in range(args.rounds):
                picks = np.random.default_rng(round_).integers(0, count, min(args.reads, count // 4)).tolist()
                for name, run in CONTENDERS.items():
                    drop_pages(dat)
                    start = time.perf_counter()
                    run(base, picks, item_bytes)
                    times[name].append((time.perf_counter() - start) / len(picks))
            best = min(statistics.median(times["preadv"]), statistics.median(times["MADV_WILLNEED + copy"]))
            print(f"\n  items of {item_bytes // 1024} KiB")
            for name, samples in times.items():
                med = statistics.median(samples)
                print(f"    {name:<26} {med * 1e6:8.1f} us  {med / best:5.2f}x")
        try:
            import torch  # noqa: F401
        except ImportError:
            return
        base = folder / "items2048"
        rates = {"picomap, access='cold'": [], "preadv dataset": []}
        for _ in range(args.rounds):
            for name in rates:
                drop_pages(dat)
                dataset = pm.MapLoader(base, access="cold") if "picomap" in name else \
                    PreadvItems(base, 2048, dat.stat().st_size // 2048)
                rates[name].append(dataloader_rate(dataset, args.loader_items))
                del dataset
        print(f"\n  DataLoader, 2 workers, batch_size=64, shuffled, cold, 2 KiB items, the first "
              f"{args.loader_items:,}: items/s, medians of {args.rounds}")
        base_rate = statistics.median(rates["preadv dataset"])
        for name, samples in rates.items():
            print(f"    {name:<26} {statistics.median(samples):10,.0f}  {statistics.median(samples) / base_rate:5.2f}x")


if __name__ == "__main__":
    main()

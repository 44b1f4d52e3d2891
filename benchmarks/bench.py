"""picomap beside its peers and the physical limit, on three workloads.

    pip install ".[bench]"
    python benchmarks/bench.py [--quick] [--rounds N] [--workloads tokens,tiny,spectrograms]
                               [--scale X] [--chart PATH]

Every contender runs in the same process run, interleaved round by round (each round builds, opens,
reads and verifies every contender before the next round starts), so all see the same machine.
Figures are medians over the rounds; speed is also given as a ratio to "the limit" measured in the
same run. Builds run in a forked child, so that the peak memory of each build can be read apart.

Contenders:
  limit        build: np.concatenate + write + fsync + one xxh3_128 over the bytes; load: a bare
               slice of the mapped data with the offsets in a Python list; verify: one xxh3_128 pass
  picomap      build_map / get_loader_fn / verify_hash (and picomap-cold: access="cold")
  npy-files    one .npy per item (np.save; np.load with mmap_mode="r" for views, without for copies)
  h5py-vlen    one variable-length h5py dataset (items flattened; lengths kept beside)
  h5py-flat    one flat h5py dataset of rows plus an offsets dataset
  hf-datasets  Hugging Face datasets: from_generator + save_to_disk, load_from_disk, numpy format
Cold reads: each of 20 a round drops the files from the page cache (posix_fadvise DONTNEED, no mapping
alive) and reopens them first, so that no read warms the next.
"""
import argparse
import gc
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import picomap as pm  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never reach for the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


# ---------------------------------------------------------------- workloads

def tokens(n, rng):
    return [rng.integers(0, 50_000, int(k), dtype=np.int32) for k in rng.integers(16, 1025, n)]


def tiny(n, rng):
    return [rng.integers(0, 1 << 40, int(k), dtype=np.int64) for k in rng.integers(1, 9, n)]


def spectrograms(n, rng):
    return [rng.standard_normal((int(t), 80), dtype=np.float32) for t in rng.integers(100, 1001, n)]


# name: (maker, items by default, items with --quick)
WORKLOADS = {"tokens": (tokens, 20_000, 2_000), "tiny": (tiny, 200_000, 5_000),
             "spectrograms": (spectrograms, 300, 40)}


# ---------------------------------------------------------------- contenders

class Limit:
    """What the hardware allows: one array, one file, one hash."""
    name, has_view, can_verify = "limit", True, True

    def build(self, items, folder):
        flat = np.concatenate(items)
        with open(folder / "data.bin", "wb") as f:
            f.write(flat.tobytes() if flat.dtype.byteorder == ">" else flat)  # native: no copy
            f.flush()
            os.fsync(f.fileno())
        xxhash.xxh3_128(flat).hexdigest()
        np.save(folder / "offsets.npy", np.cumsum([0] + [len(a) for a in items]))
        (folder / "layout.txt").write_text(f"{flat.dtype.str} {' '.join(map(str, flat.shape[1:]))}")

    def open(self, folder):
        dtype, *trail = (folder / "layout.txt").read_text().split(" ")
        mapped = np.memmap(folder / "data.bin", dtype=dtype, mode="r")  # a plain ndarray over it slices fastest
        data = np.asarray(mapped).reshape(-1, *map(int, filter(None, trail)))
        bounds = np.load(folder / "offsets.npy").tolist()
        return Reader(lambda i: data[bounds[i]:bounds[i + 1]], lambda i: data[bounds[i]:bounds[i + 1]].copy(),
                      len(bounds) - 1, data)

    def verify(self, folder):
        xxhash.xxh3_128(np.memmap(folder / "data.bin", mode="r")).hexdigest()


class Picomap:
    name, has_view, can_verify = "picomap", True, True

    def __init__(self, access="cached"):
        self.access = access
        if access == "cold":
            self.name = "picomap-cold"

    def build(self, items, folder):
        pm.build_map(items, folder / "map", progress=False)

    def open(self, folder):
        load, n = pm.get_loader_fn(folder / "map", access=self.access)
        return Reader(load, lambda i: load(i, copy=True), n, load)

    def verify(self, folder):
        pm.verify_hash(folder / "map", progress=False)


class NpyFiles:
    name, has_view, can_verify = "npy-files", True, False

    def build(self, items, folder):
        for i, a in enumerate(items):
            np.save(folder / f"{i}.npy", a)

    def open(self, folder):
        n = sum(1 for _ in folder.iterdir())
        return Reader(lambda i: np.load(folder / f"{i}.npy", mmap_mode="r"),
                      lambda i: np.load(folder / f"{i}.npy"), n, None)


class H5Vlen:
    name, has_view, can_verify = "h5py-vlen", False, False

    def build(self, items, folder):
        import h5py
        with h5py.File(folder / "data.h5", "w") as f:
            d = f.create_dataset("items", (len(items),), dtype=h5py.vlen_dtype(items[0].dtype))
            for i, a in enumerate(items):
                d[i] = a.reshape(-1)
            f["shapes"] = np.array([a.shape for a in items])

    def open(self, folder):
        import h5py
        f = h5py.File(folder / "data.h5", "r")
        items, shapes = f["items"], f["shapes"][()]
        get = lambda i: items[i].reshape(shapes[i])  # noqa: E731
        return Reader(get, get, len(shapes), f)


class H5Flat:
    name, has_view, can_verify = "h5py-flat", False, False

    def build(self, items, folder):
        import h5py
        with h5py.File(folder / "data.h5", "w") as f:
            f["rows"] = np.concatenate(items)
            f["offsets"] = np.cumsum([0] + [len(a) for a in items])

    def open(self, folder):
        import h5py
        f = h5py.File(folder / "data.h5", "r")
        rows, bounds = f["rows"], f["offsets"][()].tolist()
        get = lambda i: rows[bounds[i]:bounds[i + 1]]  # noqa: E731
        return Reader(get, get, len(bounds) - 1, f)


class HFDatasets:
    name, has_view, can_verify = "hf-datasets", False, False

    def build(self, items, folder):
        from datasets import Array2D, Dataset, Features, Sequence, Value
        a = items[0]
        x = Sequence(Value(str(a.dtype))) if a.ndim == 1 else Array2D(shape=(None, *a.shape[1:]), dtype=str(a.dtype))
        ds = Dataset.from_generator(_hf_rows, features=Features({"x": x}), cache_dir=str(folder / "cache"),
                                    gen_kwargs={"path": str(folder / "items.npy")}, keep_in_memory=False) \
            if _stage_items(items, folder) else None
        ds.save_to_disk(str(folder / "ds"))
        del ds
        shutil.rmtree(folder / "cache")
        (folder / "items.npy").unlink()

    def open(self, folder):
        from datasets import load_from_disk
        ds = load_from_disk(str(folder / "ds")).with_format("numpy")
        get = lambda i: ds[i]["x"]  # noqa: E731
        return Reader(get, get, len(ds), ds, iterate=lambda: (row["x"] for row in ds))  # its fastest pass


def _stage_items(items, folder):
    """HF's from_generator fingerprints its arguments: hand it a path, not the arrays themselves."""
    np.save(folder / "items.npy", np.array(items + [None], dtype=object)[:-1], allow_pickle=True)
    return True


def _hf_rows(path):
    for a in np.load(path, allow_pickle=True):  # the benchmark's own file, written just above
        yield {"x": a}


class Reader:
    """A contender's opened dataset: view(i), copy(i), n, and what keeps it open. A full pass
    copies every item in order, so that every contender really reads every byte."""

    def __init__(self, view, copy, n, handle, iterate=None):
        self.view, self.copy, self.n, self.handle = view, copy, n, handle
        self.iterate = iterate or (lambda: (copy(i) for i in range(n)))


CONTENDERS = [Limit(), Picomap(), Picomap(access="cold"), NpyFiles(), H5Vlen(), H5Flat(), HFDatasets()]


# ---------------------------------------------------------------- measuring

def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _build_child(contender, items, folder, queue):
    before = rss_kib()  # what the forked child shares with us: the items and everything else
    seconds, _ = timed(lambda: contender.build(items, folder))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((seconds, max(0, peak - before) * 1024))


def build_in_child(contender, items, folder):
    """Build in a forked child: its time, and its peak memory beyond what it started with."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_build_child, args=(contender, items, folder, queue))
    child.start()
    result = queue.get()
    child.join()
    if child.exitcode:
        raise RuntimeError(f"{contender.name}: build failed")
    return result


def disk_bytes(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def drop_from_page_cache(folder):
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def per_item_us(get, indices):
    start = time.perf_counter()
    for i in indices:  # keep nothing: 20k live np.memmaps would exhaust the file handles
        get(i)
    return (time.perf_counter() - start) / len(indices) * 1e6


def measure(contender, items, folder, rng, reads):
    """One round of every figure for one contender."""
    figures = {}
    figures["build s"], figures["build MB"] = build_in_child(contender, items, folder)
    figures["build MB"] /= 1e6
    figures["disk MB"] = disk_bytes(folder) / 1e6
    figures["open ms"], reader = timed(lambda: contender.open(folder))
    figures["open ms"] *= 1e3
    indices = rng.integers(0, reader.n, reads).tolist()
    if contender.has_view:
        figures["view us"] = per_item_us(reader.view, indices)
    figures["copy us"] = per_item_us(reader.copy, indices)
    figures["pass s"], _ = timed(lambda: sum(x.size for x in reader.iterate()))
    if contender.can_verify:
        figures["verify s"], _ = timed(lambda: contender.verify(folder))
    reader = None
    cold_us = []
    for i in indices[:COLD_READS]:  # each read from a dropped cache: one read must not warm the next
        gc.collect()  # no mapping of the files alive, or their pages stay cached
        drop_from_page_cache(folder)
        cold = contender.open(folder)
        cold_us.append(per_item_us(cold.copy, [i]))
        cold = None
    gc.collect()
    figures["cold copy us"] = statistics.median(cold_us)
    return figures


# Cold reads a round: each drops the page cache and reopens the map first.
COLD_READS = 20


# A contender whose build takes longer than this in round 1 is measured in round 1 only (marked *):
# on 200k tiny items, one file or one h5py write an item takes minutes a round.
SLOW_BUILD_SECONDS = 10

FIGURES = ["build s", "build MB", "disk MB", "open ms", "view us", "copy us", "cold copy us", "pass s", "verify s"]


def run(workloads, rounds, scale, quick):
    results = {}
    for name in workloads:
        maker, n, n_quick = WORKLOADS[name]
        items = maker(max(1, int((n_quick if quick else n) * scale)), np.random.default_rng(0))
        samples, once = {c.name: {} for c in CONTENDERS}, set()
        for r in range(rounds):
            for contender in (c for c in CONTENDERS if c.name not in once):
                folder = Path(tempfile.mkdtemp(prefix=f"bench-{contender.name}-", dir=os.environ.get("PICOMAP_BENCH_DIR")))
                try:
                    figures = measure(contender, items, folder, np.random.default_rng(r), 2_000 if quick else 20_000)
                finally:
                    shutil.rmtree(folder)
                for key, value in figures.items():
                    samples[contender.name].setdefault(key, []).append(value)
                if figures["build s"] > SLOW_BUILD_SECONDS:
                    once.add(contender.name)
            print(f"  {name}: round {r + 1}/{rounds} done", file=sys.stderr)
        results[name] = (len(items), sum(a.nbytes for a in items),
                         {c + ("*" if c in once and rounds > 1 else ""): {k: statistics.median(v) for k, v in figs.items()}
                          for c, figs in samples.items()})
    return results


# ---------------------------------------------------------------- reporting

def report(results):
    for name, (n, nbytes, table) in results.items():
        limit = table["limit"]
        print(f"\n### {name}: {n:,} items, {nbytes / 1e6:.0f} MB (medians; x = ratio to the limit; "
              f"* = measured in round 1 only, its build being slower than {SLOW_BUILD_SECONDS} s)\n")
        print("| contender | " + " | ".join(FIGURES) + " |")
        print("|---" * (len(FIGURES) + 1) + "|")
        for contender, figures in table.items():
            cells = []
            for key in FIGURES:
                if key not in figures:
                    cells.append("-")
                    continue
                value = figures[key]
                ratio = f" ({value / limit[key]:.2f}x)" if key in limit and contender != "limit" and limit[key] > 0 \
                    and key not in ("build MB", "disk MB") else ""
                cells.append(f"{value:.3g}{ratio}")
            print(f"| {contender} | " + " | ".join(cells) + " |")


def chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = ["build s", "open ms", "copy us", "cold copy us", "pass s"]
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (name, (n, nbytes, table)) in zip(axes[0], results.items()):
        names = [c for c in table if c != "limit"]
        width = 0.8 / len(names)
        for k, contender in enumerate(names):
            ratios = [table[contender].get(key, math.nan) / table["limit"][key] for key in shown]
            ax.bar(np.arange(len(shown)) + k * width, ratios, width, label=contender)
        ax.axhline(1, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(shown)) + 0.4 - width / 2, shown, rotation=20)
        ax.set_title(f"{name}: {n:,} items, {nbytes / 1e6:.0f} MB")
        ax.set_ylabel("time / the limit's (log; lower is better)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"\nchart: {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and 1 round: well under 30 s")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every workload's item count")
    parser.add_argument("--chart", help="write a PNG chart here (needs matplotlib)")
    args = parser.parse_args(argv)
    results = run(args.workloads.split(","), 1 if args.quick else args.rounds, args.scale, args.quick)
    report(results)
    if args.chart:
        chart(results, args.chart)


if __name__ == "__main__":
    main()

"""Packed language-model windows (pm.Windows) against a Megatron-style index build and a plain memmap.

    python benchmarks/windows.py [--quick] [--sizes 1e6,1e8,1e9] [--folder DIR] [--rounds 5]

(a) Open to first batch, in a fresh process for each figure, on maps of 10^6 to 10^9 documents:
    picomap opens the map, makes ``Windows(load, 1024)`` and a shuffled ``Sampler``, and returns a
    first batch of 32 windows copied to int64 with their ``cu_seqlens``. The Megatron-style build
    does what Megatron-LM's GPTDataset does before its first sample, in numpy: the document index
    (every document, shuffled with numpy's RandomState, int32), the sample index (for each sample
    boundary its document and offset, as ``build_sample_idx`` walks the documents, here
    vectorised in chunks of 4M documents so that it needs no more than the document index
    besides) and the shuffle index (the samples, shuffled), then reads its first 32 samples. Both
    read the same map; its offsets are mapped, so reading them costs page cache, not private
    memory. Megatron itself also writes these indices to disk and loads them on every rank: not
    counted. Maps are crafted, not built: documents of 0 to 7 tokens (mean 3.5, uint16), real
    offsets (8 bytes a document on disk: 8 GB at 10^9) and a sparse .dat; removed afterwards.
    Time: wall clock from before opening to the batch in hand. Memory: tracemalloc's peak (numpy's
    and Python's allocations) and the growth of the process's anonymous memory, sampled every 10 ms.
(b) On a map of real-looking documents (lognormal lengths, median ~400 tokens): ``w[k]`` against
    the bare slice ``data[k*L:k*L+L+1]`` of the mapped rows (ratio of medians, rounds interleaved);
    ``cu_seqlens(k)`` per window; and windows a second through a DataLoader with 2 workers (batch
    32, seq_len 1024, a Sampler's order, steady state after the first batch) for picomap's windows,
    picomap's windows with their boundaries packed as the README's recipe does, and the same loop
    over a plain uint16 np.memmap opened for each batch as nanoGPT does.
"""
import argparse
import gc
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import picomap as pm  # noqa: E402

SEQ_LEN, BATCH = 1024, 32
PATTERN = np.arange(8)  # document lengths of the crafted maps, repeated: 0..7 tokens
CHUNK = 1 << 22
BUILD = []  # the Megatron-style child's index build time, apart from reading its first batch


# ---------------------------------------------------------------- maps

def craft(base: Path, n_docs: int) -> Path:
    """A valid map of n_docs uint16 documents of 0..7 tokens: real offsets written in chunks, a sparse .dat."""
    prefix = np.concatenate(([0], np.cumsum(PATTERN)))
    period, per = len(PATTERN), int(prefix[-1])
    total = (n_docs // period) * per + int(prefix[n_docs % period])
    with open(f"{base}.starts.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<u8", "fortran_order": False, "shape": (n_docs + 1,)})
        for a in range(0, n_docs + 1, 1 << 24):
            i = np.arange(a, min(a + (1 << 24), n_docs + 1), dtype=np.int64)
            f.write(((i // period) * per + prefix[i % period]).astype("<u8").tobytes())
    with open(f"{base}.dat", "wb") as f:
        f.truncate(total * 2)
    Path(f"{base}.json").write_text(json.dumps({"trail_dim": [], "hash": "0" * 32, "creation_time": "",
                                                "dtype": "uint16", "count": n_docs, "total_rows": total}))
    return base


def documents_map(base: Path, n_tokens: int) -> Path:
    """A map of about n_tokens random uint16 tokens in documents of lognormal lengths (1..200k)."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.0, 1.2, n_tokens // 200 + 10), 1, 200_000).astype(np.int64)
    lengths = lengths[:np.searchsorted(np.cumsum(lengths), n_tokens) + 1]
    starts = np.concatenate(([0], np.cumsum(lengths)))
    np.save(f"{base}.starts.npy", starts.astype(np.uint64))
    rng.integers(0, 50257, int(starts[-1]), dtype=np.uint16).tofile(f"{base}.dat")
    Path(f"{base}.json").write_text(json.dumps({"trail_dim": [], "hash": "0" * 32, "creation_time": "",
                                                "dtype": "uint16", "count": len(lengths),
                                                "total_rows": int(starts[-1])}))
    return base


# ---------------------------------------------------------------- (a) open to first batch, in a child

def anonymous() -> int:
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
    return 0


class Peak:
    """The highest anonymous memory seen while the block runs, above what it was at the start."""
    def __enter__(self):
        self.start = self.peak = anonymous()
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, anonymous())
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.growth = max(self.peak, anonymous()) - self.start


def picomap_first_batch(path: str) -> list:
    load, _ = pm.get_loader_fn(path)
    w = pm.Windows(load, SEQ_LEN)
    ks = list(itertools.islice(iter(pm.Sampler(w, seed=0)), BATCH))
    windows = w.__getitems__(ks)
    return [np.stack(windows).astype(np.int64), [w.cu_seqlens(k) for k in ks]]


def megatron_indices(starts: np.ndarray, seq_len: int, seed: int):
    """Megatron GPTDataset's three indices for one epoch: document, sample and shuffle."""
    n_docs, total = len(starts) - 1, int(starts[-1])
    random = np.random.RandomState(seed)
    document_index = np.arange(n_docs, dtype=np.int32)
    random.shuffle(document_index)
    n_samples = (total - 1) // seq_len
    sample_index = np.empty((n_samples + 1, 2), np.int32 if n_docs < 2**31 else np.int64)
    before, next_sample = 0, 0  # tokens in the documents before this chunk; the next boundary to place
    for a in range(0, n_docs, CHUNK):
        ids = document_index[a:a + CHUNK].astype(np.int64)
        sizes = starts[ids + 1] - starts[ids]
        ends = before + np.cumsum(sizes)  # tokens up to the end of each document, in index order
        last = min(n_samples, (int(ends[-1]) - 1) // seq_len) if len(ends) and ends[-1] > 0 else -1
        if last >= next_sample:
            boundaries = np.arange(next_sample, last + 1, dtype=np.int64) * seq_len
            at = np.searchsorted(ends, boundaries, side="right")  # the document holding each boundary token
            sample_index[next_sample:last + 1, 0] = a + at
            sample_index[next_sample:last + 1, 1] = boundaries - (ends[at] - sizes[at])
            next_sample = last + 1
        before = int(ends[-1]) if len(ends) else before
    shuffle_index = np.arange(n_samples, dtype=np.uint32 if n_samples < 2**32 else np.int64)
    random.shuffle(shuffle_index)
    return document_index, sample_index, shuffle_index


def megatron_sample(data, starts, document_index, sample_index, s: int) -> np.ndarray:
    (d0, o0), (d1, o1) = sample_index[s], sample_index[s + 1]
    parts = []
    for position in range(d0, d1 + 1):
        doc = int(document_index[position])
        begin, end = int(starts[doc]), int(starts[doc + 1])
        first = begin + (int(o0) if position == d0 else 0)  # int: NumPy 2 keeps int32 and overflows
        last = begin + int(o1) + 1 if position == d1 else end
        parts.append(data[first:last])
    return np.concatenate(parts)


def megatron_first_batch(path: str) -> list:
    files = pm.map_files(path)
    starts = np.load(files.starts, mmap_mode="r").view(np.int64)
    data = np.memmap(files.dat, np.uint16, "r")
    start = time.perf_counter()
    document_index, sample_index, shuffle_index = megatron_indices(starts, SEQ_LEN, seed=0)
    BUILD.append(time.perf_counter() - start)
    samples = [megatron_sample(data, starts, document_index, sample_index, int(s)) for s in shuffle_index[:BATCH]]
    return [np.stack(samples).astype(np.int64)]


def child(job: str, path: str, traced: bool) -> dict:
    work = {"picomap": picomap_first_batch, "megatron": megatron_first_batch}[job]
    gc.collect()
    if traced:
        tracemalloc.start()
    with Peak() as peak:
        start = time.perf_counter()
        batch = work(path)
        seconds = time.perf_counter() - start
    out = {"seconds": seconds, "anonymous": peak.growth, "shape": list(batch[0].shape), "build": sum(BUILD)}
    if traced:
        out["traced"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out


def in_child(job: str, path: Path, traced: bool, timeout: float) -> dict:
    try:
        result = subprocess.run([sys.executable, __file__, "--child", job, str(path), str(int(traced))],
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if result.returncode:
        return {"error": (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def mib(x: float) -> str:
    return f"{x / 2**20:.2f} MiB" if x < 2**30 else f"{x / 2**30:.2f} GiB"


def open_to_first_batch(folder: Path, sizes: list, rounds: int, timeout: float) -> None:
    print(f"### (a) open to first batch: {BATCH} windows of {SEQ_LEN} tokens, shuffled, each in a fresh process")
    print("| documents | tokens | picomap time | picomap traced / anonymous | Megatron-style time | "
          "Megatron-style traced / anonymous | time ratio |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        base = craft(folder / f"docs{n}", n)
        tokens = json.loads(Path(f"{base}.json").read_text())["total_rows"]
        times = [in_child("picomap", base, False, timeout)["seconds"] for _ in range(rounds)]
        mine, memory = statistics.median(times), in_child("picomap", base, True, timeout)
        need = 4 * n + 3 * CHUNK * 8 + 8 * (tokens // SEQ_LEN)  # document index, a chunk, sample and shuffle index
        if need > 0.6 * memory_available():
            theirs = {"error": f"skipped: needs about {mib(need)}, more than 60% of the {mib(memory_available())} "
                               "available"}
        else:
            theirs = in_child("megatron", base, True, timeout)
        for f in pm.map_files(base):
            f.unlink(missing_ok=True)
        mine_cell = f"{mine * 1e3:.2f} ms"
        mine_memory = f"{mib(memory['traced'])} / {mib(memory['anonymous'])}"
        if "error" in theirs:
            cells = [theirs["error"], "", ""]
        else:
            cells = [f"{theirs['seconds']:.2f} s ({theirs['build']:.2f} s build)",
                     f"{mib(theirs['traced'])} / {mib(theirs['anonymous'])}",
                     f"{theirs['seconds'] / mine:,.0f}x"]
        print(f"| {n:.0e} | {tokens:.2e} | {mine_cell} | {mine_memory} | {' | '.join(cells)} |", flush=True)


# ---------------------------------------------------------------- (b) per window, and through a DataLoader

class MemmapWindows:
    """nanoGPT's way: a plain uint16 np.memmap, opened again for each batch, windows sliced from it."""
    def __init__(self, path: Path, seq_len: int):
        self.path, self.seq_len = path, seq_len
        self.count = (os.path.getsize(path) // 2 - 1) // seq_len

    def __len__(self):
        return self.count

    def __getitems__(self, ks):
        data = np.memmap(self.path, np.uint16, "r")
        return [data[k * self.seq_len:k * self.seq_len + self.seq_len + 1] for k in ks]


class WindowsWithBoundaries:
    """The README recipe's dataset: each window and its cu_seqlens."""
    def __init__(self, windows):
        self.windows = windows

    def __len__(self):
        return len(self.windows)

    def __getitems__(self, ks):
        return [(self.windows[k], self.windows.cu_seqlens(k)) for k in ks]


def stack(windows):
    import torch
    return torch.from_numpy(np.stack(windows).astype(np.int64))


def pack(samples):  # the README recipe's collate
    import torch
    tokens = np.stack([window for window, _ in samples]).astype(np.int64)
    seq_len = tokens.shape[1] - 1
    out = np.empty((3, len(samples), seq_len), np.int64)
    out[0], out[1] = tokens[:, :-1], tokens[:, 1:]
    for row, (_, cu) in enumerate(samples):
        out[2, row] = np.arange(seq_len) - np.repeat(cu[:-1], np.diff(cu))
        out[1, row, cu[1:-1] - 1] = -100
    return torch.from_numpy(out)


def windows_per_second(dataset, collate, batches: int) -> float:
    from torch.utils.data import DataLoader
    loader = DataLoader(dataset, sampler=pm.Sampler(len(dataset), seed=1), batch_size=BATCH, num_workers=2,
                        collate_fn=collate)
    count, start = 0, None
    for batch in loader:
        if start is None:
            start = time.perf_counter()  # steady state: worker start-up and the first batch apart
        else:
            count += BATCH
        if count >= batches * BATCH:
            break
    return count / (time.perf_counter() - start)


def per_window(folder: Path, n_tokens: int, rounds: int, picks: int, batches: int) -> None:
    base = documents_map(folder / "documents", n_tokens)
    load, n_docs = pm.get_loader_fn(base)
    w, data = pm.Windows(load, SEQ_LEN), load.data
    ks = np.random.default_rng(0).integers(0, len(w), picks).tolist()
    L, span = SEQ_LEN, SEQ_LEN + 1
    for k in ks:
        w.cu_seqlens(k)  # every chunk of offsets checked once, as a first pass would
    timings = {"w[k]": [], "bare": [], "cu_seqlens": []}
    for _ in range(rounds):
        start = time.perf_counter()
        for k in ks:
            data[k * L:k * L + span]
        timings["bare"].append((time.perf_counter() - start) / picks)
        start = time.perf_counter()
        for k in ks:
            w[k]
        timings["w[k]"].append((time.perf_counter() - start) / picks)
        start = time.perf_counter()
        for k in ks:
            w.cu_seqlens(k)
        timings["cu_seqlens"].append((time.perf_counter() - start) / picks)
    med = {name: statistics.median(t) for name, t in timings.items()}
    ratios = statistics.median(a / b for a, b in zip(timings["w[k]"], timings["bare"]))
    boundaries = statistics.mean(len(w.cu_seqlens(k)) - 2 for k in ks[:2000])
    print(f"\n### (b) {n_docs:,} documents, {len(data):,} tokens (median document "
          f"{int(np.median(np.diff(load.starts)))}), seq_len {SEQ_LEN}, {len(w):,} windows; medians of {rounds} rounds")
    print("| operation | per window | ratio |")
    print("|---|---|---|")
    print(f"| bare slice `data[k*L:k*L+L+1]` | {med['bare'] * 1e9:.0f} ns | 1 |")
    print(f"| `w[k]` | {med['w[k]'] * 1e9:.0f} ns | {ratios:.2f}x |")
    print(f"| `w.cu_seqlens(k)` ({boundaries:.1f} boundaries a window) | {med['cu_seqlens'] * 1e6:.2f} µs | |")
    try:
        import torch  # noqa: F401
    except ImportError:
        print("(DataLoader figures skipped: torch is not installed)")
        return
    contenders = {"np.memmap, nanoGPT-style": (MemmapWindows(Path(f"{base}.dat"), SEQ_LEN), stack),
                  "pm.Windows": (w, stack),
                  "pm.Windows + boundaries (README's pack)": (WindowsWithBoundaries(w), pack)}
    rates = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, (dataset, collate) in contenders.items():
            rates[name].append(windows_per_second(dataset, collate, batches))
    base_rates = rates["np.memmap, nanoGPT-style"]
    print(f"\nDataLoader, 2 workers, batch {BATCH}, windows of {SEQ_LEN} tokens copied to int64, "
          f"{batches} batches a pass, medians of {rounds} rounds")
    print("| contender | windows/s | ratio to np.memmap |")
    print("|---|---|---|")
    for name, rate in rates.items():
        ratio = statistics.median(a / b for a, b in zip(rate, base_rates))
        print(f"| {name} | {statistics.median(rate):,.0f} | {ratio:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--sizes", default=None, help="documents for (a), comma-separated (default 1e6,1e8,1e9)")
    parser.add_argument("--folder", default=None, help="where the temporary maps go (default: the system's)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a child is given up")
    parser.add_argument("--parts", default="a,b", help="which parts to run: a (open to first batch), b, or both")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job, path, traced = args.child
        print(json.dumps(child(job, path, traced == "1")))
        return
    sizes = [int(float(s)) for s in (args.sizes or ("1e4,1e5" if args.quick else "1e6,1e8,1e9")).split(",")]
    rounds = args.rounds or (2 if args.quick else 5)
    folder = Path(tempfile.mkdtemp(prefix="picomap-windows-", dir=args.folder))
    try:
        if "a" in args.parts:
            open_to_first_batch(folder, sizes, rounds, args.timeout)
        if "b" in args.parts:
            per_window(folder, 2_000_000 if args.quick else 100_000_000, rounds, picks=20_000 if args.quick else 200_000,
                       batches=20 if args.quick else 200)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

"""A PyTorch DataLoader over a picomap loader against the same loop over a list of in-memory arrays.

    python benchmarks/dataloader.py [--quick]

One full pass per contender per round, contenders interleaved, several rounds; medians and the
ratio picomap / in-memory list for each number of workers. Needs torch.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import picomap as pm  # noqa: E402


def to_tensor(item):
    return torch.from_numpy(item.astype(np.int64))


def pad(batch):
    out = torch.zeros(len(batch), max(len(x) for x in batch), dtype=torch.int64)
    for row, x in zip(out, batch):
        row[:len(x)] = torch.from_numpy(x.astype(np.int64))
    return out


def one_pass(dataset, workers: int, batch_size) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=pad if batch_size else to_tensor, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n_items, rounds = (2_000, 2) if args.quick else (20_000, 3)
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 50_000, int(n), dtype=np.int32) for n in rng.integers(16, 1025, n_items)]
    with tempfile.TemporaryDirectory() as tmp:
        pm.build_map(items, Path(tmp) / "tokens", progress=False)
        load, _ = pm.get_loader_fn(Path(tmp) / "tokens")
        setups = [(workers, batch) for batch in (None, 64) for workers in (0, 2)]
        times = {(source, *setup): [] for source in ("picomap", "list") for setup in setups}
        for _ in range(rounds):
            for setup in setups:
                for source, dataset in (("picomap", load), ("list", items)):
                    times[(source, *setup)].append(one_pass(dataset, *setup))
    print(f"DataLoader, one shuffled pass over {n_items:,} int32 token items, medians of {rounds} rounds")
    for workers, batch in setups:
        ours, theirs = (statistics.median(times[s, workers, batch]) for s in ("picomap", "list"))
        print(f"  {workers} workers, batch_size={batch}: picomap {ours:.3f} s, in-memory list {theirs:.3f} s, "
              f"ratio {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()

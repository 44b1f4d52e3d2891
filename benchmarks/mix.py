"""pm.Mix beside a Megatron-style blending table: construction, memory, locate, prefix proportions.

    python benchmarks/mix.py [--quick] [--rounds 3] [--deviation-positions 1e7]

The baseline is Megatron-LM's blend as its C++ helper builds it, written here in numpy: for each
sample in turn, the dataset furthest behind its weight (the largest ``w[d] * max(i, 1) - drawn[d]``)
gets it; the table holds each sample's dataset (int16) and its index within that dataset (int64),
10 bytes a sample. It is built with one Python step a sample (vectorised over the datasets), so
its construction time is far above the C++ helper's; its memory and lookup cost are the helper's.
It is built only where it fits (10^6 samples; 10^9 would be 10 GB, 10^12 10 TB).

Figures, all in one run: construction time (median of --rounds; the table once), peak memory of
construction (tracemalloc), the median cost of one random locate (``mix.locate(i)``; for the
table, reading both arrays at i) over --rounds rounds of 20,000 random positions, and the worst
deviation of any prefix (of the first --deviation-positions) from the weights as given, max over
sources of ``|count_d(i) - i * w_d|``, for both. Sources are sized stand-ins of 10^9 items each:
construction never touches a source.
"""
import argparse
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import picomap as pm  # noqa: E402


class Sized:
    """A source of n items that are never read: only its length matters here."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, j):
        return j


def weights_of(sources: int) -> np.ndarray:
    """Uneven weights, the same every run: the largest about 100 times the smallest."""
    return np.random.default_rng(sources).random(sources) ** 2 + 0.01


def megatron_table(weights, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's blending indices: each sample's dataset (int16) and index within it (int64)."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    dataset = np.empty(n, np.int16)
    within = np.empty(n, np.int64)
    drawn = np.zeros(len(w), np.int64)
    for i in range(n):
        d = int(np.argmax(w * max(i, 1) - drawn))
        dataset[i], within[i] = d, drawn[d]
        drawn[d] += 1
    return dataset, within


def peak_memory(build) -> int:
    tracemalloc.start()
    try:
        build()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def median_seconds(work, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def locate_us(locate, length: int, rounds: int, count: int) -> float:
    """Median over rounds of the mean cost of one locate at random positions, in µs."""
    per_round = []
    for r in range(rounds):
        positions = np.random.default_rng(r).integers(0, length, count).tolist()
        start = time.perf_counter()
        for i in positions:
            locate(i)
        per_round.append((time.perf_counter() - start) / count * 1e6)
    return statistics.median(per_round)


def worst_deviation(sources_of_chunks, weights) -> float:
    """max over prefixes i and sources d of |count_d(i) - i * w_d|, from chunks of the sources drawn."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    counts, done, worst = np.zeros(len(w), np.int64), 0, 0.0
    for chunk in sources_of_chunks:
        positions = np.arange(done + 1, done + len(chunk) + 1, dtype=np.float64)
        for d in range(len(w)):
            running = counts[d] + np.cumsum(chunk == d)
            worst = max(worst, float(np.abs(running - positions * w[d]).max()))
        counts += np.bincount(chunk, minlength=len(w))
        done += len(chunk)
    return worst


def mix_chunks(mix, n: int, chunk: int = 1 << 20):
    """The source of each of the mixture's first n positions, a chunk at a time."""
    for a in range(0, n, chunk):
        yield np.array([mix.locate(i)[0] for i in range(a, min(a + chunk, n))], np.int64)


def construction_table(args) -> None:
    print("### Construction and locate (sources of 10^9 items; medians)\n")
    print("| sources | length | picomap.Mix: build | memory | locate | Megatron table: build (× Mix) | "
          "memory (× Mix) | locate |")
    print("|---|---|---|---|---|---|---|---|")
    table_length = 10**5 if args.quick else 10**6
    for count in (2, 10, 100):
        weights, sources = weights_of(count), [Sized(10**9) for _ in range(count)]
        pm.Mix(sources, weights)  # once before measuring: the modules it imports on first use
        for length in (10**6, 10**9, 10**12):
            def build():
                return pm.Mix(sources, weights, length=length)
            built = median_seconds(build, args.rounds)
            memory = peak_memory(build)
            mix = build()
            ours = locate_us(mix.locate, length, args.rounds, args.locates)
            row = f"| {count} | 10^{len(str(length)) - 1} | {built * 1e3:.2f} ms | {memory / 2**10:.0f} KiB | " \
                  f"{ours:.2f} µs | "
            if length == 10**6:
                start = time.perf_counter()
                dataset, within = megatron_table(weights, table_length)
                megatron_built = time.perf_counter() - start
                megatron_memory = peak_memory(lambda: megatron_table(weights, table_length))

                def lookup(i, dataset=dataset, within=within):
                    return int(dataset[i]), int(within[i])
                theirs = locate_us(lookup, table_length, args.rounds, args.locates)
                shown = f"10^{len(str(table_length)) - 1}: "
                row += f"{shown}{megatron_built:.1f} s ({megatron_built / built:,.0f}×) | " \
                       f"{megatron_memory / 2**20:.1f} MiB ({megatron_memory / memory:,.0f}×) | " \
                       f"{theirs:.2f} µs (Mix {ours / theirs:.1f}× it) |"
            else:
                row += f"- ({10 * length / 2**30:,.0f} GiB: not built) | - | - |"
            print(row, flush=True)
    print()


def deviation_table(args) -> None:
    n = int(args.deviation_positions)
    print(f"### Worst prefix deviation from the weights over the first {n:,} positions\n")
    print("| weights | picomap.Mix | Megatron table |")
    print("|---|---|---|")
    cases = [("0.7 / 0.3", [0.7, 0.3]), ("0.5 / 0.3 / 0.2", [0.5, 0.3, 0.2]),
             ("10 uneven (random)", weights_of(10).tolist()), ("100 uneven (random)", weights_of(100).tolist())]
    for label, weights in cases:
        mix = pm.Mix([Sized(10**9) for _ in weights], weights, length=n, shuffle=False)
        ours = worst_deviation(mix_chunks(mix, n), weights)
        dataset, _ = megatron_table(weights, n)
        theirs = worst_deviation([dataset[a:a + (1 << 20)].astype(np.int64) for a in range(0, n, 1 << 20)], weights)
        print(f"| {label} | {ours:.3f} | {theirs:.3f} |", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds: small tables, few locates")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--deviation-positions", type=float, default=1e7)
    parser.add_argument("--locates", type=int, default=20_000)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.locates, args.deviation_positions = 1, 2000, 1e5
    print(f"picomap {pm.__version__}, numpy {np.__version__}; the table is skipped past 10^6 samples: "
          "10 bytes a sample (10 GB at 10^9), and its build is one Python step a sample here\n")
    construction_table(args)
    deviation_table(args)


if __name__ == "__main__":
    main()

"""picomap.Sampler beside torch's RandomSampler and DistributedSampler, and cold passes over a map.

    python benchmarks/sampler.py [--sizes 1e7,1e8,1e9] [--torch-up-to 1e8] [--map-mib 2048] [--rounds 3]
                                 [--memory-limit MIB]

Memory is the process's anonymous memory (Linux) grown while the sampler hands out its first
index and keeps its iterator, in a fresh child process per figure; time to the first index
likewise. Throughput: indices a second over the first 2M. Cold passes: a map of 4 KiB items,
its pages dropped with posix_fadvise(DONTNEED) before each pass (with no mapping of it alive,
which would keep them), the first --pass-items items copied; in order, in
a block shuffle with B = 8 MiB / 4 KiB = 2048 as the README says, and fully shuffled. Medians of
--rounds, the passes interleaved round by round.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import picomap as pm  # noqa: E402

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
def anonymous():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
kind, n = sys.argv[1], int(sys.argv[2])
import torch, picomap as pm
from torch.utils.data import RandomSampler, DistributedSampler
class Sized:
    def __len__(self):
        return n
before = anonymous()
start = time.perf_counter()
if kind == "picomap":
    sampler = pm.Sampler(n, seed=0, num_replicas=8, rank=3)
elif kind == "RandomSampler":
    sampler = RandomSampler(Sized())
else:
    sampler = DistributedSampler(Sized(), num_replicas=8, rank=3, seed=0)
it = iter(sampler)
next(it)
first = time.perf_counter() - start
grown = anonymous() - before
start, count = time.perf_counter(), 0
for _ in zip(it, range(2_000_000)):
    count += 1
rate = count / (time.perf_counter() - start)
print(json.dumps({{"first_ms": first * 1e3, "memory": grown, "rate": rate}}))
"""


def child(kind: str, n: int) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), kind, str(n)],
                            capture_output=True, text=True)
    if result.returncode:
        return {"error": (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def memory_limit(mib: int | None):
    """Run the block in a memory cgroup of ``mib`` MiB (root, Linux): its page cache is capped with
    it, as on a machine whose map is larger than its memory."""
    if not mib:
        yield
        return
    line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if x.split(":")[1] in ("memory", ""))
    v2 = line.split(":")[1] == ""
    home = Path("/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/memory") / line.split(":")[2].lstrip("/")
    group = home / f"picomap-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(mib << 20))
        (group / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield
        finally:
            (home / "cgroup.procs").write_text(str(os.getpid()))
    finally:
        group.rmdir()


def drop_pages(path: Path) -> None:
    """Drop a file's pages from the page cache; no mapping of it may be alive, or they stay."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold_pass(path: Path, sampler, items: int) -> float:
    """Seconds an item over the first ``items`` of a pass, from cold."""
    drop_pages(path.with_name(path.name + ".dat"))
    start = time.perf_counter()
    with pm.MapLoader(path) as load:  # a mapping of its own, closed after: the next drop works
        for i, _ in zip(sampler, range(items)):
            load(i, copy=True)
    return (time.perf_counter() - start) / min(items, len(sampler))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e7,1e8,1e9")
    parser.add_argument("--torch-up-to", default="1e8", help="largest n to give torch's samplers")
    parser.add_argument("--map-mib", type=int, default=2048, help="size of the map for the cold passes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pass-items", type=int, default=50_000, help="items timed in each cold pass")
    parser.add_argument("--blocks", type=lambda text: [int(b) for b in text.split(",")], default=[2048, 8192, 32768],
                        help="block sizes B to time, in items of 4 KiB")
    parser.add_argument("--folder", default=None)
    parser.add_argument("--memory-limit", type=int, default=None, metavar="MIB",
                        help="run the cold passes in a memory cgroup of this size (root): a map bigger than memory")
    args = parser.parse_args()
    torch_limit = int(float(args.torch_up_to))
    print("n, sampler: memory grown, time to the first index, indices a second")
    for n in (int(float(s)) for s in args.sizes.split(",")):
        for kind in ("picomap", "RandomSampler", "DistributedSampler"):
            if kind != "picomap" and n > torch_limit:
                continue
            row = child(kind, n)
            if "error" in row:
                print(f"{n:>14,} {kind:>18}: {row['error']}", flush=True)
                continue
            print(f"{n:>14,} {kind:>18}: {row['memory'] / 2**20:9.1f} MiB  {row['first_ms']:9.2f} ms  "
                  f"{row['rate'] / 1e6:5.1f} M/s", flush=True)
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        items = args.map_mib * 256  # 4 KiB each
        path = Path(tmp) / "cold"
        pm.build_map((np.full(1024, k, np.int32) for k in range(items)), path, progress=False)
        n = items
        samplers = {"in order": pm.Sampler(n, shuffle=False), "full shuffle": pm.Sampler(n),
                    **{f"block shuffle, B={b} ({b * 4 // 1024} MiB)": pm.Sampler(n, block=b) for b in args.blocks}}
        times = {name: [] for name in samplers}
        with memory_limit(args.memory_limit):
            for round_ in range(args.rounds):
                for name, sampler in samplers.items():
                    sampler.set_epoch(round_)
                    times[name].append(cold_pass(path, sampler, args.pass_items))
        base = statistics.median(times["in order"])
        limit = f", in {args.memory_limit} MiB of memory" if args.memory_limit else ""
        print(f"\ncold passes over a map of {n:,} items of 4 KiB ({args.map_mib} MiB{limit}), the first "
              f"{min(n, args.pass_items):,} items of each, medians of {args.rounds}:")
        for name, samples in times.items():
            med = statistics.median(samples)
            print(f"  {name:<24} {med * 1e6:8.1f} us an item  {med / base:6.2f}x in order")


if __name__ == "__main__":
    main()

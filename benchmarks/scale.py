"""Scale: opening, workers, build, merge, verify and info on maps of 1M to 1B items (Linux).

    python benchmarks/scale.py [--sizes 1e6,1e7,1e8,1e9] [--jobs-at 1e8] [--folder DIR] [--before FILE]

Maps are crafted, not built: one-row int8 items, real offsets (8 bytes an item on disk: 8 GB at 1B)
and a sparse .dat. Every figure is taken in a fresh child process. "Private" is the process's
anonymous memory (/proc/self/smaps_rollup), which no other process can share; mapped file pages,
which every process shares through the page cache, are not private. Peaks are sampled every 20 ms.
Build, merge (10 shards), verify and info run at the --jobs-at sizes. --before FILE runs the same
children with another picomap.py (e.g. `git show v1.0:picomap.py > /tmp/old.py`), for a comparison
in the same run. Medians of --rounds opens; the others are measured once.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import gc, io, json, os, sys, threading, time, contextlib
sys.path.insert(0, {module_dir!r})
import numpy as np
import picomap as pm

def anonymous():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024

class Peak:  # the highest anonymous memory seen while the block runs, above what it was at the start
    def __enter__(self):
        self.start = self.peak = anonymous()
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self
    def sample(self):
        while self.running:
            self.peak = max(self.peak, anonymous())
            time.sleep(0.02)
    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, anonymous())
        self.growth = self.peak - self.start

class Probe:  # a dataset whose items are a DataLoader worker's private memory once it loaded them
    def __init__(self, load):
        self.load = load
    def __len__(self):
        return len(self.load)
    def __getitem__(self, i):
        self.load(i % len(self.load))  # the same picks on the baseline's small map
        return anonymous()

# a spawned DataLoader worker imports this script as __mp_main__: it must run no job
job, path, n, rounds = (sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])) if __name__ == "__main__" else ("", "", 0, 0)
out = {{}}
if job == "open":
    before = anonymous()  # the first open, before any freed array could stay in the heap
    load = pm.get_loader_fn(path)[0]
    out["open_private"] = anonymous() - before
    for i in np.random.default_rng(0).integers(0, n, 1000).tolist():
        load(i)
    out["after_1000_loads_private"] = anonymous() - before
    times = []
    for _ in range(rounds):
        gc.collect()
        t = time.perf_counter()
        again = pm.get_loader_fn(path)[0]
        times.append(time.perf_counter() - t)
        del again
    out["open_ms"] = sorted(times)[len(times) // 2] * 1e3
elif job == "workers":
    import torch
    from torch.utils.data import DataLoader
    picks = np.linspace(0, n - 1, 200).astype(int).tolist()
    for method in ("spawn", "forkserver"):
        worker = {{}}
        for name in (path, sys.argv[5]):  # this map, then a 1,000-item one: the empty worker's baseline
            loader = DataLoader(Probe(pm.get_loader_fn(name)[0]), batch_size=None, sampler=picks,
                                num_workers=2, multiprocessing_context=method)
            worker[name] = max(int(x) for x in loader)
        out[f"worker_{{method}}_private"] = worker[path] - worker[sys.argv[5]]
elif job == "build":
    item = np.zeros(1, np.int8)
    def items():
        for _ in range(n):
            yield item
    with Peak() as peak:
        t = time.perf_counter()
        pm.build_map(items(), path, progress=False)
        out["build_s"] = time.perf_counter() - t
    out["build_peak"] = peak.growth
elif job == "merge":
    shards = json.loads(sys.argv[5])
    with Peak() as peak:
        t = time.perf_counter()
        pm.merge_maps(shards, path, progress=False)
        out["merge_s"] = time.perf_counter() - t
    out["merge_peak"] = peak.growth
elif job == "verify":
    with Peak() as peak:
        t = time.perf_counter()
        pm.verify_hash(path, progress=False)
        out["verify_s"] = time.perf_counter() - t
    out["verify_peak"] = peak.growth
elif job == "info":
    with Peak() as peak, contextlib.redirect_stdout(io.StringIO()):
        t = time.perf_counter()
        code = pm.main(["info", path])
        out["info_s"] = time.perf_counter() - t
    out["info_peak"] = peak.growth
if job:
    print(json.dumps(out))
"""


def craft(base: Path, n: int) -> Path:
    """A valid map of n one-row int8 items: real offsets, a sparse .dat, a placeholder hash."""
    if base.with_suffix(".json").exists() and json.loads(base.with_suffix(".json").read_text())["count"] == n:
        return base
    with open(f"{base}.starts.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<u8", "fortran_order": False, "shape": (n + 1,)})
        for start in range(0, n + 1, 1 << 24):
            f.write(np.arange(start, min(start + (1 << 24), n + 1), dtype="<u8").tobytes())
    with open(f"{base}.dat", "wb") as f:
        f.truncate(n)
    Path(f"{base}.json").write_text(json.dumps({"trail_dim": [], "hash": "0" * 32, "creation_time": "",
                                                "dtype": "int8", "count": n, "total_rows": n}))
    return base


def child(module: Path, job: str, *args) -> dict:
    script = CHILD.format(module_dir=str(module.parent))
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(script.replace("import picomap as pm", f"import {module.stem} as pm"))
    try:
        result = subprocess.run([sys.executable, f.name, job, *map(str, args)], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if result.returncode:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def mib(x) -> str:
    return f"{x / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e6,1e7,1e8,1e9")
    parser.add_argument("--jobs-at", default="1e8", help="sizes at which build, merge, verify and info run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--folder", default=None, help="where to craft the maps (default: a temporary folder)")
    parser.add_argument("--before", default=None, help="another picomap.py to measure alongside")
    parser.add_argument("--no-workers", action="store_true", help="skip the DataLoader figures (no torch)")
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    jobs_at = {int(float(s)) for s in args.jobs_at.split(",") if s}
    modules = {"now": ROOT / "picomap.py"}
    if args.before:
        modules["before"] = Path(args.before).resolve()
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        folder = Path(tmp)
        small = craft(folder / "small", 1000)
        for n in sizes:
            base = craft(folder / f"n{n}", n)
            for label, module in modules.items():
                row = child(module, "open", base, n, args.rounds)
                if not args.no_workers:
                    row.update(child(module, "workers", base, n, 1, small))
                print(f"{n:>13,} items, {label:>6}: " + ", ".join(
                    f"{k} {v:.2f}" if k.endswith("_ms") else f"{k} {mib(v) if isinstance(v, int) else v}"
                    for k, v in row.items()), flush=True)
            if n in jobs_at:
                for label, module in modules.items():
                    row = child(module, "build", folder / f"built{n}", n, 1)
                    row.update(child(module, "verify", folder / f"built{n}", n, 1))
                    row.update(child(module, "info", folder / f"built{n}", n, 1))
                    shards = []
                    for k in range(10):
                        child(module, "build", folder / f"shard{k}", n // 10, 1)
                        shards.append(str(folder / f"shard{k}"))
                    row.update(child(module, "merge", folder / f"merged{n}", n, 1, json.dumps(shards)))
                    print(f"{n:>13,} items, {label:>6}: " + ", ".join(
                        f"{k} {v:.1f}" if k.endswith("_s") else f"{k} {mib(v) if isinstance(v, int) else v}"
                        for k, v in row.items()), flush=True)
                    for p in folder.glob("shard*"):
                        p.unlink()
                    for p in folder.glob(f"built{n}.*"):
                        p.unlink()
                    for p in folder.glob(f"merged{n}.*"):
                        p.unlink()
            for p in folder.glob(f"n{n}.*"):
                p.unlink()


if __name__ == "__main__":
    main()

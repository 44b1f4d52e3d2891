"""Samples with several fields: a set against what a user did before (a map per field, built in
passes, captions in a side JSON file, zipped by hand), and MapWriter against build_map.

    python benchmarks/fields.py [--items N] [--rounds R] [--no-dataloader]

Contenders run interleaved in one process, several rounds; figures are medians, as ratios to the
baseline measured in the same run (the machines are shared and noisy). The DataLoader passes
(batches of 64, shuffled, the README's padding collate_fn) need torch.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import picomap as pm  # noqa: E402


def make_clips(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"audio": rng.standard_normal(int(rng.integers(200, 800))).astype(np.float32),
             "tokens": rng.integers(0, 1000, int(rng.integers(2, 9))).astype(np.int32),
             "text": f"clip {k}: " + "".join(rng.choice(list("abcdefgh "), 24))} for k in range(n)]


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def build_by_hand(clips: list[dict], folder: Path) -> None:
    """Before sets: a pass per array field, the captions in a JSON file beside them."""
    for name in ("audio", "tokens"):
        pm.build_map((clip[name] for clip in clips), folder / f"hand-{name}", progress=False)
    (folder / "hand-text.json").write_text(json.dumps([clip["text"] for clip in clips]))


def build_with_writer(items: list, path: Path) -> None:
    with pm.MapWriter(path, progress=False) as writer:
        for item in items:
            writer.append(item)


class ByHand:
    """What a user zipped before sets: a loader per array field and the captions from a JSON list."""

    def __init__(self, folder: Path):
        self.audio, self.tokens = (pm.get_loader_fn(folder / f"hand-{name}")[0] for name in ("audio", "tokens"))
        self.text = json.loads((folder / "hand-text.json").read_text())

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, i: int) -> dict:
        return {"audio": self.audio(i), "tokens": self.tokens(i), "text": self.text[i]}


def pad(samples: list[dict]) -> dict:
    """The README's padding collate_fn: each array field zero-padded to the batch's longest."""
    import torch
    batch = {"text": [s["text"] for s in samples]}
    for name in ("audio", "tokens"):
        lengths = [len(s[name]) for s in samples]
        padded = np.zeros((len(samples), max(lengths)), samples[0][name].dtype)
        for row, s in zip(padded, samples):
            row[:len(s[name])] = s[name]
        batch[name], batch[name + "_lengths"] = torch.from_numpy(padded), torch.tensor(lengths)
    return batch


def dataloader_pass(dataset, workers: int) -> float:
    from torch.utils.data import DataLoader
    loader = DataLoader(dataset, batch_size=64, shuffle=True, num_workers=workers, collate_fn=pad)
    return timed(lambda: sum(len(batch["text"]) for batch in loader))


def per_call_ns(fn, indices) -> float:
    start = time.perf_counter_ns()
    for i in indices:
        fn(i)
    return (time.perf_counter_ns() - start) / len(indices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-dataloader", dest="dataloader", action="store_false",
                        help="skip the DataLoader passes (which need torch)")
    args = parser.parse_args()
    clips = make_clips(args.items)
    tokens = [clip["tokens"] for clip in clips]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        builds = {"by hand: a map per field + captions JSON (baseline)": lambda: build_by_hand(clips, folder),
                  "one set: build_map of dicts": lambda: pm.build_map(clips, folder / "set", progress=False)}
        writes = {"build_map of token items (baseline)": lambda: pm.build_map(tokens, folder / "b", progress=False),
                  "MapWriter.append of the same": lambda: build_with_writer(tokens, folder / "w")}
        times = {name: [] for name in (*builds, *writes)}
        for _ in range(args.rounds):
            for name, work in {**builds, **writes}.items():
                times[name].append(timed(work))

        load, n = pm.get_loader_fn(folder / "set")
        audio, toks = pm.get_loader_fn(folder / "hand-audio")[0], pm.get_loader_fn(folder / "hand-tokens")[0]
        captions = json.loads((folder / "hand-text.json").read_text())
        loads = {"by hand: two loaders and a list (baseline)":
                 lambda i: {"audio": audio(i), "tokens": toks(i), "text": captions[i]},
                 "one set: load(i)": load,
                 "one set: __getitems__ (a DataLoader's batch of 64), per item":
                 lambda i: load.__getitems__(batches[i % len(batches)])}
        indices = np.random.default_rng(1).integers(0, n, 50_000).tolist()
        batches = [indices[k:k + 64] for k in range(0, len(indices), 64)]
        for name in loads:
            times[name] = []
        for _ in range(args.rounds):
            for name, fn in loads.items():
                batched = "__getitems__" in name  # one call a batch: the time a call over 64 items
                times[name].append(per_call_ns(fn, range(len(batches))) / 64 if batched else per_call_ns(fn, indices))

        passes = {}
        if args.dataloader:
            for workers in (0, 2):
                passes[f"by hand, DataLoader with {workers} workers (baseline)"] = (ByHand(folder), workers)
                passes[f"one set, DataLoader with {workers} workers"] = (load, workers)
            for name in passes:
                times[name] = []
            for _ in range(args.rounds):
                for name, (dataset, workers) in passes.items():
                    times[name].append(dataloader_pass(dataset, workers))

        def opened(work):
            tracemalloc.start()
            try:
                kept = work()
                return tracemalloc.get_traced_memory()[0], kept
            finally:
                tracemalloc.stop()
        side_json, _ = opened(lambda: json.loads((folder / "hand-text.json").read_text()))
        set_open, _ = opened(lambda: pm.get_loader_fn(folder / "set"))

    print(f"\n{args.items:,} clips: float32 audio (200-800 samples), int32 tokens (2-8), a 32-character caption; "
          f"{args.rounds} rounds, medians")
    groups = [(builds, "s"), (writes, "s"), (loads, "ns")]
    groups += [({name: None for name in list(passes)[k:k + 2]}, "s") for k in range(0, len(passes), 2)]
    for group, unit in groups:
        base = statistics.median(times[next(iter(group))])
        for name in group:
            med = statistics.median(times[name])
            shown = f"{med:8.3f} s " if unit == "s" else f"{med:8.0f} ns"
            print(f"  {name:<55} {shown}  {med / base:5.2f}x")
    print(f"  memory held after opening: captions JSON {side_json / 2**20:.1f} MiB (private, in every worker), "
          f"the set {set_open / 2**10:.0f} KiB (its text field is mapped, shared)")


if __name__ == "__main__":
    main()

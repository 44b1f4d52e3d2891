"""The loader as a dataset: pickling, multiprocessing, threads, and a real PyTorch DataLoader."""
import functools
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import picomap as pm
from conftest import anonymous_bytes, tokens
from test_load import write_flat_map

torch = pytest.importorskip("torch")
from torch.utils.data import ConcatDataset, DataLoader  # noqa: E402


@pytest.fixture
def toy(in_tmp):
    items = tokens(40, seed=3)
    pm.build_map(items, "toy", progress=False)
    return items


def checksum(load, i):
    """Runs in a worker process: what it sees of item i."""
    item = load(i)
    return i, len(item), int(item.astype(np.int64).sum())


def expected(items):
    return [(i, len(a), int(a.astype(np.int64).sum())) for i, a in enumerate(items)]


# ---------------------------------------------------------------- pickling

def test_pickle_holds_the_path_not_the_data(in_tmp):
    write_flat_map("big", 1_000_000)
    load, _ = pm.get_loader_fn("big")
    blob = pickle.dumps(load)
    assert len(blob) < 4096
    again = pickle.loads(blob)
    assert len(again) == 1_000_000 and again.path == load.path.absolute() and again.hash == load.hash
    assert np.shares_memory(again(5), again.data) and not np.shares_memory(again.data, load.data)


def test_unpickling_a_replaced_map_raises(toy):
    blob = pickle.dumps(pm.get_loader_fn("toy")[0])
    pm.build_map(tokens(5, seed=9), "toy", progress=False)
    with pytest.raises(ValueError, match="toy.json: the map was replaced since this loader was pickled"):
        pickle.loads(blob)


def test_unpickling_a_deleted_map_raises(toy):
    blob = pickle.dumps(pm.get_loader_fn("toy")[0])
    for f in pm.map_files("toy"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="toy.json"):
        pickle.loads(blob)


# ---------------------------------------------------------------- processes and threads

@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_process_pool_maps_over_the_loader(toy, method):
    load, n = pm.get_loader_fn("toy")
    with multiprocessing.get_context(method).Pool(2) as pool:
        got = pool.map(functools.partial(checksum, load), range(n), chunksize=5)
    assert got == expected(toy)


def test_threads_read_concurrently(toy):
    load, n = pm.get_loader_fn("toy")
    want = expected(toy)
    wrong = []

    def reader(seed):
        for i in np.random.default_rng(seed).integers(0, n, 2000):
            if checksum(load, int(i)) != want[i]:
                wrong.append(int(i))
    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


# ---------------------------------------------------------------- PyTorch

@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_dataloader_with_workers_yields_every_item(toy, method, shuffle):
    load, _ = pm.get_loader_fn("toy")
    loader = DataLoader(load, batch_size=None, shuffle=shuffle, num_workers=2, collate_fn=np.copy,
                        multiprocessing_context=method, generator=torch.Generator().manual_seed(0))
    got, want = [a.tolist() for a in loader], [a.tolist() for a in toy]
    if shuffle:  # every item exactly once, in another order
        assert sorted(got) == sorted(want) and got != want
    else:
        assert got == want


def test_dataloader_as_is_gives_tensors(toy):
    load, _ = pm.get_loader_fn("toy")
    with pytest.warns(UserWarning, match="not writable"):  # torch's note on read-only views
        got = list(DataLoader(load, batch_size=None))
    assert all(isinstance(t, torch.Tensor) for t in got)
    assert [t.tolist() for t in got] == [a.tolist() for a in toy]


def test_dataloader_fetches_a_batch_with_one_call(toy, monkeypatch):
    load, n = pm.get_loader_fn("toy")
    calls = []
    real = pm.MapLoader.__getitems__

    def counting(self, indices):
        calls.append(list(indices))
        return real(self, indices)
    monkeypatch.setattr(pm.MapLoader, "__getitems__", counting)
    batches = list(DataLoader(load, batch_size=8, collate_fn=list))
    assert calls == [list(range(k, min(k + 8, n))) for k in range(0, n, 8)]
    assert [a.tolist() for batch in batches for a in batch] == [a.tolist() for a in toy]


def test_concat_dataset_over_several_maps(in_tmp):
    parts = [tokens(5, seed=s) for s in range(3)]
    loads = []
    for k, items in enumerate(parts):
        pm.build_map(items, f"shard{k}", progress=False)
        loads.append(pm.get_loader_fn(f"shard{k}")[0])
    both = ConcatDataset(loads)
    assert len(both) == 15
    assert [both[i].tolist() for i in range(15)] == [a.tolist() for items in parts for a in items]


def test_a_pickle_opens_the_same_map_from_another_folder(toy, tmp_path):
    blob = tmp_path / "loader.pickle"
    blob.write_bytes(pickle.dumps(pm.get_loader_fn("toy")[0]))  # opened by a relative path
    script = ("import os, pickle, sys\nos.chdir(sys.argv[2])\nload = pickle.loads(open(sys.argv[1], 'rb').read())\n"
              "print(len(load), int(load(3).astype('int64').sum()))")
    result = subprocess.run([sys.executable, "-c", script, str(blob), "/"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(pm.__file__).parent)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(len(toy)), str(int(toy[3].astype(np.int64).sum()))]


# ---------------------------------------------------------------- workers share the offsets

class WorkerMemory:
    """A dataset over a loader whose items are the worker's anonymous memory once it has loaded them."""

    def __init__(self, load):
        self.load = load

    def __len__(self):
        return len(self.load)

    def __getitem__(self, i):
        self.load(i)
        return anonymous_bytes()


def worker_memory(load, method) -> int:
    picks = np.linspace(0, len(load) - 1, 200).astype(int).tolist()  # across the map: most chunks checked
    loader = DataLoader(WorkerMemory(load), batch_size=None, sampler=picks, num_workers=2,
                        multiprocessing_context=method)
    return max(int(x) for x in loader)


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_workers_started_afresh_share_the_offsets(in_tmp, method):
    write_flat_map("big", 10_000_000)  # 80 MB of offsets
    write_flat_map("small", 1_000)
    big, small = (worker_memory(pm.get_loader_fn(name)[0], method) for name in ("big", "small"))
    assert big - small < 4 << 20  # before: each worker read all 80 MB of offsets into its own memory


def as_lists(batch):
    return [x.tolist() for x in batch]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_slices_split_a_map_for_dataloader_workers(toy, method):
    load, n = pm.get_loader_fn("toy")
    train, val = load[:30], load[30:]
    for part, want in ((train, toy[:30]), (val, toy[30:])):
        loader = DataLoader(part, batch_size=4, num_workers=2, multiprocessing_context=method,
                            collate_fn=as_lists)
        assert [x for batch in loader for x in batch] == [a.tolist() for a in want]

"""access="cold": exactly each item's pages, for maps larger than memory; chosen at open, kept by pickles."""
import multiprocessing
import pickle

import numpy as np
import pytest

import picomap as pm
from conftest import tokens


@pytest.fixture
def toy(in_tmp):
    rng = np.random.default_rng(8)
    items = [rng.standard_normal((int(n), 3)).astype(">f8") for n in rng.integers(0, 2000, 40)]
    pm.build_map(items, "toy", progress=False)
    return items


def test_auto_reads_cold_a_map_larger_than_half_the_memory(toy, monkeypatch):
    size = pm.map_files("toy").dat.stat().st_size
    monkeypatch.setattr(pm, "_memory_for_page_cache", lambda: 2 * size - 2)  # half of it is just below
    assert pm.get_loader_fn("toy")[0].access == "cold" and pm.MapLoader("toy").access == "cold"
    monkeypatch.setattr(pm, "_memory_for_page_cache", lambda: 2 * size)
    assert pm.get_loader_fn("toy")[0].access == "cached"
    assert pm.get_loader_fn("toy", access="cold")[0].access == "cold"  # the argument overrides
    monkeypatch.setattr(pm, "_memory_for_page_cache", lambda: 10)
    assert pm.get_loader_fn("toy", access="cached")[0].access == "cached"
    with pytest.raises(ValueError, match="access must be 'auto', 'cached' or 'cold', not 'warm'"):
        pm.get_loader_fn("toy", access="warm")


def test_the_page_cache_memory_is_the_machines_or_less():
    import os
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < pm._memory_for_page_cache() <= physical


def test_both_paths_serve_identical_items(toy):
    cached, n = pm.get_loader_fn("toy", access="cached")
    cold, _ = pm.get_loader_fn("toy", access="cold")
    for i in [*range(n), -1, -n]:
        for got in (cold(i), cold[i], cold(i, copy=True)):
            want = cached(i)
            assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()
        assert not cold(i).flags.writeable and (cold(i).size == 0 or np.shares_memory(cold(i), cold.data))
        assert cold(i, copy=True).flags.writeable and cold(i, copy=True).flags.owndata
    picks = [5, 3, 4, 39, 0, 5, -2]
    assert [x.tobytes() for x in cold.__getitems__(picks)] == [cached(i).tobytes() for i in picks]
    part = cold[10:20]
    assert part.access == "cold" and [x.tobytes() for x in part] == [cached(i).tobytes() for i in range(10, 20)]
    with pytest.raises(IndexError):
        cold(n)
    with pytest.raises(TypeError):
        cold(1.0)


def test_an_empty_map_and_empty_items_read_cold(in_tmp):
    pm.build_map([], "empty", progress=False)
    assert len(pm.get_loader_fn("empty", access="cold")[0]) == 0
    pm.build_map([np.zeros((0, 2)), np.ones((2, 2))], "toy", progress=False)
    load, _ = pm.get_loader_fn("toy", access="cold")
    assert load(0).shape == (0, 2) and load(1).tolist() == [[1, 1], [1, 1]]


def access_and_sum(load, i):
    return load.access, float(load(i, copy=True).sum())


@pytest.mark.parametrize("access", ["cached", "cold"])
def test_the_choice_survives_pickling_into_workers(toy, access):
    load, n = pm.get_loader_fn("toy", access=access)
    assert pickle.loads(pickle.dumps(load)).access == access
    assert pickle.loads(pickle.dumps(load[3:7])).access == access
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        got = pool.starmap(access_and_sum, [(load, i) for i in range(n)])
    assert got == [(access, float(item.sum())) for item in toy]


def as_list(batch):
    return batch


def test_a_dataloader_over_a_cold_map(in_tmp):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader
    items = tokens(60, seed=4)
    pm.build_map(items, "toy", progress=False)
    load, _ = pm.get_loader_fn("toy", access="cold")
    sampler = pm.Sampler(load, seed=1, block=8)
    loader = DataLoader(load, sampler=sampler, batch_size=8, num_workers=2, multiprocessing_context="spawn",
                        collate_fn=as_list)
    got = [x.tolist() for batch in loader for x in batch]
    assert got == [items[i].tolist() for i in sampler] and torch is not None

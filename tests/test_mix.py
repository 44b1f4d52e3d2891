"""pm.Mix: several datasets by weight. Items are the sources' own, every prefix keeps to the
weights, each source is drawn in passes of permutations, and a mixture is the same everywhere,
small in memory at any length, picklable and exactly resumable through a DataLoader."""
import math
import pickle
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import picomap as pm

ROOT = Path(__file__).resolve().parents[1]


class Sized:
    """A source of n items without storage: item j is (name, j)."""

    def __init__(self, n, name=0):
        self.n, self.name = n, name

    def __len__(self):
        return self.n

    def __getitem__(self, j):
        if not 0 <= j < self.n:
            raise IndexError(j)
        return (self.name, j)


class Counting(Sized):
    """A Sized source that counts its __getitems__ calls and the items each asked for."""

    def __init__(self, n, name=0):
        super().__init__(n, name)
        self.calls = []

    def __getitems__(self, js):
        self.calls.append(list(js))
        return [self[j] for j in js]


class Tagged:
    """A source whose every item is its own number d: a batch of a mixture of these is its sources."""

    def __init__(self, d, n=10**9):
        self.d, self.n = d, n

    def __len__(self):
        return self.n

    def __getitem__(self, j):
        return self.d

    def __getitems__(self, js):
        return [self.d] * len(js)


def drawn_sources(mix, n):
    """The source of each of the mixture's first n positions, as an array."""
    return np.array(mix.__getitems__(range(n)))


def reference_blend(weights, n):
    """Megatron's greedy blend with the weights as given (floats, no rounding), written out here:
    position p goes to the source furthest behind, the largest w[d] * (p + 1) - drawn[d]."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    drawn, out = np.zeros(len(w)), np.empty(n, np.int64)
    for p in range(n):
        d = int(np.argmax(w * (p + 1) - drawn))
        out[p], drawn[d] = d, drawn[d] + 1
    return out


def prefix_deviation(sources, weights):
    """For each prefix length i (1..n), the largest |count_d(i) - i * w_d| over the sources."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    worst = np.zeros(len(sources))
    for d in range(len(w)):  # one source at a time keeps memory at a few arrays of n
        counts = np.cumsum(sources == d)
        worst = np.maximum(worst, np.abs(counts - np.arange(1, len(sources) + 1) * w[d]))
    return worst


# ---------------------------------------------------------------- items and proportions

def test_located_items_are_the_sources_items():
    sources = [[("a", k) for k in range(37)], [("b", k) for k in range(11)], [("c", k) for k in range(5)]]
    mix = pm.Mix(sources, [3, 1, 2], seed=4)
    assert len(mix) > 0
    for i in range(len(mix)):
        d, j = mix.locate(i)
        assert mix[i] == mix(i) == sources[d][j] == mix[i - len(mix)]
        assert mix.locate(np.int64(i)) == (d, j)
    assert mix.__getitems__(range(len(mix))) == [mix[i] for i in range(len(mix))]
    assert list(mix) == [mix[i] for i in range(len(mix))]


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1, 1], [0.5, 0.25, 0.25], [5, 1e-3], [1, 0, 2],
                                     np.random.default_rng(1).random(5).tolist(),
                                     (np.random.default_rng(2).random(8) ** 4).tolist()])
def test_every_prefix_keeps_each_source_within_an_item_of_its_weight(weights):
    n = 200_000
    mix = pm.Mix([Tagged(d) for d in range(len(weights))], weights, length=n)
    ours = prefix_deviation(drawn_sources(mix, n), weights)
    reference = prefix_deviation(reference_blend(weights, n), weights).max()
    # about an item, as Megatron's table: no blend is perfect, and the weights are never rounded,
    # so the deviation does not grow with the prefix
    assert reference < 1.5 and ours.max() < 1.5 and ours.max() <= max(reference, 1.0) + 0.3
    assert ours[n // 2:].max() < 1.5  # (the weights are not rounded: no drift along the mixture)


def test_no_prefix_strays_two_items_whatever_the_weights():
    rng = np.random.default_rng(8)
    cases = [rng.random(int(rng.integers(2, 40))) ** rng.uniform(0.3, 8) + 1e-4 for _ in range(12)]
    cases += [[2.0**-k for k in range(30)], [1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144]]
    for weights in cases:
        mix = pm.Mix([Tagged(d) for d in range(len(weights))], weights, length=20_000)
        assert prefix_deviation(drawn_sources(mix, 20_000), weights).max() < 2  # the bound Mix proves


def test_weights_are_kept_exact():
    assert pm.Mix([range(10)] * 2, [0.7, 0.3]).weights == (0.7, 0.3)
    assert pm.Mix([range(10)] * 3, [1, 2, 1]).weights == (0.25, 0.5, 0.25)
    weights = np.random.default_rng(3).random(10)
    shares = np.array(pm.Mix([range(10)] * 10, weights).weights)
    assert math.isclose(shares.sum(), 1) and np.allclose(shares, weights / weights.sum(), rtol=1e-15, atol=0)
    tiny = pm.Mix([Tagged(0), Tagged(1)], [1, 2**-30], length=2**33)  # one item in a billion, no rounding
    assert [tiny.drawn(1, n) for n in (2**29, 2**30 + 2**29, 2**33)] == [0, 1, 8]
    mix = pm.Mix([Tagged(0), Tagged(1), Tagged(2)], [1 / 3, 1 / 3, 1 / 3], length=10**15)
    assert all(abs(mix.drawn(d, 10**15) - 10**15 // 3) <= 1 for d in range(3))


def test_a_source_of_weight_zero_is_never_drawn():
    mix = pm.Mix([Tagged(0), Tagged(1, n=0), Tagged(2)], [1, 0, 3], length=50_000)
    assert set(drawn_sources(mix, 50_000).tolist()) == {0, 2}


# ---------------------------------------------------------------- passes within a source

def passes_of(mix, d):
    """Source d's draws in the mixture's order, cut into passes of len(source) (the last partial)."""
    js = [j for i in range(len(mix)) for e, j in [mix.locate(i)] if e == d]
    size = len(mix.sources[d])
    return [js[k:k + size] for k in range(0, len(js), size)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_each_pass_is_all_of_a_sources_items_fresh_each_pass(shuffle):
    mix = pm.Mix([range(13), range(40), range(29)], [3, 1, 1], length=300, seed=7, shuffle=shuffle)
    for d, size in enumerate((13, 40, 29)):
        passes = passes_of(mix, d)
        for done in passes[:-1]:
            assert sorted(done) == list(range(size))  # a permutation: nothing repeats before all are drawn
            assert shuffle or done == list(range(size))  # stored order without shuffle
        assert len(set(passes[-1])) == len(passes[-1])  # the partial last pass repeats nothing either
    upsampled = passes_of(mix, 0)
    assert len(upsampled) > 3
    assert (len({tuple(p) for p in upsampled[:3]}) == 3) == shuffle  # a fresh order each pass


def test_seeds_give_other_orders_and_the_same_blend():
    a, b = pm.Mix([range(1000)] * 2, [1, 1], seed=1), pm.Mix([range(1000)] * 2, [1, 1], seed=2)
    located_a, located_b = [a.locate(i) for i in range(100)], [b.locate(i) for i in range(100)]
    assert [d for d, _ in located_a] == [d for d, _ in located_b] and located_a != located_b


def test_default_length_uses_the_scarcest_source_exactly_once():
    assert len(pm.Mix([range(10), range(5)], [1, 1])) == 11  # the longest with no repeat: 6 + 5
    assert len(pm.Mix([range(4), range(4)], [1, 1])) == 8
    assert len(pm.Mix([range(100), range(100)], [3, 1])) == 133  # source 0 runs out first: 100 + 33
    for sizes, weights in [((1000, 10), (0.99, 0.01)), ((7, 300, 41), (0.2, 0.5, 0.3)), ((5,), (1,))]:
        mix = pm.Mix([range(n) for n in sizes], weights)
        drawn = drawn_sources(pm.Mix([Tagged(d, n) for d, n in enumerate(sizes)], weights, length=len(mix)),
                              len(mix))
        counts = np.bincount(drawn, minlength=len(sizes))
        assert (counts <= sizes).all() and (counts == sizes).any()  # the scarcest used up, none repeated
        longer = pm.Mix([Tagged(d, n) for d, n in enumerate(sizes)], weights, length=len(mix) + 1)
        assert (np.bincount(drawn_sources(longer, len(mix) + 1), minlength=len(sizes)) > sizes).any()
    assert len(pm.Mix([range(10)], [1], length=0)) == 0


# ---------------------------------------------------------------- determinism and cost

PINNED = [(0, (0, 960520818)), (1, (1, 5417)), (12345, (1, 10460)), (10**6 + 7, (2, 1)),
          (10**12 - 1, (1, 8094)), (-5, (1, 8523))]


def pinned_mix():
    return pm.Mix([Sized(10**9), Sized(12345), Sized(7)], [0.5, 0.3, 0.2], seed=11, length=10**12)


def test_locate_is_the_same_in_another_process_and_pinned():
    mix = pinned_mix()
    positions = np.random.default_rng(5).integers(0, 10**12, 300).tolist()
    here = [mix.locate(i) for i in positions]
    script = ("import sys, json; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import test_mix; "
              "mix = test_mix.pinned_mix(); print(json.dumps([mix.locate(i) for i in json.loads(sys.argv[3])]))")
    import json
    result = subprocess.run([sys.executable, "-c", script, str(ROOT), str(ROOT / "tests"), json.dumps(positions)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [tuple(x) for x in json.loads(result.stdout)] == here
    assert [(i, mix.locate(i)) for i, _ in PINNED] == PINNED  # a change of algorithm is noticed


def test_locate_agrees_with_the_batch_path():
    mix = pinned_mix()
    positions = np.random.default_rng(6).integers(0, 10**12, 2000)
    assert mix.__getitems__(positions) == [mix[i] for i in positions.tolist()]


@pytest.mark.parametrize("sources", [2, 100])
def test_a_trillion_positions_over_billion_item_sources_take_a_few_mib(sources):
    tracemalloc.start()
    try:
        weights = np.random.default_rng(sources).random(sources) + 0.01
        mix = pm.Mix([Sized(10**9, d) for d in range(sources)], weights, length=10**12)
        positions = np.random.default_rng(0).integers(0, 10**12, 5000).tolist()
        located = [mix.locate(i) for i in positions]
        batch = mix.__getitems__(positions[:512])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # a Megatron table of this mixture: 10 bytes a position, 10 TB
    assert all(0 <= j < 10**9 for _, j in located) and batch == [(d, j) for d, j in located[:512]]


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("sources, weights, error", [
    ([range(3), range(3)], [1, -1], ValueError),
    ([range(3), range(3)], [1, float("nan")], ValueError),
    ([range(3), range(3)], [1, float("inf")], ValueError),
    ([range(3), range(3)], [float("-inf"), 1], ValueError),
    ([range(3), range(3)], [0, 0], ValueError),
    ([range(3), range(3)], [1], ValueError),
    ([range(3)], [1, 1], ValueError),
    ([], [], ValueError),
    ([range(3), range(0)], [1, 1], ValueError),
    ([range(3), range(3)], [1, True], TypeError),
    ([range(3), range(3)], [1, "0.5"], TypeError),
    ([range(3), range(3)], [1, None], TypeError),
    ([range(3), iter(range(3))], [1, 1], TypeError),
    ([range(3), 5], [1, 1], TypeError),
])
def test_bad_weights_and_sources_are_refused(sources, weights, error):
    with pytest.raises(error, match="Mix: "):
        pm.Mix(sources, weights)


def test_weights_may_be_any_real_numbers():
    from fractions import Fraction
    for weights in ([np.float32(0.5), np.int64(1) + 0.5], np.array([1.0, 3.0]), [Fraction(1, 4), 0.75], [1, 3]):
        assert pm.Mix([range(4), range(4)], weights).weights == (0.25, 0.75)


def test_bad_indices_and_lengths_are_refused():
    mix = pm.Mix([range(4), range(4)], [1, 1])
    for i in (8, -9, 10**20):
        with pytest.raises(IndexError, match="out of range for a mixture of 8 items"):
            mix[i]
    for i in (1.0, "1", slice(0, 2), None):
        with pytest.raises(TypeError, match="Mix: item indices must be integers"):
            mix.locate(i)
    with pytest.raises(IndexError):
        mix.__getitems__([0, 8])
    for length in (-1, 2**62):
        with pytest.raises(ValueError, match="Mix: length"):
            pm.Mix([range(4)], [1], length=length)
    with pytest.raises(TypeError):
        pm.Mix([range(4)], [1], length=2.0)
    with pytest.raises(IndexError, match="no source 2"):
        mix.drawn(2, 5)
    with pytest.raises(ValueError, match="lengths are >= 0"):
        mix.drawn(0, -1)
    assert (mix.drawn(0, 8), mix.drawn(1, 10**18)) == (4, 5 * 10**17)


# ---------------------------------------------------------------- batches

def test_a_batch_calls_each_sources_getitems_once_in_the_order_asked():
    sources = [Counting(50, "a"), Counting(7, "b"), [("c", k) for k in range(9)]]
    mix = pm.Mix(sources, [2, 1, 1], length=1000, seed=3)
    batch = np.random.default_rng(0).integers(-1000, 1000, 64).tolist()
    got = mix.__getitems__(batch)
    assert got == [mix[i] for i in batch]
    expected = [[j for i in batch for d, j in [mix.locate(i)] if d == e] for e in range(2)]
    assert [source.calls for source in sources[:2]] == [[expected[0]], [expected[1]]]  # one call each, in order
    assert mix.__getitems__([]) == []


def test_a_mixture_of_loaders_slices_and_sets(in_tmp):
    rng = np.random.default_rng(0)
    pm.build_map([rng.integers(0, 9, int(k)) for k in rng.integers(1, 20, 60)], "a", progress=False, dtype=np.uint16)
    pm.build_map([{"x": rng.random(3), "label": str(k)} for k in range(30)], "s", progress=False)
    a, _ = pm.get_loader_fn("a")
    s, _ = pm.get_loader_fn("s")
    sources = [a, a[10:40], s, [np.arange(k) for k in range(5)]]  # a plain list too
    mix = pm.Mix(sources, [3, 1, 1, 1])
    for i, item in zip(range(len(mix)), mix.__getitems__(range(len(mix)))):
        d, j = mix.locate(i)
        want = sources[d][j]
        if d == 2:
            assert item["label"] == want["label"] and np.array_equal(item["x"], want["x"])
        else:
            assert np.array_equal(item, want) and item.dtype == want.dtype
    assert "60 items × 0.5" in repr(mix) and "30 items × 0.1667" in repr(mix)


def test_a_sampler_takes_a_mixture_as_any_dataset():
    mix = pm.Mix([range(30), range(20)], [1, 1])
    shares = [list(pm.Sampler(mix, seed=1, num_replicas=2, rank=r)) for r in range(2)]
    assert len(mix) == 41 and set(shares[0] + shares[1]) == set(range(41)) and len(shares[1]) == 21


# ---------------------------------------------------------------- pickling and workers

def test_a_mixture_pickles_small_and_locates_the_same(in_tmp):
    pm.build_map([np.arange(k) for k in range(100)], "a", progress=False)
    pm.build_map([np.arange(k) for k in range(40)], "b", progress=False)
    mix = pm.Mix([pm.get_loader_fn("a")[0], pm.get_loader_fn("b")[0][5:]], np.random.default_rng(0).random(2),
                 seed=9, length=10**6)
    data = pickle.dumps(mix)
    assert len(data) < 2000  # the loaders' paths and the arguments: no table
    back = pickle.loads(data)
    positions = np.random.default_rng(1).integers(0, 10**6, 500).tolist()
    assert [back.locate(i) for i in positions] == [mix.locate(i) for i in positions]
    assert len(back) == len(mix) and back.weights == mix.weights and repr(back) == repr(mix)
    big = pickle.dumps(pm.Mix([Sized(10**9, d) for d in range(100)], range(1, 101), length=10**12))
    assert len(big) < 10_000


def first_values(batch):
    return [int(item[0]) if isinstance(item, np.ndarray) else item for item in batch]


def token_mixture(use_windows):
    """Two token maps in the current folder, mixed 3:1: of their Windows if asked, else of the maps."""
    rng = np.random.default_rng(0)
    for name, low in (("web", 0), ("code", 1000)):
        pm.build_map([rng.integers(low, low + 1000, int(k)) for k in rng.integers(5, 60, 120)], name,
                     progress=False, dtype=np.uint16)
    loads = [pm.get_loader_fn(name)[0] for name in ("web", "code")]
    sources = [pm.Windows(load, 16) for load in loads] if use_windows else loads
    return pm.Mix(sources, [0.75, 0.25], seed=3, length=400)


def test_a_dataloader_with_two_workers_serves_the_mixture(in_tmp):
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader
    mix = token_mixture(use_windows=False)
    sampler = pm.Sampler(mix, seed=1)
    # spawn: each worker receives the mixture pickled (its loaders as paths), as on macOS and Windows
    loader = DataLoader(mix, sampler=sampler, batch_size=8, num_workers=2, collate_fn=first_values,
                        multiprocessing_context="spawn")
    assert [k for batch in loader for k in batch] == [int(mix[i][0]) for i in sampler]


@pytest.mark.parametrize("use_windows", [False, True])
def test_a_stateful_dataloader_resumes_a_mixture_exactly(in_tmp, use_windows):
    pytest.importorskip("torch")
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    if use_windows and not hasattr(pm, "Windows"):
        pytest.skip("pm.Windows is not in this picomap")
    mix = token_mixture(use_windows)

    def loader():
        sampler = pm.Sampler(mix, seed=5)
        sampler.set_epoch(1)
        return stateful.StatefulDataLoader(mix, sampler=sampler, batch_size=8, num_workers=2, collate_fn=first_values)
    whole = list(loader())
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(13)]
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert head == whole[:13] and list(resumed) == whole[13:] and len(whole) == 50

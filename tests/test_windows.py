"""pm.Windows: packed language-model windows over a map's rows, checked against an independent
Megatron-style sample index and a brute-force oracle of item boundaries."""
import json
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import picomap as pm

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write_map(base, lengths, dtype=np.uint16, seed=0):
    """A valid map of items of the given lengths, written by hand (quick): random tokens, real offsets."""
    starts = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64))).astype(np.uint64)
    tokens = np.random.default_rng(seed).integers(0, 1000, int(starts[-1])).astype(dtype)
    np.save(f"{base}.starts.npy", starts)
    tokens.tofile(f"{base}.dat")
    Path(f"{base}.json").write_text(json.dumps({"trail_dim": [], "hash": "0" * 32, "creation_time": "",
                                                "dtype": np.dtype(dtype).str, "count": len(lengths),
                                                "total_rows": int(starts[-1])}))
    return tokens, starts.astype(np.int64)


def corpus(rng, n_docs, seq_len):
    """Documents of random lengths: many empty, some short, some several windows long."""
    kind = rng.integers(0, 4, n_docs)
    lengths = np.where(kind == 0, 0, np.where(kind == 3, rng.integers(seq_len, 5 * seq_len + 3, n_docs),
                                              rng.integers(1, seq_len + 2, n_docs)))
    return [rng.integers(0, 50257, int(n)).astype(np.uint16) for n in lengths]


# ---------------------------------------------------------------- Megatron's sample index, written from its description

def megatron_sample_index(sizes, seq_len):
    """Megatron-LM GPTDataset's sample index for one epoch, documents in stored order, with
    add_extra_token_to_sequence: sample s spans from (document, offset) row s to row s + 1,
    both inclusive; consecutive samples share that boundary token."""
    total = int(sum(sizes))
    n_samples = (total - 1) // seq_len
    index = [(0, 0)]
    doc, offset = 0, 0
    for _ in range(n_samples):
        need = seq_len + 1  # tokens this sample takes, counting the shared one it starts on
        while True:
            left_in_doc = sizes[doc] - offset
            if need <= left_in_doc:
                offset += need - 1  # the sample's last token; the next sample starts on it
                break
            need -= left_in_doc
            doc, offset = doc + 1, 0
        index.append((doc, offset))
    return index


def megatron_sample(documents, index, s):
    """Sample s rebuilt from the documents, as GPTDataset reads it: the first document from its
    offset, the documents between whole, the last up to and including its offset."""
    (d0, o0), (d1, o1) = index[s], index[s + 1]
    if d0 == d1:
        return documents[d0][o0:o1 + 1]
    parts = [documents[d0][o0:]] + [documents[d] for d in range(d0 + 1, d1)] + [documents[d1][:o1 + 1]]
    return np.concatenate(parts)


@pytest.mark.parametrize("seed", range(6))
def test_every_window_is_megatrons_sample_token_for_token(in_tmp, seed):
    rng = np.random.default_rng(seed)
    seq_len = int(rng.choice([1, 2, 7, 32, 100]))
    documents = corpus(rng, int(rng.integers(1, 120)), seq_len)
    pm.build_map(documents, "docs", progress=False)
    load, _ = pm.get_loader_fn("docs")
    w = pm.Windows(load, seq_len)
    index = megatron_sample_index([len(d) for d in documents], seq_len)
    assert len(w) == len(index) - 1
    for k in range(len(w)):
        assert w[k].dtype == np.uint16 and w[k].shape == (seq_len + 1,)
        assert np.array_equal(w[k], megatron_sample(documents, index, k)), k


# ---------------------------------------------------------------- boundaries

def oracle_cu_seqlens(starts, first, seq_len):
    """By brute force: 0, each distinct item start strictly inside the window's inputs, seq_len."""
    inside = sorted({int(s) - first for s in starts if first < s < first + seq_len})
    return [0, *inside, seq_len]


@PROPERTY
@given(lengths=st.lists(st.one_of(st.just(0), st.integers(0, 5), st.integers(0, 60)), max_size=40),
       seq_len=st.integers(1, 20), cut=st.tuples(st.integers(0, 40), st.integers(0, 40)))
def test_cu_seqlens_match_the_oracle_at_every_window(tmp_path_factory, lengths, seq_len, cut):
    base = tmp_path_factory.mktemp("w") / "m"
    tokens, starts = write_map(base, lengths)
    load, n = pm.get_loader_fn(base)
    a, b = min(cut[0], n), min(max(cut), n)
    for part in (load, load[a:b]):
        w = pm.Windows(part, seq_len)
        low, high = int(part._starts[0]), int(part._starts[-1])
        assert len(w) == max(high - low - 1, 0) // seq_len
        for k in range(len(w)):
            first = low + k * seq_len
            cu = w.cu_seqlens(k)
            assert cu.dtype == np.int32 and cu.tolist() == oracle_cu_seqlens(starts[part._first:], first, seq_len)
            assert np.array_equal(w[k], tokens[first:first + seq_len + 1])
            assert w.cu_seqlens(k - len(w)).tolist() == cu.tolist()


def test_boundaries_of_empty_and_long_documents(in_tmp):
    # rows: doc A 0-2, empties at 3, doc B 3-7, doc C 8, empty at 9, doc D 9-15 (several windows of 4), E 16-17
    write_map("m", [3, 0, 0, 5, 1, 0, 7, 2])
    w = pm.Windows(pm.get_loader_fn("m")[0], 4)
    assert [w.cu_seqlens(k).tolist() for k in range(len(w))] == [[0, 3, 4], [0, 4], [0, 1, 4], [0, 4]]
    # window 1 is rows 4-8: C's only row, 8, is its label only, so no boundary of its inputs; window 2
    # is rows 8-12: C begins at its first row (0, not listed again) and D, after the empty item, at 1


def test_windows_over_a_slice_are_those_of_a_map_of_its_items(in_tmp):
    rng = np.random.default_rng(3)
    documents = corpus(rng, 60, 16)
    pm.build_map(documents, "all", progress=False)
    pm.build_map(documents[17:45], "part", progress=False)
    load, _ = pm.get_loader_fn("all")
    sliced, alone = pm.Windows(load[17:45], 16), pm.Windows(pm.get_loader_fn("part")[0], 16)
    assert len(sliced) == len(alone) > 0
    for k in range(len(alone)):
        assert np.array_equal(sliced[k], alone[k]) and sliced.cu_seqlens(k).tolist() == alone.cu_seqlens(k).tolist()
    assert len(pm.Windows(load[5:5], 3)) == 0


def test_windows_are_read_only_views_with_python_indexing(in_tmp):
    tokens, _ = write_map("m", [10, 0, 25, 6])
    load, _ = pm.get_loader_fn("m")
    w = pm.Windows(load, 5)
    assert len(w) == (41 - 1) // 5 == 8
    assert np.shares_memory(w[0], load.data) and not w[0].flags.writeable
    assert np.array_equal(w(-1), tokens[35:41]) and np.array_equal(w[np.int64(2)], tokens[10:16])
    assert np.array_equal(w[np.array(3)], tokens[15:21]) and np.array_equal(w[True], w[1])
    assert [x.tolist() for x in w.__getitems__([3, -8, np.uint8(1)])] == [tokens[a:a + 6].tolist() for a in (15, 0, 5)]
    assert [x.tolist() for x in w] == [tokens[a:a + 6].tolist() for a in range(0, 40, 5)]
    for k in (8, -9, 10**20):
        with pytest.raises(IndexError, match="m: window .* out of range for 8 windows"):
            w[k]
        with pytest.raises(IndexError):
            w.cu_seqlens(k)
    from fractions import Fraction
    for k in (1.0, np.float64(2.0), Fraction(2), "1", None, slice(0, 2), np.array([1, 2]), [1]):
        with pytest.raises(TypeError, match="window indices must be integers"):
            w[k]
        with pytest.raises(TypeError):
            w.cu_seqlens(k)
    with pytest.raises(IndexError):
        w.__getitems__([0, 8])


def test_short_and_empty_maps_have_no_windows(in_tmp):
    for lengths, seq_len, count in [([], 1, 0), ([0, 0], 1, 0), ([1], 1, 0), ([2], 1, 1), ([3, 2], 4, 1),
                                    ([3, 1], 4, 0)]:
        write_map("m", lengths)
        w = pm.Windows(pm.get_loader_fn("m")[0], seq_len)
        assert len(w) == count and list(w.__getitems__([])) == []
        with pytest.raises(IndexError):
            w[count]


def test_what_cannot_be_windowed_is_refused(in_tmp):
    write_map("m", [4, 4])
    load, _ = pm.get_loader_fn("m")
    for bad in (0, -3, 2**31):
        with pytest.raises(ValueError, match=r"m: seq_len must be from 1 to 2\*\*31 - 1"):
            pm.Windows(load, bad)
    for bad in (2.0, "4", None):
        with pytest.raises(TypeError, match="m: seq_len must be an integer"):
            pm.Windows(load, bad)
    assert pm.Windows(load, np.int32(3)).seq_len == 3 and pm.Windows(load, 3).load is load
    with pytest.raises(TypeError, match="must be a picomap loader"):
        pm.Windows(np.arange(10), 2)
    pm.build_map([{"tokens": np.arange(3), "mask": np.ones(3, bool)}] * 2, "set", progress=False)
    with pytest.raises(ValueError, match="set: a set of fields"):
        pm.Windows(pm.get_loader_fn("set")[0], 2)
    assert len(pm.Windows(pm.get_loader_fn("set")[0].fields["tokens"], 2)) == 2  # one field is a map
    pm.build_map(["some text", "more"], "text", progress=False)
    with pytest.raises(ValueError, match="text: a map of text"):
        pm.Windows(pm.get_loader_fn("text")[0], 2)
    w = pm.Windows(load, 3)
    load.close()
    with pytest.raises(ValueError, match="m: the loader is closed"):
        pm.Windows(load, 2)
    with pytest.raises(ValueError, match="m: the loader is closed"):
        w.cu_seqlens(0)
    assert w[1].tolist() == np.fromfile("m.dat", np.uint16)[3:7].tolist()  # its own view of the rows


def test_structured_rows_and_cold_reads_window_the_same(in_tmp):
    row = np.dtype([("tokens", np.uint16), ("mask", np.bool_)])
    items = []
    for n in (5, 0, 9, 3):
        item = np.zeros(n, row)
        item["tokens"], item["mask"] = np.arange(n) + 100 * len(items), np.arange(n) % 2 == 0
        items.append(item)
    pm.build_map(items, "masked", progress=False)
    every = np.concatenate(items)
    cached, cold = (pm.Windows(pm.get_loader_fn("masked", access=a)[0], 4) for a in ("cached", "cold"))
    assert cold.load.access == "cold" and len(cached) == len(cold) == 4
    for k in range(4):
        assert cached[k].dtype == row and np.array_equal(cached[k], every[4 * k:4 * k + 5])
        assert np.array_equal(cold[k], cached[k]) and cold.cu_seqlens(k).tolist() == cached.cu_seqlens(k).tolist()
    assert [x.tolist() for x in cold.__getitems__([3, 0, 1])] == [every[a:a + 5].tolist() for a in (12, 0, 4)]
    back = pickle.loads(pickle.dumps(cold))
    assert back.load.access == "cold" and isinstance(back, pm.Windows) and np.array_equal(back[-1], cold[3])


# ---------------------------------------------------------------- damaged offsets

def test_damaged_offsets_in_the_middle_are_refused_never_served(in_tmp):
    chunk = 1 << pm.CHECK_SHIFT
    _, starts = write_map("m", np.tile([3, 0, 5, 1, 9], chunk))  # five chunks of offsets
    at = 2 * chunk + 100  # an offset in chunk 2 made to go back to row 10
    damaged = starts.copy()
    damaged[at] = 10
    np.save("m.starts.npy", damaged.astype(np.uint64))
    seq_len = 64
    w = pm.Windows(pm.get_loader_fn("m")[0], seq_len)
    boundaries = np.unique(starts)  # the oracle, from the offsets before the damage
    refused = []
    for k in range(len(w)):
        first = k * seq_len
        try:
            cu = w.cu_seqlens(k)
        except ValueError as e:
            assert f"m.starts.npy: offsets decrease at item {at - 1}" in str(e)
            assert f"window {k} is not served" in str(e)
            refused.append(k)
            continue
        inside = boundaries[(boundaries > first) & (boundaries < first + seq_len)] - first
        assert cu.tolist() == [0, *inside.tolist(), seq_len]
    in_chunk_2 = [k for k in range(len(w)) if starts[2 * chunk] <= k * seq_len and
                  (k + 1) * seq_len < starts[3 * chunk]]
    assert set(in_chunk_2) <= set(refused) and len(refused) <= len(in_chunk_2) + 4  # those, hardly any more
    assert np.array_equal(w[in_chunk_2[0]], np.fromfile("m.dat", np.uint16)[in_chunk_2[0] * seq_len:][:seq_len + 1])


@PROPERTY
@given(lengths=st.lists(st.integers(0, 12), min_size=2, max_size=40), seq_len=st.integers(1, 12),
       damage=st.lists(st.tuples(st.integers(1, 39), st.integers(-5, 600)), min_size=1, max_size=3))
def test_damaged_offsets_never_give_boundaries_outside_the_window(tmp_path_factory, lengths, seq_len, damage):
    base = tmp_path_factory.mktemp("d") / "m"
    _, starts = write_map(base, lengths)
    damaged = starts.copy()
    for at, value in damage:
        damaged[min(at, len(lengths) - 1)] = max(value, 0)  # inner offsets only: both ends are checked at open
    np.save(f"{base}.starts.npy", damaged.astype(np.uint64))
    w = pm.Windows(pm.get_loader_fn(base)[0], seq_len)
    for k in range(len(w)):
        first = k * seq_len
        try:
            cu = w.cu_seqlens(k)
        except ValueError as e:
            assert "m.starts.npy" in str(e)
            continue
        assert cu[0] == 0 and cu[-1] == seq_len and bool((np.diff(cu) > 0).all())
        assert set(cu[1:-1].tolist()) <= {int(s) - first for s in damaged}  # each an offset the file holds
        if bool((np.diff(damaged) >= 0).all()):
            assert cu.tolist() == oracle_cu_seqlens(damaged, first, seq_len)


# ---------------------------------------------------------------- cost, pickling, processes

def write_pattern_map(base, n_items, pattern):
    """A valid map of n_items items whose lengths repeat pattern: real offsets written in chunks,
    a sparse .dat. Returns a function giving any offset from the pattern, without the file."""
    period, prefix = len(pattern), np.concatenate(([0], np.cumsum(pattern)))

    def offset(i):
        i = np.asarray(i, np.int64)
        return (i // period) * prefix[-1] + prefix[i % period]
    total = int(offset(n_items))
    with open(f"{base}.starts.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<u8", "fortran_order": False, "shape": (n_items + 1,)})
        for a in range(0, n_items + 1, 1 << 23):
            f.write(offset(np.arange(a, min(a + (1 << 23), n_items + 1))).astype("<u8").tobytes())
    with open(f"{base}.dat", "wb") as f:
        f.truncate(total * 2)
    Path(f"{base}.json").write_text(json.dumps({"trail_dim": [], "hash": "0" * 32, "creation_time": "",
                                                "dtype": "uint16", "count": n_items, "total_rows": total}))
    return offset


def test_hundred_million_documents_cost_no_memory(in_tmp):
    n_items, seq_len, pattern = 100_000_000, 64, [1, 0, 1, 1, 0, 0, 1, 1]
    offset = write_pattern_map("big", n_items, pattern)
    try:
        rng = np.random.default_rng(0)
        tracemalloc.start()
        try:
            load, _ = pm.get_loader_fn("big")
            w = pm.Windows(load, seq_len)
            picks = rng.integers(0, len(w), 200).tolist()
            got = {k: (w[k].shape, w.cu_seqlens(k)) for k in picks}
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20  # the offsets alone are 800 MB
        assert len(w) == (int(offset(n_items)) - 1) // seq_len
        per_row = len(pattern) / sum(pattern)
        for k, (shape, cu) in got.items():
            first = k * seq_len
            near = int(first * per_row)  # about the item holding row first; the oracle looks around it
            around = np.arange(max(near - 2 * len(pattern), 0), near + int(seq_len * per_row) + 3 * len(pattern))
            starts = offset(around)
            assert shape == (seq_len + 1,) and cu.tolist() == oracle_cu_seqlens(starts, first, seq_len)
        assert len(pickle.dumps(w)) < 1024
    finally:  # the files write_pattern_map wrote: a map without a .digests file, as before picomap 1.4
        files = pm.map_files("big")
        for f in (files.dat, files.starts, files.json):
            f.unlink()


def test_pickles_as_its_map_and_seq_len(in_tmp):
    write_pattern_map("big", 1_000_000, [3, 0, 5])
    load, _ = pm.get_loader_fn("big")
    for w in (pm.Windows(load, 128), pm.Windows(load[1000:900_000], 7)):
        blob = pickle.dumps(w)
        assert len(blob) < 1024
        back = pickle.loads(blob)
        assert type(back) is pm.Windows and len(back) == len(w) and back.seq_len == w.seq_len
        for k in (0, 1, len(w) // 2, -1):
            assert np.array_equal(back[k], w[k]) and back.cu_seqlens(k).tolist() == w.cu_seqlens(k).tolist()
        assert repr(back).endswith(repr(w).split("': ")[1]) and str(in_tmp) in repr(back)


def batch_of_windows(windows):
    """A collate for the tests: the windows copied out of the map, as int64."""
    return np.stack(windows).astype(np.int64)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers_yield_every_window_once(in_tmp, method):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader
    tokens, _ = write_map("m", np.random.default_rng(1).integers(0, 90, 200))
    w = pm.Windows(pm.get_loader_fn("m")[0], 32)
    sampler = pm.Sampler(w, seed=4)
    loader = DataLoader(w, sampler=sampler, batch_size=8, num_workers=2, collate_fn=batch_of_windows,
                        multiprocessing_context=method)
    got = np.concatenate([b.numpy() if isinstance(b, torch.Tensor) else b for b in loader])
    order = list(pm.Sampler(w, seed=4))
    assert sorted(order) == list(range(len(w)))
    assert np.array_equal(got, np.stack([tokens[32 * k:32 * k + 33] for k in order]))


def test_sampler_resume_under_stateful_dataloader(in_tmp):
    pytest.importorskip("torch")
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    write_map("m", np.random.default_rng(2).integers(0, 70, 300))
    w = pm.Windows(pm.get_loader_fn("m")[0], 16)

    def loader():
        return stateful.StatefulDataLoader(w, sampler=pm.Sampler(w, seed=9), batch_size=4, num_workers=2,
                                           collate_fn=batch_of_windows)
    whole = [b.tolist() for b in loader()]
    first = loader()
    seen = []
    for step, b in enumerate(first):
        seen.append(b.tolist())
        if step == 6:
            checkpoint = first.state_dict()
            break
    fresh = loader()
    fresh.load_state_dict(pickle.loads(pickle.dumps(checkpoint)))
    rest = [b.tolist() for b in fresh]
    assert seen + rest == whole and len(rest) == len(whole) - 7


def test_block_sampler_gives_runs_of_consecutive_windows(in_tmp):
    tokens, _ = write_map("m", np.random.default_rng(5).integers(0, 40, 400))
    w = pm.Windows(pm.get_loader_fn("m")[0], 8)
    order = list(pm.Sampler(w, seed=1, block=16))
    assert sorted(order) == list(range(len(w))) and len(w) % 16
    blocks = [k // 16 for k in order]
    runs = [blocks[0]] + [b for a, b in zip(blocks, blocks[1:]) if b != a]
    assert sorted(runs) == list(range(-(-len(w) // 16)))  # each block's windows in one run: consecutive rows
    run = [k for k in order if k // 16 == runs[0]]
    assert np.array_equal(np.concatenate([w[k][:-1] for k in sorted(run)]), tokens[8 * min(run):8 * (max(run) + 1)])


def test_benchmark_quick_mode_runs_and_reports(tmp_path):
    pytest.importorskip("torch")
    import subprocess
    import sys
    script = Path(pm.__file__).resolve().parent / "benchmarks" / "windows.py"
    result = subprocess.run([sys.executable, str(script), "--quick", "--folder", str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for line in ("| 1e+04 |", "| 1e+05 |", "| `w[k]` |", "| pm.Windows | ", "| np.memmap, nanoGPT-style |"):
        assert line in result.stdout
    assert list(tmp_path.iterdir()) == []  # its maps are removed

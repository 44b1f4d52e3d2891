"""merge_maps: the same bytes and hash as one build, clear refusals that write nothing, crash safety."""
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import picomap as pm
from conftest import LEGACY, listing, oracle_hash, read_json, snapshot, tokens, traced_peak
from test_cli import run
from test_load import run_python


def build_shards(parts, prefix="shard"):
    names = [f"{prefix}{k}" for k in range(len(parts))]
    for name, items in zip(names, parts):
        pm.build_map(items, name, progress=False)
    return names


def assert_same_as_direct_build(out, items):
    pm.build_map(items, "direct", progress=False)
    for suffix in (".dat", ".starts.npy", ".digests"):
        assert Path(f"{out}{suffix}").read_bytes() == Path(f"direct{suffix}").read_bytes()
    assert read_json(out)["hash"] == read_json("direct")["hash"] == oracle_hash(items)
    assert pm.verify_hash(out, progress=False)


def test_merge_equals_building_everything_at_once(in_tmp):
    parts = [tokens(10, seed=1), [], tokens(7, seed=2), tokens(1, seed=3)]
    header = pm.merge_maps(build_shards(parts), "merged", progress=False)
    everything = [a for part in parts for a in part]
    assert header == read_json("merged")
    assert header["count"] == len(everything) and header["total_rows"] == sum(map(len, everything))
    assert_same_as_direct_build("merged", everything)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 9), max_size=30), cuts=st.lists(st.integers(0, 30), max_size=6),
       trail=st.sampled_from([(), (3,), (2, 0)]), dtype=st.sampled_from(["<f4", ">i2", "|b1"]))
def test_merged_hash_does_not_depend_on_the_sharding(tmp_path_factory, lengths, cuts, trail, dtype):
    rng = np.random.default_rng(len(lengths))
    items = [rng.integers(0, 2, (n, *trail)).astype(dtype) for n in lengths]
    bounds = sorted({0, len(items), *(min(c, len(items)) for c in cuts)})
    parts = [items[a:b] for a, b in zip(bounds, bounds[1:])] + [[]]  # an empty shard too
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("merge"))
        pm.merge_maps(build_shards(parts), "merged", progress=False)
        assert_same_as_direct_build("merged", items)


def test_legacy_maps_are_valid_shards(in_tmp):
    with np.load(LEGACY / "ragged_f32.expected.npz") as npz:
        old = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    new = [np.ones((n, 4, 3), np.float32) for n in (2, 0, 1)]
    pm.build_map(new, "new", progress=False)
    pm.merge_maps([LEGACY / "ragged_f32", "new.dat"], "merged", progress=False)
    assert_same_as_direct_build("merged", old + new)


def test_empty_shards_may_record_any_layout(in_tmp):
    pm.build_map([], "empty", progress=False)  # records float64, ()
    pm.build_map([np.zeros((0, 5), np.uint8)], "zero_rows", progress=False)
    pm.build_map([np.arange(4, dtype=np.int16)], "real", progress=False)
    with pytest.raises(ValueError, match="shard 2"):  # an item with no rows is still an item
        pm.merge_maps(["empty", "zero_rows", "real"], "merged", progress=False)
    pm.merge_maps(["empty", "real", "empty"], "merged", progress=False)
    assert_same_as_direct_build("merged", [np.arange(4, dtype=np.int16)])
    assert pm.merge_maps(["empty", "empty"], "nothing", progress=False)["count"] == 0


def test_meta_is_kept_when_every_shard_agrees(in_tmp):
    for name, meta in [("a", {"tok": "gpt2"}), ("b", {"tok": "gpt2"}), ("c", {"tok": "bpe8k"})]:
        pm.build_map(tokens(3), name, progress=False, meta=meta)
    assert pm.merge_maps(["a", "b"], "ab", progress=False)["meta"] == {"tok": "gpt2"}
    assert pm.merge_maps(["a", "c"], "ac", progress=False, meta={"tok": "mixed"})["meta"] == {"tok": "mixed"}
    assert pm.get_loader_fn("ac")[0].meta == {"tok": "mixed"}


def test_shards_whose_meta_disagree_are_refused_unless_meta_is_given(in_tmp):
    for name, meta in [("a", {"tok": "gpt2"}), ("b", {"tok": "gpt2"}), ("c", {"tok": "bpe8k"})]:
        pm.build_map(tokens(3), name, progress=False, meta=meta)
    before = listing(in_tmp)
    with pytest.raises(ValueError, match=r'merge_maps: shard 2 \(c.dat\) has meta {"tok": "bpe8k"}, but shard 0 '
                                         r'has {"tok": "gpt2"}; pass meta='):
        pm.merge_maps(["a", "b", "c"], "abc", progress=False)
    assert listing(in_tmp) == before


def test_progress_bar_counts_bytes(in_tmp, capsys):
    pm.merge_maps(build_shards([tokens(3), tokens(4)]), "merged")
    err = capsys.readouterr().err
    assert "merge merged.dat" in err and "B/s" in err


# ---------------------------------------------------------------- refusals write nothing

@pytest.fixture
def two_shards_and_an_old_out(in_tmp):
    build_shards([tokens(5, seed=1), tokens(5, seed=2)])
    pm.build_map(tokens(3, seed=3), "out", progress=False)
    return {name: snapshot(name) for name in ("shard0", "shard1", "out")}, listing(in_tmp)


def assert_nothing_changed(before, in_tmp):
    files, names = before
    assert listing(in_tmp) == names
    assert {name: snapshot(name) for name in files} == files


@pytest.mark.parametrize("bad, words", [
    ({"dtype": np.float32}, ["shard 2", "shard2.dat", "<f4", "shard 0", "<i4"]),
    ({"trail": (2,)}, ["shard 2", "(2,)", "()"]),
])
def test_mismatched_shards_raise_naming_the_shard(two_shards_and_an_old_out, in_tmp, bad, words):
    item = np.zeros((3, *bad.get("trail", ())), bad.get("dtype", np.int32))
    pm.build_map([item], "shard2", progress=False)
    before = {"shard2": snapshot("shard2"), **two_shards_and_an_old_out[0]}, listing(in_tmp)
    with pytest.raises(ValueError) as caught:
        pm.merge_maps(["shard0", "shard1", "shard2"], "out", progress=False)
    for word in words:
        assert word in str(caught.value)
    assert_nothing_changed(before, in_tmp)


@pytest.mark.parametrize("out", ["shard1", "shard1.dat", "./shard1", "link"])
def test_out_may_not_be_an_input(two_shards_and_an_old_out, in_tmp, out):
    for suffix in (".dat", ".digests", ".json", ".starts.npy"):
        os.symlink(f"shard1{suffix}", f"link{suffix}")
    before = two_shards_and_an_old_out[0], listing(in_tmp)
    with pytest.raises(ValueError, match="is shard 1; merge into a new path"):
        pm.merge_maps(["shard0", "shard1"], out, progress=False)
    assert_nothing_changed(before, in_tmp)


def test_a_single_path_is_not_a_list_of_paths(two_shards_and_an_old_out, in_tmp):
    with pytest.raises(TypeError, match="a list of maps"):
        pm.merge_maps("shard0", "merged", progress=False)
    assert_nothing_changed(two_shards_and_an_old_out, in_tmp)


def test_a_missing_shard_raises_and_writes_nothing(two_shards_and_an_old_out, in_tmp):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        pm.merge_maps(["shard0", "nowhere"], "out", progress=False)
    assert_nothing_changed(two_shards_and_an_old_out, in_tmp)


def test_a_shard_changed_while_merging_is_refused(two_shards_and_an_old_out, in_tmp, monkeypatch):
    real = pm._copy_into

    def tamper_then_copy(source, target, bar):
        if source.files.dat.name == "shard1.dat":  # rewritten after it was checked, before it is copied
            data = bytearray(source.files.dat.read_bytes())
            data[0] ^= 1
            os.replace(_write("tampered.tmp", data), source.files.dat)
        return real(source, target, bar)
    monkeypatch.setattr(pm, "_copy_into", tamper_then_copy)
    with pytest.raises(ValueError, match="shard1.dat: changed while merging"):
        pm.merge_maps(["shard0", "shard1"], "out", progress=False)
    files, names = two_shards_and_an_old_out
    assert listing(in_tmp) == names and snapshot("out") == files["out"]


def _write(name, data):
    Path(name).write_bytes(data)
    return name


def test_an_interrupted_merge_leaves_the_old_map(two_shards_and_an_old_out, in_tmp, monkeypatch):
    copy = pm._copy_into

    def interrupted(*args):  # Ctrl-C once a shard's bytes are copied
        copy(*args)
        raise KeyboardInterrupt
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(pm, "_copy_into", interrupted)
        pm.merge_maps(["shard0", "shard1"], "out", progress=False)
    assert_nothing_changed(two_shards_and_an_old_out, in_tmp)
    assert pm.verify_hash("out", progress=False)


# ---------------------------------------------------------------- the copy itself

@pytest.mark.parametrize("kernel", ["missing", "refuses", "alternates"])
def test_the_plain_copy_fallback_gives_the_same_map(in_tmp, monkeypatch, kernel):
    parts = [tokens(40, seed=k) for k in range(3)]
    names = build_shards(parts)
    monkeypatch.setattr(pm, "COPY_CHUNK_BYTES", 100)  # many chunks per shard
    real, calls = os.copy_file_range, []

    def flaky(*args):
        calls.append(args)
        if kernel == "refuses" or len(calls) % 2:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(*args)
    if kernel == "missing":
        monkeypatch.delattr(os, "copy_file_range")
    else:
        monkeypatch.setattr(os, "copy_file_range", flaky)
    pm.merge_maps(names, "merged", progress=False)
    assert_same_as_direct_build("merged", [a for part in parts for a in part])
    assert kernel == "missing" or len(calls) > 10


# ---------------------------------------------------------------- command line

def test_merge_command(in_tmp):
    names = build_shards([tokens(4, seed=1), tokens(6, seed=2)])
    good = run("merge", "merged", *names, cwd=in_tmp)
    assert good.returncode == 0 and "merged 2 maps into merged: 10 items" in good.stdout
    assert pm.verify_hash("merged", progress=False)
    pm.build_map([np.zeros(2, np.float64)], "other", progress=False)
    for args, words in [(("bad", "shard0", "other"), "shard 1"), (("bad", "shard0", "nowhere"), "nowhere.json"),
                        (("shard0", "shard0", "shard1"), "is shard 0")]:
        bad = run("merge", *args, cwd=in_tmp)
        assert bad.returncode == 1 and words in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert not Path("bad.json").exists()


def write_shard(base, item):
    """A one-item shard written without build_map (no fsyncs), so that a thousand are quick to make."""
    np.save(f"{base}.starts.npy", np.array([0, len(item)], np.uint64))
    Path(f"{base}.dat").write_bytes(item.tobytes())
    Path(f"{base}.json").write_text(json.dumps({"trail_dim": [], "hash": "0" * 32, "creation_time": "",
                                                "dtype": str(item.dtype), "count": 1, "total_rows": len(item)}))


def test_a_thousand_shards_merge_under_a_256_file_limit(in_tmp):
    items = [np.full(k % 7, k, np.int32) for k in range(1000)]
    for k, item in enumerate(items):
        write_shard(f"s{k}", item)
    script = ("import resource, picomap as pm\nresource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))\n"
              "print(pm.merge_maps([f's{k}' for k in range(1000)], 'merged', progress=False)['count'])")
    result = run_python(script, in_tmp)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1000"
    assert_same_as_direct_build("merged", items)


def test_merge_memory_does_not_grow_with_the_count(in_tmp):
    peaks = []
    for n in (200_000, 800_000):
        for k in range(2):
            pm.build_map((np.full(k, 1, np.int8) for _ in range(n // 2)), f"part{n}-{k}", progress=False)
        peaks.append(traced_peak(lambda: pm.merge_maps([f"part{n}-0", f"part{n}-1"], f"merged{n}", progress=False)))
    assert peaks[1] < 16 << 20 and peaks[1] < peaks[0] + (1 << 20)  # before: 8 bytes an item, and more
    assert pm.verify_hash("merged800000", progress=False)


def test_merge_memory_does_not_grow_with_the_shards_meta(in_tmp):
    vocab = {"vocab": {f"token{k}": k for k in range(10_000)}}  # a tokenizer's, 0.2 MB of JSON
    peaks = []
    for n in (5, 40):
        for k in range(n):
            pm.build_map([np.arange(k % 4, dtype=np.int32)], f"part{n}-{k}", progress=False, meta=vocab)
        peaks.append(traced_peak(lambda: pm.merge_maps([f"part{n}-{k}" for k in range(n)], f"merged{n}",
                                                       progress=False)))
    assert peaks[1] < peaks[0] + (1 << 20)  # before: every shard's meta kept, 1 MB of Python objects a shard
    assert read_json("merged40")["meta"] == vocab and pm.get_loader_fn("merged40")[1] == 40


def test_damaged_shard_offsets_stop_the_merge(in_tmp):
    names = build_shards([tokens(10, seed=1), tokens(10, seed=2)])
    starts = np.load("shard1.starts.npy")
    starts[4], starts[5] = starts[5], starts[4] - 1
    np.save("shard1.starts.npy", starts)
    with pytest.raises(ValueError, match="shard1.starts.npy: offsets decrease at item 4"):
        pm.merge_maps(names, "merged", progress=False)
    assert not [name for name in listing(in_tmp) if name.startswith(("merged", ".merged"))]


def test_merge_command_takes_meta(in_tmp):
    pm.build_map(tokens(3, seed=1), "a", progress=False, meta={"v": 1})
    pm.build_map(tokens(3, seed=2), "b", progress=False, meta={"v": 2})
    refused = run("merge", "m", "a", "b", cwd=in_tmp)
    assert refused.returncode == 1 and "pass meta= (picomap merge --meta JSON)" in refused.stderr
    done = run("merge", "--meta", '{"v": 3}', "m", "a", "b", cwd=in_tmp)
    assert done.returncode == 0, done.stderr
    assert pm.MapLoader("m").meta == {"v": 3}
    for meta, words in [("{oops", "--meta must be a JSON object"), ("[1]", "meta must be a dict")]:
        bad = run("merge", "--meta", meta, "n", "a", "b", cwd=in_tmp)
        assert bad.returncode == 1 and words in bad.stderr and "Traceback" not in bad.stderr

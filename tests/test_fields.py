"""Items with several fields (sets), text items, and push-style writing with MapWriter."""
import gc
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import picomap as pm
from conftest import listing, oracle_hash, oracle_set_hash, read_json, tokens, write_json
from test_faults import SLOW_BUILD_OF, kill_when_midway, read_while_rebuilt, same_items, start_python


def clips(n=12, seed=0):
    """Audio-and-transcript-like items: float32 frames of 2 channels, int32 tokens, a str caption."""
    rng = np.random.default_rng(seed)
    return [{"audio": rng.standard_normal((int(rng.integers(0, 9)), 2)).astype(np.float32),
             "tokens": rng.integers(0, 500, int(rng.integers(0, 6))).astype(np.int32),
             "text": "".join(rng.choice(list("abcé ✓"), int(rng.integers(0, 7))))} for _ in range(n)]


def set_files(base) -> dict:
    """Every file of the set at base (its json and its fields' maps) and its bytes."""
    base = Path(base)
    found = {base.name + ".json": Path(f"{base}.json").read_bytes()}
    for path in Path(f"{base}.fields").rglob("*"):
        if path.is_file():
            found[str(path.relative_to(base.parent))] = path.read_bytes()
    return found


def field_path(base, name) -> Path:
    return Path(f"{base}.fields") / read_json(base)["build"] / name


# ---------------------------------------------------------------- text items

TEXTS = ["", "hello", "héllo wörld", "日本語", "emoji 🎉", "\x00 nul inside", "a" * 5000]


def test_text_items_round_trip_as_str_and_bytes(in_tmp):
    raw = [t.encode() for t in TEXTS] + [b"\xff\xfe not utf-8"]
    for name, items in [("str", TEXTS), ("bytes", raw)]:
        header = pm.build_map(items, name, progress=False)
        assert header["text"] == name and header["dtype"] == "uint8" and header["trail_dim"] == []
        assert header["hash"] == oracle_hash(items)
        load, n = pm.get_loader_fn(name)
        assert n == len(items) and [load(i) for i in range(n)] == items
        assert all(type(load(i)) is type(items[0]) for i in range(n))
        assert load[1:3][0] == items[1] and load(-1, copy=True) == items[-1]
        assert load.data.tobytes() == b"".join(t.encode() if isinstance(t, str) else t for t in items)
        assert pm.verify_hash(name, progress=False)
        assert pickle.loads(pickle.dumps(load))(3) == items[3]


def test_text_that_is_not_utf8_on_disk_is_refused_naming_the_item(in_tmp):
    pm.build_map(["ok", "é", "fine"], "toy", progress=False)
    data = bytearray(Path("toy.dat").read_bytes())
    data[2] = 0xFF  # the first byte of "é": no UTF-8 sequence starts so
    Path("toy.dat").write_bytes(bytes(data))
    load, _ = pm.get_loader_fn("toy")
    assert load(0) == "ok" and load(2) == "fine"
    for i in (1, -2):
        with pytest.raises(ValueError, match="toy.dat: item 1 is not UTF-8"):
            load(i)
    with pytest.raises(ValueError, match="hash mismatch"):
        pm.verify_hash("toy", progress=False)


def test_text_and_its_bytes_as_an_array_never_hash_alike(in_tmp):
    text = pm.build_map(TEXTS, "text", progress=False)["hash"]
    raw = pm.build_map([t.encode() for t in TEXTS], "raw", progress=False)["hash"]
    array = pm.build_map([np.frombuffer(t.encode(), np.uint8) for t in TEXTS], "array", progress=False)["hash"]
    assert len({text, raw, array}) == 3


@pytest.mark.parametrize("edit", ["bytes", None, "str-but-float32"])
def test_editing_a_text_maps_json_fails_verify(in_tmp, edit):
    pm.build_map(TEXTS, "toy", progress=False)
    header = read_json("toy")
    if edit is None:
        del header["text"]
    elif edit == "bytes":
        header["text"] = "bytes"
    else:
        header["dtype"] = "float32"
    write_json("toy", header)
    if edit == "str-but-float32":  # not even opened: text is uint8 by definition
        with pytest.raises(ValueError, match="toy.json: text must be"):
            pm.get_loader_fn("toy")
        return
    with pytest.raises(ValueError, match="hash mismatch"):
        pm.verify_hash("toy", progress=False)


@pytest.mark.parametrize("items, message", [
    (["a", np.arange(3)], "item 1: ndarray, but this map's items are str"),
    ([b"a", "b"], "item 1: str, but this map's items are bytes"),
    ([np.arange(2), "x"], "item 1: str, but this map's items are arrays"),
    (["ok", "\ud800"], "item 1: a str that UTF-8 cannot encode"),
])
def test_text_item_errors_name_the_item_and_leave_nothing(in_tmp, items, message):
    with pytest.raises(ValueError, match=message):
        pm.build_map(items, "toy", progress=False)
    assert listing(in_tmp) == []


def test_text_takes_no_dtype(in_tmp):
    with pytest.raises(ValueError, match="item 0: text, but dtype=int32 was asked"):
        pm.build_map(["a"], "toy", progress=False, dtype=np.int32)


# ---------------------------------------------------------------- sets: the format

def test_a_set_is_a_json_and_one_ordinary_map_per_field(in_tmp):
    items = clips()
    header = pm.build_map(items, "ds/train", progress=False, meta={"rate": 16000})
    build = header["build"]
    assert sorted(listing(in_tmp)) == sorted(["ds/train.json"] + [
        f"ds/train.fields/{build}/{name}{suffix}" for name in ("audio", "tokens", "text")
        for suffix in (".dat", ".digests", ".json", ".starts.npy")])
    assert read_json("ds/train") == header and header["count"] == len(items)
    assert list(header["fields"]) == ["audio", "tokens", "text"] and header["hash"] == oracle_set_hash(items)
    for name in ("audio", "tokens", "text"):  # each field opens alone, as any map, with its own hash
        load, n = pm.get_loader_fn(field_path("ds/train", name))
        assert n == len(items) and header["fields"][name] == load.hash == oracle_hash([it[name] for it in items])
        for i, item in enumerate(items):
            got = load(i)
            assert got == item[name] if name == "text" else np.array_equal(got, item[name])
    audio = field_path("ds/train", "audio")  # and a picomap 0.1-style reader reads a field's files
    meta = read_json(audio)
    starts = np.load(f"{audio}.starts.npy")
    rows = np.memmap(f"{audio}.dat", np.dtype(meta["dtype"]), "r", shape=(meta["total_rows"], *meta["trail_dim"]))
    assert np.array_equal(rows[starts[3]:starts[4]], items[3]["audio"])


def test_a_set_loads_dicts_with_per_field_attributes(in_tmp):
    items = clips()
    pm.build_map(items, "ds", progress=False)
    load, n = pm.get_loader_fn("ds")
    assert n == len(load) == len(items)
    for i, item in enumerate(items):
        assert same_items(load(i), item)
        assert same_items(load[i - n], item)
    copied = load(2, copy=True)
    assert copied["audio"].flags.writeable and not load(2)["audio"].flags.writeable
    assert load.dtype == {"audio": np.float32, "tokens": np.int32, "text": np.uint8}
    assert load.trail_dim == {"audio": (2,), "tokens": (), "text": ()}
    assert load.lengths["tokens"].tolist() == [len(it["tokens"]) for it in items]
    assert np.shares_memory(load.data["audio"], load.fields["audio"].data)
    assert load.starts["audio"].tolist() == load.fields["audio"].starts.tolist()
    assert load.access == {"audio": "cached", "tokens": "cached", "text": "cached"}
    assert load.fields["tokens"].fields is None and load.hash == oracle_set_hash(items)
    assert repr(load) == "<picomap.MapLoader 'ds': 12 items of fields audio float32 (*, 2), tokens int32 (*), text str>"
    part = load[3:7]
    assert len(part) == 4 and all(list(part(k)) == list(items[0]) for k in range(4))
    assert same_items(part(-1), items[6])
    for got, want in zip(load.__getitems__([5, 0, 5]), [items[5], items[0], items[5]]):
        assert same_items(got, want)
    assert [sample["text"] for sample in load] == [it["text"] for it in items]
    # errors name the set, not one of its fields' files
    with pytest.raises(IndexError, match="^ds: item 12 is out of range for a map of 12 items"):
        load(12)
    with pytest.raises(IndexError, match="^ds: item -13 is out of range"):
        load[-13]
    with pytest.raises(TypeError, match="^ds: item indices must be integers, not float"):
        load(1.0)
    with pytest.raises(ValueError, match=r"^ds: only contiguous slices of a map \(step 1\)"):
        load[::2]
    load.close()
    for closed in (lambda: load(0), lambda: load[1:3]):
        with pytest.raises(ValueError, match="^ds: the loader is closed"):
            closed()


def test_closing_a_set_lets_go_of_every_fields_files(in_tmp):
    from test_load import mapped_or_open
    pm.build_map(clips(), "ds", progress=False)
    files = [Path(f"{field_path('ds', name)}{suffix}") for name in ("audio", "tokens", "text")
             for suffix in (".dat", ".starts.npy")]
    with pm.MapLoader("ds") as load:
        sample = load(1)
        assert all(mapped_or_open(f) for f in files)
    assert sample.pop("text") == clips()[1]["text"]  # a str of its own: it holds no mapping
    gc.collect()
    assert mapped_or_open(files[0])  # the audio view handed out keeps its mapping alive
    del sample
    gc.collect()
    assert not any(mapped_or_open(f) for f in files)


def test_keys_in_any_order_and_the_same_set_hash_whatever_item_0s_order(in_tmp):
    items = clips(5)
    swapped = [dict(reversed(list(it.items()))) for it in items]
    mixed = [items[0]] + swapped[1:]
    assert pm.build_map(items, "a", progress=False)["hash"] == pm.build_map(swapped, "b", progress=False)["hash"]
    pm.build_map(mixed, "c", progress=False)
    load, _ = pm.get_loader_fn("c")
    assert list(load(3)) == list(items[0]) and all(np.array_equal(load(3)[k], items[3][k]) for k in ("audio",))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_fields_of_any_layout_round_trip(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("sets")
    n_fields = data.draw(st.integers(1, 3))
    layouts = [(data.draw(st.sampled_from(["<f4", ">i2", "u1", "?", "<c8", "text"])),
                data.draw(st.lists(st.integers(0, 3), max_size=2))) for _ in range(n_fields)]
    count = data.draw(st.integers(1, 6))
    items = []
    for _ in range(count):
        item = {}
        for k, (dtype, trail) in enumerate(layouts):
            length = data.draw(st.integers(0, 4))
            if dtype == "text":
                item[f"f{k}"] = data.draw(st.text(max_size=6))
            else:
                values = np.arange(length * int(np.prod(trail)), dtype=np.int64) % 7
                item[f"f{k}"] = values.astype(dtype).reshape(length, *trail)
        items.append(item)
    header = pm.build_map(items, folder / "s", progress=False)
    assert header["hash"] == oracle_set_hash(items)
    load, n = pm.get_loader_fn(folder / "s")
    assert n == count
    for i, item in enumerate(items):
        assert same_items(load(i), item)
    assert pm.verify_hash(folder / "s", progress=False)


# ---------------------------------------------------------------- sets: bad items

@pytest.mark.parametrize("bad, message", [
    ({"audio": np.zeros((1, 2), np.float32), "text": "x"}, r"item 5: no field \['tokens'\]"),
    ({**clips(1)[0], "extra": np.zeros(1)}, r"item 5: unexpected field \['extra'\]"),
    ({**clips(1)[0], "tokens": np.zeros(2, np.int64)}, "item 5, field 'tokens': dtype <i8 but the map is <i4"),
    ({**clips(1)[0], "audio": np.zeros((2, 3), np.float32)}, r"item 5, field 'audio': trailing shape \(3,\)"),
    ({**clips(1)[0], "audio": np.float32(1)}, "item 5, field 'audio': a 0-d array"),
    ({**clips(1)[0], "text": np.zeros(2, np.uint8)}, "item 5, field 'text': ndarray, but this map's items are str"),
    ([np.zeros(2)], "item 5: list, but this map's items are dicts of fields"),
])
def test_a_bad_item_midway_names_item_and_field_and_leaves_the_old_set(in_tmp, bad, message):
    pm.build_map(clips(), "ds", progress=False)
    before = set_files("ds")
    items = clips(5, seed=1) + [bad] + clips(3, seed=2)
    with pytest.raises((ValueError, TypeError), match=message):
        pm.build_map(items, "ds", progress=False)
    assert set_files("ds") == before and sorted(listing(in_tmp)) == sorted(before)


@pytest.mark.parametrize("name", ["a/b", "", ".hidden", "x.json", "y.starts.npy", "z" * 101, 5])
def test_field_names_must_name_files(in_tmp, name):
    with pytest.raises(ValueError, match="item 0: field name .* cannot name its map's files"):
        pm.build_map([{name: np.zeros(1)}], "ds", progress=False)
    assert listing(in_tmp) == []


@pytest.mark.parametrize("first, message", [
    ({}, "item 0: a dict of no fields; a set needs at least one"),
    ({"label": np.zeros(1), "Label": np.zeros(1)}, "item 0: fields 'label' and 'Label' differ only in case"),
])
def test_item_0_must_give_fields_that_can_be_files(in_tmp, first, message):
    with pytest.raises(ValueError, match=message):
        pm.build_map([first, first], "ds", progress=False)
    assert listing(in_tmp) == []


def test_dtype_per_field(in_tmp):
    items = clips(4)
    pm.build_map(items, "ds", progress=False, dtype={"tokens": np.int16, "audio": "float64"})
    load, _ = pm.get_loader_fn("ds")
    assert load.dtype == {"audio": np.float64, "tokens": np.int16, "text": np.uint8}
    assert np.array_equal(load(1)["tokens"], items[1]["tokens"]) and load(1)["text"] == items[1]["text"]
    with pytest.raises(ValueError, match=r"dtype= names field\(s\) \['labels'\] that item 0 lacks"):
        pm.build_map(items, "ds2", progress=False, dtype={"labels": np.int8})
    with pytest.raises(TypeError, match="dtype= must be a dict of field names to dtypes for items with fields"):
        pm.build_map(items, "ds3", progress=False, dtype=np.int16)
    with pytest.raises(ValueError, match="item 1, field 'tokens': the value 35000 does not fit int16"):
        pm.build_map([{"tokens": np.array([k * 35000])} for k in range(3)], "ds4", progress=False,
                     dtype={"tokens": np.int16})
    assert sorted(listing(in_tmp)) == sorted(set_files("ds"))


# ---------------------------------------------------------------- sets: integrity

def flip_byte(path, at=0):
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 1]))


def test_changed_bytes_in_any_field_fail_verify_naming_the_field_and_items(in_tmp):
    items = clips(40)
    pm.build_map(items, "ds", progress=False)
    assert pm.verify_hash("ds", progress=False)
    for name in ("audio", "tokens", "text"):
        dat = f"{field_path('ds', name)}.dat"
        flip_byte(dat, at=os.path.getsize(dat) // 2)
        with pytest.raises(ValueError, match=f"ds.json: field '{name}': .*hash mismatch.* holding items"):
            pm.verify_hash("ds", progress=False)
        flip_byte(dat, at=os.path.getsize(dat) // 2)
    assert pm.verify_hash("ds", progress=False)


def test_edits_to_the_sets_json_are_caught(in_tmp):
    pm.build_map(clips(), "ds", progress=False)
    header = read_json("ds")
    renamed = {**header, "fields": {("speech" if k == "audio" else k): v for k, v in header["fields"].items()}}
    write_json("ds", renamed)
    with pytest.raises(FileNotFoundError, match="speech"):  # no such field map
        pm.get_loader_fn("ds")
    swapped = dict(header["fields"])
    swapped["audio"], swapped["tokens"] = swapped["tokens"], swapped["audio"]
    write_json("ds", {**header, "fields": swapped})
    with pytest.raises(ValueError, match="field 'audio' .* comes from another build"):
        pm.get_loader_fn("ds")
    write_json("ds", {**header, "count": header["count"] - 1})
    with pytest.raises(ValueError, match="field 'audio' .* holds 12 items .* not the 11"):
        pm.get_loader_fn("ds")
    write_json("ds", {**header, "hash": "0" * 32})
    with pytest.raises(ValueError, match="ds.json: hash mismatch: .* the json's fields were changed"):
        pm.verify_hash("ds", progress=False)
    write_json("ds", {**header, "build": "../../etc"})
    with pytest.raises(ValueError, match="build must be 12 hex digits"):
        pm.get_loader_fn("ds")
    write_json("ds", {**header, "fields": {"../x": header["fields"]["audio"]}})
    with pytest.raises(ValueError, match="fields must map field names"):
        pm.get_loader_fn("ds")


def test_fields_from_two_builds_are_refused_naming_the_field(in_tmp):
    pm.build_map(clips(seed=0), "a", progress=False)
    pm.build_map(clips(seed=1), "b", progress=False)
    for suffix in (".dat", ".starts.npy", ".digests", ".json"):  # one field of build b put into build a
        shutil.copy(f"{field_path('b', 'tokens')}{suffix}", f"{field_path('a', 'tokens')}{suffix}")
    with pytest.raises(ValueError, match=r"a.json: field 'tokens' \(.*tokens.json\) .* comes from another build"):
        pm.get_loader_fn("a")
    with pytest.raises(ValueError, match="field 'tokens'"):
        pm.verify_hash("a", progress=False)


SLOW_SET_BUILD = SLOW_BUILD_OF.format(item='{"a": np.full(i % 9, i, np.int32), "t": str(i)}', path="ds")


def test_a_killed_set_build_leaves_the_old_set_and_the_next_build_cleans_up(in_tmp):
    items = clips()
    pm.build_map(items, "ds", progress=False)
    before = set_files("ds")
    kill_when_midway(start_python(SLOW_SET_BUILD, in_tmp))
    left = [name for name in listing(in_tmp) if name not in before]
    assert left and all(".tmp" in name or "ds.fields/" in name for name in left)
    assert set_files("ds") != before  # the killed build's field folder is there, beside the old one
    load, n = pm.get_loader_fn("ds")
    assert n == len(items) and all(load(i)["text"] == it["text"] for i, it in enumerate(items))
    assert pm.verify_hash("ds", progress=False)
    header = pm.build_map(clips(3, seed=5), "ds", progress=False)
    assert sorted(listing(in_tmp)) == sorted(set_files("ds")) and len(set_files("ds")) == 1 + 3 * 4
    assert read_json("ds")["build"] == header["build"]


def test_field_folders_left_by_a_crash_after_the_commit_go_with_the_next_commit(in_tmp):
    pm.build_map(clips(), "ds", progress=False)
    old = field_path("ds", "audio").parent
    stray = old.with_name("0123456789ab")
    shutil.copytree(old, stray)  # as if a build was killed between its commit and removing the old fields
    mine = Path("ds.fields/my notes")  # not a build's name: never touched
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    pm.build_map(clips(3), "ds", progress=False)
    assert not stray.exists() and not old.exists() and (mine / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in Path("ds.fields").iterdir()) == sorted([read_json("ds")["build"], "my notes"])


def test_a_cold_set_reads_its_array_fields_cold_and_keeps_it_in_pickles(in_tmp):
    items = clips()
    pm.build_map(items, "ds", progress=False)
    cold, _ = pm.get_loader_fn("ds", access="cold")
    assert cold.access == {"audio": "cold", "tokens": "cold", "text": "cold"}
    again = pickle.loads(pickle.dumps(cold[2:]))
    assert again.access == cold.access
    for i, sample in enumerate(again.__getitems__(range(len(again)))):
        assert same_items(sample, items[2 + i])


def test_a_set_and_a_single_map_replace_each_other_and_take_their_files_along(in_tmp):
    pm.build_map(tokens(5), "ds", progress=False)
    pm.build_map(clips(4), "ds", progress=False)
    assert sorted(listing(in_tmp)) == sorted(set_files("ds"))
    assert pm.get_loader_fn("ds")[0].fields is not None
    pm.build_map(tokens(5), "ds", progress=False)
    assert listing(in_tmp) == ["ds.dat", "ds.digests", "ds.json", "ds.starts.npy"]
    assert pm.get_loader_fn("ds")[0].fields is None


def version_samples(v):
    """Version v of a set whose every version differs in item count, lengths and contents."""
    return [{"x": np.full(k % 3 + 1, v, np.int32), "y": np.full((v % 4, 2), v, np.int16), "t": f"{v}:{k}"}
            for k in range(3 + v % 4)]


def test_readers_racing_a_rebuild_see_one_builds_fields_only(in_tmp):
    pm.build_map(version_samples(0), "ds", progress=False)
    reads, refusals, versions = read_while_rebuilt("ds", version_samples, lambda sample: int(sample["x"][0]), in_tmp)
    assert reads > 20 and len(versions) > 3, (reads, refusals, versions)
    assert refusals == 0 or pm.fcntl is None


# ---------------------------------------------------------------- sets: pickling, DataLoader, merge

def test_a_pickled_set_loader_and_its_slices_load_the_same_dicts(in_tmp):
    items = clips()
    pm.build_map(items, "ds", progress=False)
    load, _ = pm.get_loader_fn("ds")
    for original, first in [(load, 0), (load[4:9], 4)]:
        copy = pickle.loads(pickle.dumps(original))
        assert type(copy) is type(original) and len(copy) == len(original)
        for i in range(len(copy)):
            assert same_items(copy(i), items[first + i])
    blob = pickle.dumps(load)
    pm.build_map(clips(seed=3), "ds", progress=False)
    with pytest.raises(ValueError, match="replaced since this loader was pickled"):
        pickle.loads(blob)


def test_a_pickle_never_serves_a_set_as_a_single_map_or_the_reverse(in_tmp):
    pm.build_map(clips(), "ds", progress=False)
    set_blob = pickle.dumps(pm.get_loader_fn("ds")[0])
    pm.build_map(tokens(5), "plain", progress=False)
    plain_blob = pickle.dumps(pm.get_loader_fn("plain")[0])
    pm.build_map(clips(3), "plain", progress=False)
    with pytest.raises(ValueError, match="plain.json: a set of fields, where a single map was expected"):
        pickle.loads(plain_blob)
    set_hash = read_json("ds")["hash"]
    pm.build_map(tokens(5), "ds", progress=False)  # a single map whose json was given the set's hash
    write_json("ds", {**read_json("ds"), "hash": set_hash})
    with pytest.raises(ValueError, match="ds.json: no longer a set of fields"):
        pickle.loads(set_blob)


def pad_batch(samples):
    """The README's collate_fn: audio and tokens padded to the longest in the batch, with lengths."""
    import torch
    out = {}
    for name in ("audio", "tokens"):
        lengths = [len(s[name]) for s in samples]
        padded = np.zeros((len(samples), max(lengths, default=0), *samples[0][name].shape[1:]), samples[0][name].dtype)
        for row, s in enumerate(samples):
            padded[row, :len(s[name])] = s[name]
        out[name], out[f"{name}_lengths"] = torch.from_numpy(padded), torch.tensor(lengths)
    out["text"] = [s["text"] for s in samples]
    return out


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_dataloader_with_workers_returns_dicts(in_tmp, context):
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader
    items = clips(30)
    pm.build_map(items, "ds", progress=False)
    load, _ = pm.get_loader_fn("ds")
    loader = DataLoader(load, batch_size=4, num_workers=2, collate_fn=pad_batch, multiprocessing_context=context)
    seen = 0
    for batch in loader:
        for row, text in enumerate(batch["text"]):
            want = items[seen]
            assert text == want["text"]
            length = int(batch["audio_lengths"][row])
            assert length == len(want["audio"]) and np.array_equal(batch["audio"][row, :length].numpy(), want["audio"])
            assert not batch["audio"][row, length:].any()
            seen += 1
    assert seen == len(items)
    samples = list(DataLoader(load, batch_size=None, num_workers=2, multiprocessing_context=context))
    assert len(samples) == len(items) and all(s["text"] == it["text"] for s, it in zip(samples, items))


def test_a_merge_of_sets_is_byte_for_byte_a_direct_build(in_tmp):
    items = clips(30)
    direct = pm.build_map(items, "direct", progress=False, meta={"m": 1})
    for k, part in enumerate([items[:10], items[10:11], items[11:]]):
        pm.build_map(part, f"shard{k}", progress=False, meta={"m": 1})
    merged = pm.merge_maps([f"shard{k}" for k in range(3)], "merged", progress=False)
    assert merged["hash"] == direct["hash"] == oracle_set_hash(items) and merged["fields"] == direct["fields"]
    assert merged["meta"] == {"m": 1} and merged["count"] == 30
    for name in direct["fields"]:
        for suffix in (".dat", ".starts.npy", ".digests"):
            assert Path(f"{field_path('merged', name)}{suffix}").read_bytes() == \
                Path(f"{field_path('direct', name)}{suffix}").read_bytes()
        skip = ("creation_time",)
        assert {k: v for k, v in read_json(field_path("merged", name)).items() if k not in skip} == \
            {k: v for k, v in read_json(field_path("direct", name)).items() if k not in skip}
    assert pm.verify_hash("merged", progress=False)
    load, n = pm.get_loader_fn("merged")
    assert n == 30 and all(load(i)["text"] == it["text"] for i, it in enumerate(items))


def test_a_shard_of_no_items_merges_with_sets(in_tmp):
    items = clips(10)
    pm.build_map(items[:6], "s0", progress=False)
    empty = pm.build_map([], "s1", progress=False, dtype={"audio": np.float32})  # a worker given nothing
    pm.build_map(items[6:], "s2", progress=False)
    assert empty["count"] == 0 and "fields" not in empty and pm.get_loader_fn("s1")[1] == 0
    for order in (["s0", "s1", "s2"], ["s1", "s0", "s2"]):
        merged = pm.merge_maps(order, "out", progress=False)
        assert merged["hash"] == oracle_set_hash(items) and merged["count"] == 10
    load, _ = pm.get_loader_fn("out")
    assert all(same_items(load(i), item) for i, item in enumerate(items))


def test_merge_refuses_sets_of_other_fields_and_single_maps(in_tmp):
    pm.build_map(clips(3), "a", progress=False)
    pm.build_map([{"audio": it["audio"]} for it in clips(3)], "b", progress=False)
    pm.build_map(tokens(3), "c", progress=False)
    with pytest.raises(ValueError, match=r"shard 1 \(b.json\) has fields \['audio'\], but shard 0 has fields"):
        pm.merge_maps(["a", "b"], "out", progress=False)
    with pytest.raises(ValueError, match=r"shard 1 \(c.dat\) has no fields, but shard 0 has fields"):
        pm.merge_maps(["a", "c"], "out", progress=False)
    with pytest.raises(ValueError, match="is shard 0; merge into a new path"):
        pm.merge_maps(["a"], "a", progress=False)
    pm.build_map(["text"], "d", progress=False)
    with pytest.raises(ValueError, match=r"shard 1 \(d.dat\) holds str items .* shard 0 \(c.dat\) holds <i4"):
        pm.merge_maps(["c", "d"], "out", progress=False)
    assert not any(name.startswith("out") for name in listing(in_tmp))


# ---------------------------------------------------------------- MapWriter

def test_a_writer_writes_what_build_map_writes(in_tmp):
    for name, items in [("plain", tokens(40)), ("text", TEXTS), ("set", clips())]:
        with pm.MapWriter(f"w-{name}", progress=False, meta={"k": 1}) as writer:
            for item in items:
                writer.append(item)
            assert len(writer) == len(items) and writer.header is None
        built = pm.build_map(items, f"b-{name}", progress=False, meta={"k": 1})
        assert writer.header == read_json(f"w-{name}")
        assert {k: v for k, v in writer.header.items() if k not in ("creation_time", "build")} == \
            {k: v for k, v in built.items() if k not in ("creation_time", "build")}
        bases = [f"w-{name}", f"b-{name}"] if name != "set" else [field_path(f"{p}-set", "audio") for p in "wb"]
        for suffix in (".dat", ".starts.npy", ".digests"):
            assert Path(f"{bases[0]}{suffix}").read_bytes() == Path(f"{bases[1]}{suffix}").read_bytes()


def test_a_writer_writes_several_maps_in_one_loop(in_tmp):
    with pm.MapWriter("train", progress=False) as train, pm.MapWriter("val", progress=False) as val:
        for k, item in enumerate(tokens(30)):
            (val if k % 10 == 0 else train).append(item)
    assert pm.get_loader_fn("train")[1] == 27 and pm.get_loader_fn("val")[1] == 3
    assert train.header["hash"] == oracle_hash([t for k, t in enumerate(tokens(30)) if k % 10])


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_exception_in_the_with_block_discards_everything(old_map, in_tmp, error):
    items, files = old_map
    for target in ("toy", "ds"):
        with pytest.raises(error):
            with pm.MapWriter(target, progress=False) as writer:
                for item in clips(20) if target == "ds" else tokens(20, seed=7):
                    writer.append(item)
                raise error
        assert writer.header is None
        assert listing(in_tmp) == ["toy.dat", "toy.digests", "toy.json", "toy.starts.npy"]
    assert pm.get_loader_fn("toy")[1] == len(items) and pm.verify_hash("toy", progress=False)


def test_a_writer_dropped_unclosed_commits_nothing_and_leaves_nothing(old_map, in_tmp):
    for target in ("toy", "ds"):
        writer = pm.MapWriter(target, progress=False)
        for item in clips(5) if target == "ds" else tokens(5, seed=9):
            writer.append(item)
        assert any(".tmp" in name for name in listing(in_tmp))
        del writer
        gc.collect()
        assert listing(in_tmp) == ["toy.dat", "toy.digests", "toy.json", "toy.starts.npy"]
    load, n = pm.get_loader_fn("toy")
    assert n == len(old_map[0]) and np.array_equal(load(3), old_map[0][3])


def test_a_failed_append_discards_the_writer(old_map, in_tmp):
    writer = pm.MapWriter("toy", progress=False)
    writer.append(np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="item 1: dtype <f8 but the map is <i4"):
        writer.append(np.zeros(3))
    assert listing(in_tmp) == ["toy.dat", "toy.digests", "toy.json", "toy.starts.npy"]
    with pytest.raises(ValueError, match=r"already discarded \(ValueError at item 1\)"):
        writer.append(np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="already discarded"):
        writer.close()
    assert pm.get_loader_fn("toy")[1] == len(old_map[0])


def test_close_commits_once_and_then_the_writer_is_done(in_tmp):
    writer = pm.MapWriter("toy", progress=False)
    writer.append("one")
    header = writer.close()
    assert writer.close() == header == writer.header == read_json("toy")
    with pytest.raises(ValueError, match="already committed"):
        writer.append("two")
    empty = pm.MapWriter("empty", progress=False)
    assert empty.close()["count"] == 0 and pm.get_loader_fn("empty")[1] == 0


def test_a_writer_checks_its_arguments_before_writing(in_tmp):
    with pytest.raises(TypeError, match="meta must be a dict"):
        pm.MapWriter("toy", meta=[1])
    with pytest.raises(ValueError, match="names a folder"):
        pm.MapWriter("sub/.")
    assert listing(in_tmp) == []


def test_the_writers_progress_bar_counts_items(in_tmp, capsys):
    with pm.MapWriter("toy") as writer:
        for item in tokens(7):
            writer.append(item)
    assert "build toy: 7 items" in capsys.readouterr().err
    assert json.loads(Path("toy.json").read_text())["count"] == 7


def test_info_describes_each_field(in_tmp, capsys):
    items = clips()
    pm.build_map(items, "ds", progress=False, meta={"rate": 16000})
    assert pm.main(["info", "ds"]) == 0
    lines = dict(line.strip().split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["items"] == "12" and lines["audio.dtype"] == "float32" and lines["audio.trailing shape"] == "(2,)"
    assert lines["text.dtype"] == "str" and lines["tokens.rows"] == str(sum(len(it["tokens"]) for it in items))
    assert lines["hash"] == oracle_set_hash(items) and lines["meta"] == '{"rate": 16000}'
    assert pm.main(["verify", "ds"]) == 0


def test_numpy_str_and_bytes_items_are_text(in_tmp):
    words = np.array(["ab", "", "ünï"])
    pm.build_map(words, "str", progress=False)  # iterating a numpy array gives np.str_
    pm.build_map(np.array([b"x", b"yz"]), "bytes", progress=False)
    pm.build_map([{"w": w} for w in words], "set", progress=False)
    assert list(pm.MapLoader("str")) == ["ab", "", "ünï"] and list(pm.MapLoader("bytes")) == [b"x", b"yz"]
    assert pm.MapLoader("set")(2) == {"w": "ünï"}
    assert pm.build_map(["ab", "", "ünï"], "plain", progress=False)["hash"] == pm.MapLoader("str").hash
    with pytest.raises(ValueError, match="item 1: str_, but this map's items are bytes"):
        pm.build_map([b"x", np.str_("y")], "mixed", progress=False)


def test_a_sets_getitems_takes_any_iterable_of_indices(in_tmp):
    items = clips(6)
    pm.build_map(items, "ds", progress=False)
    load, _ = pm.get_loader_fn("ds")
    for indices in (iter([4, 1]), (k for k in (4, 1)), np.array([4, 1]), range(4, 0, -3)):
        got = load.__getitems__(indices)
        assert len(got) == 2 and same_items(got[0], items[4]) and same_items(got[1], items[1])


def test_a_dict_of_columns_as_items_is_refused(in_tmp):
    with pytest.raises(TypeError, match="items is a dict .*pass an iterable of items, e.g. a list of dicts"):
        pm.build_map({"tokens": [[1, 2]], "label": [[0]]}, "toy", progress=False)
    assert listing(in_tmp) == []


def test_a_text_map_reads_cold_when_asked_and_keeps_it(in_tmp):
    pm.build_map(TEXTS, "toy", progress=False)
    load = pm.MapLoader("toy", access="cold")
    assert load.access == "cold" and list(load) == TEXTS and load.__getitems__([3, 0]) == [TEXTS[3], TEXTS[0]]
    part = pickle.loads(pickle.dumps(load[1:]))
    assert part.access == "cold" and list(part) == TEXTS[1:] and part[0:2].access == "cold"
    assert pm.MapLoader("toy", access="cached").access == "cached"


def test_a_text_decode_error_in_a_slice_names_the_maps_item(in_tmp):
    pm.build_map(["ok", "fine", "é", "end"], "toy", progress=False)
    data = bytearray(Path("toy.dat").read_bytes())
    data[6] = 0xFF  # the first byte of "é"
    Path("toy.dat").write_bytes(bytes(data))
    load, _ = pm.get_loader_fn("toy")
    for access in ("cached", "cold"):
        part = pm.MapLoader("toy", access=access)[1:]
        for i in (1, -2):
            with pytest.raises(ValueError, match="toy.dat: item 2 is not UTF-8"):
                part(i)
        with pytest.raises(ValueError, match="toy.dat: item 2 is not UTF-8"):
            part.__getitems__([0, 1])

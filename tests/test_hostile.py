"""Hostile or damaged files: every open bounded in time and memory, never blocking, links refused
where picomap keeps its own files."""
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import picomap as pm
from conftest import listing, read_json, tokens, traced_peak, write_json
from test_commit import clips

PYTHONPATH = str(Path(pm.__file__).parent)


def build_folder(base) -> Path:
    return Path(f"{base}.fields") / read_json(base)["build"]


def run_briefly(code, cwd) -> subprocess.CompletedProcess:
    """Run code in a new process that must end within 30 s (a call that blocks would hang the suite)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": PYTHONPATH}, timeout=30)


def test_a_fifo_where_a_sets_build_folder_should_be_never_blocks(in_tmp):
    pm.build_map(clips(3, 0), "ds", progress=False)
    pm.build_map(tokens(3), "other", progress=False)
    folder = build_folder("ds")
    shutil.rmtree(folder)
    os.mkfifo(folder)
    for call in ("pm.get_loader_fn('ds')", "pm.verify_hash('ds', progress=False)",
                 "pm.merge_maps(['other', 'ds'], 'out', progress=False)", "pm.main(['info', 'ds'])"):
        result = run_briefly(f"""
            import picomap as pm
            try:
                code = {call}
            except ValueError as e:
                print("refused:", e)
            """, in_tmp)
        assert result.returncode == 0, result.stderr
        assert f"{folder} is not a folder" in result.stdout + result.stderr, (call, result.stdout, result.stderr)


def test_a_fifo_named_like_a_temporary_neither_blocks_a_build_nor_is_removed(in_tmp):
    os.mkfifo(".toy.dat.0123456789ab.tmp")
    result = run_briefly("""
        import numpy as np, picomap as pm
        pm.build_map([np.arange(3)], "toy", progress=False)
        pm.build_map([np.arange(4)], "toy", progress=False)
        print(pm.get_loader_fn("toy")[1])
        """, in_tmp)
    assert result.returncode == 0 and result.stdout.split() == ["1"], result.stderr
    assert stat.S_ISFIFO(os.lstat(".toy.dat.0123456789ab.tmp").st_mode)


def write_flat_map(base, n_rows):
    np.save(f"{base}.starts.npy", np.array([0, n_rows], np.uint64))
    Path(f"{base}.dat").write_bytes(bytes(n_rows))
    write_json(base, {"trail_dim": [], "hash": "0" * 32, "creation_time": "", "dtype": "int8", "count": 1,
                      "total_rows": n_rows})


def test_digests_of_tiny_pieces_are_refused_before_any_pass(in_tmp):
    """piece_bytes: 1 would make locating damage a Python step a byte (a GiB map: 40 minutes)."""
    write_flat_map("big", 2 << 20)
    write_json("big", {**read_json("big"), "block_bytes": 2 << 20, "piece_bytes": 1, "block_digests": ["0" * 16]})
    for job in (pm.get_loader_fn, pm.verify_hash):
        with pytest.raises(ValueError, match="big.json: 1 block digests of 2097152 bytes \\(pieces of 1\\) do not fit"):
            job("big")


def test_a_json_padded_with_digests_is_refused(in_tmp):
    pm.build_map(tokens(5), "toy", progress=False)
    header = read_json("toy")
    write_json("toy", {**header, "block_digests": header["block_digests"] * 100_000})  # about 2 MB of json
    with pytest.raises(ValueError, match="toy.json: 100000 block digests .* which make 1 blocks"):
        pm.get_loader_fn("toy")


def test_a_sparse_offsets_file_claiming_2_to_the_37_items_opens_in_bounded_memory(in_tmp):
    count = 2**37
    header = pm._npy_header(count + 1)
    with open("huge.starts.npy", "wb") as handle:  # zeros all along: a sparse file of 1 TiB
        handle.write(header)
        handle.truncate(len(header) + 8 * (count + 1))
    Path("huge.dat").write_bytes(b"")
    write_json("huge", {"trail_dim": [], "hash": "0" * 32, "creation_time": "", "dtype": "int8", "count": count,
                        "total_rows": 0})
    opened = []
    peak = traced_peak(lambda: opened.append(pm.get_loader_fn("huge")))
    load, n = opened[0]
    assert n == count and load(count - 1).shape == (0,) and load(-1).shape == (0,)
    assert peak < 1 << 20  # flags only as they are set (a list took 128 MiB), in anonymous pages


@pytest.mark.parametrize("dtype", ["<i4", ">u8"])
def test_offsets_of_another_type_are_converted_when_few_and_refused_when_many(in_tmp, monkeypatch, dtype):
    items = tokens(50)
    pm.build_map(items, "toy", progress=False)
    np.save("toy.starts.npy", np.load("toy.starts.npy").astype(dtype))
    load, n = pm.get_loader_fn("toy")
    assert n == 50 and all(np.array_equal(load(i), item) for i, item in enumerate(items))
    monkeypatch.setattr(pm, "MAX_CONVERTED_OFFSETS", 50)
    with pytest.raises(ValueError, match=f"toy.starts.npy: 51 offsets of \\{dtype}, which picomap would have to "
                                         "read and convert whole; rewrite them as native uint64"):
        pm.get_loader_fn("toy")


def test_links_inside_a_set_are_refused_and_a_maps_own_files_may_be_links(in_tmp):
    pm.build_map(clips(3, 0), "ds", progress=False)
    folder = build_folder("ds")
    shutil.move(folder, "elsewhere")
    folder.symlink_to(Path("elsewhere").resolve())  # the build folder leading out of the set
    with pytest.raises(ValueError, match="is not a folder \\(a link, a file or a FIFO\\)"):
        pm.get_loader_fn("ds")
    folder.unlink()
    folder.symlink_to(Path("..").resolve())  # ... or back to the set itself: refused, no recursion
    with pytest.raises(ValueError, match="is not a folder"):
        pm.get_loader_fn("ds")
    folder.unlink()
    shutil.move("elsewhere", folder)
    field = folder / "audio.dat"
    shutil.move(field, "audio.dat")
    field.symlink_to(Path("audio.dat").resolve())  # one field file a link
    with pytest.raises(ValueError, match="audio.dat: a link, where a set keeps its own files only"):
        pm.get_loader_fn("ds")
    items = tokens(4)
    pm.build_map(items, "real/toy", progress=False)
    for suffix in (".dat", ".starts.npy", ".digests", ".json"):  # a user's own links to a map kept elsewhere
        Path(f"toy{suffix}").symlink_to(Path(f"real/toy{suffix}").resolve())
    load, n = pm.get_loader_fn("toy")
    assert n == 4 and np.array_equal(load(3), items[3]) and pm.verify_hash("toy", progress=False)


def test_a_set_copied_without_its_fields_folder_says_so(in_tmp):
    pm.build_map(clips(3, 0), "ds", progress=False)
    os.makedirs("copy")
    shutil.copy("ds.json", "copy/ds.json")
    with pytest.raises(FileNotFoundError, match="copy/ds.json: its fields' folder .* is missing; a set is NAME.json "
                                                "and the folder NAME.fields beside it: copy or move both"):
        pm.get_loader_fn("copy/ds")
    shutil.copytree("ds.fields", "copy/ds.fields")
    assert pm.verify_hash("copy/ds", progress=False)
    assert json.loads(Path("copy/ds.json").read_text())["count"] == 3


def test_a_json_of_millions_of_tiny_values_is_refused_before_parsing(in_tmp):
    """64 MiB of "[{},{},...]" would take 1.4 GiB to parse; it is refused having read the text only."""
    pm.build_map(tokens(3), "toy", progress=False)
    header = read_json("toy")
    Path("toy.json").write_text(json.dumps({**header, "meta": {"junk": [{}] * (pm.MAX_JSON_VALUES + 1)}}))
    peak = traced_peak(lambda: pytest.raises(ValueError, pm.get_loader_fn, "toy"))
    assert peak < 40 << 20  # the text itself (12 MiB) and its bytes, never the parsed objects
    with pytest.raises(ValueError, match="toy.json: 8,388,6[0-9]{2} commas, colons and brackets, more than a "
                                         "picomap json may hold"):
        pm.get_loader_fn("toy")
    with pytest.raises(ValueError, match="meta takes .* bytes of JSON, more than a map's json keeps"):
        pm.build_map(tokens(3), "other", progress=False, meta={"junk": [0] * pm.MAX_META_VALUES})


def test_a_sets_fields_folder_that_is_a_link_is_refused(in_tmp):
    pm.build_map(clips(3, 0), "a", progress=False)
    pm.build_map(clips(3, 1), "b", progress=False)
    shutil.rmtree("a.fields")
    Path("a.fields").symlink_to(Path("b.fields").resolve())  # a's builds would clean up b's folder
    with pytest.raises(ValueError, match="a.fields is a link; a set keeps its fields in a folder of its own"):
        pm.get_loader_fn("a")
    with pytest.raises(ValueError, match="a.fields is a link"):
        pm.build_map(clips(3, 2), "a", progress=False)
    assert pm.verify_hash("b", progress=False) and len(list(Path("b.fields").iterdir())) == 1

"""The command line (python -m picomap, the picomap script) and the README's examples, run as written."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import picomap as pm
from conftest import tokens
from servers import RangeServer

ROOT = Path(pm.__file__).resolve().parent
README = (ROOT / "README.md").read_text()


def run(*args, cwd, command=(sys.executable, "-m", "picomap")):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_demo_builds_verifies_and_loads(tmp_path):
    result = run("demo", str(tmp_path / "d"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for step in ("built", "verified hash", "opened", "loaded", "checked every item"):
        assert step in result.stdout
    assert pm.verify_hash(tmp_path / "d" / "demo", progress=False)


def test_demo_in_a_temporary_folder_leaves_nothing(tmp_path):
    result = run("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = re.search(r"at (\S+)/demo", result.stdout).group(1)
    assert not os.path.exists(folder) and os.listdir(tmp_path) == []


def test_info_describes_the_map(in_tmp):
    pm.build_map([np.zeros((n, 2), np.float32) for n in (1, 3, 9)], "toy", progress=False, meta={"who": "me"})
    result = run("info", "toy", cwd=in_tmp)
    assert result.returncode == 0, result.stderr
    fields = dict(line.strip().split(": ", 1) for line in result.stdout.splitlines())
    assert fields["items"] == "3" and fields["dtype"] == "float32" and fields["trailing shape"] == "(2,)"
    assert fields["rows"] == "13" and fields["bytes"] == "104" and fields["item length min/mean/max"] == "1 / 4.333 / 9"
    assert fields["hash"] == pm.get_loader_fn("toy")[0].hash and fields["meta"] == '{"who": "me"}'


def test_verify_exit_codes_and_one_line_errors(in_tmp):
    pm.build_map(tokens(), "toy", progress=False)
    ok = run("verify", "toy", cwd=in_tmp)
    assert ok.returncode == 0 and "intact" in ok.stdout
    data = bytearray(Path("toy.dat").read_bytes())
    data[7] ^= 1
    Path("toy.dat").write_bytes(data)
    for path, words in [("toy", "hash mismatch"), ("nowhere", "nowhere.json: missing")]:
        bad = run("verify", path, cwd=in_tmp)
        assert bad.returncode == 1 and words in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_console_script_is_installed(tmp_path):
    script = shutil.which("picomap")
    if script is None:
        pytest.skip("picomap is not pip-installed in this environment")
    result = run("demo", str(tmp_path), cwd=tmp_path, command=(script,))
    assert result.returncode == 0 and "verified hash" in result.stdout


def python_blocks(markdown):
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_readme_quick_example_runs_as_written(tmp_path):
    quick = python_blocks(README)[0]
    result = subprocess.run([sys.executable, "-c", quick], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["3 items available", "(11, 4)"]
    assert sorted(os.listdir(tmp_path)) == ["toy.dat", "toy.digests", "toy.json", "toy.starts.npy"]


@pytest.mark.parametrize("heading, prints", [("## Recipes", 24), ("## Preparing data in parallel", 5)])
def test_readme_sections_run_as_written_and_print_what_they_say(tmp_path, heading, prints):
    pytest.importorskip("torch")  # the recipes use it; CI installs it
    pytest.importorskip("torchdata")  # (the sampling recipe's StatefulDataLoader)
    pytest.importorskip("dask")
    section = README.split(heading + "\n")[1].split("\n## ")[0]
    script = "\n".join(python_blocks(section))
    promised = [line.split("# -> ")[1] for line in script.splitlines() if "# -> " in line]
    with RangeServer(tmp_path) as server:  # the remote recipe's server, on loopback
        (tmp_path / "recipes.py").write_text(script.replace("http://127.0.0.1:8000", server.url))
        result = subprocess.run([sys.executable, "recipes.py"], cwd=tmp_path, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == promised and len(promised) == prints


def test_readme_shows_the_two_commands():
    assert "pip install . && python -m picomap demo" in README
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = re.search(r"^pip install (\S+) && (python -m pytest.*)$", README, flags=re.M)
    assert test_command, "README lacks the test command"
    assert f'pip install --quiet {test_command.group(1)}' in ci and test_command.group(2) in ci


# Which tests back each number in the README's Reliability section: a file, and words of which a
# test's name must hold one (none: every test of the file).
RELIABILITY = {
    "corrupt-map cases": [("test_load.py", ["corrupt", "oversized", "absurd", "no_map", "regular_file",
                                            "not_maps", "damaged_offsets", "shifted_whole"]),
                          ("test_damage.py", ["malformed", "too_many"]), ("test_merge.py", ["damaged"]),
                          ("test_fields.py", ["edits_to_the_sets_json", "two_builds", "editing_a_text",
                                              "not_utf8", "never_serves_a_set"]), ("test_hostile.py", [])],
    "fault-injection tests": [("test_faults.py", []), ("test_commit.py", []), ("test_build.py", ["leave"]),
                              ("test_merge.py", ["leaves", "changed", "interrupted", "writes_nothing",
                                                 "not_be_an_input", "mismatched"]),
                              ("test_fields.py", ["killed_set", "crash_after", "racing", "exception_in_the_with",
                                                  "dropped_unclosed", "failed_append"])],
    "bad-item cases": [("test_build.py", ["bad_item_raises", "meta_must", "names_the_item", "cannot_record",
                                          "meta_too_large", "cannot_hold", "own_dtype"]),
                       ("test_fields.py", ["bad_item_midway", "field_names_must", "text_item_errors",
                                           "fields_that_can_be_files"]),
                       ("test_convert.py", ["refuses"])],
    "damage-location tests": [("test_damage.py", [])],
    "remote-map tests": [("test_remote.py", [])],
}


def test_readme_reliability_numbers_match_the_suite():
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                               cwd=ROOT, capture_output=True, text=True, timeout=120).stdout.splitlines()
    tests = [line for line in collected if "::" in line]
    for label, selections in RELIABILITY.items():
        count = sum(1 for test in tests for file, words in selections
                    if test.startswith(f"tests/{file}::") and (not words or any(w in test for w in words)))
        assert f"**{count}** {label}" in README, f"README should say **{count}** {label}"
    from test_fuzz import EXAMPLES
    from test_load import DAMAGE_EXAMPLES
    assert f"**2 × {EXAMPLES}** fuzzing examples" in README and f"**{DAMAGE_EXAMPLES}** examples" in README


def test_info_shortens_a_long_meta_unless_asked(in_tmp):
    tokenizer = {"vocab": {f"tok{k}": k for k in range(5000)}}
    pm.build_map([np.zeros(3, np.uint16)], "toy", progress=False, meta=tokenizer)
    short = run("info", "toy", cwd=in_tmp)
    line = [x for x in short.stdout.splitlines() if x.strip().startswith("meta:")][0]
    assert len(line) < 300 and "characters; --full-meta shows all" in line
    full = run("info", "--full-meta", "toy", cwd=in_tmp)
    meta = [x for x in full.stdout.splitlines() if x.strip().startswith("meta:")][0].split(": ", 1)[1]
    assert json.loads(meta) == tokenizer


def test_the_test_extra_leaves_torch_out_and_the_readme_shows_its_cpu_install():
    extra = re.search(r"^test = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    assert "torch" not in extra  # torchdata would pull in torch's CUDA build: gigabytes
    for line in ("pip install torch --index-url https://download.pytorch.org/whl/cpu", "pip install torchdata"):
        assert line in README.split("## Install and test")[1].split("\n## ")[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.count("pip install --quiet torch==2.13.0") == 2 and ci.count("pip install --quiet torchdata") == 2


def test_info_prints_the_mean_length_in_the_notation_of_min_and_max(in_tmp):
    pm.build_map([np.zeros(n, np.uint8) for n in (3, 353588, 10, 7)], "toy", progress=False)
    result = run("info", "toy", cwd=in_tmp)
    fields = dict(line.strip().split(": ", 1) for line in result.stdout.splitlines())
    assert fields["item length min/mean/max"] == "3 / 88402 / 353588"

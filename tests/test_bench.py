"""The benchmark in its quickest mode, so that it never rots: it completes and reports every contender
on every workload, and draws its chart. Its timings are not asserted: the machines are shared."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_reports_every_contender(tmp_path):
    for peer in ("h5py", "datasets", "matplotlib"):
        pytest.importorskip(peer)  # the bench extra; CI installs it
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--scale", "0.25",
                             "--chart", str(tmp_path / "chart.png")], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PICOMAP_BENCH_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    tables = result.stdout.split("### ")[1:]
    assert [t.split(":")[0] for t in tables] == list(bench.WORKLOADS)
    for table in tables:
        rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
        assert [row.rstrip("*") for row in rows] == [c.name for c in bench.CONTENDERS]
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bench-")]  # it cleans up after itself

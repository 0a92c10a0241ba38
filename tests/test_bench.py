"""The benchmark script works: a quick run exits 0 and prints every figure.

It checks the instrument, not the timings (those depend on the machine).
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"


def bench_figures():
    sys.path.insert(0, str(RUN.parent))  # run.py imports its sibling client.py
    try:
        spec = importlib.util.spec_from_file_location("bench_run", RUN)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(RUN.parent))
    return [figure for _, figure, _ in module.FIGURES]


@pytest.mark.slow
def test_quick_benchmark_runs_and_reports_every_figure(tmp_path):
    markdown = tmp_path / "bench.md"
    result = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--markdown", str(markdown)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,  # a bound for a loaded machine, not a timing check
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = bench_figures()
    assert len(figures) == 17
    for figure in figures:
        assert figure in result.stdout
        assert figure in markdown.read_text()
    assert "ERROR" not in result.stdout
    assert "not measured" not in result.stdout

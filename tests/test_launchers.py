"""Hydra launchers for sweeps: the joblib launcher runs a sweep's jobs in parallel processes."""

from __future__ import annotations

import pytest
from conftest import tiny_overrides
from test_e2e import assert_none_left, ray_processes, run_cli

pytestmark = pytest.mark.slow


def test_a_joblib_sweep_runs_its_jobs_in_parallel_and_the_report_reads_it(tmp_path):
    sweep = tmp_path / "sweep"
    before = ray_processes()
    proc = run_cli(
        [
            "run",
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            *tiny_overrides("num_rounds=1", "server_stage=none", "dataset.eval_samples=8"),
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for job in ("0", "1"):
        rows = (sweep / job / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == 2, job  # rounds 0 and 1
    report = run_cli(["report", str(sweep)])
    assert report.returncode == 0, report.stderr[-2000:]
    table = (sweep / "report.md").read_text()
    assert table.count("| ok |") == 2 and "| 1 |" in table and "| 2 |" in table  # both seeds, finished
    assert_none_left(before)

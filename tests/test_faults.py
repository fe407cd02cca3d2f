"""Faults a client, a crash or a typo can cause, in one place (docs/reliability.md lists what each
test guarantees). Bad replies: tests/test_strategy.py; bad config values: tests/test_config.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_overrides

pytestmark = pytest.mark.slow


def _common(*extra: str) -> list[str]:
    return tiny_overrides("server_stage=none", "dataset.eval_samples=8", *extra)


def _state(run_dir: Path, rnd: int) -> dict[str, np.ndarray]:
    with np.load(run_dir / "checkpoints" / f"round-{rnd}" / "fedmllm-state.npz") as z:
        return {k: z[k] for k in z.files}


def test_scaffold_cut_short_mid_round_resumes_like_an_uninterrupted_run(tmp_path):
    """A run killed during round 3: its clients wrote their round-3 control variates, the server
    never checkpointed round 3. The resumed run redoes round 3 from the round-2 client state and
    ends where an uninterrupted run ends."""
    from inprocess import run_in_process

    from fedmllm.tracking import read_metrics

    common = _common("aggregator=scaffold")
    full, part = tmp_path / "full", tmp_path / "part"
    run_in_process([*common, "num_rounds=4", f"out_dir={full}"])
    run_in_process([*common, "num_rounds=3", f"out_dir={part}"])
    # the kill: round 3's checkpoint and metrics row never made it; the clients' state files did
    shutil.rmtree(part / "checkpoints" / "round-3")
    assert (part / "client-state" / "partition-0-round-3.npz").is_file()
    run_in_process([*common, "num_rounds=4", f"out_dir={part}", f"resume={part}"])
    a, b = _state(full, 4), _state(part, 4)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert [r["round"] for r in read_metrics(part)] == [0, 1, 2, 3, 4]  # round 3's row once


def test_a_damaged_checkpoint_falls_back_to_the_round_before_and_metrics_are_rewritten(tmp_path, capsys):
    from inprocess import run_in_process

    from fedmllm.server.checkpoint import latest_state
    from fedmllm.tracking import read_metrics

    common = _common("num_rounds=3", f"out_dir={tmp_path}")
    run_in_process(common)
    state = tmp_path / "checkpoints" / "round-3" / "fedmllm-state.npz"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
    assert latest_state(tmp_path)[0] == 2
    assert "round-3 cannot be resumed from: fedmllm-state.npz" in capsys.readouterr().err
    adapter = tmp_path / "checkpoints" / "round-2" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-10])  # the manifest catches what np.load would not
    assert latest_state(tmp_path)[0] == 1
    assert "round-2 cannot be resumed from: adapter_model.safetensors has" in capsys.readouterr().err
    run_in_process([*_common("num_rounds=3", f"out_dir={tmp_path}"), f"resume={tmp_path}"])
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]  # no duplicate rows


def test_resume_refuses_other_settings_and_a_missing_dir_before_touching_the_run(tmp_path):
    from inprocess import run_in_process

    from fedmllm.server.run import ResumeError

    run_in_process(_common("num_rounds=1", f"out_dir={tmp_path}"))
    saved = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ResumeError, match=r"peft.r: 16 -> 4"):
        run_in_process([*_common("num_rounds=2", f"out_dir={tmp_path}", "peft.r=4"), f"resume={tmp_path}"])
    with pytest.raises(ResumeError, match=r"model.quantization: '4bit' -> 'none'"):
        run_in_process([*_common("num_rounds=2", f"out_dir={tmp_path}", "model.quantization=none"),
                        f"resume={tmp_path}"])
    assert (tmp_path / "config.yaml").read_text() == saved  # the record of what the run was
    with pytest.raises(ResumeError, match="raise num_rounds"):
        run_in_process([*_common("num_rounds=1", f"out_dir={tmp_path}"), f"resume={tmp_path}"])


def test_a_run_in_which_no_round_aggregated_fails_with_the_reason(tmp_path):
    from inprocess import run_in_process

    from fedmllm.server.run import NoRoundAggregated

    with pytest.raises(NoRoundAggregated, match=r"no round of 2 aggregated.*update norm .* > aggregator.max_update_norm"):
        run_in_process(_common(f"out_dir={tmp_path}", "aggregator.max_update_norm=1e-12"))


def test_cli_resume_of_a_missing_dir_fails_without_creating_it(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "nope"
    proc = subprocess.run([sys.executable, "-m", "fedmllm.cli", "run", f"resume={missing}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no such directory" in proc.stderr and not missing.exists()


def test_the_continue_hint_appears_only_where_resuming_can_help(tmp_path):
    from inprocess import run_in_process

    from fedmllm.cli import resume_hint
    from fedmllm.server.run import NoRoundAggregated

    assert resume_hint(str(tmp_path), RuntimeError("boom")) == ""  # nothing checkpointed
    run_in_process(_common("num_rounds=1", f"out_dir={tmp_path}"))
    assert resume_hint(str(tmp_path), RuntimeError("boom")).endswith(f"fedmllm run resume={tmp_path}")
    assert resume_hint(str(tmp_path), NoRoundAggregated("x")) == ""
    manifest = json.loads((tmp_path / "checkpoints" / "round-1" / "manifest.json").read_text())
    assert {"adapter_model.safetensors", "adapter_config.json", "fedmllm-state.npz"} <= set(manifest)

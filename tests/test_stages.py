"""Server stages (MLLM-FL): stage-1 alignment on the public pool, global alignment after aggregation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_overrides


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    """An empty $FEDMLLM_CACHE whose models dir links to the user's (no tiny rebuild)."""
    from fedmllm.models.build import cache_root

    models = cache_root() / "models"
    models.mkdir(parents=True, exist_ok=True)
    (tmp_path / "models").symlink_to(models)
    monkeypatch.setenv("FEDMLLM_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("objective", ["embed", "caption"])
def test_stage1_objective_decreases_and_is_cached(fresh_cache, objective):
    from safetensors.torch import load_file

    from fedmllm.config import compose
    from fedmllm.models.load import load_model
    from fedmllm.models.stage1 import WEIGHTS, model_config, stage1_dir
    from fedmllm.server.stages import ensure_pretrained

    steps = 60 if objective == "embed" else 150
    cfg = compose(tiny_overrides(f"server_stage.pretrain.objective={objective}",
                                 f"server_stage.pretrain.steps={steps}", "server_stage.pretrain.lr=1e-2"))
    lines: list[str] = []
    first = ensure_pretrained(cfg, log=lines.append)
    assert first["cached"] is False and first["seconds"] > 0
    # tiny-llava's language model is random and frozen: the caption loss can only fall a little
    # (the vision side learns which of ~400 tokens follow), the embedding loss a lot
    drop = 0.1 * first["loss_first"] if objective == "embed" else 0.01
    assert first["loss_last"] < first["loss_first"] - drop, first
    assert first["public_images"] > 0
    out = stage1_dir(cfg)
    assert out.parent == fresh_cache / "stage1" and (out / WEIGHTS).is_file()
    assert any("stage 1: done" in line for line in lines)
    again = ensure_pretrained(cfg, log=lines.append)
    assert again["cached"] is True and again["seconds"] == 0.0
    assert again["loss_last"] == first["loss_last"]

    # The saved tensors are vision tower + projector only, and a model built with the run's model
    # config carries them (clients load the same file); the plain base model does not.
    saved = load_file(str(out / WEIGHTS))
    assert saved and all(k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for k in saved)
    staged, _, _ = load_model(model_config(cfg))
    base, _, _ = load_model(cfg["model"])
    key = next(k for k in saved if "multi_modal_projector" in k)
    assert np.allclose(staged.state_dict()[key].float().numpy(), saved[key].float().numpy())
    assert not np.allclose(base.state_dict()[key].float().numpy(), saved[key].float().numpy())


def test_stage1_cache_key_follows_settings():
    from fedmllm.config import compose
    from fedmllm.models.stage1 import stage1_dir

    base = stage1_dir(compose(tiny_overrides()))
    assert base == stage1_dir(compose(tiny_overrides()))
    assert base != stage1_dir(compose(tiny_overrides("server_stage.pretrain.steps=21")))
    assert base != stage1_dir(compose(tiny_overrides("dataset.public_fraction=0.3")))
    assert base != stage1_dir(compose(tiny_overrides("seed=1")))
    # align settings do not change the stage-1 result
    assert base == stage1_dir(compose(tiny_overrides("server_stage=pretrain_align")))
    assert stage1_dir(compose(tiny_overrides("server_stage=none"))) is None


def test_public_captions_come_from_public_images_only():
    from fedmllm.data import load_public, load_public_captions, load_task

    cfg = {"name": "easyvqa", "balanced": True, "public_fraction": 0.5, "eval_samples": 0}
    captions = load_public_captions(cfg, 42)
    public = {s["image"] for s in load_public(cfg, 42)}
    _, pool, _ = load_task(cfg, 42)
    assert {p for p, _ in captions} <= public
    assert not {p for p, _ in captions} & {s["image"] for s in pool}
    colours = {w[0] for _, w in captions}
    shapes = {w[1] for _, w in captions}
    assert shapes == {"circle", "rectangle", "triangle"} and len(colours) == 8


def test_server_stage_needs_public_pool():
    from fedmllm.config import ConfigError, compose

    with pytest.raises(ConfigError, match="dataset.public_fraction=0.5"):
        compose(tiny_overrides("dataset.public_fraction=0"))
    compose(tiny_overrides("dataset.public_fraction=0", "server_stage=none"))  # fine without stages
    with pytest.raises(ConfigError, match="choose embed or caption"):
        compose(tiny_overrides("server_stage.pretrain.objective=clip"))


@pytest.mark.slow
def test_run_with_pretrain_and_align_logs_both(tmp_path):
    """A tiny run with both stages: round 0 records the stage-1 build, every round its alignment."""
    from test_e2e import run_cli

    out = tmp_path / "run"
    proc = run_cli(["run", *tiny_overrides("server_stage=pretrain_align", "model.quantization=none"),
                    f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "align " in proc.stdout  # the round line shows the alignment cost
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert "pretrain_seconds" in rows[0] and "align_seconds" not in rows[0]
    for r in rows[1:]:
        assert r["align_seconds"] > 0 and np.isfinite(r["align_loss"])
    assert json.loads((out / "stage1.json").read_text())["objective"] == "embed"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "idefics3", "llava_onevision", "paligemma"])
def test_stage1_embed_trains_every_family_and_the_model_carries_it(fresh_cache, family):
    """The families whose processors flatten (Qwen) or tile (Idefics3, OneVision) the pixels take
    the per-step path; the loss falls and a model built with the run's config carries the result."""
    from safetensors.torch import load_file

    from fedmllm.config import compose
    from fedmllm.models.load import load_model
    from fedmllm.models.stage1 import WEIGHTS, model_config, stage1_dir

    from fedmllm.server.stages import ensure_pretrained

    cfg = compose(tiny_overrides(f"model=tiny-{family}", "model.quantization=none",
                                 "server_stage.pretrain.steps=30", "server_stage.pretrain.lr=1e-2"))
    first = ensure_pretrained(cfg, log=lambda _: None)
    assert first["loss_last"] < 0.9 * first["loss_first"], first
    saved = load_file(str(stage1_dir(cfg) / WEIGHTS))
    staged, _, fam = load_model(model_config(cfg))
    assert saved and {fam.group_of(k) for k in saved} == {"vision_encoder", "projector"}
    key = next(k for k in saved if fam.group_of(k) == "projector")
    assert np.allclose(staged.state_dict()[key].float().numpy(), saved[key].float().numpy())

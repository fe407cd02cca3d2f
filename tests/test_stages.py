"""Server stages (MLLM-FL): stage-1 alignment on the public pool, global alignment after aggregation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    """An empty $FEDMLLM_CACHE whose models dir links to the user's (no tiny rebuild)."""
    from fedmllm.common import cache_root

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
    from fedmllm.stages.cache import WEIGHTS, model_config, stage1_dir
    from fedmllm.stages.vision import ensure_pretrained

    steps = 60 if objective == "embed" else 150
    cfg = compose(
        tiny_overrides(
            f"server_stage.pretrain.objective={objective}",
            f"server_stage.pretrain.steps={steps}",
            "server_stage.pretrain.lr=1e-2",
        )
    )
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
    from fedmllm.stages.cache import stage1_dir

    base = stage1_dir(compose(tiny_overrides()))
    assert base == stage1_dir(compose(tiny_overrides()))
    assert base != stage1_dir(compose(tiny_overrides("server_stage.pretrain.steps=21")))
    assert base != stage1_dir(compose(tiny_overrides("dataset.public_fraction=0.3")))
    assert base != stage1_dir(compose(tiny_overrides("seed=1")))
    # align settings do not change the stage-1 result
    assert base == stage1_dir(compose(tiny_overrides("server_stage=pretrain_align")))
    assert stage1_dir(compose(tiny_overrides("server_stage=none"))) is None


def test_public_captions_come_from_public_images_only():
    from fedmllm.data import load_public, load_task
    from fedmllm.stages.captions import load_public_captions

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
    proc = run_cli(
        ["run", *tiny_overrides("server_stage=pretrain_align", "model.quantization=none"), f"hydra.run.dir={out}"]
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "align " in proc.stdout  # the round line shows the alignment cost
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert "pretrain_seconds" in rows[0] and "align_seconds" not in rows[0]
    for r in rows[1:]:
        assert r["align_seconds"] > 0 and np.isfinite(r["align_loss"])
    assert json.loads((out / "stage1.json").read_text())["objective"] == "embed"
    # the pre-trained adapter is the initial global adapter: round 0's checkpoint holds it
    from safetensors.numpy import load_file

    from fedmllm.server.checkpoint import STATE_FILE, read_state
    from fedmllm.stages.cache import ADAPTER

    adapter = json.loads((out / "stage1_adapter.json").read_text())
    assert "pretrain_adapter_seconds" in rows[0] and adapter["steps"] == 3
    cached = load_file(str(Path(adapter["dir"]) / ADAPTER))
    _, initial, _ = read_state(out / "checkpoints" / "round-0" / STATE_FILE)
    assert initial.keys() == cached.keys() and all(np.array_equal(initial[k], cached[k]) for k in cached)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "idefics3", "llava_onevision", "paligemma"])
def test_stage1_embed_trains_every_family_and_the_model_carries_it(fresh_cache, family):
    """The families whose processors flatten (Qwen) or tile (Idefics3, OneVision) the pixels take
    the per-step path; the loss falls and a model built with the run's config carries the result."""
    from safetensors.torch import load_file

    from fedmllm.config import compose
    from fedmllm.models.load import load_model
    from fedmllm.stages.cache import WEIGHTS, model_config, stage1_dir
    from fedmllm.stages.vision import ensure_pretrained

    cfg = compose(
        tiny_overrides(
            f"model=tiny-{family}",
            "model.quantization=none",
            "server_stage.pretrain.steps=30",
            "server_stage.pretrain.lr=1e-2",
        )
    )
    first = ensure_pretrained(cfg, log=lambda _: None)
    assert first["loss_last"] < 0.9 * first["loss_first"], first
    saved = load_file(str(stage1_dir(cfg) / WEIGHTS))
    staged, _, fam = load_model(model_config(cfg))
    assert saved and {fam.group_of(k) for k in saved} == {"vision_encoder", "projector"}
    key = next(k for k in saved if fam.group_of(k) == "projector")
    assert np.allclose(staged.state_dict()[key].float().numpy(), saved[key].float().numpy())


def test_public_captioned_samples_are_the_public_questions_with_their_caption_as_text():
    from fedmllm.data import load_public, load_task
    from fedmllm.stages.captions import load_public_captioned, load_public_captions

    cfg = {"name": "easyvqa", "balanced": True, "public_fraction": 0.5, "eval_samples": 0}
    captioned = load_public_captioned(cfg, 42)
    public = {s["id"]: s for s in load_public(cfg, 42)}
    words = dict(load_public_captions(cfg, 42))
    _, pool, _ = load_task(cfg, 42)
    pool_ids = {s["id"] for s in pool}
    assert len(captioned) > 1000
    for s in captioned:
        source = public[s["id"].removesuffix("-captioned")]
        assert source["id"] not in pool_ids  # public only: no client holds it
        assert s["image"] is None and s["label"] == source["label"]
        assert s["text"] == f"The image shows a {' '.join(words[source['image']])}. {source['text']}"
    assert {s["label"] for s in captioned} == {0, 1}


def _adapter_cfg(*extra):
    from fedmllm.config import compose

    return compose(
        tiny_overrides(
            "model.quantization=none",
            "server_stage.pretrain.lora.steps=60",
            "server_stage.pretrain.lora.batch_size=8",
            "server_stage.pretrain.lora.lr=1e-2",
            "server_stage.pretrain.lora.stop_accuracy=null",
            *extra,
        )
    )


def _server_model(cfg):
    import torch

    from fedmllm.algorithms import server_peft
    from fedmllm.models import clear_cache, get_model
    from fedmllm.stages.cache import model_config

    clear_cache()
    torch.manual_seed(cfg["seed"])
    return get_model(model_config(cfg), server_peft(cfg))


def test_adapter_pretrain_learns_from_captions_is_cached_and_loads_into_a_fresh_model(fresh_cache):
    from fedmllm.data.collate import Collator
    from fedmllm.data.easyvqa import YESNO
    from fedmllm.models.adapter import adapter_state
    from fedmllm.stages.adapter import ensure_adapter_pretrained
    from fedmllm.stages.cache import ADAPTER, adapter_dir
    from fedmllm.stages.vision import ensure_pretrained

    cfg = _adapter_cfg()
    ensure_pretrained(cfg, log=lambda _: None)
    lm = _server_model(cfg)
    before = adapter_state(lm.model)
    lines: list[str] = []
    collator = Collator(lm.processor, lm.family, YESNO)
    first = ensure_adapter_pretrained(cfg, lm, collator, log=lines.append)
    assert first["cached"] is False and first["steps"] == 60 and first["public_samples"] > 1000
    # tiny-llava's LM is random: the loss falls slowly (5.8 -> 5.4 in a trial), it learns token
    # frequencies rather than the questions
    assert first["loss_last"] < first["loss_first"] - 0.15, first
    assert 0 <= first["val_text_accuracy"] <= 1 and any("stage 1 adapter: done" in x for x in lines)
    trained = adapter_state(lm.model)
    assert (adapter_dir(cfg) / ADAPTER).is_file()
    lora_b = [k for k in trained if "lora_B" in k]
    assert lora_b and all(np.any(trained[k] != before[k]) for k in lora_b)  # B left zero: trained

    lm2 = _server_model(cfg)  # a fresh model: the cached adapter replaces its initial one
    again = ensure_adapter_pretrained(cfg, lm2, Collator(lm2.processor, lm2.family, YESNO), log=lines.append)
    assert again["cached"] is True and again["seconds"] == 0.0 and again["loss_last"] == first["loss_last"]
    loaded = adapter_state(lm2.model)
    assert loaded.keys() == trained.keys() and all(np.array_equal(loaded[k], trained[k]) for k in trained)


def test_adapter_pretrain_stops_once_held_out_accuracy_is_reached(fresh_cache):
    from fedmllm.data.collate import Collator
    from fedmllm.data.easyvqa import YESNO
    from fedmllm.stages.adapter import ensure_adapter_pretrained
    from fedmllm.stages.vision import ensure_pretrained

    def build(*extra):
        cfg = _adapter_cfg(
            "server_stage.pretrain.lora.steps=6",
            "server_stage.pretrain.lora.eval_every=2",
            "server_stage.pretrain.lora.check_gate=null",
            *extra,
        )
        ensure_pretrained(cfg, log=lambda _: None)
        lm = _server_model(cfg)
        lines: list[str] = []
        summary = ensure_adapter_pretrained(cfg, lm, Collator(lm.processor, lm.family, YESNO), log=lines.append)
        return summary, lines

    # no target: every step runs, the held-out questions are scored at steps 2 and 4 (and after 6)
    full, _ = build()
    assert full["steps"] == full["max_steps"] == 6 and len(full["losses"]) == 6
    assert [s for s, _ in full["val_text_accuracy_curve"]] == [2, 4]
    # a target the first check reaches (any right answer of 8): training stops there
    early, lines = build("server_stage.pretrain.lora.stop_accuracy=0.01")
    curve = early["val_text_accuracy_curve"]
    assert curve[0][1] >= 0.01 and early["steps"] == 2 and len(early["losses"]) == 2 and len(curve) == 1
    assert early["val_text_accuracy"] == curve[-1][1] and early["max_steps"] == 6
    assert any("stopped at step 2 of 6" in x for x in lines), lines
    assert early["dir"] != full["dir"]  # the target is part of the cache key
    # every step's batch was answered (before its update) and recorded
    answered = full["batch_answer_accuracy"]
    assert len(answered) == 6 and all(0 <= a <= 1 for a in answered)
    # the gate: a check point runs its check only when the last 5 batches answered at least
    # check_gate right; 0 passes every time, above the batches' accuracy none runs
    opened, _ = build("server_stage.pretrain.lora.stop_accuracy=0.01", "server_stage.pretrain.lora.check_gate=0")
    assert opened["steps"] == 2 and [s for s, _ in opened["val_text_accuracy_curve"]] == [2]
    shut, _ = build(
        "server_stage.pretrain.lora.stop_accuracy=0.01",
        f"server_stage.pretrain.lora.check_gate={max(answered) + 0.01:.4f}",
    )
    assert shut["steps"] == 6 and shut["val_text_accuracy_curve"] == [] and shut["check_gate"] > 0
    with pytest.raises(Exception, match="stop_accuracy=1.5"):
        _adapter_cfg("server_stage.pretrain.lora.stop_accuracy=1.5")
    with pytest.raises(Exception, match="check_gate=2"):
        _adapter_cfg("server_stage.pretrain.lora.check_gate=2")


def test_adapter_pretrain_keeps_ffa_lora_a_and_skips_fedsa_lora(fresh_cache):
    from fedmllm.data.collate import Collator
    from fedmllm.data.easyvqa import YESNO
    from fedmllm.models.adapter import adapter_state, init_lora_a
    from fedmllm.stages.adapter import ensure_adapter_pretrained
    from fedmllm.stages.vision import ensure_pretrained

    cfg = _adapter_cfg("aggregator=ffa_lora", "server_stage.pretrain.lora.steps=3")
    ensure_pretrained(cfg, log=lambda _: None)
    lm = _server_model(cfg)
    init_lora_a(lm.model, cfg["seed"])  # what run_server and every FFA client derive
    before = adapter_state(lm.model)
    collator = Collator(lm.processor, lm.family, YESNO)
    assert ensure_adapter_pretrained(cfg, lm, collator, log=lambda _: None)
    after = adapter_state(lm.model)
    a_keys = [k for k in after if "lora_A" in k]
    b_keys = [k for k in after if "lora_B" in k]
    assert a_keys and all(np.array_equal(after[k], before[k]) for k in a_keys)
    assert any(np.any(after[k] != before[k]) for k in b_keys)

    lines: list[str] = []
    cfg = _adapter_cfg("aggregator=fedsa_lora")
    assert ensure_adapter_pretrained(cfg, lm, collator, log=lines.append) is None
    assert "skipped" in lines[0] and "fedsa_lora" in lines[0]


def test_adapter_cache_key_follows_what_shapes_the_adapter():
    from fedmllm.config import compose
    from fedmllm.stages.cache import adapter_dir, stage1_dir

    def key(*extra):
        return adapter_dir(compose(tiny_overrides(*extra)))

    base = key()
    assert base == key() and base.parent.name == "pretrain-lora"
    for extra in (
        "server_stage.pretrain.lora.steps=5",
        "peft.r=8",
        "dataset=easyvqa_caption",
        "server_stage.pretrain.steps=21",
        "model.quantization=none",
        "seed=1",
    ):
        assert key(extra) != base, extra
    assert key("aggregator=ffa_lora") != base
    # the round settings and the adapter stage's own switch do not touch the stage-1 result
    assert key("train.local_steps=9", "num_rounds=7") == base
    cfg = compose(tiny_overrides("server_stage.pretrain.lora.enabled=false"))
    assert adapter_dir(cfg) is None and stage1_dir(cfg) == stage1_dir(compose(tiny_overrides()))
    with pytest.raises(Exception, match="server_stage.pretrain.lora.steps=0"):
        compose(tiny_overrides("server_stage.pretrain.lora.steps=0"))

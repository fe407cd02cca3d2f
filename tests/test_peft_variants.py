"""PEFT variants (lora, dora, rslora, ia3) x connector policies on tiny-llava: each trains, its
payload is exactly its trainable tensors, it runs a federated round; LoRA-only aggregators refuse
what they cannot aggregate."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import tiny_overrides

from fedmllm.models.adapter import METHODS, adapter_params, adapter_state, payload_bytes, trainable_bytes


def _peft(variant: str, *extra: str) -> dict:
    from fedmllm.config import compose

    return compose(tiny_overrides(f"peft={variant}", *extra))


def _wrapped(cfg: dict, quantization: str = "4bit"):
    import torch

    from fedmllm.models.adapter import apply_peft
    from fedmllm.models.load import load_model

    torch.manual_seed(0)
    model, processor, family = load_model(dict(cfg["model"], quantization=quantization))
    return apply_peft(model, family, cfg["peft"]), processor, family


def _train(model, processor, family, cfg, steps=3):
    from fedmllm.data import load_task
    from fedmllm.data.collate import Collator
    from fedmllm.training import train_steps

    task, train, _ = load_task(cfg["dataset"], cfg["seed"])
    col = Collator(processor, family, task)
    return train_steps(model, col, train[:32], dict(cfg["train"], local_steps=steps, lr=1e-2), seed=0)


@pytest.mark.parametrize("variant", METHODS)
def test_each_variant_trains_and_sends_exactly_its_trainable_tensors(variant):
    cfg = _peft(variant)
    model, processor, family = _wrapped(cfg)
    before = adapter_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # payload keys <-> trainable parameters, one to one; stable names (no adapter name), fp32
    params = adapter_params(model)
    assert {name for name, p in model.named_parameters() if any(p is q for q in params.values())} == trainable
    assert set(before) == set(params) and all(".default" not in k for k in before)
    assert all(a.dtype == np.float32 for a in before.values())
    assert payload_bytes(before) == trainable_bytes(model)
    marker = {"lora": "lora_A", "rslora": "lora_A", "dora": "lora_magnitude_vector", "ia3": "ia3_l"}[variant]
    assert any(marker in k for k in before), sorted(before)[:4]
    assert all("vision_tower" not in k for k in before)  # peft.targets=[llm]
    stats = _train(model, processor, family, cfg)
    assert math.isfinite(stats["train-loss"])
    after = adapter_state(model)
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    adapters = {k for k in before if "multi_modal_projector" not in k}
    assert moved & adapters, f"{variant}: training changed no adapter tensor"


def test_rslora_scales_by_alpha_over_sqrt_r_and_dora_adds_magnitudes():
    lora, _, _ = _wrapped(_peft("lora", "peft.r=4", "peft.alpha=8"))
    rs, _, _ = _wrapped(_peft("rslora", "peft.r=4", "peft.alpha=8"))
    name = next(n for n, _ in lora.named_modules() if n.endswith("language_model.layers.0.self_attn.q_proj"))
    assert lora.get_submodule(name).scaling["default"] == pytest.approx(8 / 4)
    assert rs.get_submodule(name).scaling["default"] == pytest.approx(8 / math.sqrt(4))
    dora, _, _ = _wrapped(_peft("dora", "peft.r=4"))
    extra = set(adapter_state(dora)) - set(adapter_state(lora))
    assert extra and all(k.endswith(".lora_magnitude_vector") for k in extra)


@pytest.mark.parametrize("policy", ["frozen", "lora", "full"])
def test_connector_policy_decides_what_of_the_projector_travels(policy):
    cfg = _peft("lora", f"peft.projector={policy}")
    model, *_ = _wrapped(cfg, quantization="none")
    keys = [k for k in adapter_state(model) if "multi_modal_projector" in k]
    if policy == "frozen":
        assert keys == []
    elif policy == "lora":
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
        assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys} == {"linear_1", "linear_2"}
    else:
        assert sorted(k.rsplit("multi_modal_projector.", 1)[1] for k in keys) == [
            "linear_1.bias",
            "linear_1.weight",
            "linear_2.bias",
            "linear_2.weight",
        ]
    projector = [
        p for n, p in model.named_parameters() if "multi_modal_projector" in n and ".original_module." not in n
    ]
    assert any(p.requires_grad for p in projector) == (policy != "frozen")


def test_targets_by_module_group_reach_the_vision_encoder():
    model, *_ = _wrapped(_peft("dora", "peft.targets=[llm,vision_encoder]"), quantization="none")
    keys = adapter_state(model)
    assert any("vision_tower" in k and ".lora_A." in k for k in keys)
    assert any("language_model" in k and ".lora_A." in k for k in keys)
    only_vision, *_ = _wrapped(
        _peft("ia3", "peft.targets=[vision_encoder]", "peft.feedforward=[]"), quantization="none"
    )
    assert {"vision_tower" in k for k in adapter_state(only_vision) if "ia3_l" in k} == {True}


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["peft=ia3", "aggregator=ffa_lora"], ["aggregator=ffa_lora", "peft=ia3", "aggregator=fedavg"]),
        (["peft=ia3", "aggregator=fedsa_lora"], ["aggregator=fedsa_lora", "peft=ia3"]),
        (["peft=ia3", "aggregator=flora"], ["aggregator=flora", "peft=ia3"]),
        (["peft=dora", "aggregator=flora"], ["aggregator=flora", "peft=dora", "peft=rslora"]),
        (["peft.projector=trained"], ["peft.projector='trained'", "full"]),
        (["peft.targets=[llm,projector]"], ["peft.projector"]),
        (["peft.targets=[text]"], ["peft.targets=['text']", "llm"]),
    ],
)
def test_unsupported_combinations_name_the_setting_and_the_fix(overrides, names):
    from fedmllm.config import ConfigError, compose

    with pytest.raises(ConfigError) as err:
        compose(tiny_overrides(*overrides))
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("variant", ["rslora", "lora"])
def test_flora_keeps_the_scale_of_every_rank(variant):
    from fedmllm.algorithms import algorithm_of
    from fedmllm.config import compose

    cfg = compose(
        tiny_overrides(
            f"peft={variant}", "peft.r=4", "peft.alpha=8", "aggregator=flora", "aggregator.client.max_rank=16"
        )
    )
    root = 0.5 if variant == "rslora" else 1.0
    flora = algorithm_of(cfg)
    for rank in (None, 2, 8):
        p = flora.client_peft(cfg, 0, rank) if rank else flora.server_peft(cfg)
        assert p["alpha"] / p["r"] ** root == pytest.approx(8 / 4**root)
        assert p["r"] == 16 + (rank or 0)


@pytest.mark.parametrize(
    "variant, aggregator",
    [
        ("lora", "fedavg"),
        ("dora", "fedavg"),
        ("rslora", "fedavg"),
        ("ia3", "fedavg"),
        pytest.param("dora", "ffa_lora", marks=pytest.mark.slow),
        pytest.param("rslora", "flora", marks=pytest.mark.slow),
    ],
)
def test_one_federated_round_per_variant(tmp_path, variant, aggregator):
    from inprocess import run_in_process

    from fedmllm.tracking import read_metrics

    out = tmp_path / f"{variant}-{aggregator}"
    extra = ["aggregator.client.ranks=[2,4]", "aggregator.client.max_rank=8"] if aggregator == "flora" else []
    run_in_process(
        tiny_overrides(
            f"peft={variant}",
            f"aggregator={aggregator}",
            "num_rounds=1",
            "server_stage=none",
            "dataset.eval_samples=8",
            f"out_dir={out}",
            *extra,
        )
    )
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1]
    assert math.isfinite(rows[1]["train_loss"]) and "accuracy" in rows[1]
    from fedmllm.server.checkpoint import read_state_flat

    shared = [
        k for k in read_state_flat(out / "checkpoints" / "round-1" / "fedmllm-state.npz") if k.startswith("global/")
    ]
    marker = {"ia3": ".ia3_l", "dora": ".lora_magnitude_vector"}.get(variant, ".lora_B.")
    assert any(marker in k for k in shared), shared[:4]

"""Shared fixtures: tiny models (built into the user's cache once), composed configs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every process this test session starts inherits the tag (Ray's daemons and workers too), so the
# tests that check for or stop leftover Ray processes touch only their own, never another run's
# on the same machine (a grid running beside the suite, another CI job).
os.environ.setdefault("FEDMLLM_TEST_SESSION", f"{os.getpid()}-{os.urandom(4).hex()}")


def tiny_overrides(*extra: str) -> list[str]:
    return [
        "model=tiny-llava",
        "num_clients=2",
        "clients_per_round=2",
        "num_rounds=2",
        "train.local_steps=2",
        "train.batch_size=4",
        "dataset.eval_samples=16",
        "server_stage.pretrain.steps=20",
        "server_stage.pretrain.batch_size=16",
        "server_stage.pretrain.lora.steps=3",
        "server_stage.pretrain.lora.batch_size=4",
        "server_stage.pretrain.lora.eval_samples=8",
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_cfg():
    from fedmllm.config import compose

    return compose(tiny_overrides())


@pytest.fixture(scope="session", params=["4bit", "none"])
def tiny_lm(request, tiny_cfg):
    """(LoadedModel, cfg) for tiny-llava in 4-bit and unquantized."""
    import copy

    import torch

    from fedmllm.models import LoadedModel
    from fedmllm.models.adapter import apply_peft
    from fedmllm.models.load import load_model

    cfg = copy.deepcopy(tiny_cfg)
    cfg["model"]["quantization"] = request.param
    torch.manual_seed(0)
    model, processor, family = load_model(cfg["model"])
    return LoadedModel(apply_peft(model, family, cfg["peft"]), processor, family), cfg


def tiny_lora(family: str = "llava", quant: str = "4bit"):
    """(model with LoRA, collator, config) of a tiny preset; LoRA B drawn non-zero, so every LoRA
    tensor gets a gradient from the first step."""
    import torch

    from fedmllm.config import compose
    from fedmllm.data import load_task
    from fedmllm.data.collate import Collator
    from fedmllm.models.adapter import apply_peft
    from fedmllm.models.load import load_model

    cfg = compose(tiny_overrides(f"model=tiny-{family}", f"model.quantization={quant}"))
    torch.manual_seed(0)
    model, processor, fam = load_model(cfg["model"])
    model = apply_peft(model, fam, cfg["peft"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    task, _, _ = load_task(cfg["dataset"], cfg["seed"])
    return model, Collator(processor, fam, task), cfg


def loss_and_grads(model, batch, **kw):
    """(answer loss, gradient of every trainable tensor) of one batch; gradients cleared after."""
    import torch

    from fedmllm.training import answer_loss

    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    loss = answer_loss(model, dict(batch), **kw)
    loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    return loss.item(), grads

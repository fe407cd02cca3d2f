"""Batches follow the model to its device (the GPU path is exercised by bench/gpu.py on a GPU)."""

from __future__ import annotations

import json

import torch
from conftest import tiny_overrides


class _Model(torch.nn.Module):
    """A model stand-in whose input embeddings live on `device` (`meta`: another device, no GPU needed)."""

    def __init__(self, device: str):
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4, device=device)

    def get_input_embeddings(self):
        return self.embed


def test_batch_tensors_move_to_the_models_device_and_other_values_stay():
    from fedmllm.models.device import model_device, to_model

    batch = {
        "input_ids": torch.ones(2, 3, dtype=torch.long),
        "pixel_values": torch.zeros(2, 3, 4, 4),
        "labels": torch.full((2, 3), -100),
        "keep": 2,
    }
    moved = to_model(batch, _Model("meta"))
    assert model_device(_Model("meta")).type == "meta"
    assert {k: v.device.type for k, v in moved.items() if k != "keep"} == {
        "input_ids": "meta",
        "pixel_values": "meta",
        "labels": "meta",
    }
    assert moved["keep"] == 2 and moved["input_ids"].dtype == torch.long
    assert batch["input_ids"].device.type == "cpu"  # the caller's batch is left as it was
    here = to_model(batch, _Model("cpu"))
    assert all(here[k] is batch[k] for k in batch)  # already on the model's device: not copied


def test_tiny_builder_takes_an_intermediate_size(tmp_path, monkeypatch):
    """`model.text.intermediate` sets the MLP width (bench/gpu.py builds SmolLM2's 1536 this way);
    without it the tiny presets keep twice the hidden size."""
    from fedmllm.config import compose
    from fedmllm.models.build import ensure_built

    monkeypatch.setenv("FEDMLLM_CACHE", str(tmp_path))
    wide = ensure_built(compose(tiny_overrides("+model.text.intermediate=96"))["model"])
    plain = ensure_built(compose(tiny_overrides())["model"])
    assert wide != plain
    sizes = [json.loads((d / "config.json").read_text())["text_config"]["intermediate_size"] for d in (wide, plain)]
    assert sizes == [96, 128]

"""Where a model's inputs go: the collator builds batches on the CPU, the model may sit on a GPU."""

from __future__ import annotations

from typing import Any


def model_device(model):
    """The device of the model's input embeddings (where `input_ids` must be)."""
    return model.get_input_embeddings().weight.device


def to_model(batch: dict[str, Any], model) -> dict[str, Any]:
    """`batch` with every tensor moved to `model`'s device (ints and other values unchanged); a
    no-op on the CPU."""
    device = model_device(model)
    return {
        k: v.to(device) if hasattr(v, "to") and getattr(v, "device", device) != device else v for k, v in batch.items()
    }


def avoid_cudnn_attention() -> None:
    """Turn off PyTorch's cuDNN attention kernel for `attn_implementation=sdpa` on a GPU.

    Our batches are left-padded (answers end every row), so a padded position's attention row is
    fully masked. On an H200 (torch 2.11 + cu130, bf16) the cuDNN kernel's backward returned NaN
    for such rows (anomaly mode: ScaledDotProductCudnnAttentionBackward0) and the adapter stage
    failed at its fourth step; the memory-efficient kernel, which PyTorch picks next, trains them
    (bench/gpu.py, docs/benchmarks.md "GPU"). No-op without CUDA."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)

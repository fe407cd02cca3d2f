"""Pre-quantized model cache: a preset is quantized to 4 bits once, saved, and later loads read it as is.

In a deployment every round starts a fresh client process; quantizing the full-precision weights
each time costs a full read of them plus NF4 packing (docs/benchmarks.md, "Load time"). The first
4-bit load of a preset writes the quantized model to `$FEDMLLM_CACHE/quantized/<name>-<digest>`,
keyed by the preset's weights and every quantization setting, written atomically; later loads of
the same key call `from_pretrained` on that directory, which holds packed NF4 weights and the
BitsAndBytesConfig (transformers then restores the quant states instead of quantizing).
`model.quantized_cache=false` turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

from fedmllm.common import cache_root, write_atomically
from fedmllm.models.build import preset_dir

QUANT_CACHE_VERSION = 1  # bump when what is saved changes, so old entries are not reused


def weights_key(model_cfg: dict[str, Any]) -> str:
    """What identifies a preset's full-precision weights: its build key (offline presets) or path."""
    path = model_cfg.get("path")
    if path and not model_cfg.get("random_init"):  # a random-init build stands in for `path`'s weights
        return str(path)
    return preset_dir(model_cfg).name  # name + hash of the build settings + BUILD_VERSION


def quantized_dir(model_cfg: dict[str, Any], quant_config) -> Path:
    """Cache directory of a preset quantized with `quant_config` (a BitsAndBytesConfig)."""
    import bitsandbytes
    import transformers

    key = json.dumps(
        {
            "v": QUANT_CACHE_VERSION,
            "weights": weights_key(model_cfg),
            "quant": quant_config.to_dict(),  # 4/8 bit, nf4, double quant, compute dtype, skip list
            # the serialized format belongs to these two libraries
            "libs": [transformers.__version__, bitsandbytes.__version__],
        },
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return cache_root() / "quantized" / f"{model_cfg.get('name') or 'model'}-{digest}"


def uses_cache(model_cfg: dict[str, Any]) -> bool:
    """Whether this load goes through the pre-quantized cache (4-bit, cache not turned off)."""
    return model_cfg.get("quantization") == "4bit" and bool(model_cfg.get("quantized_cache", True))


def from_pretrained_quantized(model_cls, source: str, model_cfg: dict[str, Any], kwargs: dict[str, Any]):
    """`model_cls.from_pretrained(source, **kwargs)` through the pre-quantized cache.

    Returns (model, where it came from: "cache" or "quantized now").
    """

    out = quantized_dir(model_cfg, kwargs["quantization_config"])
    if (out / "config.json").is_file():
        # the saved config carries the BitsAndBytesConfig; passing one again would only be merged
        plain = {k: v for k, v in kwargs.items() if k != "quantization_config"}
        return model_cls.from_pretrained(out, **plain), "cache"
    model = model_cls.from_pretrained(source, **kwargs)
    write_atomically(out, model.save_pretrained)
    return model, "quantized now"


def keep_cpu_layout(model) -> int:
    """Turn off bitsandbytes' in-place CPU repacking of 4-bit weights; returns the layers changed.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit`'s weight the first time
    it runs without gradients (evaluation): the double-quantized absmax is expanded and rounded to
    bf16, and `state_dict()` (every checkpoint save) quantizes it back. Each cycle moves the base
    weights (absmax values by up to 6e-4 on tiny-llava), so a model's weights depended on how many
    evaluations and saves it had seen: a resumed run, which skips the evaluation of its first
    round, trained on other base weights than an uninterrupted one (adapters 1e-3 apart after one
    round), and only on CPUs with that instruction set. With this, every CPU takes the one path
    that training takes (dequantize, then matmul) and the base weights never change."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # no 4-bit layers without it
        return 0
    changed = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
        weight = module.weight
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    return changed


@contextlib.contextmanager
def dequantized(model):
    """Within the block, each 4-bit linear layer of `model` that sits on the CPU multiplies with its
    weight dequantized once, on entry, instead of on every call.

    bitsandbytes' CPU path unpacks the NF4 weight to the compute dtype in every forward pass, and
    the backward pass unpacks it again. Kept in the compute dtype, the same NF4 values give the same
    products (bit-identical losses and gradients), at the memory of a full-precision copy of those
    layers (about 0.4 GB for smol-llava's language model) until the block ends. Alone it saved
    0-8% of an adapter-stage step on 2 cores; with the shared prompt prefix, whose extra pass would
    unpack every weight again, the two together cost 0.79 of the plain step (bench/adapter_step.py). Layers on a GPU are left alone: their
    kernels dequantize on chip, and a 7B model's copy would not fit beside it."""
    import torch
    import torch.nn.functional as F

    try:
        import bitsandbytes as bnb
    except ImportError:  # no 4-bit layers without it
        yield
        return
    patched = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if not isinstance(module, bnb.nn.Linear4bit) or module.weight.device.type != "cpu":
                    continue
                state = module.weight.quant_state
                dtype = module.compute_dtype or state.dtype or torch.float32
                weight = bnb.functional.dequantize_4bit(module.weight.data, state).to(dtype)

                def forward(x, weight=weight, module=module):
                    bias = None if module.bias is None else module.bias.to(weight.dtype)
                    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

                module.forward = forward  # the instance attribute shadows the class's forward
                patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward

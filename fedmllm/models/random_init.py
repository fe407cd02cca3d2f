"""Shape-faithful hub presets without their weights (`model.random_init=true`).

A hub preset (llava-1.5-7b, qwen2.5-vl-7b, ...) is built from what ships in the package: its
checkpoint's config.json (`hub_configs/<preset>.json`) with random weights, and a processor with
the checkpoint's own image-processor settings (`hub_configs/<preset>.processor.json`: resolution,
patch and merge sizes, tiling), so every width, head count, patch size and image resolution is
the real model's and the processor computes the real number of image tokens per image.

What differs from the checkpoint, on purpose:
- `model.num_layers=N` keeps the first N decoder layers and N vision layers (Qwen2.5-VL's
  full-attention blocks among them; Gemma/Qwen `layer_types` cut to match);
- the tokenizer is a stand-in: the family's small BPE with the model's special tokens and a chat
  template (fedmllm.models.families, the same one its tiny preset uses); the config's token ids
  (image, video, vision start/end, bos/eos/pad) point at the stand-in's;
- `model.vocab_size=N` shrinks the embedding and lm_head to N rows (at least the stand-in's size)
  to keep memory small; without it the checkpoint's vocabulary size is kept.

The result is written once into the cache (keyed by the preset, num_layers, vocab_size and seed)
and loads through the same code as a downloaded checkpoint, 4-bit included.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml

from fedmllm.common import MissingAssetError
from fedmllm.models.families.common import save_tiny
from fedmllm.models.registry import Family, get_family

HUB_CONFIGS = Path(__file__).parent / "hub_configs"
CONF_MODELS = Path(__file__).resolve().parents[1] / "conf" / "model"

# Config attributes naming special token ids: taken from the stand-in build, so they index the
# stand-in tokenizer (the checkpoint's ids, e.g. 151655, lie beyond a shrunk vocabulary).
TOKEN_ID_KEYS = (
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "video_token_index",
    "vision_start_token_id",
    "vision_end_token_id",
    "boi_token_index",
    "eoi_token_index",
)
TEXT_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Processor settings (processor_config.json) that change how many tokens an image becomes.
PROCESSOR_KEYS = (
    "patch_size",
    "vision_feature_select_strategy",
    "num_additional_image_tokens",
    "image_seq_len",
    "image_seq_length",
    "num_image_tokens",
    "vision_aspect_ratio",
)


def processor_settings(hf_config: str) -> dict[str, Any]:
    """The bundled `<preset>.processor.json` next to the preset's `hf_config` file."""
    path = HUB_CONFIGS / (Path(hf_config).stem + ".processor.json")
    if not path.is_file():
        raise MissingAssetError(
            f"the preset needs the checkpoint's image-processor settings in {path}; save its "
            "preprocessor_config.json (and processor_config.json) there as hub_configs/__init__.py says"
        )
    return json.loads(path.read_text())


def bundled_config(config_cls, hf_config: str, preset: str, num_layers: int | None = None, vocab_size=None):
    """The preset's bundled config.json (`hub_configs/<hf_config>`) as `config_cls`, cut to
    `num_layers` and a `vocab_size`-row vocabulary where a random build asks for them."""
    path = HUB_CONFIGS / hf_config
    if not path.is_file():
        raise FileNotFoundError(
            f"model.hf_config={hf_config!r}: {path} is missing; save the checkpoint's "
            f"config.json there (preset {preset!r})"
        )
    config = config_cls.from_dict(json.loads(path.read_text()))
    truncate(config, num_layers)
    if vocab_size:
        config.get_text_config().vocab_size = vocab_size
    return config


def stand_in(family: Family, tmp: Path):
    """(processor, config) of the family's tiny preset, built in `tmp`: the stand-in tokenizer,
    chat template and special-token ids the random build borrows."""
    preset = yaml.safe_load((CONF_MODELS / f"tiny-{family.name}.yaml").read_text())
    family.build_tiny(preset, tmp)
    config_cls = family.model_cls().config_class
    return family.processor_cls().from_pretrained(tmp), config_cls.from_pretrained(tmp)


def image_processor(settings: dict[str, Any], cls: type | None = None):
    """An image processor with the checkpoint's settings (the processor.json's "image_processor"):
    of `cls`, or of the class the settings name (its PIL backend: no torchvision)."""
    if cls is None:
        import transformers

        name = settings.get("image_processor_type", "")
        cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name)
    skip = {"image_processor_type", "processor_class", "auto_map", "_source"}
    return cls(**{k: v for k, v in settings.items() if k not in skip})


def truncate(config, num_layers: int | None) -> None:
    """Keep the first `num_layers` decoder and vision layers (every width unchanged)."""
    if not num_layers:
        return
    text = config.get_text_config()
    text.num_hidden_layers = min(num_layers, text.num_hidden_layers)
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[: text.num_hidden_layers]
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return
    kept = num_layers
    for key in ("num_hidden_layers", "depth"):
        if hasattr(vision, key):
            setattr(vision, key, min(num_layers, getattr(vision, key)))
            kept = getattr(vision, key)
    blocks = getattr(vision, "fullatt_block_indexes", None)
    if blocks:  # Qwen2.5-VL: the last kept block attends to the whole image, as block 7 of 32 does
        vision.fullatt_block_indexes = [i for i in blocks if i < kept] or [kept - 1]
    layer = getattr(config, "vision_feature_layer", None)
    if isinstance(layer, int) and layer >= 0:  # a layer index past the kept ones: the last kept
        config.vision_feature_layer = min(layer, kept)


def build_random(preset: dict[str, Any], out: Path) -> None:
    """Write the preset's shape-faithful random checkpoint (config, weights, processor) to `out`."""
    family = get_family(preset["family"])
    settings = processor_settings(str(preset["hf_config"]))
    config_cls = family.model_cls().config_class
    config = bundled_config(config_cls, str(preset["hf_config"]), preset["name"], preset.get("num_layers"))
    with tempfile.TemporaryDirectory() as tmp:
        processor, tiny = stand_in(family, Path(tmp))
    processor.image_processor = image_processor(settings.get("image_processor") or {}, type(processor.image_processor))
    for key, value in (settings.get("processor") or {}).items():
        if key in PROCESSOR_KEYS and hasattr(processor, key):
            setattr(processor, key, value)
    for key in TOKEN_ID_KEYS:
        if hasattr(config, key) and hasattr(tiny, key):
            setattr(config, key, getattr(tiny, key))
    text, tiny_text = config.get_text_config(), tiny.get_text_config()
    for key in TEXT_TOKEN_KEYS:
        setattr(text, key, getattr(tiny_text, key, None))
    vocab = max(int(preset.get("vocab_size") or text.vocab_size), len(processor.tokenizer))
    text.vocab_size = vocab
    if hasattr(config, "vocab_size"):
        config.vocab_size = vocab
    config.architectures = [family.model_cls().__name__]
    save_tiny(family.model_cls(), config, processor, preset, out)

"""Model family registry: each family declares its HF classes, prompt format and module groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

MODULE_GROUPS = ("vision_encoder", "projector", "llm")


@dataclass(frozen=True)
class Family:
    """What fedmllm needs to know about one MLLM family (one module in fedmllm/models/families/).

    ``module_groups`` maps each group (vision_encoder, projector, llm) to module path
    prefixes (transformers 5 layout). They decide what is frozen, what gets LoRA, what stays
    unquantized and what is federated, so they are data, not code; the groups are disjoint.
    """

    name: str
    model_cls: Callable[[], type]  # lazy: importing every HF class costs seconds
    processor_cls: Callable[[], type]  # image-only where the HF processor also wants a video half
    module_groups: dict[str, tuple[str, ...]]
    lora_targets: tuple[str, ...]  # leaf names inside the `llm` group
    model_types: tuple[str, ...]  # config.json `model_type`s this family loads (model.path=DIR)
    # prompt(processor, system, user, has_image) -> the chat-formatted text up to the answer,
    # with one image placeholder that the processor expands to the image's tokens.
    prompt: Callable[..., str]
    # encode(processor, prompts, images, answers|None) -> model inputs; answers follow prompts.
    encode: Callable[..., dict]
    # image_seq_len(model_config, processor, height, width) -> image tokens for one image,
    # computed from the configs (tests hold the processor's expansion against it).
    image_seq_len: Callable[..., int]
    build_tiny: Callable[[dict, Any], None]  # (preset, out_dir): random tiny checkpoint, saved
    image_token: str = "<image>"  # the expanded image token (counted in input_ids)
    # leaf names of the vision encoder's attention layers (`peft.targets=[llm,vision_encoder]`);
    # CLIP and SigLIP towers use these, Qwen's ViT fuses q,k,v into `qkv`
    vision_lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    # resolution(processor, model_config, settings): apply the model section's resolution settings
    # it reads (`resolution_keys`: min_pixels, max_pixels, image_splitting, tile_size, max_grid)
    resolution: Callable[[Any, Any, dict], None] | None = None
    resolution_keys: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def group_of(self, module_name: str) -> str | None:
        """Return the module group a (full) module name belongs to, or None."""
        for group, prefixes in self.module_groups.items():
            if any(module_name == p or module_name.startswith(p + ".") for p in prefixes):
                return group
        return None


_FAMILIES: dict[str, Family] = {}
CALLABLES = ("model_cls", "processor_cls", "prompt", "encode", "image_seq_len", "build_tiny")


def check_family(family: Family) -> None:
    """Raise ValueError naming what a family lacks (module groups, targets, hooks)."""
    problems = [f"module group {g!r}" for g in MODULE_GROUPS if not family.module_groups.get(g)]
    extra = set(family.module_groups) - set(MODULE_GROUPS)
    if extra:
        problems.append(f"unknown module groups {sorted(extra)} (allowed: {list(MODULE_GROUPS)})")
    prefixes = [p for g in MODULE_GROUPS for p in family.module_groups.get(g, ())]
    overlap = sorted({a for a in prefixes for b in prefixes if a != b and b.startswith(a + ".")})
    if overlap or len(set(prefixes)) != len(prefixes):
        problems.append(f"overlapping module groups at {overlap or prefixes} (list disjoint sub-paths)")
    if not family.lora_targets:
        problems.append("lora_targets")
    if not family.model_types:
        problems.append("model_types")
    problems += [name for name in CALLABLES if not callable(getattr(family, name, None))]
    if problems:
        raise ValueError(f"model family {family.name!r} is incomplete: {', '.join(problems)}")


def register_family(family: Family) -> Family:
    """Register a family once; registering the same name twice raises KeyError."""
    if family.name in _FAMILIES:
        raise KeyError(f"model family {family.name!r} is already registered")
    check_family(family)
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    """Look a family up by name; the error lists the registered ones."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; registered: {sorted(_FAMILIES)}") from None


def family_for_model_type(model_type: str) -> Family:
    """The family that loads checkpoints whose config.json says `model_type`."""
    for family in _FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in _FAMILIES.values() for t in f.model_types)
    raise KeyError(
        f"no registered model family loads model_type {model_type!r} (known: {known}); add one: docs/add-a-model.md"
    )


def families() -> dict[str, Family]:
    """All registered families (read-only copy)."""
    return dict(_FAMILIES)

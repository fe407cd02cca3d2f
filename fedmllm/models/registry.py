"""Model family registry: each family declares its HF classes, prompt format and module groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

MODULE_GROUPS = ("vision_encoder", "projector", "llm")


@dataclass(frozen=True)
class Family:
    """What fedmllm needs to know about one MLLM family.

    ``module_groups`` maps each group (vision_encoder, projector, llm) to module path
    prefixes. They decide what is frozen, what gets LoRA, what stays unquantized and
    what is federated, so they are data, not code.
    """

    name: str
    model_cls: Callable[[], type]  # lazy: importing every HF class costs seconds
    processor_cls: Callable[[], type]
    module_groups: dict[str, tuple[str, ...]]
    lora_targets: tuple[str, ...]  # leaf names inside the `llm` group
    image_token: str = "<image>"
    extra: dict[str, Any] = field(default_factory=dict)

    def group_of(self, module_name: str) -> str | None:
        """Return the module group a (full) module name belongs to, or None."""
        for group, prefixes in self.module_groups.items():
            if any(module_name == p or module_name.startswith(p + ".") for p in prefixes):
                return group
        return None


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Register a family once; registering the same name twice raises KeyError."""
    if family.name in _FAMILIES:
        raise KeyError(f"model family {family.name!r} is already registered")
    missing = [g for g in MODULE_GROUPS if not family.module_groups.get(g)]
    if missing:
        raise ValueError(f"family {family.name!r} lacks module groups {missing}")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    """Look a family up by name; the error lists the registered ones."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise KeyError(
            f"unknown model family {name!r}; registered: {sorted(_FAMILIES)}"
        ) from None


def families() -> dict[str, Family]:
    """All registered families (read-only copy)."""
    return dict(_FAMILIES)

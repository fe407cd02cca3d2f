"""The model families: one module each, registered on import and checked for completeness."""

from __future__ import annotations

import importlib

from fedmllm.models.registry import check_family, families

# Adding a family: one module here + one preset file (docs/add-a-model.md).
FAMILIES = ("llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "paligemma")

for _name in FAMILIES:
    importlib.import_module(f"{__name__}.{_name}")


def _check_complete() -> None:
    """Import-time check: every listed module registered its family, and each is complete."""
    registered = families()
    missing = [n for n in FAMILIES if n not in registered]
    if missing:
        raise ImportError(f"family modules {missing} did not register a family of the same name")
    for family in registered.values():
        check_family(family)


_check_complete()

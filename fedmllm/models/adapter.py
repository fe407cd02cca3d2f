"""PEFT application and the adapter <-> arrays contract (only trainable adapter tensors travel)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from fedmllm.models.registry import Family


def lora_target_regex(family: Family, targets: list[str], leaves: list[str] | None = None) -> str:
    """Regex over full module names: `leaves` (default: the family's LoRA targets) inside `targets` groups."""
    leaves = list(leaves or family.lora_targets)
    prefixes = [p for g in targets for p in family.module_groups[g] if p != "lm_head"]
    pre = "|".join(re.escape(p) for p in prefixes)
    return rf"^({pre})\..*\.({'|'.join(map(re.escape, leaves))})$"


def apply_peft(model, family: Family, peft_cfg: dict[str, Any]):
    """Wrap the model with LoRA on the configured groups; the projector is trained fully when
    `peft.projector=full` (it then travels as `modules_to_save`). Everything else is frozen."""
    from peft import LoraConfig, get_peft_model

    projector = peft_cfg.get("projector", "full")
    if projector not in ("full", "frozen"):
        raise ValueError(f"peft.projector={projector!r}: choose full or frozen")
    modules_to_save = None
    if projector == "full":
        # PEFT matches modules_to_save by name suffix: the projector's last path component.
        modules_to_save = [p.rsplit(".", 1)[-1] for p in family.module_groups["projector"]]
    config = LoraConfig(
        r=int(peft_cfg.get("r", 16)),
        lora_alpha=int(peft_cfg.get("alpha", 32)),
        lora_dropout=float(peft_cfg.get("dropout", 0.0)),
        target_modules=lora_target_regex(family, list(peft_cfg.get("targets", ["llm"])), peft_cfg.get("leaves")),
        modules_to_save=modules_to_save,
        bias="none",
        init_lora_weights=True,
    )
    return get_peft_model(model, config)


def adapter_state(model) -> dict[str, np.ndarray]:
    """The exchanged payload: trainable adapter tensors as fp32 numpy arrays, stable key names."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().to("cpu").float().numpy().copy() for k, v in state.items()}


def load_adapter_state(model, arrays: dict[str, np.ndarray]) -> None:
    """Load a payload into the model; keys must be exactly the model's adapter keys."""
    import torch
    from peft import set_peft_model_state_dict

    expected = set(adapter_state_keys(model))
    got = set(arrays)
    if got != expected:
        raise KeyError(
            f"adapter keys differ: missing {sorted(expected - got)[:3]}, unexpected {sorted(got - expected)[:3]}"
        )
    result = set_peft_model_state_dict(model, {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
    bad = [k for k in getattr(result, "unexpected_keys", []) or []]
    if bad:
        raise KeyError(f"adapter keys not loaded: {bad[:3]}")


def adapter_state_keys(model) -> list[str]:
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(model, save_embedding_layers=False))


def trainable_bytes(model) -> int:
    """Bytes of all trainable parameters as fp32 (what a client must send, exactly)."""
    return sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)


def payload_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of a payload's tensors."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))

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
        lora_alpha=float(peft_cfg.get("alpha", 32)),
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


def load_adapter_state(model, arrays: dict[str, np.ndarray], partial: bool = False) -> None:
    """Load a payload into the model; keys must be exactly the model's adapter keys
    (`partial`: a subset of them, e.g. FFA-LoRA's B tensors; the others keep their values)."""
    import torch

    params = adapter_params(model)
    got = set(arrays)
    missing, unexpected = set(params) - got, got - set(params)
    if unexpected or (missing and not partial):
        raise KeyError(
            f"adapter keys differ: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    with torch.no_grad():
        for k, v in arrays.items():
            p = params[k]
            if tuple(p.shape) != np.shape(v):
                raise ValueError(f"{k}: payload shape {np.shape(v)} != model shape {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.asarray(v)).to(p.dtype))


def payload_key(param_name: str) -> str:
    """The payload key of a parameter name: PEFT's state-dict naming, without the adapter name."""
    name = param_name.replace(".modules_to_save.default.", ".")
    return re.sub(r"\.(lora_[AB])\.default\.", r".\1.", name)


def adapter_params(model) -> dict[str, Any]:
    """Payload key -> the model parameter it is read from and loaded into (adapter tensors only)."""
    keys = set(adapter_state_keys(model))
    out = {}
    for name, p in model.named_parameters():
        k = payload_key(name)
        if k in keys and ".original_module." not in name:
            out[k] = p
    if set(out) != keys:
        raise KeyError(f"adapter keys without a parameter: {sorted(keys - set(out))[:3]}")
    return out


def llm_layer_index(key: str) -> int | None:
    """Index of the language-model decoder layer a payload key belongs to (None: not in one)."""
    m = re.search(r"language_model\.(?:model\.)?layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def init_lora_a(model, seed: int, keys=None) -> None:
    """Set LoRA A tensors to PEFT's default init (Kaiming-uniform, a=sqrt(5)) drawn from a
    generator seeded by `seed` and the key, so every process gets the same A (FFA-LoRA's shared
    frozen A; FLoRA's fresh local factors)."""
    import hashlib
    import math

    import torch

    params = adapter_params(model)
    with torch.no_grad():
        for k in sorted(keys if keys is not None else params):
            if ".lora_A." not in k:
                continue
            p = params[k]
            digest = int(hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()[:15], 16)
            gen = torch.Generator().manual_seed(digest)
            bound = 1 / math.sqrt(p.shape[1])  # kaiming_uniform_(a=sqrt(5)): gain*sqrt(3/fan_in)
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)


def adapter_state_keys(model) -> list[str]:
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(model, save_embedding_layers=False))


def trainable_bytes(model) -> int:
    """Bytes of all trainable parameters as fp32 (what a client must send, exactly)."""
    return sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)


def payload_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of a payload's tensors."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))

"""Parameters per module group, trainable adapter and bytes per round of a preset, on the meta device.

`fedmllm inspect model=<preset> peft=<variant>` and bench/payload.py read this. No weights are
read or downloaded: the model is instantiated from its config on the meta device and the PEFT
method applied there. The config comes from a local `model.path` directory's config.json (its
`model_type` picks the family, as loading does), else the preset's bundled `hf_config` file
(fedmllm/models/hub_configs/, hub presets), else the offline preset's build (built once on first
use, as any run would).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedmllm.algorithms import algorithm_of
from fedmllm.config import typed
from fedmllm.models.adapter import PeftSettings, adapter_params, apply_peft
from fedmllm.models.build import ensure_built
from fedmllm.models.load import ModelSettings, family_of
from fedmllm.models.random_init import HUB_CONFIGS, bundled_config
from fedmllm.models.registry import get_family  # importing fedmllm.models registers the families

MB = 1e6


def local_checkpoint(model_cfg: dict[str, Any]) -> Path | None:
    """`model.path` when it is a local checkpoint directory (with config.json), else None."""
    path = typed(ModelSettings, model_cfg, "model").path
    return Path(str(path)) if path and (Path(str(path)) / "config.json").is_file() else None


def family_of_preset(model_cfg: dict[str, Any]):
    """The family that loads the preset: a local `model.path`'s config.json `model_type` decides
    (as loading does), else `model.family`."""

    local = local_checkpoint(model_cfg)
    if local is not None:
        return family_of(model_cfg, str(local))
    return get_family(typed(ModelSettings, model_cfg, "model").family)


def hf_config(model_cfg: dict[str, Any]):
    """The Hugging Face config of a preset, without weights (see the module docstring for the order)."""
    model = typed(ModelSettings, model_cfg, "model")
    local = local_checkpoint(model_cfg)
    cls = family_of_preset(model_cfg).model_cls().config_class
    if local is not None:  # model.path=DIR wins over the preset's bundled config or builder
        return cls.from_pretrained(local)
    if model.hf_config:  # a random-init build's shape: its model.num_layers and model.vocab_size
        shape = (model.num_layers, model.vocab_size) if model.random_init else ()
        return bundled_config(cls, str(model.hf_config), model.name, *shape)
    if model.builder:
        return cls.from_pretrained(ensure_built(model_cfg))
    raise ValueError(
        f"preset {model.name!r} has no config available offline: add `hf_config: <preset>.json` "
        f"to its yaml with the checkpoint's config.json in {HUB_CONFIGS}, or set model.path=DIR to a local copy"
    )


def meta_model(model_cfg: dict[str, Any]):
    """(model on the meta device, family): shapes and names only, no memory, no weights."""
    import torch

    family = family_of_preset(model_cfg)
    config = hf_config(model_cfg)
    with torch.device("meta"):
        return family.model_cls()(config), family


def _adapter_sizes(model, family, peft_cfg: dict[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
    """(payload key -> numel, module group -> trainable params) of a meta-device model under
    `peft_cfg` (the model is wrapped in place)."""

    with warnings.catch_warnings():  # PEFT calls transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing")
        peft_model = apply_peft(model, family, peft_cfg)
    sizes = {k: p.numel() for k, p in adapter_params(peft_model).items()}
    by_group: dict[str, int] = {}
    for k, n in sizes.items():
        group = family.group_of(k.removeprefix("base_model.model.")) or "other"
        by_group[group] = by_group.get(group, 0) + n
    return sizes, by_group


def footprint(cfg: dict[str, Any]) -> dict[str, Any]:
    """What one client holds, trains and exchanges per round, for a composed config.

    Bytes are fp32 tensors (the payload contract). Up/down follow the aggregator's protocol
    (its algorithm's `traffic`, fedmllm.algorithms): FFA-LoRA never sends A; FedSA-LoRA sends A down but A and B up
    (B only for the server's evaluation); SCAFFOLD adds a control variate of the adapter's size
    each way; FLoRA sends the client's own rank-r factors up and the rank-max_rank global down.
    """

    model_cfg, peft = cfg["model"], typed(PeftSettings, cfg["peft"], "peft")
    model, family = meta_model(model_cfg)
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():  # tied weights are counted once
        g = family.group_of(name) or "other"
        groups[g] = groups.get(g, 0) + p.numel()
    total = sum(groups.values())
    algorithm = algorithm_of(cfg)
    sizes, trainable_groups = _adapter_sizes(model, family, algorithm.server_peft(cfg))
    shared = sum(n for k, n in sizes.items() if algorithm.travels(k))

    def own() -> int:  # a client's own rank-r adapter (FLoRA's fresh factors)
        r = algorithm.client_rank(cfg, 0)
        return sum(_adapter_sizes(*meta_model(model_cfg), replace(peft, r=r))[0].values())

    up, down = algorithm.traffic(shared, sum(sizes.values()), own)
    return {
        "preset": typed(ModelSettings, model_cfg, "model").name,
        "peft": peft.name,
        "aggregator": algorithm.name,
        "groups": groups,
        "total_params": total,
        "trainable_params": sum(sizes.values()),
        "trainable_by_group": trainable_groups,
        "tensors": len(sizes),
        "bytes_up": 4 * up,
        "bytes_down": 4 * down,
        "full_bytes": 4 * total,
    }


def format_footprint(f: dict[str, Any]) -> str:
    """The table `fedmllm inspect` prints."""
    lines = [
        f"model {f['preset']}  peft {f['peft']}  aggregator {f['aggregator']}  (meta device, no weights)",
        f"{'module group':<16} {'params':>15} {'trainable':>13}",
    ]
    for g, n in f["groups"].items():
        lines.append(f"{g:<16} {n:>15,} {f['trainable_by_group'].get(g, 0):>13,}")
    lines.append(
        f"{'total':<16} {f['total_params']:>15,} {f['trainable_params']:>13,}  "
        f"({100 * f['trainable_params'] / f['total_params']:.3f}% trainable, {f['tensors']} tensors)"
    )
    per_round = f["bytes_up"] + f["bytes_down"]
    lines.append(
        f"per client per round: up {f['bytes_up'] / MB:.3f} MB + down {f['bytes_down'] / MB:.3f} MB "
        f"= {per_round / MB:.3f} MB (fp32); the full model in fp32 is {f['full_bytes'] / MB:,.1f} MB "
        f"(adapter / full = {f['bytes_up'] / f['full_bytes']:.5f})"
    )
    return "\n".join(lines)

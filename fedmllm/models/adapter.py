"""PEFT application and the adapter <-> arrays contract (only trainable adapter tensors travel)."""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import numpy as np

from fedmllm.config import ConfigError, Number, integer, need, number, typed
from fedmllm.models.registry import MODULE_GROUPS, Family

# peft=<variant>: the PEFT method behind each config file in conf/peft/.
METHODS = ("lora", "dora", "rslora", "ia3")
PROJECTOR_POLICIES = ("frozen", "lora", "full")


@dataclass
class PeftSettings:
    """`peft`: the adapter method and where it goes (fedmllm/conf/peft/*.yaml; IA3 has no rank,
    alpha or dropout, only IA3 has `feedforward`)."""

    name: str = "lora"
    r: Optional[int] = 16  # ia3: unused
    alpha: Optional[Number] = 32
    dropout: Optional[Number] = 0.0
    targets: List[str] = field(default_factory=lambda: ["llm"])
    leaves: Optional[List[str]] = None
    vision_leaves: Optional[List[str]] = None
    projector: str = "full"
    feedforward: Optional[List[str]] = None  # ia3

    @property
    def rank(self) -> int:
        """The LoRA rank (0 for IA3, which has none)."""
        return 0 if self.name == "ia3" else int(self.r)

    def __post_init__(self) -> None:
        need(self.name in METHODS, f"peft={self.name!r}: choose one of {list(METHODS)}")
        need(
            self.projector in PROJECTOR_POLICIES,
            f"peft.projector={self.projector!r}: choose frozen, lora (adapter on its linear layers) or "
            "full (trained and federated whole)",
        )
        targets = list(self.targets or [])
        need(
            bool(targets) and all(t in MODULE_GROUPS for t in targets),
            f"peft.targets={targets!r}: list module groups from {['llm', 'vision_encoder']} (e.g. peft.targets=[llm])",
        )
        need(
            "projector" not in targets,
            "peft.targets lists projector; set the connector with peft.projector=lora|full|frozen instead",
        )
        if self.name != "ia3":
            for key in ("r", "alpha"):
                v = getattr(self, key)
                need(number(v) and v > 0, f"peft.{key}={v!r} must be a number > 0 for peft={self.name}")
            need(integer(self.r), f"peft.r={self.r!r} must be an integer >= 1")
            d = self.dropout
            need(number(d) and 0 <= d < 1, f"peft.dropout={d!r} must be a number in [0, 1)")
        else:
            ff = list(self.feedforward or [])
            extra = sorted(set(ff) - set(self.leaves or []))
            need(
                not extra,
                f"peft.feedforward={ff!r} names layers not in peft.leaves={self.leaves!r}; "
                "IA3 scales the inputs of feed-forward layers among its targets, so add them to peft.leaves",
            )


def method_of(peft: PeftSettings | dict[str, Any]) -> str:
    """The PEFT method of a `peft` config section (`name`, default lora)."""
    return typed(PeftSettings, peft, "peft").name


def peft_problem(peft: PeftSettings | dict[str, Any]) -> str | None:
    """What is wrong with a `peft` section (PeftSettings' checks), or None."""
    try:
        typed(PeftSettings, peft, "peft")
    except ConfigError as err:
        return str(err)
    return None


def lora_target_regex(
    family: Family, targets: list[str], leaves: list[str] | None = None, vision_leaves: list[str] | None = None
) -> str:
    """Regex over full module names: inside the `llm` group `leaves` (default: the family's LoRA
    targets), inside `vision_encoder` `vision_leaves` (default: the family's vision targets)."""
    by_group = {
        "llm": list(leaves or family.lora_targets),
        "vision_encoder": list(vision_leaves or family.vision_lora_targets),
    }
    parts = []
    for g in targets:
        pre = "|".join(re.escape(p) for p in family.module_groups[g] if p != "lm_head")
        parts.append(rf"^({pre})\..*\.({'|'.join(map(re.escape, by_group[g]))})$")
    return "|".join(f"(?:{p})" for p in parts)


def check_targets(model, family: Family, peft_cfg: PeftSettings | dict[str, Any]) -> None:
    """Raise ValueError naming a `peft.targets` group in which no layer got an adapter."""
    peft = typed(PeftSettings, peft_cfg, "peft")
    adapted = [n for n, _ in model.named_modules() if n.endswith(("lora_A", "ia3_l"))]
    for g in peft.targets:
        prefixes = tuple("base_model.model." + p + "." for p in family.module_groups[g])
        if not any(n.startswith(prefixes) for n in adapted):
            key = "leaves" if g == "llm" else "vision_leaves"
            want = getattr(peft, key) or (family.lora_targets if g == "llm" else family.vision_lora_targets)
            raise ValueError(
                f"peft.targets includes {g}, but no layer of {family.name}'s {g} is named "
                f"{list(want)}; set peft.{key} to its linear layers' names"
            )


def projector_linears(model, family: Family) -> list[str]:
    """Full names of the projector's linear layers (`peft.projector=lora` puts the adapter there)."""
    import torch

    prefixes = family.module_groups["projector"]
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(n == p or n.startswith(p + ".") for p in prefixes)
    ]
    if not names:
        raise ValueError(
            f"peft.projector=lora: family {family.name!r} has no linear layer under {list(prefixes)}; "
            "use peft.projector=full or frozen"
        )
    return names


def peft_config(model, family: Family, peft_cfg: PeftSettings | dict[str, Any]):
    """The PEFT library config of a `peft` section (method, targets by module group, projector policy)."""
    from peft import IA3Config, LoraConfig

    settings = typed(PeftSettings, peft_cfg, "peft")
    method, projector = settings.name, settings.projector
    targets = lora_target_regex(family, list(settings.targets), settings.leaves, settings.vision_leaves)
    if projector == "lora":
        exact = "|".join(re.escape(n) for n in projector_linears(model, family))
        targets = rf"(?:{targets})|(?:^({exact})$)"
    # PEFT matches modules_to_save by name suffix: the projector's last path component.
    modules_to_save = [p.rsplit(".", 1)[-1] for p in family.module_groups["projector"]] if projector == "full" else None
    if method == "ia3":
        ff = list(settings.feedforward or [])
        # IA3 scales a feed-forward layer's input (down_proj), an attention layer's output (k, v).
        feedforward = lora_target_regex(family, ["llm"], ff) if ff else None
        return IA3Config(target_modules=targets, feedforward_modules=feedforward or [], modules_to_save=modules_to_save)
    return LoraConfig(
        r=int(settings.r),
        lora_alpha=float(settings.alpha),
        lora_dropout=float(settings.dropout),
        target_modules=targets,
        modules_to_save=modules_to_save,
        bias="none",
        init_lora_weights=True,
        use_dora=method == "dora",
        use_rslora=method == "rslora",  # scale alpha/sqrt(r) instead of alpha/r
    )


def apply_peft(model, family: Family, peft_cfg: dict[str, Any]):
    """Wrap the model with the configured PEFT method (`peft.name`: lora, dora, rslora, ia3) on
    the `peft.targets` module groups; the projector is frozen, adapted (`peft.projector=lora`) or
    trained fully (`full`: it then travels as `modules_to_save`). Everything else is frozen."""
    from peft import get_peft_model

    model = get_peft_model(model, peft_config(model, family, peft_cfg))
    check_targets(model, family, peft_cfg)
    return model


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
        raise KeyError(f"adapter keys differ: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for k, v in arrays.items():
            p = params[k]
            if tuple(p.shape) != np.shape(v):
                raise ValueError(f"{k}: payload shape {np.shape(v)} != model shape {tuple(p.shape)}")
            src = np.asarray(v)
            if not src.flags.writeable:  # a zero-copy view of a Flower message's bytes (read-only)
                src = src.copy()  # torch.from_numpy needs writable memory; the adapter is small
            p.copy_(torch.from_numpy(src).to(p.dtype))


def payload_key(param_name: str) -> str:
    """The payload key of a parameter name: PEFT's state-dict naming, without the adapter name."""
    name = param_name.replace(".modules_to_save.default.", ".")
    name = re.sub(r"\.(lora_[AB])\.default\.", r".\1.", name)
    name = re.sub(r"\.lora_magnitude_vector\.default\.weight$", ".lora_magnitude_vector", name)  # DoRA
    return re.sub(r"\.ia3_l\.default$", ".ia3_l", name)  # IA3


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


LLM_LAYER = r"(?:language_model|text_model)\.(?:model\.)?layers\.(\d+)\."


def llm_layer_index(key: str) -> int | None:
    """Index of the language-model decoder layer a payload key belongs to (None: not in one).
    The decoder is `language_model` in every family but idefics3 (`text_model`); vision encoders'
    `layers.N` never match (tests hold every registered family's `llm` group to these names)."""
    m = re.search(LLM_LAYER, key)
    return int(m.group(1)) if m else None


def init_lora_a(model, seed: int, keys=None) -> None:
    """Set LoRA A tensors to PEFT's default init (Kaiming-uniform, a=sqrt(5)) drawn from a
    generator seeded by `seed` and the key, so every process gets the same A (FFA-LoRA's shared
    frozen A; FLoRA's fresh local factors)."""

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


def save_peft(model, out: Path, *, base: str | None = None, processor=None, files: tuple[Path, ...] = ()) -> Path:
    """Write the model's adapter in PEFT format into `out` (loadable with
    `PeftModel.from_pretrained(base, out)`): `base` is what adapter_config.json names as the base
    model, `processor` is saved beside it, `files` are linked or copied in. Written aside, then
    renamed: a crash mid-write never leaves a half adapter under `out`."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if base is not None:
        for config in getattr(model, "peft_config", {}).values():
            config.base_model_name_or_path = base
    model.save_pretrained(tmp, save_embedding_layers=False)
    if processor is not None:
        processor.save_pretrained(tmp)
    for src in files:
        _link_or_copy(Path(src), tmp / Path(src).name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)

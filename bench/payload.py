"""Adapter bytes per round vs full-model bytes, per preset, computed on the meta device.

    python bench/payload.py [preset ...]     (default: every offline preset)

No weights are loaded: the model is instantiated from its config on the meta device, the
configured PEFT method applied, and parameters counted. Offline presets are built first if
their config is not cached yet (smol-llava: about a minute, once).
"""

from __future__ import annotations

import argparse


def count(preset: str) -> dict:
    import torch
    from transformers import AutoConfig

    from fedmllm.config import compose
    from fedmllm.models.adapter import apply_peft
    from fedmllm.models.load import resolve_path
    from fedmllm.models.registry import get_family

    cfg = compose([f"model={preset}"])
    family = get_family(cfg["model"]["family"])
    config = AutoConfig.from_pretrained(resolve_path(cfg["model"]))
    with torch.device("meta"):
        model = family.model_cls()(config)
    total = sum(p.numel() for p in model.parameters())
    peft_model = apply_peft(model, family, cfg["peft"])
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    lm = sum(p.numel() for n, p in model.named_parameters() if family.group_of(n.replace("base_model.model.", "")) == "llm")
    return {"preset": preset, "total_params": total, "llm_params": lm, "adapter_params": trainable,
            "adapter_bytes": trainable * 4, "full_bytes": total * 4}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("presets", nargs="*", default=["tiny-llava", "smol-llava"])
    args = p.parse_args()
    print(f"{'preset':<12} {'params':>12} {'adapter':>10} {'adapter MB/round':>17} {'full fp32 MB':>13} {'ratio':>8}")
    for preset in args.presets:
        r = count(preset)
        print(f"{r['preset']:<12} {r['total_params']:>12,} {r['adapter_params']:>10,} "
              f"{r['adapter_bytes'] / 1e6:>17.2f} {r['full_bytes'] / 1e6:>13.2f} "
              f"{r['adapter_bytes'] / r['full_bytes']:>8.4f}")
    print("adapter MB/round: bytes each client sends per round (= bytes it receives); "
          "ratio: adapter bytes / full-model fp32 bytes")


if __name__ == "__main__":
    main()

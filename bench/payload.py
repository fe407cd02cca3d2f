"""Adapter bytes per round vs the full model, for every preset x PEFT variant, on the meta device.

    python bench/payload.py [--presets P ...] [--variants V ...]   (default: every conf/model and conf/peft file)

The same code as `fedmllm inspect` (fedmllm.models.inspection.footprint): no weights are loaded;
hub presets use their bundled config, offline presets their build (built once if missing; smol-llava
about a minute). Aggregator fedavg: each client sends the adapter up and receives it down.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CONF = Path(__file__).parents[1] / "fedmllm" / "conf"


def main() -> None:
    from fedmllm.config import compose
    from fedmllm.models.inspection import footprint

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="*", default=sorted(f.stem for f in (CONF / "model").glob("*.yaml")))
    p.add_argument("--variants", nargs="*", default=sorted(f.stem for f in (CONF / "peft").glob("*.yaml")))
    args = p.parse_args()
    print(
        "| preset | peft | params | trainable | trainable % | MB up per client per round | "
        "MB up+down | full model fp32 MB | adapter / full |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        for variant in args.variants:
            f = footprint(compose([f"model={preset}", f"peft={variant}", "aggregator=fedavg"]))
            print(
                f"| {preset} | {variant} | {f['total_params']:,} | {f['trainable_params']:,} | "
                f"{100 * f['trainable_params'] / f['total_params']:.3f} | {f['bytes_up'] / 1e6:.3f} | "
                f"{(f['bytes_up'] + f['bytes_down']) / 1e6:.3f} | {f['full_bytes'] / 1e6:,.1f} | "
                f"{f['bytes_up'] / f['full_bytes']:.5f} |",
                flush=True,
            )
    print(
        "\nBytes are fp32 tensors (the payload contract); projector policy as in each peft file "
        "(full: the projector travels whole). adapter / full: bytes up / full-model fp32 bytes."
    )


if __name__ == "__main__":
    main()

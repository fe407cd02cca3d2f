"""Model load time per fresh process: 4-bit from the pre-quantized cache vs quantizing full-precision weights.

    python bench/load.py [--repeats 3] [preset ...]     (default: smol-llava tiny-llava)

In a deployment every round starts a fresh client process, so this load is on each round's
critical path. Each measurement is a new Python process that imports torch, bitsandbytes and the
model's modeling module first (not timed: the same in every mode) and then times `load_model`
(weights + processor, the same call clients make); `process s` is the whole process, imports included:
- `quantize`: full-precision safetensors -> NF4 at load time (`model.quantized_cache=false`),
- `cached`: the packed NF4 model saved by the first 4-bit load (`$FEDMLLM_CACHE/quantized/...`),
- `fp32`: the unquantized model, for reference.
The modes alternate within each repeat, so machine load hits them alike; medians are printed
with the ratio quantize / cached, measured side by side in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("quantize", "cached", "fp32")


def child(preset: str, mode: str) -> None:
    import bitsandbytes  # noqa: F401  (imports are not what we measure: ~3 s of torch.compile set-up)
    import torch  # noqa: F401

    from fedmllm.config import compose
    from fedmllm.models.load import load_model
    from fedmllm.models.registry import get_family

    cfg = compose([f"model={preset}"])["model"]
    get_family(cfg["family"]).model_cls()  # imports the HF modeling module
    cfg = dict(cfg, quantization="none" if mode == "fp32" else "4bit", quantized_cache=mode == "cached")
    t = time.perf_counter()
    model, _, _ = load_model(cfg)
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "source": model.config._name_or_path}))


def measure(preset: str, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", preset, mode]
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["process"] = time.perf_counter() - start
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("presets", nargs="*", default=["smol-llava", "tiny-llava"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", nargs=2, metavar=("PRESET", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    print(f"{'preset':<12} {'mode':<9} {'load s (median)':>16} {'process s':>10}  source")
    for preset in args.presets:
        measure(preset, "cached")  # warm-up: builds the preset and the 4-bit cache once
        times: dict[str, list[float]] = {m: [] for m in MODES}
        procs: dict[str, list[float]] = {m: [] for m in MODES}
        sources = {}
        for _ in range(args.repeats):
            for mode in MODES:
                row = measure(preset, mode)
                times[mode].append(row["seconds"])
                procs[mode].append(row["process"])
                sources[mode] = row["source"]
        for mode in MODES:
            print(
                f"{preset:<12} {mode:<9} {statistics.median(times[mode]):>16.3f} "
                f"{statistics.median(procs[mode]):>10.2f}  {sources[mode]}"
            )
        assert Path(sources["cached"]).parent.name == "quantized", "the cached mode did not load the 4-bit cache"
        ratio = statistics.median(times["quantize"]) / statistics.median(times["cached"])
        print(
            f"{preset:<12} quantize/cached load-time ratio: {ratio:.2f}x "
            f"(per-run quantize {['%.2f' % t for t in times['quantize']]}, cached {['%.2f' % t for t in times['cached']]})"
        )


if __name__ == "__main__":
    main()

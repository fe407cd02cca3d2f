"""Every hub preset, shape-faithful without its weights, on this machine's CPU.

    python bench/hub_presets.py [--presets llava-1.5-7b ...] [--out hub.json]

Per preset (`model.random_init=true`, one decoder and one vision layer, a 1,024-token vocabulary:
every width, head count and resolution the checkpoint's): the build into an empty cache (random
weights, saved, then quantized to 4-bit NF4), the image tokens of one photo per size at the
preset's token budget (its processor, held against the family's formula), and one federated round
of two clients in this process at the budget tests/test_hub_presets.py uses (1 step of batch 1
each, the held-out sample scored with and without its image at rounds 0 and 1). Then what
`fedmllm inspect` predicts for a client step at full depth, batch 1 and 4.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
SHAPE = ["model.random_init=true", "model.num_layers=1", "model.vocab_size=1024"]


def measure(preset: str, memes: Path, work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from inprocess import run_in_process
    from PIL import Image
    from test_hub_presets import ROUND_BUDGET, SIZES, round_overrides

    from fedmllm.config import compose
    from fedmllm.data.fixtures import photo
    from fedmllm.models import clear_cache
    from fedmllm.models.load import load_model
    from fedmllm.models.memory import predict_peak

    cfg = compose([f"model={preset}", *SHAPE])
    t = time.perf_counter()
    model, processor, family = load_model(cfg["model"])  # builds, saves, quantizes into the cache
    build_s = time.perf_counter() - t
    tokens = {}
    for w, h in SIZES:
        prompt = family.prompt(processor, "system", "Is this meme hateful?", True)
        image = Image.open(io.BytesIO(photo(w, h))).convert("RGB")
        ids = family.encode(processor, [prompt], [image])["input_ids"]
        tokens[f"{w}x{h}"] = int((ids == processor.tokenizer.convert_tokens_to_ids(family.image_token)).sum())
    del model
    clear_cache()
    t = time.perf_counter()
    run = run_in_process(round_overrides(preset, memes, work / preset))
    round_s = time.perf_counter() - t
    row = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    full = compose([f"model={preset}"])
    mode = "checkpointing" if full["train"]["gradient_checkpointing"] else "no_checkpointing"
    predicted = {f"batch{b}": round(predict_peak(full, batch_size=b)["modes"][mode]["peak"] / 1e9, 2) for b in (1, 4)}
    return {
        "build_s": round(build_s, 1),
        "image_tokens": tokens,
        "round_s": round(round_s, 1),
        "round_budget": ROUND_BUDGET.get(preset, []),
        "client_image_tokens": [c.get("image-tokens") for c in row["clients"]],
        "train_loss": row["train_loss"],
        "predicted_peak_gb": predicted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from test_hub_presets import HUB, SIZES

    from fedmllm.data.fixtures import write_hateful_memes

    work = Path(tempfile.mkdtemp(prefix="hub-presets-"))
    os.environ["FEDMLLM_CACHE"] = str(work / "cache")  # an empty cache: the build is measured
    memes = write_hateful_memes(work / "hm", n_rows=8, seed=0, photo_sizes=SIZES)
    results = {}
    for preset in args.presets or HUB:
        results[preset] = measure(preset, memes, work)
        print(json.dumps({preset: results[preset]}), flush=True)
    sizes = [f"{w}x{h}" for w, h in SIZES]
    print(
        f"\n{'preset':22} {'build s':>8} {'round s':>8}  image tokens at " + ", ".join(sizes) + "  predicted GB b1/b4"
    )
    for preset, r in results.items():
        toks = "/".join(str(r["image_tokens"][s]) for s in sizes)
        pred = f"{r['predicted_peak_gb']['batch1']}/{r['predicted_peak_gb']['batch4']}"
        print(f"{preset:22} {r['build_s']:>8} {r['round_s']:>8}  {toks}  {pred}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

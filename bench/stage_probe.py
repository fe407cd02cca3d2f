"""Issue 3 probe: can smol-llava + LoRA learn easy-vqa's balanced yes/no questions centrally, and
does a LoRA trained on the captions *as text* transfer to the stage-1 image tokens?

    python bench/stage_probe.py --mode text2img --steps 100 --every 50   # ~25 min on 2 idle cores

Modes (train -> evaluate, held-out: 200 test-split questions, seed 0):
- text: "The image shows a <colour> <shape>. <question>" with no image -> the same, captioned;
- image: the questions with their images (stage-1 base) -> the same;
- text2img: captioned text, no image -> the questions with their images (stage-1 base), i.e.
  whether the image tokens that stage 1 aligned with the caption words stand in for them.
Training draws from the whole training split (a learnability probe, not the federated setup);
fp32, LoRA r=16 on all seven linear layers of the LM by default, AdamW restarted every `--every`
steps (as each federated round restarts it). Prints accuracy, the share answered "yes" and, for
image evaluation, the accuracy with the image removed, every `--every` steps.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def captioned(split: str):
    """The balanced yes/no questions with the image replaced by its caption as text."""
    from fedmllm.data.easyvqa import image_attributes, yesno_samples

    attrs = image_attributes(split)
    out = []
    for s in yesno_samples(split, balanced=True):
        i = int(s["id"].split("-")[1])
        if i in attrs:  # a few images lack an easy-vqa colour question
            shape, color = attrs[i]
            out.append({**s, "image": None, "text": f"The image shows a {color} {shape}. {s['text']}"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("text", "image", "text2img"), default="text2img")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--leaves", default=ALL_LINEAR)
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides")
    args = ap.parse_args()

    from fedmllm.algorithms import server_peft
    from fedmllm.config import compose
    from fedmllm.data.collate import Collator
    from fedmllm.data.easyvqa import YESNO, yesno_samples
    from fedmllm.evaluation.scoring import score_options
    from fedmllm.models import get_model
    from fedmllm.stages.cache import model_config
    from fedmllm.stages.vision import ensure_pretrained
    from fedmllm.training import train_steps

    overrides = ["model=smol-llava", "model.quantization=none", f"peft.leaves=[{args.leaves}]", *args.overrides]
    if args.mode == "text":
        overrides.append("server_stage=none")  # no image anywhere: the vision side does not matter
    cfg = compose(overrides)
    ensure_pretrained(cfg)  # the stage-1 base (cached after its first build)
    lm = get_model(model_config(cfg), server_peft(cfg))
    train = yesno_samples("train", balanced=True) if args.mode == "image" else captioned("train")
    test = captioned("test") if args.mode == "text" else yesno_samples("test", balanced=True)
    random.Random(0).shuffle(test)
    test = test[:200]
    labels = np.array([s["label"] for s in test])
    collator = Collator(lm.processor, lm.family, YESNO)

    def evaluate() -> str:
        pred = score_options(lm.model, collator, test, batch_size=50).argmax(1)
        line = f"accuracy {(pred == labels).mean():.3f} | answered yes {(pred == 1).mean():.3f}"
        if args.mode != "text":
            pred = score_options(lm.model, collator, test, batch_size=50, drop_image=True).argmax(1)
            line += f" | no image {(pred == labels).mean():.3f}"
        return line

    print(f"{args.mode}: lr {args.lr}, batch {args.batch_size}, leaves {args.leaves}", flush=True)
    print(f"step 0 | {evaluate()}", flush=True)
    train_cfg = {"local_steps": args.every, "batch_size": args.batch_size, "lr": args.lr, "max_grad_norm": 1.0}
    t0 = time.time()
    for k in range(args.steps // args.every):
        loss = train_steps(lm.model, collator, train, train_cfg, seed=k)["train-loss"]
        print(f"step {(k + 1) * args.every} | loss {loss:.3f} | {evaluate()} | {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

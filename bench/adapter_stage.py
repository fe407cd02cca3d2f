"""Issue 3: the server's adapter pre-training (`server_stage.pretrain.lora`) alone, for choosing its
settings: builds stage 1 if needed, trains the initial adapter on the public questions with the
captions as text (or loads it from the cache), then scores the held-out questions with their
images and with the image removed.

    python bench/adapter_stage.py server_stage.pretrain.lora.lr=2e-3 server_stage.pretrain.lora.steps=70

Arguments are Hydra overrides of the run config (default: the demo's). Prints the loss per 10
steps (the LM sits at chance, loss ~0.36, until it starts reading the caption, then drops),
the held-out text accuracy on public questions, and the held-out accuracy with / without the image.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main() -> None:
    import torch

    from fedmllm.algorithms import server_peft
    from fedmllm.config import compose
    from fedmllm.data import load_task
    from fedmllm.data.collate import Collator
    from fedmllm.models import get_model
    from fedmllm.server.evaluate import evaluate
    from fedmllm.stages.adapter import ensure_adapter_pretrained
    from fedmllm.stages.cache import model_config
    from fedmllm.stages.vision import ensure_pretrained

    if {"-h", "--help"} & set(sys.argv[1:]):
        raise SystemExit(__doc__)
    cfg = compose(sys.argv[1:])
    ensure_pretrained(cfg)
    torch.manual_seed(cfg["seed"])  # as run_server: the same initial LoRA A
    lm = get_model(model_config(cfg), server_peft(cfg))
    task, _, heldout = load_task(cfg["dataset"], cfg["seed"])
    collator = Collator(lm.processor, lm.family, task)
    summary = ensure_adapter_pretrained(cfg, lm, collator)
    if summary is None:
        raise SystemExit("server_stage.pretrain.lora is off for this config")
    losses = summary["losses"]
    print("loss per 10 steps:", [round(float(np.mean(losses[i : i + 10])), 3) for i in range(0, len(losses), 10)])
    metrics = evaluate(lm.model, collator, heldout, None, cfg["train"]["eval_batch_size"])
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}))
    print(
        f"held-out accuracy {metrics['accuracy']:.3f} | no image {metrics['accuracy_no_image']:.3f} | "
        f"stage {summary['build_seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()

"""Global alignment, `server_stage.align`: after aggregation, the server fine-tunes the global
adapter on the public task samples for a few steps (the clients' trainer)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from fedmllm.config import typed
from fedmllm.models.adapter import adapter_state, load_adapter_state
from fedmllm.models.quantize import dequantized
from fedmllm.stages import AlignSettings
from fedmllm.training import PLAIN_LOOP, TrainSettings, round_seed, train_steps


class Aligner:
    """Global alignment: after aggregation, fine-tune the global adapter on the public task
    samples for `align.local_steps` steps (same trainer as the clients); returns the new adapter."""

    def __init__(self, cfg: dict[str, Any], lm, collator, public_samples):
        self.cfg = cfg
        self.lm = lm
        self.collator = collator
        self.samples = public_samples
        align = typed(AlignSettings, cfg["server_stage"]["align"], "server_stage.align")
        self.train = replace(
            typed(TrainSettings, cfg["train"], "train"),
            **PLAIN_LOOP,
            local_steps=align.local_steps,
            batch_size=align.batch_size,
            lr=align.lr,
        )
        self.rounds = align.rounds
        if not public_samples:
            raise ValueError("server_stage.align needs public samples: set dataset.public_fraction > 0 (e.g. 0.5)")

    def __call__(self, server_round: int, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray] | None, dict]:
        """The aligned adapter and its cost, or (None, {}) in a round that `align.rounds` skips."""
        if self.rounds == "last" and server_round != self.cfg["num_rounds"]:
            return None, {}
        t0 = time.time()
        load_adapter_state(self.lm.model, arrays)
        # a partition id no client has: the server's batches differ from every client's
        seed = round_seed(self.cfg["seed"], server_round, 99_991)
        with dequantized(self.lm.model):  # on the CPU: 4-bit weights unpacked once per alignment
            result = train_steps(self.lm.model, self.collator, self.samples, self.train, seed)
        out = adapter_state(self.lm.model)
        return out, {"align_seconds": round(time.time() - t0, 2), "align_loss": result["train-loss"]}

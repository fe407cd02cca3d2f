"""MLLM-FL's server-side stages on the server's public pool (disjoint from every client's data):

- vision.py, stage 1 (`server_stage.pretrain`): the vision tower and projector learn to make image
  tokens mean something to the frozen language model, before round 1;
- adapter.py, adapter pre-training (`server_stage.pretrain.lora`): the initial global adapter,
  trained on the public questions with each image's caption as text (a CheckGate decides when
  it scores its held-out questions and stops);
- align.py, global alignment (`server_stage.align`): after aggregation, a few steps on the public
  task samples;
- cache.py, where their results live (keyed by everything that shapes them); captions.py, their data.

Every stage trains through fedmllm.training's one loop (`optimize`; `train_steps` for the adapter).
No flwr (bench/gpu.py runs the stages on a GPU machine without it). This package file holds the
`server_stage` settings and imports no trainer, so the ClientApp can read `stages.cache` without
loading them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from fedmllm.config import Number, integer, need, number

OBJECTIVES = ("embed", "caption")
ALIGN_ROUNDS = ("all", "last")


@dataclass
class AdapterStageSettings:
    """`server_stage.pretrain.lora`: the initial global adapter, trained on the public questions."""

    enabled: bool = False
    steps: int = 150
    batch_size: int = 16
    lr: Number = 1e-3
    eval_every: int = 0
    check_gate: Optional[Number] = None
    stop_accuracy: Optional[Number] = None
    eval_samples: int = 100

    def check(self) -> None:
        """Checked when stage 1 runs (the stage trains on its result)."""
        if not self.enabled:
            return
        for key in ("steps", "batch_size"):
            v = getattr(self, key)
            need(
                integer(v) and v >= 1,
                f"server_stage.pretrain.lora.{key}={v!r} must be an integer >= 1 "
                "(or server_stage.pretrain.lora.enabled=false)",
            )
        need(number(self.lr) and self.lr > 0, f"server_stage.pretrain.lora.lr={self.lr!r} must be a number > 0")
        every, target, gate = self.eval_every, self.stop_accuracy, self.check_gate
        need(
            integer(every) and every >= 0,
            f"server_stage.pretrain.lora.eval_every={every!r} must be an integer >= 0 (0: no checks)",
        )
        need(
            target is None or (number(target) and 0 < target <= 1),
            f"server_stage.pretrain.lora.stop_accuracy={target!r} must be in (0, 1], or null to run every step",
        )
        need(
            gate is None or (number(gate) and 0 <= gate <= 1),
            f"server_stage.pretrain.lora.check_gate={gate!r} must be in [0, 1], or null to check every eval_every steps",
        )


@dataclass
class PretrainSettings:
    """`server_stage.pretrain`: stage 1 (vision tower + projector on the public images)."""

    enabled: bool = False
    objective: str = "embed"
    steps: int = 900
    batch_size: int = 64
    lr: Number = 1e-3
    warmup: Optional[int] = None  # default: steps // 20
    temperature: Number = 20.0
    augment: bool = True
    lora: AdapterStageSettings = field(default_factory=AdapterStageSettings)

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        need(
            self.objective in OBJECTIVES,
            f"server_stage.pretrain.objective={self.objective!r}: choose embed or caption",
        )
        for key in ("steps", "batch_size"):
            v = getattr(self, key)
            need(integer(v) and v >= 1, f"server_stage.pretrain.{key}={v!r} must be an integer >= 1")
        self.lora.check()


@dataclass
class AlignSettings:
    """`server_stage.align`: global alignment after aggregation."""

    enabled: bool = False
    rounds: str = "all"
    local_steps: int = 6
    batch_size: int = 8
    lr: Number = 2e-4

    def __post_init__(self) -> None:
        if self.enabled:
            need(
                self.rounds in ALIGN_ROUNDS,
                f"server_stage.align.rounds={self.rounds!r}: choose all or last",
            )


@dataclass
class ServerStageSettings:
    """`server_stage`: none, pretrain or pretrain_align (fedmllm/conf/server_stage/*.yaml)."""

    name: str = "none"
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    align: AlignSettings = field(default_factory=AlignSettings)

    @property
    def enabled(self) -> bool:
        """Whether any stage trains on the server's public pool."""
        return self.pretrain.enabled or self.align.enabled

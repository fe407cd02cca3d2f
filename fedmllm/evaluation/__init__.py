"""Option scoring, answer parsing and metrics; the `eval` settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedmllm.config import Number, integer, need, number, rate
from fedmllm.partitioning.scenarios import EVAL_SCENARIOS

MODES = ("score", "generate")
PROTOCOLS = ("ours", "fedmllm")


@dataclass
class FedMLLMSampling:
    """`eval.fedmllm`: how eval.protocol=fedmllm samples answers (MiniCPM-V's chat defaults)."""

    temperature: Number = 0.7
    top_p: Number = 0.8
    top_k: int = 100
    repetition_penalty: Number = 1.05
    seed: int = 0


@dataclass
class EvalSettings:
    """`eval`: the server's held-out evaluation (fedmllm/conf/config.yaml says what each does)."""

    mode: str = "score"
    protocol: str = "ours"
    max_new_tokens: int = 8
    scenario: str = "aligned"
    mrate: Number = 0.0
    fedmllm: FedMLLMSampling = field(default_factory=FedMLLMSampling)
    # > 0: every client holds this share of its partition out of training and evaluates its own
    # model on it (Flower's client-side evaluation), every eval_every rounds and the last
    client_fraction: Number = 0.0

    def __post_init__(self) -> None:
        need(
            number(self.client_fraction) and 0 <= self.client_fraction < 1,
            f"eval.client_fraction={self.client_fraction!r} must be in [0, 1): the share of each client's "
            "partition it holds out to evaluate its own model on (e.g. 0.2; 0: no client-side evaluation)",
        )
        need(
            self.scenario in EVAL_SCENARIOS,
            f"eval.scenario={self.scenario!r}: choose one of aligned, missing, image_only, text_only",
        )
        if self.scenario == "missing":
            rate("eval.mrate", self.mrate)
        need(self.mode in MODES, f"eval.mode={self.mode!r}: choose score or generate")
        need(
            integer(self.max_new_tokens) and self.max_new_tokens >= 1,
            f"eval.max_new_tokens={self.max_new_tokens!r} must be an integer >= 1 (e.g. 8)",
        )
        need(self.protocol in PROTOCOLS, f"eval.protocol={self.protocol!r}: choose ours or fedmllm")
        need(
            self.protocol != "fedmllm" or self.mode == "generate",
            "eval.protocol=fedmllm reads generated answers as FedMLLM's scripts do; add eval.mode=generate",
        )

"""Option scoring, answer parsing and metrics; the `eval` settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedmllm.config import Number, integer, need, rate
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

    def __post_init__(self) -> None:
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

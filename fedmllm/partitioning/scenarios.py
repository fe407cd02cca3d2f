"""FedMLLM's modality scenarios (aligned, missing, cross, hybrid), applied to a client's samples
after the label partition, and the held-out set's `eval.scenario`."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from fedmllm.config import Number, need, rate, typed
from fedmllm.data.schema import Sample

SCENARIOS = ("aligned", "missing", "cross", "hybrid")
EVAL_SCENARIOS = ("aligned", "missing", "image_only", "text_only")


@dataclass
class ScenarioSettings:
    """`scenario`: which modalities each client's samples keep (fedmllm/conf/scenario/*.yaml)."""

    name: str = "aligned"
    mrate: Optional[Number] = None  # missing
    qrate: Optional[Number] = None  # hybrid
    image_clients: Optional[int] = None  # cross (at most num_clients: the run's check)

    def __post_init__(self) -> None:
        need(
            self.name in SCENARIOS,
            f"scenario={self.name!r}: choose one of aligned, missing, cross, hybrid",
        )
        if self.name == "missing":
            rate("scenario.mrate", self.mrate)
        elif self.name == "hybrid":
            rate("scenario.qrate", self.qrate)


def sample_rng(seed: int, stream: str, client: int | str) -> random.Random:
    """A `random.Random` for per-sample draws, fixed by (seed, stream, client).

    FedMLLM draws every client's samples from one global `random.seed(42)` stream in
    `os.listdir` order, which no two processes agree on. Here each client has its own stream,
    seeded from a string (hashed with SHA-512 by `random.seed`, not by `hash()`, so
    PYTHONHASHSEED does not change it): clients, the server and `fedmllm partition` draw the same.
    """
    return random.Random(f"fedmllm/{stream}/seed{seed}/client{client}")


def with_modalities(sample: Sample, image: bool, text: bool) -> Sample:
    """A copy of `sample` with its image and/or text set to None where not kept."""
    out = Sample(**sample)
    if not image:
        out["image"] = None
    if not text:
        out["text"] = None
    return out


def image_only_clients(num_clients: int, k: int, seed: int = 42) -> set[int]:
    """`cross`: the k image-only clients, `random.seed(seed); random.sample(range(N), k)` as in
    FedMLLM (N=10, seed 42: k=3 -> {0, 1, 4})."""
    if not 0 <= k <= num_clients:
        raise ValueError(f"scenario.image_clients={k} must be in [0, num_clients={num_clients}]")
    return set(random.Random(seed).sample(list(range(num_clients)), k))


def hybrid_presence(num_clients: int, qrate: float, seed: int = 42) -> np.ndarray:
    """`hybrid`: [N, 2] 0/1 matrix, column 0 image, column 1 text, each 1 with probability 1-q
    (`np.random.seed(seed); np.random.binomial(1, 1 - q, size=(N, 2))` as in FedMLLM)."""
    return np.random.RandomState(seed).binomial(1, 1 - qrate, size=(num_clients, 2))


def drop_missing(samples: list[Sample], mrate: float, rng: random.Random) -> list[Sample]:
    """`missing`: per sample, text kept with probability 1-m, then image kept with probability 1-m
    (FedMLLM's draw order; m=0.3: 49% both, 21% text only, 21% image only, 9% neither)."""
    out = []
    for s in samples:
        text = rng.random() < 1 - mrate
        image = rng.random() < 1 - mrate
        out.append(with_modalities(s, image, text))
    return out


def apply_scenario(
    samples: list[Sample], scenario: ScenarioSettings | dict[str, Any], client: int, num_clients: int, seed: int
) -> list[Sample]:
    """Copies of one client's samples with the modalities `scenario.name` keeps."""
    scenario = typed(ScenarioSettings, scenario, "scenario")
    if scenario.name == "missing":
        return drop_missing(samples, float(scenario.mrate), sample_rng(seed, "missing", client))
    if scenario.name == "cross":
        image = client in image_only_clients(num_clients, int(scenario.image_clients), seed)
        return [with_modalities(s, image, not image) for s in samples]
    if scenario.name == "hybrid":
        has_image, has_text = (bool(v) for v in hybrid_presence(num_clients, float(scenario.qrate), seed)[client])
        if has_image or has_text:
            return [with_modalities(s, has_image, has_text) for s in samples]
        rng = sample_rng(seed, "hybrid", client)  # neither: each sample one modality, 50/50
        return [with_modalities(s, image, not image) for s in samples for image in [rng.random() < 0.5]]
    return [with_modalities(s, True, True) for s in samples]  # aligned


def apply_eval_scenario(samples: list[Sample], scenario: str, mrate: float, seed: int) -> list[Sample]:
    """The held-out set under `eval.scenario`: aligned (full modality, FedMLLM's test sets),
    missing (each modality dropped with probability `eval.mrate`), image_only or text_only."""
    if scenario == "aligned":
        return list(samples)
    if scenario == "image_only":
        return [with_modalities(s, True, False) for s in samples]
    if scenario == "text_only":
        return [with_modalities(s, False, True) for s in samples]
    if scenario == "missing":
        return drop_missing(samples, float(mrate), sample_rng(seed, "eval-missing", "server"))
    raise ValueError(f"eval.scenario={scenario!r}: choose one of {', '.join(EVAL_SCENARIOS)}")


def scenario_tag(scenario: ScenarioSettings | dict[str, Any]) -> str:
    """Directory name of a scenario: aligned, missing-mrate0.3, cross-img3, hybrid-qrate0.4."""
    scenario = typed(ScenarioSettings, scenario, "scenario")
    if scenario.name == "missing":
        return f"missing-mrate{float(scenario.mrate)}"
    if scenario.name == "cross":
        return f"cross-img{int(scenario.image_clients)}"
    if scenario.name == "hybrid":
        return f"hybrid-qrate{float(scenario.qrate)}"
    return scenario.name

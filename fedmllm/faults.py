"""Fault injection for robustness experiments (`faults`): Byzantine clients.

`faults.byzantine=K`: partitions 0 .. K-1 replace their honest update u (the adapter they trained
minus the one they received) before it leaves them:
- `scale`: u x `faults.scale` (a client overweighting itself; default 10);
- `sign_flip`: -u x `faults.scale` (pushing the model back the way the data pulls it);
- `random`: Gaussian noise with u's norm per tensor, u's scale with no direction (seeded by the
  run's seed, the round and the partition).
Every reply keeps its metrics (the attack is in the values only), so the robust aggregators
(fedmedian, fedtrimmedavg, krum, multikrum, bulyan) are tested against what FedAvg averages in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmllm.config import Number, integer, need, number

ATTACKS = ("scale", "sign_flip", "random")


@dataclass
class FaultSettings:
    """`faults`: Byzantine clients (fedmllm/conf/config.yaml)."""

    byzantine: int = 0
    attack: str = "scale"
    scale: Number = 10.0

    def __post_init__(self) -> None:
        need(
            integer(self.byzantine) and self.byzantine >= 0,
            f"faults.byzantine={self.byzantine!r} must be an integer >= 0 (the first K partitions attack)",
        )
        need(self.attack in ATTACKS, f"faults.attack={self.attack!r}: choose scale, sign_flip or random")
        need(number(self.scale) and self.scale > 0, f"faults.scale={self.scale!r} must be a number > 0")

    def attacks(self, partition_id: int) -> bool:
        return partition_id < self.byzantine


def byzantine(
    trained: dict[str, np.ndarray], sent: dict[str, np.ndarray], faults: FaultSettings, seed: int
) -> dict[str, np.ndarray]:
    """What a Byzantine client sends instead of `trained`, given the adapter it was `sent`."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, value in trained.items():
        base = sent.get(key, np.zeros_like(value))
        update = value - base
        if faults.attack == "scale":
            bad = update * np.float32(faults.scale)
        elif faults.attack == "sign_flip":
            bad = update * np.float32(-faults.scale)
        else:
            noise = rng.standard_normal(update.shape).astype(np.float32)
            bad = noise * np.float32(np.linalg.norm(update) / max(np.linalg.norm(noise), 1e-12))
        out[key] = (base + bad).astype(value.dtype)
    return out

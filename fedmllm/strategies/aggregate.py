"""Pure aggregation math and reply validation over dicts of arrays (no flwr)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


class InvalidReply(ValueError):
    """A client reply that must not be aggregated; the message says why."""


def weighted_average(payloads: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """sum_k w_k x_k / sum_k w_k, key by key (FedAvg)."""
    if not payloads:
        raise ValueError("nothing to aggregate")
    w = np.asarray(weights, dtype=np.float64)
    if (w <= 0).any():
        raise ValueError(f"weights must be > 0, got {w.tolist()}")
    w = w / w.sum()
    return {
        k: sum(wi * np.asarray(p[k], dtype=np.float64) for wi, p in zip(w, payloads)).astype(np.float32)
        for k in payloads[0]
    }


def check_reply(reference: Mapping[str, np.ndarray], payload: Mapping[str, np.ndarray], num_examples) -> None:
    """Raise InvalidReply unless the payload has the reference's keys, shapes, a float dtype,
    finite values and num_examples > 0."""
    missing, extra = set(reference) - set(payload), set(payload) - set(reference)
    if missing or extra:
        raise InvalidReply(f"adapter keys differ (missing {sorted(missing)[:2]}, unexpected {sorted(extra)[:2]})")
    for k, ref in reference.items():
        arr = np.asarray(payload[k])
        if arr.shape != np.shape(ref):
            raise InvalidReply(f"{k}: shape {arr.shape} != {np.shape(ref)}")
        if arr.dtype != np.float32:
            raise InvalidReply(f"{k}: dtype {arr.dtype}, expected float32")
        if not np.isfinite(arr).all():
            raise InvalidReply(f"{k}: non-finite values")
    if not isinstance(num_examples, (int, float)) or num_examples <= 0:
        raise InvalidReply(f"num-examples={num_examples!r} must be > 0")

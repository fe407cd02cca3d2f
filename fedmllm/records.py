"""Flower record glue shared by both apps: adapter dicts <-> ArrayRecord."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Adapter payload -> ArrayRecord (fp32 numpy, key order kept)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> adapter payload."""
    return {k: v.numpy() for k, v in record.items()}

"""The FedMLLM benchmark's label partition (`data_partition_*.py`), as a pure function over labels."""

from __future__ import annotations

import random
from typing import Hashable, Sequence

import numpy as np

TOPUPS = ("all", "first")  # which label groups the script tops up: Hateful Memes' | CrisisMMD's


def fedmllm_partition(
    labels: Sequence[Hashable],
    num_clients: int,
    alpha: float,
    seed: int = 42,
    min_per_label: int = 1,
    topup: str = "all",
) -> list[list[int]]:
    """Indices of each client's samples, exactly as FedMLLM's partition script draws them.

    - Labels are grouped in order of first appearance (the script's `defaultdict`), each group
      keeping the input order.
    - One Dirichlet(alpha) row per label from numpy's legacy generator seeded with `seed`
      (`np.random.seed(42); np.random.dirichlet([alpha] * N, num_labels)`).
    - A client's share of a label is floor(p * n); clients under `min_per_label` take one sample
      at a time from the first client above it; the last client takes the remainder.
      `topup="all"` does this for every label (`data_partition_hateful.py`); `topup="first"` only
      for the first label group (`data_partition_crisismmd.py`: `if label_idx == 0`), so there a
      client may hold none of a later label, and a rare later label never fails.
    - Each client's list is then shuffled with Python's `random` seeded with `seed`, client 0 first.

    Index lists equal the script's entry lists position for position (a shuffle's permutation
    depends only on the list's length). Where the script would loop forever (a topped-up label too
    rare to give every client `min_per_label`), this raises ValueError instead.
    """
    if topup not in TOPUPS:
        raise ValueError(f"partitioner.topup={topup!r}: choose all (Hateful Memes' script) or first (CrisisMMD's)")
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients} must be >= 1")
    if alpha <= 0:
        raise ValueError(f"partitioner.alpha={alpha} must be > 0")
    groups: dict[Hashable, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(y, []).append(i)
    proportions = np.random.RandomState(seed).dirichlet([alpha] * num_clients, len(groups))
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for g, ((label, group), row) in enumerate(zip(groups.items(), proportions)):
        splits = (row * len(group)).astype(int)
        if (topup == "all" or g == 0) and not _top_up(splits, min_per_label):
            raise ValueError(
                f"label {label!r} has {len(group)} samples, too few to give each of {num_clients} clients "
                f"{min_per_label} after flooring its Dirichlet shares (FedMLLM's script would loop forever); "
                f"lower num_clients or raise partitioner.alpha"
            )
        splits[-1] = len(group) - splits[:-1].sum()
        start = 0
        for client, n in enumerate(splits):
            parts[client].extend(group[start : start + n])
            start += n
    rng = random.Random(seed)
    for part in parts:
        rng.shuffle(part)
    return parts


def _top_up(splits: np.ndarray, minimum: int) -> bool:
    """The script's fix-up, in place: each client under `minimum` takes one sample from the first
    client above it, until none is under. False where no donor is left (the script's endless loop)."""
    while np.any(splits < minimum):
        deficit = np.where(splits < minimum)[0]
        excess = np.where(splits > minimum)[0]
        if len(excess) == 0:
            return False
        for client in deficit:
            if len(excess) == 0:
                break
            donor = excess[0]
            splits[client] += 1
            splits[donor] -= 1
            if splits[donor] <= minimum:
                excess = excess[1:]
    return True

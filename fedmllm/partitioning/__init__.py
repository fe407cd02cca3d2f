"""Label partitioners (flwr-datasets iid/dirichlet, FedMLLM's script) selected by partition-id / num-partitions."""

from __future__ import annotations

import os
import warnings
from dataclasses import astuple, dataclass
from functools import lru_cache
from typing import Any, Optional

from fedmllm.config import Number, need, number, typed
from fedmllm.data.schema import Sample
from fedmllm.partitioning.fedmllm_split import fedmllm_partition
from fedmllm.partitioning.scenarios import apply_scenario

PARTITIONERS = ("iid", "dirichlet", "fedmllm")
TOPUPS = ("all", "first")  # FedMLLM's Hateful Memes script | its CrisisMMD script


@dataclass
class PartitionerSettings:
    """`partitioner`: how the training pool is split into clients (fedmllm/conf/partitioner/*.yaml)."""

    name: str = "iid"
    alpha: Optional[Number] = None  # dirichlet, fedmllm
    min_partition_size: int = 10  # dirichlet
    topup: str = "all"  # fedmllm

    def __post_init__(self) -> None:
        need(
            self.name in PARTITIONERS,
            f"partitioner.name={self.name!r}: choose iid, dirichlet or fedmllm",
        )
        if self.name in ("dirichlet", "fedmllm"):
            need(
                number(self.alpha) and self.alpha > 0,
                f"partitioner.alpha={self.alpha!r} must be a number > 0 (e.g. 0.5 for strong skew)",
            )
        if self.name == "fedmllm":
            need(
                self.topup in TOPUPS,
                f"partitioner.topup={self.topup!r}: choose all (FedMLLM's Hateful Memes script) or first "
                "(its CrisisMMD script)",
            )


def make_partitioner(settings: PartitionerSettings, num_partitions: int, seed: int):
    """flwr-datasets partitioner for `partitioner.name` (iid | dirichlet over `label`); `fedmllm`
    is not a flwr-datasets partitioner (see fedmllm_split)."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if settings.name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=float(settings.alpha),
        min_partition_size=int(settings.min_partition_size),
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )


@lru_cache(maxsize=8)  # a worker serves many rounds/clients: partition once per process
def _partition_indices(labels: tuple[int, ...], settings: tuple, num_partitions: int, seed: int):
    p = PartitionerSettings(*settings)
    if p.name == "fedmllm":
        return fedmllm_partition(labels, num_partitions, float(p.alpha), seed, topup=p.topup)
    from datasets import Dataset

    if num_partitions > len(labels):
        raise ValueError(
            f"num_clients={num_partitions} exceeds the {len(labels)} training samples: every client "
            f"needs at least one; lower num_clients to at most {len(labels)}"
        )
    ds = Dataset.from_dict({"label": list(labels), "idx": list(range(len(labels)))})
    part = make_partitioner(p, num_partitions, seed)
    part.dataset = ds

    try:
        with warnings.catch_warnings():  # one warning per retry; a failure below says it in one line
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            return [list(part.load_partition(i)["idx"]) for i in range(num_partitions)]
    except ValueError as err:  # flwr-datasets gives up after its retries and blames alpha alone
        if p.name != "dirichlet":
            raise
        need = int(p.min_partition_size)
        raise ValueError(
            f"partitioner=dirichlet could not give each of {num_partitions} clients at least "
            f"partitioner.min_partition_size={need} of the {len(labels)} training samples with "
            f"partitioner.alpha={p.alpha} (flwr-datasets: {str(err).splitlines()[0][:120]}); lower "
            f"partitioner.min_partition_size (at most {len(labels) // num_partitions} can work) or num_clients, "
            "or raise partitioner.alpha (small alphas concentrate a label on few clients)"
        ) from None


def client_samples(
    samples: list[Sample],
    partitioner: PartitionerSettings | dict[str, Any],
    partition_id: int,
    num_partitions: int,
    seed: int,
) -> list[Sample]:
    """The samples of one partition."""
    idx = label_partition(samples, partitioner, num_partitions, seed)[partition_id]
    return [samples[i] for i in idx]


def label_partition(
    samples: list[Sample], partitioner: PartitionerSettings | dict[str, Any], num_partitions: int, seed: int
) -> list[list[int]]:
    """Sample indices of every partition under the `partitioner` section, deterministic in
    (labels, settings, num_partitions, seed) and cached per process."""
    settings = astuple(typed(PartitionerSettings, partitioner, "partitioner"))
    return _partition_indices(tuple(s["label"] for s in samples), settings, num_partitions, seed)


def client_partition(pool: list[Sample], cfg: dict[str, Any], partition_id: int, num_partitions: int) -> list[Sample]:
    """One client's training samples: the label partition, then the modality scenario (copies,
    image paths absolute), so every process and `fedmllm partition` build the same samples."""

    samples = client_samples(pool, cfg["partitioner"], partition_id, num_partitions, cfg["seed"])
    out = apply_scenario(samples, cfg["scenario"], partition_id, num_partitions, cfg["seed"])
    for s in out:
        if s["image"] is not None:
            s["image"] = os.path.abspath(s["image"])
    return out

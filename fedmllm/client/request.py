"""The plain-Python request one train or evaluate message hands the client: what the ClientApp
builds and `fedmllm.client.rounds.train_request` runs, in the ClientApp's process or in the
node's worker (fedmllm.client.worker), which receives it pickled. Light on purpose: deployment
imports it in every one-message `flwr-clientapp` process."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class TrainRequest:
    """What one train message hands the client, as plain Python (no flwr): what the ClientApp
    passes to `train_request`, in its own process or in the node's worker (fedmllm.client.worker)."""

    run_config: dict[str, Any]
    node_config: dict[str, Any]
    arrays: dict[str, np.ndarray]
    config: dict[str, Any]  # the message's ConfigRecord: server-round, proximal-mu
    extra: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    state: dict[str, np.ndarray] | None = None  # the ClientStore kept in Context.state
    base_overrides: tuple[str, ...] = ()
    evaluate: bool = False  # an evaluate message: evaluate this client's model on its held-out split

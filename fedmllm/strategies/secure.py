"""Secure aggregation of the adapter (`secure_aggregation=true`, settings `secagg`): Flower's SecAgg+ protocol
(`flwr.server.workflow.SecAggPlusWorkflow` on the server, `secaggplus_mod` on the clients), so the
server learns only the clients' mean, never one client's adapter.

In Flower 1.42 SecAgg+ runs on the legacy workflow path only (a LegacyContext with a legacy
Strategy's configure_fit / aggregate_fit, FitIns / FitRes records). `secure_start` is the bridge:
it runs a run's rounds as `Strategy.start` does, but each round's training goes through the
SecAgg+ workflow:

1. the run's AdapterStrategy configures the round (node sampling, the config its algorithm and
   privacy put in, the bytes it sends); `_Bridge.configure_fit` hands those nodes and that config
   to the workflow as FitIns, with the adapter's key order (legacy Parameters have no keys);
2. the workflow runs the four SecAgg+ stages; on the clients `client.app.secure_mod` runs
   `secaggplus_mod` over the client's round (`client.app.secure_train`), which masks the trained
   adapter, quantized within +-`clipping_range` to `quantization_range` levels;
3. the workflow unmasks only the sum; `_Bridge.aggregate_fit` gives the mean to the AdapterStrategy
   as one reply (`AdapterStrategy.aggregate_secure`), so the algorithm's strategy (FedAvg, FedProx,
   FFA-LoRA, FedSA-LoRA's A, FedAvgM / FedAdam's server step) and the DP wrapper (noise for the
   number of clients in the sum) act on it as on an average of replies.

The clients' weights are equal (each client's weight is 1: Flower quantizes weight x value inside
the masked sum, which large example counts would push past `max_weight` or blur), so the server
gets the plain mean of the adapters. Per-client training metrics (loss, example counts) still
reach the server, outside the mask, as in Flower.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord
from flwr.server import ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedmllm.privacy import SECURE_KEYS
from fedmllm.records import from_record


class _Node(ClientProxy):
    """The workflow's handle on a sampled node (it reads `node_id` only)."""

    def __init__(self, node_id: int):
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, *a, **k):  # pragma: no cover - the workflow never calls these
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


class _Bridge:
    """The legacy Strategy the workflow calls: the round's sample and config in, the mean out."""

    def __init__(self, messages: list[Message], keys: list[str]):
        self.messages, self.keys = messages, keys
        self.result: tuple[dict[str, np.ndarray], list[dict[str, Any]], list[str]] | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager) -> list:
        out = []
        for m in self.messages:
            config = dict(m.content["config"])
            config[SECURE_KEYS] = json.dumps(self.keys)
            out.append((_Node(m.metadata.dst_node_id), FitIns(parameters, config)))
        return out

    def aggregate_fit(self, server_round: int, results: list, failures: list):
        if not results:
            return None, {}
        mean = parameters_to_ndarrays(results[0][1].parameters)  # the workflow's unmasked mean, in every result
        rows = [dict(fitres.metrics, **{"node-id": proxy.node_id}) for proxy, fitres in results]
        self.result = (dict(zip(self.keys, mean)), rows, [str(f) for f in failures])
        return results[0][1].parameters, {}


def secure_workflow(settings) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with the `secure_aggregation` settings (equal weights: max_weight 1)."""
    return SecAggPlusWorkflow(
        num_shares=settings.num_shares,
        reconstruction_threshold=settings.reconstruction_threshold,
        max_weight=1.0,
        clipping_range=float(settings.clipping_range),
        quantization_range=int(settings.quantization_range),
        timeout=settings.timeout,
    )


def secure_round(
    strategy, workflow: SecAggPlusWorkflow, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord
):
    """One training round through SecAgg+: the new global adapter (or None: no aggregation)."""
    messages = list(strategy.configure_train(server_round, arrays, config, grid))
    if not messages:
        return None
    keys = list(arrays.keys())
    bridge = _Bridge(messages, keys)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=server_round),
        strategy=bridge,
    )
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    context.state[MAIN_PARAMS_RECORD] = _parameters_record(arrays, keys)
    workflow(grid, context)
    if bridge.result is None:
        return strategy.aggregate_secure(server_round, None, [], ["the SecAgg+ protocol halted"])
    mean, rows, failures = bridge.result
    return strategy.aggregate_secure(server_round, mean, rows, failures)


def _parameters_record(arrays: ArrayRecord, keys: list[str]) -> ArrayRecord:
    """The global adapter as the workflow reads it (legacy Parameters: tensors in key order)."""
    values = from_record(arrays)
    return parameters_to_arrayrecord(ndarrays_to_parameters([values[k] for k in keys]), keep_input=True)


def secure_start(
    strategy,
    settings,
    *,
    grid: Grid,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    timeout: float,
    train_config: ConfigRecord,
    evaluate_fn: Callable[[int, ArrayRecord], Any],
) -> ArrayRecord:
    """`Strategy.start` for a run under secure aggregation: round 0's evaluation, then per round
    the SecAgg+ training round, the clients' own evaluation (eval.client_fraction) and the
    server's evaluation. Returns the last global adapter."""
    workflow = secure_workflow(settings)
    workflow.timeout = float(settings.timeout) if settings.timeout is not None else timeout
    arrays = initial_arrays
    evaluate_fn(0, arrays)
    for server_round in range(1, num_rounds + 1):
        new = secure_round(strategy, workflow, grid, server_round, arrays, ConfigRecord(dict(train_config)))
        if new is not None:
            arrays = new
        messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        if messages:
            strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))
        evaluate_fn(server_round, arrays)
    return arrays

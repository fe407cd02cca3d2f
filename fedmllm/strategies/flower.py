"""Flower's own strategies over adapter tensors: each is Flower's class + AdapterReplies (reply
checks) + FusedAverage (the weighted average in one pass over the already decoded replies).

Defaults in fedmllm/conf/aggregator/*.yaml follow FedMLLM where it set them (server lr 1e-3,
tau 1e-3, beta1 0.9, beta2 0.99, mu 0.01); Flower's FedProx sends `proximal-mu` and the client adds
(mu/2)||theta - theta_global||^2 over the adapter tensors (fedmllm.training).
"""

from __future__ import annotations

from flwr.serverapp import strategy as fl

from fedmllm.strategies.validation import AdapterReplies, FusedAverage


class AdapterFedAvg(AdapterReplies, FusedAverage):
    """FedAvg over the adapter."""


class AdapterFedAvgM(AdapterReplies, fl.FedAvgM, FusedAverage):
    """FedAvg with server momentum over the adapter."""


class AdapterFedProx(AdapterReplies, fl.FedProx, FusedAverage):
    """FedProx: FedAvg aggregation; clients get `proximal-mu`."""


class AdapterFedAdam(AdapterReplies, fl.FedAdam, FusedAverage):
    """Adam on the server over the averaged adapter update."""


class AdapterFedYogi(AdapterReplies, fl.FedYogi, FusedAverage):
    """Yogi on the server over the averaged adapter update."""


class AdapterFedAdagrad(AdapterReplies, fl.FedAdagrad, FusedAverage):
    """Adagrad on the server over the averaged adapter update."""

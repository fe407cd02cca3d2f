"""FedMLLM's default: FedAdagrad on the server (as their `fedmllm` baseline) and the layer-wise
adaptive regularization on every client (`client.adaptive_reg: true`, settings in
train.adaptive_reg)."""

from __future__ import annotations

from fedmllm.algorithms.base import register
from fedmllm.algorithms.fedadagrad import FedAdagrad


@register
class FedMLLMDefault(FedAdagrad):
    name = "fedmllm_default"

"""Coordinate-wise median of the clients' adapters (Yin et al., 2018; Flower's FedMedian).
Robust (`Algorithm.robust`)."""

from __future__ import annotations

from fedmllm.algorithms.base import Algorithm, register


@register
class FedMedian(Algorithm):
    name = "fedmedian"
    flower_strategy = "FedMedian"
    robust = True

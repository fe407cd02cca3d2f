"""Coordinate-wise mean after cutting the `beta` fraction of largest and smallest values (Yin et al., 2018; Flower's FedTrimmedAvg).
Robust (`Algorithm.robust`)."""

from __future__ import annotations

from fedmllm.algorithms.base import Algorithm, register


@register
class FedTrimmedAvg(Algorithm):
    name = "fedtrimmedavg"
    flower_strategy = "FedTrimmedAvg"
    robust = True

"""Krum (Blanchard et al., 2017; Flower's Krum): the one reply closest to its n - f - 2 nearest others, f = num_malicious_nodes.
Robust (`Algorithm.robust`)."""

from __future__ import annotations

from fedmllm.algorithms.base import Algorithm, register


@register
class Krum(Algorithm):
    name = "krum"
    flower_strategy = "Krum"
    robust = True
    # replies a round needs for f = aggregator.num_malicious_nodes (n > 2f + 2)
    min_replies = staticmethod(lambda f: 2 * f + 3)
    min_replies_rule = "n > 2f + 2"

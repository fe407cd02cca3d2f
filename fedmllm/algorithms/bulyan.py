"""Bulyan (El Mhamdi et al., 2018; Flower's Bulyan): Multi-Krum's choice, then a coordinate-wise trimmed mean around the median.
Robust (`Algorithm.robust`)."""

from __future__ import annotations

from fedmllm.algorithms.base import Algorithm, register


@register
class Bulyan(Algorithm):
    name = "bulyan"
    flower_strategy = "Bulyan"
    robust = True
    # replies a round needs for f = aggregator.num_malicious_nodes (n >= 4f + 3)
    min_replies = staticmethod(lambda f: 4 * f + 3)
    min_replies_rule = "n >= 4f + 3"

"""Multi-Krum (Blanchard et al., 2017; Flower's MultiKrum): the average of the m replies Krum scores best.
Robust (`Algorithm.robust`)."""

from __future__ import annotations

from fedmllm.algorithms.base import Algorithm, register


@register
class MultiKrum(Algorithm):
    name = "multikrum"
    flower_strategy = "MultiKrum"
    robust = True
    # replies a round needs for f = aggregator.num_malicious_nodes (n > 2f + 2)
    min_replies = staticmethod(lambda f: 2 * f + 3)
    min_replies_rule = "n > 2f + 2"

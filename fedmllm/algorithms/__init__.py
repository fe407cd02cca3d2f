"""One module per aggregator: its server strategy, its client hooks, what travels, its PEFT
needs, its config check and which server stages apply (`base.Algorithm`).

`aggregator=<name>` selects `fedmllm/conf/aggregator/<name>.yaml`; its `name` selects the
algorithm registered under that name (`@register`), imported on first use from
`fedmllm.algorithms.<name>` or from the module named by the yaml's `module:` key
(docs/add-an-aggregator.md). Nothing outside this package compares an algorithm's name.
"""

from fedmllm.algorithms.base import (
    Algorithm,
    adaptive_reg_settings,
    algorithm_class,
    algorithm_of,
    builtin_names,
    peft_at_rank,
    register,
    server_peft,
    strategy_settings,
    unregister,
)

__all__ = [
    "Algorithm",
    "adaptive_reg_settings",
    "algorithm_class",
    "algorithm_of",
    "builtin_names",
    "peft_at_rank",
    "register",
    "server_peft",
    "strategy_settings",
    "unregister",
]

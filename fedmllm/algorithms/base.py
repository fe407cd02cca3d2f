"""What every algorithm is: the `Algorithm` base class, its registry, and the PEFT settings that
follow from it. No flwr, no torch at import (the client's worker and bench/gpu.py import it).

An algorithm decides, for one aggregator config (`aggregator=<name>`):
- the server strategy (`strategy_class`, loaded on use: it needs flwr; the run wraps it in
  strategies.wrapper.AdapterStrategy, which checks the replies);
- what travels (`travels(key)`: which adapter tensors are in the exchanged payload);
- the client's round (`prepare`, `after_backward`, `finish`, called by fedmllm.client.local.LocalRound);
- the PEFT it needs (`peft_methods`, `peft`), its config check (`problems`), the bytes it moves
  (`traffic`), and which server stages apply (`adapter_stage`, `align`).
The defaults are FedAvg's: the whole adapter travels both ways and clients train it as sent.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import fedmllm.algorithms as pkg
from fedmllm.config import typed
from fedmllm.evaluation import EvalSettings
from fedmllm.models.adapter import PeftSettings, load_adapter_state, method_of
from fedmllm.privacy import PrivacySettings
from fedmllm.stages import AlignSettings
from fedmllm.training import TrainSettings

if TYPE_CHECKING:  # pragma: no cover
    from fedmllm.client.local import LocalRound

_REGISTRY: dict[str, type["Algorithm"]] = {}

ROBUST_DP_REFUSAL = (
    "computes a median, trimmed mean or Krum choice of the replies, whose sensitivity to one client is not "
    "the clipping_norm / n of a mean that the noise is calibrated to"
)
ROBUST_SECURE_REFUSAL = "computes a statistic of the individual replies, which the server never sees"
SERVER_OPTIMIZER_DP_REFUSAL = (
    "steps a server optimizer (momentum, adaptive moments) from the mean before Flower's wrapper adds the "
    "noise, so its state carries un-noised updates into later rounds"
)


class Algorithm:
    """An aggregator: subclass it, set `name`, decorate the class with `@register`.

    An instance holds one run's `aggregator` config section (`self.section`) and its `client:`
    settings (`self.client`). Client hooks get the round's `LocalRound` (its model, the arrays the
    server sent, the message's other records, the client's store, seeds, and `scratch`, a dict
    for what one hook hands the next)."""

    name: ClassVar[str] = ""
    client_keys: ClassVar[tuple[str, ...]] = ("adaptive_reg",)  # allowed in the `client:` section
    peft_methods: ClassVar[tuple[str, ...] | None] = None  # PEFT methods it works with; None: any
    adapter_stage: ClassVar[bool] = True  # server_stage.pretrain.lora can give it its initial adapter
    align: ClassVar[bool] = True  # server_stage.align applies (it retrains the whole shared adapter)
    # What the pre-trained adapter's cache key records about the algorithm: the frozen tensors of
    # the adapter stage are all that depends on it (kept equal to the key the caches were built with).
    stage_key: ClassVar[str] = "standard"
    # The Flower strategy (a class in flwr.serverapp.strategy) that `strategy_class` puts over the
    # adapter; an algorithm with its own aggregation overrides `strategy_class` instead.
    flower_strategy: ClassVar[str] = "FedAvg"
    # Robust aggregation: the Flower strategy computes its own statistic of the replies (median,
    # trimmed mean, Krum's choice; the clients' example counts do not weigh in), each reply's values
    # checked by the wrapper first. A client sending a scaled, sign-flipped or random update
    # (faults.byzantine injects one) moves its global adapter less than FedAvg's weighted mean.
    robust: ClassVar[bool] = False
    # Krum, MultiKrum, Bulyan: the replies per round they need to tolerate f Byzantine clients
    min_replies: ClassVar[Callable[[int], int] | None] = None
    min_replies_rule: ClassVar[str] = ""
    free_rank: ClassVar[bool] = False  # replies may differ from the global adapter in LoRA rank (FLoRA)
    # Why client-level DP (privacy=dp_*, fedmllm.privacy) does not compose with it; "": it does.
    # Flower's DP wrappers add noise of std z x C / n to the strategy's aggregate: that hides one
    # client only where the aggregate is the equal-weight mean of n updates clipped to C, released
    # as it is (FedAvg, FedProx, FFA-LoRA, FedSA-LoRA's shared A).
    dp_refusal: ClassVar[str] = ""
    # Why secure aggregation (secure_aggregation=true, SecAgg+: the server sees only the clients'
    # sum) does not compose with it; "": it does (its strategy works from the mean of the replies).
    secure_refusal: ClassVar[str] = ""
    # Clients keep part of their model across rounds (FedSA-LoRA's B): client-side evaluation
    # (eval.client_fraction) evaluates each client's personal model, which it saves in PEFT format.
    personal: ClassVar[bool] = False

    def __init__(self, section: dict[str, Any] | None = None):
        self.section = dict(section or {})
        self.client = dict(self.section.get("client") or {})

    # --- settings ------------------------------------------------------------------------------
    @property
    def adaptive_reg(self) -> bool:
        """FedMLLM's layer-wise proximal term on the client (`client.adaptive_reg`)."""
        return bool(self.client.get("adaptive_reg", False))

    @property
    def pooled(self) -> bool:
        """The one training partition trains on every partition's samples (centralized)."""
        return False

    def sits_out(self, partition_id: int) -> bool:
        """Whether this partition has nothing to do in the run (it replies num-examples 0 once and
        the strategy never samples it again)."""
        return False

    def problems(self, cfg: dict[str, Any]) -> list[str]:
        """What is wrong with `cfg` under this algorithm, each naming the setting and the fix."""
        out = []
        if "_target_" in self.section:
            out.append(
                f"aggregator._target_ is no longer read: aggregator.name={self.name!r} selects the algorithm "
                "and its strategy (fedmllm.algorithms); drop _target_ from the aggregator yaml"
            )
        unknown = sorted(set(self.client) - set(self.client_keys))
        if unknown:
            out.append(
                f"aggregator.client.{unknown[0]} is not a setting of aggregator={self.name} "
                f"(its client settings: {list(self.client_keys)})"
            )
        method = method_of(cfg["peft"])
        if self.peft_methods is not None and method not in self.peft_methods:
            why = (
                "stacks LoRA factors B_k A_k across clients, which DoRA's magnitude normalisation breaks"
                if method == "dora"
                else f"works on LoRA's A and B factors, which peft={method} does not have"
            )
            out.append(
                f"aggregator={self.name} {why}; use peft={' or peft='.join(self.peft_methods)} with it, "
                f"or a standard aggregator (e.g. aggregator=fedavg) with peft={method}"
            )
        if self.min_replies is not None:
            f, n = self.section.get("num_malicious_nodes", 0), cfg["clients_per_round"]
            if not (isinstance(f, int) and not isinstance(f, bool) and f >= 0):
                out.append(f"aggregator.num_malicious_nodes={f!r} must be an integer >= 0")
            elif n < self.min_replies(f):
                out.append(
                    f"aggregator={self.name} with num_malicious_nodes={f} needs {self.min_replies_rule} replies "
                    f"per round; clients_per_round={n}: raise it to {self.min_replies(f)} or lower "
                    "aggregator.num_malicious_nodes"
                )
        privacy = typed(PrivacySettings, cfg.get("privacy"), "privacy")
        refusal = self.dp_refusal or (ROBUST_DP_REFUSAL if self.robust else "")
        if privacy.enabled and refusal:
            out.append(
                f"privacy={privacy.name} does not compose with aggregator={self.name}: it {refusal}; use "
                "aggregator=fedavg, fedprox, ffa_lora or fedsa_lora with privacy, or privacy=none"
            )
        if self.free_rank and typed(EvalSettings, cfg.get("eval"), "eval").client_fraction > 0:
            out.append(
                f"eval.client_fraction: aggregator={self.name}'s clients train their own rank on top of the global "
                "adapter, which has no one model to evaluate on a client; drop eval.client_fraction"
            )
        secure = self.secure_refusal or (ROBUST_SECURE_REFUSAL if self.robust else "")
        if cfg.get("secure_aggregation") and secure:
            out.append(
                f"secure_aggregation=true does not compose with aggregator={self.name}: it {secure}; use the "
                "FedAvg family (fedavg, fedprox, fedavgm, fedadam, ...), ffa_lora or fedsa_lora, or secure_aggregation=false"
            )
        if cfg.get("secure_aggregation") and self.section.get("max_update_norm") is not None:
            out.append(
                "secure_aggregation=true with aggregator.max_update_norm: the server never sees one client's update "
                "to measure its norm; drop max_update_norm (privacy=dp_client_fixed bounds it on the clients)"
            )
        align = typed(AlignSettings, (cfg.get("server_stage") or {}).get("align"), "server_stage.align")
        if align.enabled and not self.align:
            out.append(
                f"server_stage.align trains the whole adapter on the server, which aggregator={self.name} "
                "does not share; use server_stage=pretrain or a standard aggregator"
            )
        return out

    # --- what travels ----------------------------------------------------------------------------
    def travels(self, key: str) -> bool:
        """Whether an adapter tensor is part of the exchanged payload."""
        return True

    def shared_payload(self, arrays: dict) -> dict:
        return {k: v for k, v in arrays.items() if self.travels(k)}

    def traffic(self, shared: int, total: int, own: Callable[[], int]) -> tuple[int, int]:
        """(up, down) parameters per client and round, given the shared adapter's size, the whole
        adapter's, and `own()`, the size of a client's own rank-r adapter (counted on demand)."""
        return shared, shared

    # --- PEFT ----------------------------------------------------------------------------------
    def client_rank(self, cfg: dict[str, Any], partition_id: int, node_rank: int | None = None) -> int:
        """A client's own LoRA rank: node_config `lora-rank`, else `peft.r` (0 for peft=ia3)."""
        return int(node_rank) if node_rank is not None else typed(PeftSettings, cfg["peft"], "peft").rank

    def client_peft(self, cfg: dict[str, Any], partition_id: int, node_rank: int | None = None) -> dict[str, Any]:
        """The PEFT settings of a client's model."""
        return peft_with_rank(cfg["peft"], node_rank)

    def server_peft(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """The PEFT settings of the server's model (evaluation, checkpoints, server stages)."""
        return peft_with_rank(cfg["peft"], None)

    # --- server ----------------------------------------------------------------------------------
    def strategy_class(self) -> type:
        """The Flower strategy class the run's strategies.wrapper.AdapterStrategy wraps:
        `flower_strategy` over the fused weighted average (imports flwr)."""
        from flwr.serverapp import strategy as flower

        from fedmllm.strategies.fused import checked, fused

        return (checked if self.robust else fused)(getattr(flower, self.flower_strategy))

    def prepare_server_model(self, model, seed: int) -> None:
        """Put the server's model into the state every client starts from (before the adapter stage)."""

    def frozen_in_adapter_stage(self, key: str) -> bool:
        """Adapter tensors the server's adapter stage must leave as they are."""
        return False

    # --- client: one local round ---------------------------------------------------------------
    def prepare(self, r: "LocalRound") -> None:
        """Load what the server sent into the model and freeze what must not train."""

        load_adapter_state(r.model, r.arrays)

    def evaluation_model(self, r: "LocalRound") -> None:
        """Load the model a client evaluates on its own held-out split (eval.client_fraction): the
        global adapter as sent (`personal` algorithms: with what the client keeps)."""
        load_adapter_state(r.model, r.arrays)

    def after_backward(self, r: "LocalRound") -> None:
        """After each backward pass, before the optimizer step (gradients are in the params)."""

    def finish(self, r: "LocalRound", state: dict) -> tuple[dict, dict]:
        """(adapter state to send before the `travels` filter, extra records for the reply)."""
        return state, {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make `aggregator.name=<cls.name>` select `cls`. A second class with a
    registered name raises, naming both."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__}: set `name` before registering an algorithm")
    old = _REGISTRY.get(cls.name)
    if old is not None and old is not cls:
        raise ValueError(
            f"algorithm name {cls.name!r} is taken by {old.__module__}.{old.__qualname__}; "
            f"rename {cls.__module__}.{cls.__qualname__}"
        )
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget a registered algorithm (tests that register their own)."""
    _REGISTRY.pop(name, None)


def builtin_names() -> list[str]:
    """The algorithms that ship with fedmllm (one module each in fedmllm/algorithms/)."""

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name != "base")


def algorithm_class(name: str, module: str | None = None) -> type[Algorithm]:
    """The registered class of `name`, importing `module` (default fedmllm.algorithms.<name>)
    first when it is not registered yet."""
    if name not in _REGISTRY:
        where = module or (f"fedmllm.algorithms.{name}" if name in builtin_names() else None)
        if where is not None:
            try:
                importlib.import_module(where)
            except ModuleNotFoundError as err:
                raise ValueError(
                    f"aggregator.module={where!r} cannot be imported ({err}); name a module "
                    f"that registers aggregator {name!r}"
                ) from None
    if name not in _REGISTRY:
        raise ValueError(
            f"aggregator {name!r} is not registered: choose one of {builtin_names()}, or set "
            "aggregator.module to the module that registers it (docs/add-an-aggregator.md)"
        )
    return _REGISTRY[name]


def algorithm_of(cfg: dict[str, Any]) -> Algorithm:
    """The algorithm of a composed config (its `aggregator` section: `name`, optional `module`)."""
    section = cfg["aggregator"]
    return algorithm_class(str(section.get("name")), section.get("module"))(section)


def server_peft(cfg: dict[str, Any]) -> dict[str, Any]:
    """The PEFT settings of the server's model under the config's algorithm."""
    return algorithm_of(cfg).server_peft(cfg)


def strategy_settings(section: dict[str, Any]) -> dict[str, Any]:
    """The strategy's constructor arguments in an `aggregator` section (all but the algorithm's own keys)."""
    return {k: v for k, v in section.items() if k not in ("name", "module", "client")}


# --- PEFT settings -------------------------------------------------------------------------------


def adaptive_reg_settings(cfg: dict[str, Any], algorithm: Algorithm | None = None) -> dict[str, float] | None:
    """FedMLLM's adaptive regularization settings when on (train.adaptive_reg.enabled or the
    aggregator's client section), else None."""
    reg = typed(TrainSettings, cfg["train"], "train").adaptive_reg
    if not (reg.enabled or (algorithm or algorithm_of(cfg)).adaptive_reg):
        return None
    return {"mu": float(reg.mu), "mu_w": float(reg.mu_w), "s_layer": int(reg.s_layer)}


def peft_scale(peft: dict[str, Any]) -> tuple[float, float]:
    """(alpha / r**root, root): LoRA's scale and the power of r in its denominator (rsLoRA: 1/2)."""
    root = 0.5 if peft.get("name") == "rslora" else 1.0
    return float(peft.get("alpha", 32)) / float(peft["r"]) ** root, root


def peft_at_rank(peft: dict[str, Any], r: int) -> dict[str, Any]:
    """`peft` at rank `r`, lora_alpha following the rank so the scale stays that of peft.alpha / peft.r."""
    out = dict(peft)
    scale, root = peft_scale(out)
    out["r"], out["alpha"] = int(r), scale * int(r) ** root
    return out


def peft_with_rank(peft: dict[str, Any], rank: int | None) -> dict[str, Any]:
    """The `peft` section for a model of one shape across clients: a client rank other than
    peft.r is an error (averaging needs one shape); IA3 has no rank."""
    peft = dict(peft)
    if peft.get("name", "lora") == "ia3":
        if rank is not None:
            raise ValueError(f"client LoRA rank {rank}: peft=ia3 has no rank; drop node_config lora-rank")
        return peft
    r = int(peft["r"])
    if rank is not None and int(rank) != r:
        raise ValueError(
            f"client LoRA rank {rank} != peft.r={r}: heterogeneous ranks need aggregator=flora "
            "(other aggregators average tensors of one shape)"
        )
    return peft_at_rank(peft, r)

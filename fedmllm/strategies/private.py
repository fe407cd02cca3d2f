"""Client-level differential privacy over the adapter (`privacy=dp_*`, fedmllm.privacy): Flower's
central-DP strategy wrappers with what a fedmllm run needs around them.

    strategy = AdapterStrategy(private_strategy(fused(FedAvg)(...), settings, sample_size=10,
                                                population=100, num_rounds=20, seed=42), ...)

Flower's wrappers clip (server-side) and add the noise; these subclasses add:
- equal weights: each reply's aggregation weight is set to 1 before the wrapped strategy averages,
  so one client's clipped update moves the mean by at most clipping_norm / n, the sensitivity the
  noise (std z x clipping_norm / n) is calibrated to (a mean weighted by example counts is not);
- n is the number of replies aggregated, not the number sampled (a dropped reply would otherwise
  leave the mean less noise than its sensitivity needs);
- the noise is drawn from a generator seeded by the run's seed and the round (a run is repeatable
  and a resumed one draws what the uninterrupted one did);
- adaptive clipping noises each round with the bound its clients clipped to (Flower's client-side
  adaptive wrapper updates the bound first and noises with the new one);
- the accountant: every aggregated round reports `epsilon` (spent after that many rounds at
  privacy.delta), `dp_noise_std`, `dp_clipping_norm` and the largest update norm it averaged,
  which the run logs in metrics.jsonl; each reply's norm goes into its client row (`update_norms`);
- the protocol of strategies.wrapper.AdapterStrategy (`min_train_nodes`, `state_attrs`,
  `leave_out`, ...) passed through to the wrapped strategy, plus the adaptive bound as server
  state (`dp_state`) so that `resume=` continues with it.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedmllm.config import ConfigError
from fedmllm.privacy import CONFIG_KEY, SUM_CLIENTS_KEY, PrivacySettings, epsilon
from fedmllm.records import from_record, to_record
from fedmllm.strategies.aggregate import update_norm


class _Private:
    """What the three wrappers share (mixed in before Flower's class)."""

    checks_values = False  # every reply is decoded and checked by the AdapterStrategy before clipping

    def dp_setup(
        self, settings: PrivacySettings, noise_multiplier: float, sample_size: int, population: int, seed: int
    ):
        self.dp = settings
        self.dp_noise_multiplier = float(noise_multiplier)  # what the accountant composes
        self.dp_sample_size, self.dp_population, self.dp_seed = int(sample_size), int(population), int(seed)
        self.update_norms: dict[int, float] = {}  # node id -> L2 norm of the update it was averaged with
        self._sent: dict[str, np.ndarray] = {}
        self._clip_sent = float(self.clipping_norm)
        self._replies = sample_size
        self._round = 0
        self.noise_std = 0.0

    # --- the wrapped strategy's settings and protocol, for the AdapterStrategy ------------------------
    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("strategy")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    @property
    def state_attrs(self) -> tuple[str, ...]:
        return (*getattr(self.strategy, "state_attrs", ()), "dp_state")

    @property
    def dp_state(self) -> dict[str, np.ndarray]:
        return {"clipping_norm": np.asarray([self.clipping_norm], np.float64)}

    def load_state(self, attr: str, value: Any) -> None:
        if attr == "dp_state":
            self.clipping_norm = float(np.asarray(value["clipping_norm"]).reshape(-1)[0])
        else:
            self.strategy.load_state(attr, value)

    def epsilon(self, rounds: int) -> float:
        """The epsilon spent after `rounds` rounds (every round counts, aggregated or not)."""
        return epsilon(
            self.dp_noise_multiplier,
            rounds,
            self.dp_sample_size,
            self.dp_population,
            float(self.dp.delta),
            self.dp.accounting,
        )

    def describe(self, num_rounds: int) -> str:
        how = "solved for target_epsilon" if self.dp.target_epsilon is not None else "set"
        return (
            f"privacy={self.dp.name}: noise multiplier {self.dp_noise_multiplier:.4g} ({how}), clipping norm "
            f"{self.clipping_norm:g}{' (initial; adaptive)' if self.dp.clipping == 'adaptive' else ''}, noise std on "
            f"the mean {self.dp_noise_multiplier * self.clipping_norm / self.dp_sample_size:.4g}; "
            f"{self.dp_sample_size} of {self.dp_population} clients a round ({self.dp.accounting} accounting): "
            f"epsilon {self.epsilon(num_rounds):.3g} at delta {self.dp.delta:g} after {num_rounds} rounds"
        )

    # --- rounds ------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = from_record(arrays)
        self._clip_sent = float(self.clipping_norm)
        if self.dp.clipping != "server":
            config[CONFIG_KEY] = self.dp.clipping  # client.app's privacy_mod runs Flower's clipping mod
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        key, weight_key = self.strategy.arrayrecord_key, self.strategy.weighted_by_key
        order = list(self._sent)
        clients = 0  # in the mean: one a reply, or under secure aggregation the clients in its one sum
        for m in replies:
            if list(m.content[key].keys()) != order and set(m.content[key].keys()) == set(order):
                arrays = from_record(m.content[key])  # Flower clips by position: the sent order
                m.content[key] = to_record({k: arrays[k] for k in order})
            metrics = next(iter(m.content.metric_records.values()))
            clients += int(metrics.get(SUM_CLIENTS_KEY, 1))
            metrics[weight_key] = 1.0  # equal weights
        self._replies, self._round = max(1, clients), server_round
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        self.update_norms = {
            m.metadata.src_node_id: update_norm(from_record(m.content[key]), self._sent) for m in replies
        }
        out = MetricRecord(dict(metrics or {}))
        out["epsilon"] = self.epsilon(server_round)
        out["dp_noise_std"] = self.noise_std
        out["dp_clipping_norm"] = self._clip_sent
        out["dp_update_norm_max"] = max(self.update_norms.values(), default=0.0)
        return arrays, out

    def _rng(self, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.dp_seed, self._round, stream])

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        # self.noise_multiplier: under adaptive clipping the update's share of the effective one
        self.noise_std = float(self.noise_multiplier * self._clip_sent / self._replies)
        rng = self._rng(0)
        return to_record(
            {
                k: (v + rng.normal(0.0, self.noise_std, v.shape)).astype(np.float32)
                for k, v in from_record(aggregated).items()
            }
        )

    def _noisy_fraction(self, count: int, total: int) -> float:  # adaptive clipping's noised count
        return float(self._rng(1).normal(count, self.clipped_count_stddev)) / float(total)


class PrivateServerFixed(_Private, DifferentialPrivacyServerSideFixedClipping):
    """Flower's DifferentialPrivacyServerSideFixedClipping (privacy=dp_server_fixed)."""


class PrivateClientFixed(_Private, DifferentialPrivacyClientSideFixedClipping):
    """Flower's DifferentialPrivacyClientSideFixedClipping (privacy=dp_client_fixed)."""


class PrivateClientAdaptive(_Private, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's DifferentialPrivacyClientSideAdaptiveClipping (privacy=dp_client_adaptive)."""


def private_strategy(
    inner: Strategy, settings: PrivacySettings, *, sample_size: int, population: int, num_rounds: int, seed: int
) -> Strategy:
    """`inner` behind the DP wrapper `settings` name (noise solved from target_epsilon if set)."""
    z = settings.noise(num_rounds, sample_size, population)
    c = float(settings.clipping_norm)
    if settings.clipping == "server":
        out = PrivateServerFixed(inner, z, c, sample_size)
    elif settings.clipping == "fixed":
        out = PrivateClientFixed(inner, z, c, sample_size)
    else:
        sd = settings.count_stddev(sample_size)
        if z >= 2 * sd:
            raise ConfigError(
                f"privacy=dp_client_adaptive: noise multiplier {z:.4g} needs privacy.clipped_count_stddev above "
                f"{z / 2:.4g} (the noised count takes part of the privacy budget; it is {sd:g}, clients_per_round / 20 "
                f"by default); set privacy.clipped_count_stddev={math.ceil(z * 10) / 10:g} or more, or raise the budget"
            )
        out = PrivateClientAdaptive(
            inner,
            z,
            sample_size,
            initial_clipping_norm=c,
            target_clipped_quantile=float(settings.target_quantile),
            clip_norm_lr=float(settings.clip_lr),
            clipped_count_stddev=sd,
        )
    out.dp_setup(settings, z, sample_size, population, seed)
    return out

"""Differential privacy over the adapter update (`privacy`): its settings and the accountant. No
flwr here (strategies.private holds the server's wrappers, client.app the clipping mod).

`privacy=dp_server_fixed | dp_client_fixed | dp_client_adaptive` puts Flower's central-DP wrapper
(`flwr.serverapp.strategy.DifferentialPrivacy*`) over the algorithm's strategy: every client's
update (its adapter minus the global one) is clipped to L2 norm `privacy.clipping_norm` (on the
server, or on the client by Flower's `fixedclipping_mod` / `adaptiveclipping_mod`), the server
averages the clipped updates with equal weights and adds Gaussian noise of standard deviation
noise_multiplier x clipping_norm / replies. That is client-level DP: the released global adapter
hides whether any one client took part, whatever its data.

The accountant (Google's dp-accounting, RDP) turns the noise multiplier, the sampling rate
q = clients_per_round / num_clients and the rounds into the epsilon spent at `privacy.delta`:
- `accounting=poisson` (default): the Poisson-subsampled Gaussian, the accounting of DP-FedAvg
  (McMahan et al., 2018) and Opacus. Flower samples exactly clients_per_round clients without
  replacement, for which this is the usual approximation;
- `accounting=without_replacement`: dp-accounting's bound for sampling a fixed number without
  replacement (replace-one neighbours), what Flower's sampling is;
- `accounting=none`: no amplification by sampling (every round a full Gaussian release).
`privacy.target_epsilon` (instead of `noise_multiplier`) solves for the noise that spends exactly
that epsilon over `num_rounds` rounds.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Optional

from fedmllm.config import Number, need, number

# privacy=<name> -> where the update is clipped (None: no DP)
CLIPPING = {"none": None, "dp_server_fixed": "server", "dp_client_fixed": "fixed", "dp_client_adaptive": "adaptive"}
ACCOUNTING = ("poisson", "without_replacement", "none")
# the train config's key by which the server asks clients to clip (client.app's privacy_mod)
CONFIG_KEY = "dp-clipping"
# secure aggregation: the FitIns config entry naming the adapter's tensors in order (legacy
# Parameters carry none; strategies.secure writes it, client.app's secure_train reads it)
SECURE_KEYS = "fedmllm-adapter-keys"
# secure aggregation: the metric by which the one reply that carries the unmasked mean names how
# many clients are in it (strategies.wrapper writes it; the DP wrapper noises for that many)
SUM_CLIENTS_KEY = "secure-sum-clients"


@dataclass
class PrivacySettings:
    """`privacy` (fedmllm/conf/privacy/*.yaml)."""

    name: str = "none"
    noise_multiplier: Optional[Number] = None  # noise std / clipping norm (of one client's update)
    target_epsilon: Optional[Number] = None  # instead of noise_multiplier: the epsilon to spend over num_rounds
    clipping_norm: Number = 1.0  # L2 bound of a client's update (adaptive: the initial bound)
    delta: Number = 1e-5
    accounting: str = "poisson"
    # dp_client_adaptive (Andrew et al., 2021): the bound follows the target quantile of the
    # clients' update norms, learning rate clip_lr, from a noised count (std clipped_count_stddev;
    # null: clients_per_round / 20, as the paper and Flower)
    target_quantile: Number = 0.5
    clip_lr: Number = 0.2
    clipped_count_stddev: Optional[Number] = None

    def __post_init__(self) -> None:
        need(
            self.name in CLIPPING,
            f"privacy={self.name!r}: choose privacy=none, dp_server_fixed, dp_client_fixed or dp_client_adaptive",
        )
        if not self.enabled:
            return
        z, eps = self.noise_multiplier, self.target_epsilon
        need(
            (z is None) != (eps is None),
            f"privacy={self.name}: set exactly one of privacy.noise_multiplier (e.g. 1.0) and privacy.target_epsilon "
            f"(e.g. 8); got noise_multiplier={z!r}, target_epsilon={eps!r}",
        )
        need(z is None or (number(z) and z > 0), f"privacy.noise_multiplier={z!r} must be a number > 0")
        need(eps is None or (number(eps) and eps > 0), f"privacy.target_epsilon={eps!r} must be a number > 0")
        need(
            number(self.clipping_norm) and self.clipping_norm > 0,
            f"privacy.clipping_norm={self.clipping_norm!r} must be a number > 0 (the L2 bound of one client's update)",
        )
        need(
            number(self.delta) and 0 < self.delta < 1,
            f"privacy.delta={self.delta!r} must be in (0, 1), below 1 / num_clients (e.g. 1e-5)",
        )
        need(
            self.accounting in ACCOUNTING,
            f"privacy.accounting={self.accounting!r}: choose poisson, without_replacement or none",
        )
        need(
            number(self.target_quantile) and 0 < self.target_quantile < 1,
            f"privacy.target_quantile={self.target_quantile!r} must be in (0, 1)",
        )
        need(number(self.clip_lr) and self.clip_lr > 0, f"privacy.clip_lr={self.clip_lr!r} must be a number > 0")
        sd = self.clipped_count_stddev
        need(sd is None or (number(sd) and sd > 0), f"privacy.clipped_count_stddev={sd!r} must be null or > 0")

    @property
    def enabled(self) -> bool:
        return CLIPPING[self.name] is not None

    @property
    def clipping(self) -> str | None:
        """Where the update is clipped: server, fixed (client), adaptive (client); None: no DP."""
        return CLIPPING[self.name]

    def noise(self, rounds: int, sample_size: int, population: int) -> float:
        """The noise multiplier: `noise_multiplier`, or the one spending `target_epsilon` in `rounds`."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        return solve_noise(
            float(self.target_epsilon), rounds, sample_size, population, float(self.delta), self.accounting
        )

    def count_stddev(self, sample_size: int) -> float:
        """dp_client_adaptive: the noise std of the clipped count."""
        sd = self.clipped_count_stddev
        return float(sd) if sd is not None else sample_size / 20


def _event(noise_multiplier: float, sample_size: int, population: int, accounting: str):
    import dp_accounting as dp

    gaussian = dp.GaussianDpEvent(noise_multiplier)
    if accounting == "none" or sample_size >= population:
        return gaussian
    if accounting == "poisson":
        return dp.PoissonSampledDpEvent(sample_size / population, gaussian)
    return dp.SampledWithoutReplacementDpEvent(population, sample_size, gaussian)


def _accountant(accounting: str, orders=None):
    from dp_accounting import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    relation = NeighboringRelation.REPLACE_ONE if accounting == "without_replacement" else None
    kwargs = {"neighboring_relation": relation} if relation is not None else {}
    return RdpAccountant(orders, **kwargs) if orders is not None else RdpAccountant(**kwargs)


@functools.lru_cache(maxsize=4096)
def epsilon(
    noise_multiplier: float,
    rounds: int,
    sample_size: int,
    population: int,
    delta: float,
    accounting: str = "poisson",
    orders: tuple[float, ...] | None = None,
) -> float:
    """The epsilon at `delta` after `rounds` releases of the Gaussian mechanism with
    `noise_multiplier`, each over `sample_size` of `population` clients (RDP accountant; `orders`:
    its Renyi orders, dp-accounting's default set when None). 0 rounds spend 0."""
    if rounds <= 0:
        return 0.0
    acc = _accountant(accounting, list(orders) if orders is not None else None)
    with _quiet():
        acc.compose(_event(noise_multiplier, sample_size, population, accounting), int(rounds))
        return float(acc.get_epsilon(delta))


def solve_noise(
    target_epsilon: float, rounds: int, sample_size: int, population: int, delta: float, accounting: str = "poisson"
) -> float:
    """The smallest noise multiplier that spends at most `target_epsilon` at `delta` in `rounds`."""
    from dp_accounting import mechanism_calibration as calib

    def make_event(z: float):
        import dp_accounting as dp

        return dp.SelfComposedDpEvent(_event(z, sample_size, population, accounting), int(rounds))

    with _quiet():
        z = calib.calibrate_dp_mechanism(
            lambda: _accountant(accounting),
            make_event,
            target_epsilon,
            delta,
            calib.LowerEndpointAndGuess(1e-3, 1.0),
            tol=1e-4,
        )
    return float(z)


@contextlib.contextmanager
def _quiet():
    """dp-accounting logs a warning per fractional Renyi order it cannot evaluate at small q (it
    leaves those orders out of the minimum, as it should): dozens of lines per call."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@dataclass
class SecAggSettings:
    """`secagg`: Flower's SecAgg+ protocol when `secure_aggregation=true` (strategies.secure).

    Every client's adapter values are clipped to +-clipping_range and quantized to
    quantization_range levels before masking: with the defaults one step is 16 / 2**22 = 3.8e-6, and
    the mean of n clients is within that of the fp32 mean (LoRA and projector values stay well
    inside +-8). num_shares / reconstruction_threshold: Flower's (a float: that share of the
    sampled clients; 1.0 and 0.6: every client shares its keys with all, and 60 % of them must
    stay to unmask)."""

    num_shares: Number = 1.0
    reconstruction_threshold: Number = 0.6
    clipping_range: Number = 8.0
    quantization_range: int = 4194304
    timeout: Optional[Number] = None  # seconds each SecAgg+ stage waits (null: the run's round_timeout)

    def __post_init__(self) -> None:
        need(number(self.num_shares) and self.num_shares > 0, f"secagg.num_shares={self.num_shares!r} must be > 0")
        t = self.reconstruction_threshold
        need(number(t) and t > 0, f"secagg.reconstruction_threshold={t!r} must be > 0 (a share <= 1 or a count)")
        need(
            number(self.clipping_range) and self.clipping_range > 0,
            f"secagg.clipping_range={self.clipping_range!r} must be > 0 (adapter values are clipped to +- it)",
        )
        q = self.quantization_range
        need(
            isinstance(q, int) and 2 <= q < 2**31,
            f"secagg.quantization_range={q!r} must be an integer in [2, 2**31) (levels per value; default 4194304)",
        )
        need(self.timeout is None or (number(self.timeout) and self.timeout > 0), "secagg.timeout must be null or > 0")

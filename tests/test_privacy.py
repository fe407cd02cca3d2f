"""Client-level differential privacy (privacy=dp_*: Flower's central-DP wrappers over the adapter,
fedmllm.privacy's accountant): the accountant against a published value, the noise solved for a
target epsilon, the settings and the algorithms it refuses, and tiny runs of the three modes whose
logged update norms are bounded by the clipping norm."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmllm.config import ConfigError, compose
from fedmllm.privacy import PrivacySettings, epsilon, solve_noise


def test_accountant_gives_the_published_epsilon_of_a_subsampled_gaussian():
    """Opacus' documentation of its compute_dp_sgd_privacy script (opacus.ai/api/compute_dp_sgd_privacy):
    sampling rate 1 %, noise multiplier 1.0, 300 steps, delta 1e-5, RDP orders 2, 5, 10, 20, 100:
    epsilon = 2.39 at optimal order 5. dp-accounting's full order set can only be tighter."""
    assert round(epsilon(1.0, 300, 1, 100, 1e-5, "poisson", (2, 5, 10, 20, 100)), 2) == 2.39
    assert epsilon(1.0, 300, 1, 100, 1e-5, "poisson") < 2.39
    # no amplification: every round a full Gaussian release costs more; without replacement sits between
    assert epsilon(1.0, 30, 10, 100, 1e-5, "none") > epsilon(1.0, 30, 10, 100, 1e-5, "poisson")
    assert epsilon(1.0, 0, 10, 100, 1e-5) == 0.0


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_solved_noise_spends_the_target_epsilon(target):
    z = solve_noise(target, 20, 10, 100, 1e-5)
    assert epsilon(z, 20, 10, 100, 1e-5) == pytest.approx(target, rel=1e-3)
    assert solve_noise(target, 40, 10, 100, 1e-5) > z  # more rounds need more noise
    assert solve_noise(target, 20, 20, 100, 1e-5) > z  # a larger sampled share amplifies less


def test_settings_name_what_is_missing_and_what_does_not_compose():
    with pytest.raises(ConfigError, match="set exactly one of privacy.noise_multiplier .* and privacy.target_epsilon"):
        compose(["privacy=dp_server_fixed"])
    with pytest.raises(ConfigError, match="set exactly one of"):
        compose(["privacy=dp_server_fixed", "privacy.noise_multiplier=1", "privacy.target_epsilon=8"])
    with pytest.raises(ConfigError, match="privacy='dp'"):
        compose(["privacy.name=dp"])
    with pytest.raises(ConfigError, match="privacy.delta=2"):
        compose(["privacy=dp_client_fixed", "privacy.target_epsilon=8", "privacy.delta=2"])
    dp = ["privacy=dp_client_fixed", "privacy.target_epsilon=8"]
    for aggregator, why in [
        ("fedadam", "steps a server optimizer"),
        ("fedavgm", "steps a server optimizer"),
        ("krum", "median, trimmed mean or Krum choice"),
        ("scaffold", "control-variate corrections"),
        ("flora", "stacks each client's own LoRA factors"),
        ("local", "trains one partition alone"),
    ]:
        with pytest.raises(ConfigError, match=f"does not compose with aggregator={aggregator}: it .*{why}"):
            compose([*dp, f"aggregator={aggregator}", "num_clients=5", "clients_per_round=5"])
    with pytest.raises(ConfigError, match="privacy=dp_client_fixed with transport"):
        compose([*dp, "transport=int8"])
    for aggregator in ("fedavg", "fedprox", "ffa_lora", "fedsa_lora"):
        cfg = compose([*dp, f"aggregator={aggregator}"])
        assert PrivacySettings(**cfg["privacy"]).enabled


def test_adaptive_clipping_refuses_a_count_noise_too_small_for_its_noise():
    from fedmllm.server.run import build_strategy

    cfg = compose(["privacy=dp_client_adaptive", "privacy.target_epsilon=1"])  # 4 clients: count std 0.2
    with pytest.raises(ConfigError, match="needs privacy.clipped_count_stddev above"):
        build_strategy(cfg)


def test_adaptive_bound_is_server_state_that_resume_restores():
    from fedmllm.server.run import build_strategy

    over = ["privacy=dp_client_adaptive", "privacy.noise_multiplier=1", "privacy.clipped_count_stddev=2"]
    first = build_strategy(compose(over))
    first.strategy.clipping_norm = 0.37
    again = build_strategy(compose(over))
    again.load_state_arrays(first.state_arrays())
    assert again.strategy.clipping_norm == pytest.approx(0.37)
    assert again.min_train_nodes == first.strategy.strategy.min_train_nodes  # the wrapped strategy's settings


def _dp_run(tmp_path: Path, name: str, *extra: str) -> list[dict]:
    from inprocess import three_client_rows

    return three_client_rows(tmp_path / name, "train.local_steps=1", *extra)


# fp32 rounding of the clipped update: its norm measured after the round trip exceeds the bound by
# at most a few float32 ulps (4e-6 relative in these runs)
SLACK = 1 + 2e-5


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,aggregator,extra",
    [
        ("dp_server_fixed", "ffa_lora", ["privacy.target_epsilon=8"]),
        ("dp_client_fixed", "fedavg", ["privacy.noise_multiplier=1.0"]),
        ("dp_client_adaptive", "fedprox", ["privacy.noise_multiplier=0.5", "privacy.clipped_count_stddev=1.0"]),
    ],
)
def test_a_private_run_logs_epsilon_and_bounded_update_norms(tmp_path, mode, aggregator, extra):
    """The clipping norm is far below a client's raw update, so every update arrives clipped to
    it: at the server (dp_server_fixed) or by Flower's mod on the client, where the server clips
    nothing (dp_client_*). Every round logs the epsilon spent so far and the noise it added."""
    clip = 1e-3
    rows = _dp_run(
        tmp_path, mode, f"privacy={mode}", f"aggregator={aggregator}", f"privacy.clipping_norm={clip}", *extra
    )
    trained = [r for r in rows if r["round"] > 0]
    assert len(trained) == 2
    eps = [r["epsilon"] for r in trained]
    assert 0 < eps[0] < eps[1]
    if mode == "dp_server_fixed":
        assert eps[1] == pytest.approx(8.0, rel=1e-3)  # the solved noise spends the target in num_rounds
    for r in trained:
        bound = r["dp_clipping_norm"]
        norms = [c["update-norm"] for c in r["clients"]]
        assert len(norms) == 3
        assert all(n <= bound * SLACK for n in norms), (norms, bound)
        assert max(norms) >= bound / SLACK  # the raw updates were larger: clipping took place
        assert r["dp_update_norm_max"] == pytest.approx(max(norms))
        assert r["dp_noise_std"] > 0
    if mode == "dp_client_adaptive":
        assert trained[1]["dp_clipping_norm"] != trained[0]["dp_clipping_norm"]  # the bound moved
    else:
        assert trained[0]["dp_noise_std"] == pytest.approx(
            trained[0]["dp_clipping_norm"] * _z(rows, tmp_path, mode) / 3
        )


def _z(rows, tmp_path, mode) -> float:
    """The noise multiplier the run used (its config: set, or solved for the target epsilon)."""
    import yaml

    cfg = yaml.safe_load((tmp_path / mode / "config.yaml").read_text())["privacy"]
    if cfg["noise_multiplier"] is not None:
        return float(cfg["noise_multiplier"])
    return solve_noise(float(cfg["target_epsilon"]), 2, 3, 3, float(cfg["delta"]))

"""The one bridge between Hydra and Flower: compose + validate configs, read run/node config."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

CONF_MODULE = "fedmllm.conf"
OVERRIDES_KEY = "overrides"  # the only run_config key fedmllm reads


class ConfigError(ValueError):
    """A config option or value is wrong; the message names it and the fix."""


def _choices(group: str) -> list[str]:
    conf = Path(__file__).parent / "conf" / group
    return sorted(p.stem for p in conf.glob("*.yaml"))


def compose(overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Compose the packaged Hydra config with overrides; return a validated plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    gh = GlobalHydra.instance()
    was_initialized = gh.is_initialized()
    try:
        if not was_initialized:
            initialize_config_module(CONF_MODULE, version_base="1.3")
        cfg = hydra_compose("config", overrides=overrides)
        data = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err, overrides)) from None
    finally:
        if not was_initialized:
            GlobalHydra.instance().clear()
    data.pop("hydra", None)
    return validate(data)


def _explain(err: Exception, overrides: list[str]) -> str:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    for group in ("model", "peft", "dataset", "partitioner", "scenario", "aggregator", "train", "logger"):
        for o in overrides:
            if o.startswith(group + "=") and f"'{group}'" in str(err):
                return f"unknown {group} {o.split('=', 1)[1]!r}; choose one of {_choices(group)} ({msg})"
    if "Could not override" in msg or "Key '" in msg:
        return f"{msg}. Check the key's spelling; `fedmllm run --cfg job` prints every option"
    return f"bad config override in {overrides}: {msg}"


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Reject invalid settings early, naming the field and the fix."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    for key in ("num_clients", "num_rounds", "clients_per_round"):
        need(isinstance(cfg.get(key), int) and cfg[key] >= 1, f"{key}={cfg.get(key)!r} must be an integer >= 1")
    need(
        cfg["clients_per_round"] <= cfg["num_clients"],
        f"clients_per_round={cfg['clients_per_round']} exceeds num_clients={cfg['num_clients']}; "
        f"set clients_per_round<={cfg['num_clients']}",
    )
    m = cfg["model"]
    need(
        m.get("quantization") in ("4bit", "8bit", "none"),
        f"model.quantization={m.get('quantization')!r} is not one of 4bit, 8bit, none",
    )
    need(
        m.get("attn_implementation") in ("sdpa", "eager", "flash_attention_2"),
        f"model.attn_implementation={m.get('attn_implementation')!r}: choose sdpa, eager or flash_attention_2",
    )
    t = cfg["train"]
    for key in ("local_steps", "batch_size"):
        need(isinstance(t.get(key), int) and t[key] >= 1, f"train.{key}={t.get(key)!r} must be an integer >= 1")
    for key in ("lr", "projector_lr"):
        need(isinstance(t.get(key), (int, float)) and t[key] > 0, f"train.{key}={t.get(key)!r} must be a number > 0")
    frac = cfg["dataset"].get("public_fraction", 0.0)
    need(
        isinstance(frac, (int, float)) and 0 <= frac < 1,
        f"dataset.public_fraction={frac!r} must be a number in [0, 1) (0.2: a fifth of the images stay with the server)",
    )
    st = cfg.get("server_stage") or {}
    pre, align = st.get("pretrain") or {}, st.get("align") or {}
    if pre.get("enabled") or align.get("enabled"):
        need(
            frac > 0,
            f"server_stage={st.get('name')} trains on the server's public pool, but dataset.public_fraction=0; "
            "set dataset.public_fraction=0.5 (or server_stage=none)",
        )
    if pre.get("enabled"):
        need(pre.get("objective") in ("embed", "caption"),
             f"server_stage.pretrain.objective={pre.get('objective')!r}: choose embed or caption")
        for key in ("steps", "batch_size"):
            need(isinstance(pre.get(key), int) and pre[key] >= 1,
                 f"server_stage.pretrain.{key}={pre.get(key)!r} must be an integer >= 1")
    if align.get("enabled"):
        need(align.get("rounds") in ("all", "last"),
             f"server_stage.align.rounds={align.get('rounds')!r}: choose all or last")
    p = cfg["partitioner"]
    need(p["name"] in ("iid", "dirichlet"), f"partitioner.name={p['name']!r}: choose iid or dirichlet")
    if p["name"] == "dirichlet":
        need(
            isinstance(p.get("alpha"), (int, float)) and p["alpha"] > 0,
            f"partitioner.alpha={p.get('alpha')!r} must be a number > 0 (e.g. 0.5 for strong skew)",
        )
    need(cfg["peft"].get("r", 1) >= 1, f"peft.r={cfg['peft'].get('r')!r} must be >= 1")
    ev = cfg.get("eval") or {}
    need(ev.get("mode") in ("score", "generate"), f"eval.mode={ev.get('mode')!r}: choose score or generate")
    need(
        isinstance(ev.get("max_new_tokens"), int) and not isinstance(ev.get("max_new_tokens"), bool)
        and ev["max_new_tokens"] >= 1,
        f"eval.max_new_tokens={ev.get('max_new_tokens')!r} must be an integer >= 1 (e.g. 8)",
    )
    need(cfg["logger"]["name"] in ("none", "wandb"), f"logger={cfg['logger']['name']!r}: choose none or wandb")
    return cfg


def run_config_overrides(run_config: Mapping[str, Any]) -> list[str]:
    """Hydra overrides carried in Flower's run_config (`--run-config "overrides='a=1 b=2'"`)."""
    unknown = sorted(set(run_config) - {OVERRIDES_KEY})
    if unknown:
        raise ConfigError(
            f"run_config keys {unknown} are not read by fedmllm; pass Hydra overrides as "
            f"--run-config \"overrides='model=tiny-llava num_rounds=2'\""
        )
    raw = run_config.get(OVERRIDES_KEY, "") or ""
    return shlex.split(str(raw))


def from_run_config(run_config: Mapping[str, Any], base: tuple[str, ...] = ()) -> dict[str, Any]:
    """Composed config for a Flower app: `base` overrides (set by `fedmllm run`) then run_config's."""
    return compose([*base, *run_config_overrides(run_config)])


@dataclass(frozen=True)
class NodeIdentity:
    """Who this node is, from `--node-config` (or the simulation engine)."""

    partition_id: int
    num_partitions: int
    data_dir: str | None = None


def node_identity(node_config: Mapping[str, Any]) -> NodeIdentity:
    """Read `partition-id`, `num-partitions` and optional `data-dir`; errors name the setting."""
    for key in ("partition-id", "num-partitions"):
        if key not in node_config:
            raise ConfigError(
                f"node_config lacks {key!r}; start the SuperNode with "
                f"--node-config \"partition-id=0 num-partitions=2\""
            )
    pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if not 0 <= pid < n:
        raise ConfigError(f"node_config partition-id={pid} must be in [0, num-partitions={n})")
    data_dir = node_config.get("data-dir")
    if data_dir is not None and not Path(str(data_dir)).is_dir():
        raise ConfigError(f"node_config data-dir={data_dir!r} does not exist")
    return NodeIdentity(pid, n, str(data_dir) if data_dir else None)

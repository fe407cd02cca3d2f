"""The one bridge between Hydra and Flower: compose + validate configs, read run/node config."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

CONF_MODULE = "fedmllm.conf"
OVERRIDES_KEY = "overrides"  # the only run_config key fedmllm reads


class ConfigError(ValueError):
    """A config option or value is wrong; the message names it and the fix."""


def _choices(group: str) -> list[str]:
    conf = Path(__file__).parent / "conf" / group
    return sorted(p.stem for p in conf.glob("*.yaml"))


def compose(overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Compose the packaged Hydra config with overrides; return a validated plain dict. A key
    no config has (misspelt, or added with `+`) fails in one line naming it."""
    overrides = list(overrides)
    if any(o.lstrip().startswith("+") for o in overrides):  # Hydra accepts any new key after +
        problem = unknown_setting(overrides)
        if problem:
            raise ConfigError(problem)
    try:
        data = _compose(overrides)
    except ConfigError as err:
        problem = unknown_setting(overrides) if "Check the key's spelling" in str(err) else None
        raise ConfigError(problem or str(err)) from None
    return validate(data)


def unknown_setting(overrides: list[str] | tuple[str, ...]) -> str | None:
    """One line naming the first override whose key no config node has (with the closest known
    key), or None. Group choices (`model=...`, `+experiment=...`) are applied first, each sweep at
    its first value, so keys a group brings count as known; `hydra.*` and deletions are Hydra's."""
    import difflib
    import fnmatch

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    groups = set(_GROUPS) | {p.name for p in (Path(__file__).parent / "conf").iterdir() if p.is_dir()}

    def first(o) -> str:
        value = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else o.get_value_element_as_str()
        return f"{'+' if o.is_add() else ''}{o.key_or_group}={value}"

    chosen = [first(o) for o in parsed if o.key_or_group in groups and not o.is_delete()]
    keys = [
        o
        for o in parsed
        if o.key_or_group not in groups
        and not o.is_delete()
        and not o.key_or_group.startswith(("hydra.", "hydra/"))
        and o.key_or_group != "hydra"
        and not any(fnmatch.fnmatchcase(o.key_or_group, pattern) for pattern in OPTIONAL_SETTINGS)
    ]
    if not keys:
        return None
    try:
        base = _compose(chosen)
    except ConfigError:
        return None  # a bad group choice: compose's own message says which
    for o in keys:
        node: Any = base
        parts = o.key_or_group.split(".")
        for i, part in enumerate(parts):
            if isinstance(node, dict) and part in node:
                node = node[part]
                continue
            where = ".".join(parts[:i])
            siblings = list(node) if isinstance(node, dict) else []
            close = difflib.get_close_matches(part, siblings, n=1)
            hint = f"; did you mean {'.'.join([*parts[:i], close[0]])}?" if close else ""
            inside = f" in {where}" if where else ""
            return (
                f"unknown setting {o.key_or_group!r} ({o.input_line}): no key {part!r}{inside}{hint} "
                "(`fedmllm run --cfg job` prints every setting)"
            )
    return None


# Settings no yaml sets that the code reads with a default: `+key=value` adds them. The built
# models' `text` and `vision` sections take any of the builder's size keys (e.g. intermediate).
OPTIONAL_SETTINGS = ("model.lora_leaves", "model.text.*", "model.vision.*")
_GROUPS = (
    "model",
    "peft",
    "dataset",
    "prompt",
    "partitioner",
    "scenario",
    "aggregator",
    "server_stage",
    "train",
    "logger",
    "experiment",
    "cell",
)


def _compose(overrides: list[str]) -> dict[str, Any]:
    """Hydra's composition of the packaged config (no validation); ConfigError on Hydra's errors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

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
    return data


def _explain(err: Exception, overrides: list[str]) -> str:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    groups = ("model", "peft", "dataset", "prompt", "partitioner", "scenario", "aggregator", "server_stage", "train")
    for group in (*groups, "logger"):
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

    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)  # num_rounds=true is not one round

    for key in ("num_clients", "num_rounds", "clients_per_round", "eval_every"):
        need(integer(cfg.get(key, 1)) and cfg.get(key, 1) >= 1, f"{key}={cfg.get(key)!r} must be an integer >= 1")
    need(integer(cfg.get("seed")), f"seed={cfg.get('seed')!r} must be an integer (e.g. seed=42)")
    keep = cfg.get("keep_checkpoints")
    need(
        keep is None or (integer(keep) and keep >= 1),
        f"keep_checkpoints={keep!r} must be null (keep every round) or an integer >= 1",
    )
    need(
        isinstance(cfg.get("keep_best", False), bool),
        f"keep_best={cfg.get('keep_best')!r} must be true or false (keep the best round's checkpoint too)",
    )
    timeout = cfg.get("round_timeout", 3600)
    need(
        isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0,
        f"round_timeout={timeout!r} must be a number of seconds > 0 (e.g. 600)",
    )
    gpus = cfg.get("client_gpus")
    need(
        gpus is None or (isinstance(gpus, (int, float)) and not isinstance(gpus, bool) and gpus >= 0),
        f"client_gpus={gpus!r} must be null (1 per client when CUDA is visible, else 0) or a number >= 0 (e.g. 0.5)",
    )
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
    from fedmllm.models.load import ATTN_IMPLEMENTATIONS, COMPUTE_DTYPES

    need(
        m.get("compute_dtype", "auto") in COMPUTE_DTYPES,
        f"model.compute_dtype={m.get('compute_dtype')!r}: choose one of {list(COMPUTE_DTYPES)} (auto: fp32 on CPU, bf16 on GPU)",
    )
    need(
        m.get("attn_implementation") in ATTN_IMPLEMENTATIONS,
        f"model.attn_implementation={m.get('attn_implementation')!r}: choose sdpa, eager or flash_attention_2",
    )
    t = cfg["train"]
    for key in ("local_steps", "batch_size"):
        need(isinstance(t.get(key), int) and t[key] >= 1, f"train.{key}={t.get(key)!r} must be an integer >= 1")
    for key in ("lr", "projector_lr"):
        need(
            isinstance(t.get(key), (int, float)) and not isinstance(t[key], bool) and 0 < t[key] < float("inf"),
            f"train.{key}={t.get(key)!r} must be a finite number > 0",
        )
    need(
        integer(t.get("grad_accum", 1)) and t.get("grad_accum", 1) >= 1,
        f"train.grad_accum={t.get('grad_accum')!r} must be an integer >= 1",
    )
    ep = t.get("local_epochs")
    need(
        ep is None or (integer(ep) and ep >= 1),
        f"train.local_epochs={ep!r} must be null (use train.local_steps) or an integer >= 1",
    )
    need(
        t.get("schedule", "constant") in ("constant", "cosine"),
        f"train.schedule={t.get('schedule')!r}: choose constant or cosine",
    )
    need(
        t.get("round_schedule", "constant") in ("constant", "cosine_warm"),
        f"train.round_schedule={t.get('round_schedule')!r}: choose constant or cosine_warm (FedMLLM's)",
    )
    for key in ("warmup_ratio", "round_warmup"):
        v = t.get(key, 0.0)
        need(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
            f"train.{key}={v!r} must be a number in [0, 1) (e.g. 0.01)",
        )
    betas = t.get("adam_betas", [0.9, 0.999])
    need(
        isinstance(betas, (list, tuple))
        and len(betas) == 2
        and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas),
        f"train.adam_betas={betas!r} must be two numbers in [0, 1), e.g. [0.9,0.95]",
    )
    need(
        t.get("weight_by", "partition_size") in ("partition_size", "examples_seen"),
        f"train.weight_by={t.get('weight_by')!r}: choose partition_size (each client's dataset size, "
        "FedMLLM's weighting) or examples_seen (local_steps x batch_size)",
    )
    d = cfg["dataset"]
    frac = d.get("public_fraction", 0.0)
    need(
        isinstance(frac, (int, float)) and 0 <= frac < 1,
        f"dataset.public_fraction={frac!r} must be a number in [0, 1) (0.2: a fifth of the images stay with the server)",
    )
    need(d.get("template", "short") in ("mc", "short"), f"dataset.template={d.get('template')!r}: choose mc or short")
    prompt = (cfg.get("prompt") or {}).get("name", "plain")
    need(prompt in ("plain", "aug"), f"prompt={prompt!r}: choose plain or aug")
    st = cfg.get("server_stage") or {}
    pre, align = st.get("pretrain") or {}, st.get("align") or {}
    if not d["name"].startswith("easyvqa"):
        # The server stages need the public pool's image captions, which only easy-vqa provides.
        need(
            frac == 0,
            f"dataset.public_fraction={frac} is supported for easy-vqa only; "
            f"set dataset.public_fraction=0 for dataset={d['name']}",
        )
        need(
            not (pre.get("enabled") or align.get("enabled")),
            f"server_stage={st.get('name')} needs a captioned public pool, which only easy-vqa has; "
            f"add server_stage=none for dataset={d['name']}",
        )
    if d["name"] == "crisismmd":
        need(
            d.get("task") in ("humanitarian", "informative", "damage"),
            f"dataset.task={d.get('task')!r}: choose humanitarian, informative or damage",
        )
        need(
            not (d.get("agreed") and d["task"] == "damage"),
            "CrisisMMD has no agreed-label damage split; set dataset.agreed=false for dataset.task=damage",
        )
    if pre.get("enabled") or align.get("enabled"):
        need(
            frac > 0,
            f"server_stage={st.get('name')} trains on the server's public pool, but dataset.public_fraction=0; "
            "set dataset.public_fraction=0.5 (or server_stage=none)",
        )
    if pre.get("enabled"):
        need(
            pre.get("objective") in ("embed", "caption"),
            f"server_stage.pretrain.objective={pre.get('objective')!r}: choose embed or caption",
        )
        for key in ("steps", "batch_size"):
            need(
                isinstance(pre.get(key), int) and pre[key] >= 1,
                f"server_stage.pretrain.{key}={pre.get(key)!r} must be an integer >= 1",
            )
        lora = pre.get("lora") or {}
        if lora.get("enabled"):
            for key in ("steps", "batch_size"):
                need(
                    isinstance(lora.get(key), int) and lora[key] >= 1,
                    f"server_stage.pretrain.lora.{key}={lora.get(key)!r} must be an integer >= 1 "
                    "(or server_stage.pretrain.lora.enabled=false)",
                )
            need(
                isinstance(lora.get("lr"), (int, float)) and lora["lr"] > 0,
                f"server_stage.pretrain.lora.lr={lora.get('lr')!r} must be a number > 0",
            )
            every, target = lora.get("eval_every", 0), lora.get("stop_accuracy")
            need(
                isinstance(every, int) and every >= 0,
                f"server_stage.pretrain.lora.eval_every={every!r} must be an integer >= 0 (0: no checks)",
            )
            need(
                target is None or (isinstance(target, (int, float)) and 0 < target <= 1),
                f"server_stage.pretrain.lora.stop_accuracy={target!r} must be in (0, 1], or null to run every step",
            )
            gate = lora.get("check_gate")
            need(
                gate is None or (isinstance(gate, (int, float)) and 0 <= gate <= 1),
                f"server_stage.pretrain.lora.check_gate={gate!r} must be in [0, 1], or null to check every eval_every steps",
            )
    if align.get("enabled"):
        need(
            align.get("rounds") in ("all", "last"),
            f"server_stage.align.rounds={align.get('rounds')!r}: choose all or last",
        )
    reg = cfg["train"].get("adaptive_reg") or {}
    if reg:
        need(
            isinstance(reg.get("s_layer"), int) and reg["s_layer"] >= 0,
            f"train.adaptive_reg.s_layer={reg.get('s_layer')!r} must be an integer >= 0",
        )
    if cfg.get("resume"):
        need(
            Path(str(cfg["resume"])).is_dir(),
            f"resume={cfg['resume']!r} is not a directory; pass the 'run dir:' a stopped run printed",
        )
    p = cfg["partitioner"]
    need(
        p["name"] in ("iid", "dirichlet", "fedmllm"),
        f"partitioner.name={p['name']!r}: choose iid, dirichlet or fedmllm",
    )
    if p["name"] in ("dirichlet", "fedmllm"):
        need(
            isinstance(p.get("alpha"), (int, float)) and p["alpha"] > 0,
            f"partitioner.alpha={p.get('alpha')!r} must be a number > 0 (e.g. 0.5 for strong skew)",
        )
    if p["name"] == "fedmllm":
        need(
            p.get("topup", "all") in ("all", "first"),
            f"partitioner.topup={p.get('topup')!r}: choose all (FedMLLM's Hateful Memes script) or first (its CrisisMMD script)",
        )
    _validate_scenarios(cfg, need)
    from fedmllm.algorithms import algorithm_of
    from fedmllm.models.adapter import peft_problem

    problem = peft_problem(cfg["peft"])
    need(problem is None, str(problem))
    try:
        algorithm = algorithm_of(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for problem in algorithm.problems(cfg):
        need(False, problem)
    need(cfg["peft"].get("r", 1) >= 1, f"peft.r={cfg['peft'].get('r')!r} must be >= 1")
    ev = cfg.get("eval") or {}
    need(ev.get("mode") in ("score", "generate"), f"eval.mode={ev.get('mode')!r}: choose score or generate")
    need(
        isinstance(ev.get("max_new_tokens"), int)
        and not isinstance(ev.get("max_new_tokens"), bool)
        and ev["max_new_tokens"] >= 1,
        f"eval.max_new_tokens={ev.get('max_new_tokens')!r} must be an integer >= 1 (e.g. 8)",
    )
    need(
        ev.get("protocol", "ours") in ("ours", "fedmllm"),
        f"eval.protocol={ev.get('protocol')!r}: choose ours or fedmllm",
    )
    need(
        ev.get("protocol", "ours") != "fedmllm" or ev.get("mode") == "generate",
        "eval.protocol=fedmllm reads generated answers as FedMLLM's scripts do; add eval.mode=generate",
    )
    need(cfg["logger"]["name"] in ("none", "wandb"), f"logger={cfg['logger']['name']!r}: choose none or wandb")
    return cfg


def _validate_scenarios(cfg: dict[str, Any], need: Callable[[bool, str], None]) -> None:
    """`scenario.*` (training modalities) and `eval.*` (held-out modalities)."""

    def rate(key: str, value: Any) -> None:
        need(
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1,
            f"{key}={value!r} must be a number in [0, 1] (e.g. {key}=0.3)",
        )

    sc = cfg["scenario"]
    need(
        sc.get("name") in ("aligned", "missing", "cross", "hybrid"),
        f"scenario={sc.get('name')!r}: choose one of aligned, missing, cross, hybrid",
    )
    if sc["name"] == "missing":
        rate("scenario.mrate", sc.get("mrate"))
    elif sc["name"] == "hybrid":
        rate("scenario.qrate", sc.get("qrate"))
    elif sc["name"] == "cross":
        k, n = sc.get("image_clients"), cfg["num_clients"]
        need(
            isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= n,
            f"scenario.image_clients={k!r} must be an integer in [0, num_clients={n}]; "
            f"set scenario.image_clients<={n} or raise num_clients",
        )
    ev = cfg.get("eval") or {}
    need(
        ev.get("scenario", "aligned") in ("aligned", "missing", "image_only", "text_only"),
        f"eval.scenario={ev.get('scenario')!r}: choose one of aligned, missing, image_only, text_only",
    )
    if ev.get("scenario") == "missing":
        rate("eval.mrate", ev.get("mrate"))


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
    lora_rank: int | None = None  # node_config `lora-rank`: this client's LoRA rank (aggregator=flora)
    image_root: str | None = None  # node_config `image-root`: where this site keeps its partition's images


def node_identity(node_config: Mapping[str, Any]) -> NodeIdentity:
    """Read `partition-id`, `num-partitions` and optional `data-dir`, `image-root`, `lora-rank` from a SuperNode's
    `--node-config`; errors name the setting and the fix (a ClientApp fails that message with it)."""
    fix = 'restart the SuperNode with --node-config "partition-id=I num-partitions=N" (0 <= I < N)'

    def integer(key: str, value: Any) -> int:
        if isinstance(value, bool) or not str(value).lstrip("-").isdigit():
            raise ConfigError(f"node_config {key}={value!r} is not an integer; {fix}")
        return int(value)

    for key in ("partition-id", "num-partitions"):
        if key not in node_config:
            raise ConfigError(f"node_config lacks {key!r}; {fix}")
    pid = integer("partition-id", node_config["partition-id"])
    n = integer("num-partitions", node_config["num-partitions"])
    if n < 1 or not 0 <= pid < n:
        raise ConfigError(f"node_config partition-id={pid} must be in [0, num-partitions={n}); {fix}")
    data_dir = node_config.get("data-dir")
    if data_dir is not None and not Path(str(data_dir)).is_dir():
        raise ConfigError(
            f"node_config data-dir={data_dir!r} does not exist on this SuperNode; pass the 'partition dir:' "
            "that `fedmllm partition ... out=DIR` printed, or leave data-dir out to build the partition on the fly"
        )
    rank = node_config.get("lora-rank")
    if rank is not None and integer("lora-rank", rank) < 1:
        raise ConfigError(f"node_config lora-rank={rank!r} must be an integer >= 1")
    image_root = node_config.get("image-root")
    if image_root is not None and (data_dir is None or not Path(str(image_root)).is_dir()):
        raise ConfigError(
            f"node_config image-root={image_root!r} "
            + (
                "is read with data-dir only; add data-dir=<partition dir>"
                if data_dir is None
                else "does not exist on this SuperNode"
            )
            + ": it names the directory holding the partition's images, whose paths are relative to it"
        )
    return NodeIdentity(
        pid,
        n,
        str(data_dir) if data_dir else None,
        int(rank) if rank is not None else None,
        str(image_root) if image_root is not None else None,
    )

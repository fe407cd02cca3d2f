"""The one bridge between Hydra and Flower: compose + validate configs, read run/node config."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

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
        base = _compose(chosen, keep_unset=True)
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
OPTIONAL_SETTINGS = ("model.text.*", "model.vision.*")
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
    "transport",
    "experiment",
    "cell",
)


def _compose(overrides: list[str], keep_unset: bool = False) -> dict[str, Any]:
    """Hydra's composition of the packaged config (no validation); ConfigError on Hydra's errors.
    `keep_unset`: keep the schema's keys no yaml set (as `???`)."""

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
        if not keep_unset:
            data = unset_removed(data)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_type_problem(err) or _explain(err, overrides)) from None
    finally:
        if not was_initialized:
            GlobalHydra.instance().clear()
    data.pop("hydra", None)
    return data


_KINDS = (
    ("Integer", "an integer"),
    ("Union[int, float]", "a number"),
    ("Float", "a number"),
    ("valid bool", "true or false"),
    ("ListConfig", "a list, e.g. [a,b]"),
    ("for field of type 'str'", "a string"),
)


def _type_problem(err: BaseException) -> str | None:
    """One line for a value of the wrong type under a schema (OmegaConf's ValidationError, maybe
    wrapped by Hydra): the key, the value and what it must be."""

    from omegaconf.errors import ValidationError

    seen: BaseException | None = err
    while seen is not None and not isinstance(seen, ValidationError):
        seen = seen.__cause__ or seen.__context__
    if seen is None or not getattr(seen, "full_key", None):
        return None
    first = str(getattr(seen, "msg", "") or seen).splitlines()[0]
    kind = next((k for marker, k in _KINDS if marker in first), None)
    value = getattr(seen, "value", None)
    if kind is None:
        return f"{seen.full_key}={value!r}: {first}"
    return f"{seen.full_key}={value!r} must be {kind} ({first})"


def _explain(err: Exception, overrides: list[str]) -> str:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    groups = ("model", "peft", "dataset", "prompt", "partitioner", "scenario", "aggregator", "server_stage", "train")
    for group in (*groups, "logger", "transport"):
        for o in overrides:
            if o.startswith(group + "=") and f"'{group}'" in str(err):
                return f"unknown {group} {o.split('=', 1)[1]!r}; choose one of {_choices(group)} ({msg})"
    if "Could not override" in msg or "Key '" in msg:
        return f"{msg}. Check the key's spelling; `fedmllm run --cfg job` prints every option"
    return f"bad config override in {overrides}: {msg}"


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Reject invalid settings early, naming the field and the fix: the packaged config module
    (`fedmllm.conf`) builds its typed settings from `cfg`, each section's `__post_init__` checking
    its own values. Returns `cfg` unchanged."""
    importlib.import_module(CONF_MODULE).check(cfg)
    return cfg


# --- typed sections: what every settings dataclass in the package uses ---------------------------

Number = Union[int, float]


def need(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless cond: the settings' checks, one line each."""
    if not cond:
        raise ConfigError(msg)


def integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # num_rounds=true is not one round


def number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def rate(key: str, value: Any) -> None:
    """A probability setting: a number in [0, 1]."""
    need(number(value) and 0 <= value <= 1, f"{key}={value!r} must be a number in [0, 1] (e.g. {key}=0.3)")


def schema(cls: type) -> Any:
    """Dataclass `cls` as a Hydra schema (an OmegaConf structured node): its fields and their
    types, every value unset (`???`), so that composition checks each key and type and the yaml
    files keep supplying the values. Nested dataclass fields are schemas of their own."""

    from omegaconf import MISSING, OmegaConf

    node = OmegaConf.structured(cls)

    def unset(n: Any) -> None:
        for key in list(n.keys()):
            child = n._get_node(key)
            if OmegaConf.is_dict(child) and OmegaConf.get_type(child) not in (dict, None):
                unset(child)
            else:
                n[key] = MISSING

    unset(node)
    return node


def unset_removed(data: Any) -> Any:
    """A composed container without the keys no yaml set (`???`), so that the plain dict holds
    what the yaml files and overrides say, as it did before the schemas; a section left empty
    that way goes too."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            if v == "???":
                continue
            kept = unset_removed(v)
            if isinstance(v, dict) and v and not kept:
                continue
            out[k] = kept
        return out
    if isinstance(data, list):
        return [unset_removed(v) for v in data]
    return data


def build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """An instance of settings dataclass `cls` from a composed section (nested settings too);
    keys the section lacks take the class defaults, its `__post_init__` checks the values."""
    need(
        isinstance(data, Mapping),
        f"{where}={data!r} must be a mapping of settings (`fedmllm run --cfg job` prints them)",
    )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            at = f"{where}." if where else ""
            hint = f"; did you mean {at}{close[0]}?" if close else ""
            raise ConfigError(f"unknown setting {at}{key}{hint} (`fedmllm run --cfg job` prints every setting)")
        kind = hints[key]
        if dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
            value = build(kind, value, f"{where}.{key}" if where else key)
        kwargs[key] = value
    return cls(**kwargs)


def typed(cls: type, section: Any, where: str) -> Any:
    """`section` as settings `cls`: itself when it is one, else built from a mapping (`build`: keys
    it lacks take the class defaults, the values checked). Functions that take a section accept
    either, so a caller may pass a composed config's section or a few keys of it."""
    return section if isinstance(section, cls) else build(cls, section if section is not None else {}, where)


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

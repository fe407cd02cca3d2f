"""The packaged Hydra config: the yaml groups in this folder, and their schema.

`RunSettings` is the whole config, typed: its top-level settings and one settings dataclass per
section, each owned by the package that reads it (`model`: models.load, `peft`: models.adapter,
`dataset`: data, `prompt`: data.prompts, `partitioner`: partitioning, `scenario`:
partitioning.scenarios, `server_stage`: stages, `train`: training, `eval`: evaluation, `logger`:
tracking, `transport`: transport, `faults`: faults, `privacy`: privacy). `aggregator` stays a mapping: its keys are its algorithm's
(fedmllm.algorithms).

Importing this module registers the schema in Hydra's ConfigStore as `fedmllm_settings`, the
first entry of config.yaml's defaults: composition then rejects a key no section has and a value
of the wrong type. `check(cfg)` builds the typed settings from a composed dict, so each section's
`__post_init__` checks its values and `RunSettings.__post_init__` what spans sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore

from fedmllm.algorithms import algorithm_of
from fedmllm.config import ConfigError, Number, build, integer, need, number, schema
from fedmllm.data import DatasetSettings
from fedmllm.data.prompts import PromptSettings
from fedmllm.evaluation import EvalSettings
from fedmllm.faults import FaultSettings
from fedmllm.models.adapter import PeftSettings
from fedmllm.models.load import ModelSettings, local_checkpoint_replaces_build
from fedmllm.partitioning import PartitionerSettings
from fedmllm.partitioning.scenarios import ScenarioSettings
from fedmllm.privacy import PrivacySettings, SecAggSettings
from fedmllm.stages import ServerStageSettings
from fedmllm.tracking import LoggerSettings
from fedmllm.training import TrainSettings
from fedmllm.transport import TransportSettings

SCHEMA = "fedmllm_settings"


@dataclass
class RunSettings:
    """A run's settings (fedmllm/conf/config.yaml says what each top-level one does)."""

    num_clients: int = 4
    num_rounds: int = 4
    clients_per_round: int = 4
    seed: int = 42
    client_cpus: Number = 2
    client_gpus: Optional[Number] = None
    round_timeout: Number = 3600
    eval_every: int = 1
    verbose: bool = False
    out_dir: Optional[str] = None
    resume: Optional[str] = None
    keep_checkpoints: Optional[int] = None
    keep_best: bool = False
    model: ModelSettings = field(default_factory=ModelSettings)
    peft: PeftSettings = field(default_factory=PeftSettings)
    server_stage: ServerStageSettings = field(default_factory=ServerStageSettings)
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    partitioner: PartitionerSettings = field(default_factory=PartitionerSettings)
    scenario: ScenarioSettings = field(default_factory=ScenarioSettings)
    aggregator: Dict[str, Any] = field(default_factory=dict)
    train: TrainSettings = field(default_factory=TrainSettings)
    logger: LoggerSettings = field(default_factory=LoggerSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    transport: TransportSettings = field(default_factory=TransportSettings)
    faults: FaultSettings = field(default_factory=FaultSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    secure_aggregation: bool = False
    secagg: SecAggSettings = field(default_factory=SecAggSettings)

    def __post_init__(self) -> None:
        for key in ("num_clients", "num_rounds", "clients_per_round", "eval_every"):
            v = getattr(self, key)
            need(integer(v) and v >= 1, f"{key}={v!r} must be an integer >= 1")
        need(integer(self.seed), f"seed={self.seed!r} must be an integer (e.g. seed=42)")
        keep = self.keep_checkpoints
        need(
            keep is None or (integer(keep) and keep >= 1),
            f"keep_checkpoints={keep!r} must be null (keep every round) or an integer >= 1",
        )
        need(
            isinstance(self.keep_best, bool),
            f"keep_best={self.keep_best!r} must be true or false (keep the best round's checkpoint too)",
        )
        need(
            number(self.round_timeout) and self.round_timeout > 0,
            f"round_timeout={self.round_timeout!r} must be a number of seconds > 0 (e.g. 600)",
        )
        gpus = self.client_gpus
        need(
            gpus is None or (number(gpus) and gpus >= 0),
            f"client_gpus={gpus!r} must be null (1 per client when CUDA is visible, else 0) or a number >= 0 (e.g. 0.5)",
        )
        need(
            self.clients_per_round <= self.num_clients,
            f"clients_per_round={self.clients_per_round} exceeds num_clients={self.num_clients}; "
            f"set clients_per_round<={self.num_clients}",
        )
        if self.scenario.name == "cross":
            k, n = self.scenario.image_clients, self.num_clients
            need(
                integer(k) and 0 <= k <= n,
                f"scenario.image_clients={k!r} must be an integer in [0, num_clients={n}]; "
                f"set scenario.image_clients<={n} or raise num_clients",
            )
        stage, frac = self.server_stage, self.dataset.public_fraction
        if not self.dataset.captioned:
            need(
                not stage.enabled,
                f"server_stage={stage.name} needs a captioned public pool, which only easy-vqa has; "
                f"add server_stage=none for dataset={self.dataset.name}",
            )
        if stage.enabled:
            need(
                frac > 0,
                f"server_stage={stage.name} trains on the server's public pool, but dataset.public_fraction=0; "
                "set dataset.public_fraction=0.5 (or server_stage=none)",
            )
        need(
            self.dataset.answers != "open" or self.eval.mode == "generate",
            "dataset.answers=open: free-text answers are evaluated by generation; add eval.mode=generate "
            "(and eval.max_new_tokens for the longest answer, e.g. 16)",
        )
        need(
            self.faults.byzantine <= self.num_clients,
            f"faults.byzantine={self.faults.byzantine} exceeds num_clients={self.num_clients}",
        )
        if self.privacy.enabled:
            need(
                not self.transport.active,
                f"privacy={self.privacy.name} with transport (codec={self.transport.codec}, topk={self.transport.topk}, "
                f"down_codec={self.transport.down_codec}): the update is clipped and noised as fp32 against the one "
                "global adapter every client received; use the transport defaults (fp32) with privacy",
            )
        if self.secure_aggregation:
            need(
                not self.transport.active,
                f"secure_aggregation with transport (codec={self.transport.codec}, down_codec="
                f"{self.transport.down_codec}): SecAgg+ masks the adapter's fp32 values quantized its own way; "
                "use the transport defaults (fp32) with it",
            )
            need(
                self.clients_per_round >= 2,
                f"secure_aggregation needs clients_per_round >= 2 (the sum of one client is its adapter); got {self.clients_per_round}",
            )
            need(
                self.privacy.name in ("none", "dp_client_fixed"),
                f"secure_aggregation with privacy={self.privacy.name}: the server sees only the clients' sum, so it "
                "can neither clip each update (dp_server_fixed) nor read each client's clipping bit "
                "(dp_client_adaptive); use privacy=dp_client_fixed, which clips on the clients",
            )
        if self.resume:
            need(
                Path(str(self.resume)).is_dir(),
                f"resume={self.resume!r} is not a directory; pass the 'run dir:' a stopped run printed",
            )


def run_settings(cfg: dict[str, Any] | RunSettings) -> RunSettings:
    """The typed settings of a composed (and checked) config: what a process that received the
    config as a dict reads its values from."""
    return cfg if isinstance(cfg, RunSettings) else build(RunSettings, cfg, "")


def check(cfg: dict[str, Any]) -> RunSettings:
    """The typed settings of a composed config, every check run (ConfigError names the setting and
    the fix); then its algorithm's own check (`Algorithm.problems`), which reads the whole config.
    A `model.path` on an offline-built preset first replaces its build settings (in `cfg`)."""
    local_checkpoint_replaces_build(cfg)
    settings = build(RunSettings, cfg, "")
    try:
        algorithm = algorithm_of(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for problem in algorithm.problems(cfg):
        need(False, problem)
    need(
        not (settings.transport.active and algorithm.free_rank),
        f"transport (codec={settings.transport.codec}, topk={settings.transport.topk}, down_codec="
        f"{settings.transport.down_codec}): aggregator={algorithm.name}'s adapters have each client's own rank, "
        "which the server cannot encode or decode against one adapter; use the transport defaults (fp32) with it",
    )
    return settings


ConfigStore.instance().store(name=SCHEMA, node=schema(RunSettings))

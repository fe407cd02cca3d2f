"""Config composition and the Hydra <-> Flower bridge."""

from pathlib import Path

import pytest

from fedmllm.config import ConfigError, compose, from_run_config, node_identity, run_config_overrides

CONF = Path(__file__).parents[1] / "fedmllm" / "conf"
GROUPS = ["model", "peft", "dataset", "prompt", "partitioner", "scenario", "aggregator", "train", "logger", "transport"]


def test_defaults_compose_to_the_demo_setting():
    cfg = compose()
    assert cfg["model"]["name"] == "smol-llava" and cfg["model"]["quantization"] == "4bit"
    assert cfg["partitioner"]["name"] == "dirichlet"
    assert cfg["aggregator"]["name"] == "fedavg"
    assert cfg["num_clients"] == 4 and cfg["seed"] == 42


@pytest.mark.parametrize(
    "group,option",
    [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))],
)
def test_every_group_option_composes(group, option):
    extra = []
    if group == "aggregator":  # Krum, Multi-Krum, Bulyan: enough clients for their f (the config check names it)
        from fedmllm.algorithms import algorithm_class

        needs = algorithm_class(option).min_replies
        if needs is not None:
            f = compose([f"{group}={option}", "num_clients=20", "clients_per_round=20"])[group]["num_malicious_nodes"]
            extra = [f"num_clients={needs(f)}", f"clients_per_round={needs(f)}"]
            with pytest.raises(ConfigError, match=f"raise it to {needs(f)}"):
                compose([f"{group}={option}", f"num_clients={needs(f) - 1}", f"clients_per_round={needs(f) - 1}"])
    cfg = compose([f"{group}={option}", *extra])
    assert cfg[group].get("name", option) == option


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (
            ["model=nope"],
            f"unknown model 'nope'; choose one of {sorted(p.stem for p in (CONF / 'model').glob('*.yaml'))}",
        ),
        (["num_rounds=abc"], "num_rounds='abc'"),
        (["no_such_key=1"], "no_such_key"),
        (["train.lr=-1"], "train.lr=-1 must be a finite number > 0"),
        (["train.lr=inf"], "train.lr=inf must be a finite number > 0"),
        (["eval_every=0"], "eval_every=0 must be an integer >= 1"),
        (["seed=abc"], "seed='abc' must be an integer"),
        (["num_rounds=true"], "num_rounds=True must be an integer"),  # the schema's type
        (["train.batch_size=abc"], "train.batch_size='abc' must be an integer"),
        (
            ["train.gradient_checkpointing=yes please"],
            "train.gradient_checkpointing='yes please' must be true or false",
        ),
        (["peft.targets=llm"], "peft.targets='llm' must be a list"),
        (["train.grad_accum=0"], "train.grad_accum=0 must be an integer >= 1"),
        (["train.round_schedule=linear"], "train.round_schedule='linear': choose constant or cosine_warm"),
        (["clients_per_round=9"], "clients_per_round=9 exceeds num_clients=4"),
        (["model.quantization=3bit"], "model.quantization='3bit'"),
        (["partitioner.alpha=0"], "partitioner.alpha=0"),
        (["dataset.public_fraction=1.5"], "dataset.public_fraction=1.5 must be a number in [0, 1)"),
        (["round_timeout=0"], "round_timeout=0 must be a number of seconds > 0"),
        (["keep_best=maybe"], "keep_best='maybe' must be true or false"),
    ],
)
def test_bad_input_gives_one_short_message_naming_it(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_composed_config_builds_typed_settings_each_section_owned_by_its_package():
    """fedmllm.conf.RunSettings: one dataclass per section; the composed dict holds exactly what the
    yaml files and overrides set (a key a preset does not set stays out of it)."""
    from fedmllm.conf import RunSettings, check
    from fedmllm.models.load import ModelSettings
    from fedmllm.stages import AdapterStageSettings
    from fedmllm.training import TrainSettings

    cfg = compose(["model=tiny-llava", "train.lr=0.01"])
    settings = check(cfg)
    assert isinstance(settings, RunSettings) and isinstance(settings.model, ModelSettings)
    assert isinstance(settings.train, TrainSettings) and settings.train.lr == 0.01
    assert isinstance(settings.server_stage.pretrain.lora, AdapterStageSettings)
    assert settings.server_stage.pretrain.lora.stop_accuracy == cfg["server_stage"]["pretrain"]["lora"]["stop_accuracy"]
    assert "hf_config" not in cfg["model"] and "lora_leaves" not in cfg["model"]  # tiny-llava sets neither
    assert "r" not in compose(["peft=ia3"])["peft"]


def test_a_section_built_with_a_key_it_does_not_have_names_it():
    from fedmllm.conf import check

    cfg = compose()
    cfg["train"]["lrr"] = 0.1
    with pytest.raises(ConfigError, match=r"^unknown setting train.lrr; did you mean train.lr\?"):
        check(cfg)


def test_a_model_path_replaces_an_offline_presets_build_but_not_a_hub_presets_settings():
    """Issue 21: model.path=DIR on the default preset no longer keeps smol-llava's name, build keys
    (its cache key) and LoRA leaves."""
    cfg = compose(["model.path=/ckpts/my-llava/"])
    assert cfg["model"]["name"] == "my-llava" and cfg["model"]["path"] == "/ckpts/my-llava/"
    assert not {"builder", "vision", "text", "seed", "lora_leaves"} & set(cfg["model"])
    assert cfg["peft"]["leaves"] == ["q_proj", "v_proj"]
    assert compose(["model.path=/c/m", "peft.leaves=[q_proj,o_proj]"])["peft"]["leaves"] == ["q_proj", "o_proj"]
    default = compose()
    assert default["model"]["name"] == "smol-llava" and len(default["peft"]["leaves"]) == 7
    hub = compose(["model=llava-1.5-7b", "model.path=/c/llava"])
    assert hub["model"]["name"] == "llava-1.5-7b" and hub["model"]["hf_config"] == "llava-1.5-7b.json"


def test_run_config_overrides_are_hydra_overrides():
    cfg = from_run_config({"overrides": "model=tiny-llava num_rounds=2 'train.lr=0.001'"})
    assert cfg["model"]["name"] == "tiny-llava" and cfg["num_rounds"] == 2 and cfg["train"]["lr"] == 0.001


def test_base_overrides_come_first_and_run_config_wins():
    cfg = from_run_config({"overrides": "num_rounds=3"}, base=("num_rounds=7", "num_clients=2", "clients_per_round=2"))
    assert cfg["num_rounds"] == 3 and cfg["num_clients"] == 2


def test_unknown_run_config_key_is_rejected_with_the_fix():
    with pytest.raises(ConfigError, match="overrides='model=tiny-llava"):
        run_config_overrides({"num-rounds": 3})
    assert run_config_overrides({}) == []


def test_node_identity(tmp_path):
    ident = node_identity({"partition-id": 1, "num-partitions": 3, "data-dir": str(tmp_path)})
    assert (ident.partition_id, ident.num_partitions, ident.data_dir) == (1, 3, str(tmp_path))
    with pytest.raises(ConfigError, match="lacks 'partition-id'"):
        node_identity({"num-partitions": 2})
    with pytest.raises(ConfigError, match="partition-id=2 must be in"):
        node_identity({"partition-id": 2, "num-partitions": 2})
    with pytest.raises(ConfigError, match="data-dir='/nonexistent' does not exist"):
        node_identity({"partition-id": 0, "num-partitions": 2, "data-dir": "/nonexistent"})
    with pytest.raises(
        ConfigError, match="partition-id='a' is not an integer; restart the SuperNode with --node-config"
    ):
        node_identity({"partition-id": "a", "num-partitions": 2})
    with pytest.raises(ConfigError, match="lora-rank=0 must be"):
        node_identity({"partition-id": 0, "num-partitions": 2, "lora-rank": 0})


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes(name):
    cfg = compose([f"+experiment={name}"])
    assert cfg["num_clients"] >= cfg["clients_per_round"] >= 1


@pytest.mark.parametrize("scenario", ["aligned", "missing", "cross", "hybrid"])
def test_fedmllm_experiments_use_fedmllms_regime_and_evaluation(scenario):
    """finetune_lora.sh + finetune.py + eval_*.py (docs/fedmllm.md), on top of the scenario."""
    cfg = compose([f"+experiment=fedmllm_{scenario}", "dataset=crisismmd", "dataset.root=/nowhere"])
    t = cfg["train"]
    assert (t["batch_size"], t["grad_accum"], t["local_epochs"], t["lr"], t["projector_lr"]) == (1, 4, 1, 2e-5, 2e-5)
    assert (t["schedule"], t["warmup_ratio"], t["round_schedule"], t["round_warmup"]) == (
        "cosine",
        0.01,
        "cosine_warm",
        0.01,
    )
    assert (t["weight_decay"], t["adam_betas"], t["gradient_checkpointing"], t["weight_by"]) == (
        0.1,
        [0.9, 0.95],
        True,
        "partition_size",
    )
    p = cfg["peft"]
    assert (p["r"], p["alpha"], p["dropout"], p["leaves"]) == (8, 8, 0.05, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert (cfg["num_clients"], cfg["clients_per_round"], cfg["num_rounds"]) == (10, 2, 50)
    assert cfg["partitioner"] == {"name": "fedmllm", "alpha": 0.5, "topup": "first"}  # CrisisMMD's script
    assert cfg["dataset"]["label_column"] == "label_image" and cfg["dataset"]["eval_samples"] == 0
    assert (cfg["eval"]["mode"], cfg["eval"]["protocol"]) == ("generate", "fedmllm")
    assert cfg["scenario"]["name"] == scenario
    hm = compose([f"+experiment=fedmllm_{scenario}", "dataset=hateful_memes", "dataset.root=/nowhere"])
    assert hm["partitioner"]["topup"] == "all" and hm["dataset"]["fedmllm_letters"] == "A-G"


def test_hub_presets_default_to_no_server_stage_and_gradient_checkpointing():
    """A hub preset's vision tower is trained (no stage 1 on toy images) and a 7B client's
    activations dominate its memory; both stay overridable."""
    import subprocess
    import sys

    cfg = compose(["model=llava-1.5-7b"])
    assert (cfg["server_stage"]["name"], cfg["train"]["gradient_checkpointing"]) == ("none", True)
    cfg = compose(["model=qwen2.5-vl-7b", "train=default", "server_stage=pretrain", "dataset.public_fraction=0.5"])
    assert (cfg["server_stage"]["name"], cfg["train"]["gradient_checkpointing"]) == ("pretrain", False)
    assert compose([])["server_stage"]["name"] == "pretrain"  # the offline default keeps its stages
    out = subprocess.run(
        [sys.executable, "-m", "fedmllm.cli", "run", "model=llava-1.5-7b", "--cfg", "job"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "gradient_checkpointing: true" in out.stdout and "\nserver_stage:\n  name: none" in out.stdout


def test_client_gpus_follows_the_visible_gpus_unless_set(monkeypatch):
    import torch

    from fedmllm.simulation import client_gpus

    assert client_gpus(0.5) == 0.5
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert client_gpus(None) == 1.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert client_gpus(None) == 0.0
    with pytest.raises(ConfigError, match="client_gpus=-1"):
        compose(["client_gpus=-1"])


def test_functions_take_their_typed_section_or_a_few_keys_of_it():
    """A function that reads a config section takes its settings dataclass; a mapping is built
    into one (missing keys take the dataclass defaults, the one place they live), so a misspelt
    key fails naming it instead of being read as its default."""
    from fedmllm.config import ConfigError
    from fedmllm.data import DatasetSettings, load_task
    from fedmllm.training import TrainSettings, optimizer_steps, round_lr

    train = TrainSettings(local_steps=3, lr=2e-5, round_schedule="cosine_warm")
    assert optimizer_steps(train, 100) == optimizer_steps({"local_steps": 3}, 100) == 3
    stepped = round_lr(train, 1, 50)
    assert isinstance(stepped, TrainSettings) and stepped.lr == pytest.approx(4e-5) and train.lr == 2e-5
    with pytest.raises(ConfigError, match=r"unknown setting train\.local_stepz; did you mean train\.local_steps\?"):
        optimizer_steps({"local_stepz": 3}, 100)
    typed_task = load_task(DatasetSettings(name="easyvqa", eval_samples=7), seed=1)
    assert typed_task[1:] == load_task({"name": "easyvqa", "eval_samples": 7}, seed=1)[1:]
    assert len(typed_task[2]) == 7
    with pytest.raises(ConfigError, match="unknown setting dataset.eval_sample; did you mean dataset.eval_samples"):
        load_task({"name": "easyvqa", "eval_sample": 7})

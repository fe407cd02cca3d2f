"""The algorithm registry (fedmllm.algorithms): one module per aggregator, registered once, and a
new one added from outside the package with one module and config keys."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_overrides

from fedmllm.algorithms import Algorithm, algorithm_class, builtin_names, register, unregister
from fedmllm.config import ConfigError, compose

PACKAGE = Path(__file__).parents[1] / "fedmllm"


def test_every_aggregator_config_has_its_algorithm_module():
    configs = sorted(p.stem for p in (PACKAGE / "conf/aggregator").glob("*.yaml"))
    assert configs == builtin_names()
    for name in configs:
        cls = algorithm_class(name)
        assert cls.name == name and cls.__module__ == f"fedmllm.algorithms.{name}"


def test_a_second_algorithm_with_a_taken_name_raises_naming_both():
    class Again(Algorithm):
        name = "fedavg"

    algorithm_class("fedavg")  # the built-in one is registered
    with pytest.raises(ValueError, match=r"'fedavg' is taken by fedmllm.algorithms.fedavg.FedAvg; rename .*Again"):
        register(Again)


def test_an_unknown_aggregator_name_or_module_is_one_line_naming_it():
    with pytest.raises(ConfigError, match=r"aggregator 'fedavgg' is not registered: choose one of \[.*'fedavg'"):
        compose(tiny_overrides("aggregator.name=fedavgg"))
    with pytest.raises(ConfigError, match=r"aggregator.module='no_such_module' cannot be imported"):
        compose(tiny_overrides("aggregator.name=mine", "aggregator.module=no_such_module"))


def test_client_settings_of_another_algorithm_are_rejected():
    cfg = compose(tiny_overrides("aggregator=local"))
    local = algorithm_class("local")
    assert local(cfg["aggregator"]).problems(cfg) == []
    problems = local({**cfg["aggregator"], "client": {"only": 0, "max_rank": 8}}).problems(cfg)
    assert problems == [
        "aggregator.client.max_rank is not a setting of aggregator=local (its client settings: "
        "['adaptive_reg', 'only'])"
    ]
    old_style = {**cfg["aggregator"], "_target_": "fedmllm.strategies.AdapterFedAvg"}
    assert "aggregator._target_ is no longer read" in local(old_style).problems(cfg)[0]


def test_a_misspelt_or_added_key_fails_in_one_line_naming_it():
    with pytest.raises(ConfigError, match=r"^unknown setting 'num_roundz' .*did you mean num_rounds\?[^\n]*$"):
        compose(tiny_overrides("num_roundz=3"))
    with pytest.raises(
        ConfigError, match=r"^unknown setting 'train.lrr' .*no key 'lrr' in train; did you mean train.lr\?"
    ):
        compose(tiny_overrides("+train.lrr=1"))
    # keys a group choice brings are known, whatever the order of the overrides
    assert compose(["aggregator.eta=0.01", "aggregator=fedadam"])["aggregator"]["eta"] == 0.01


@pytest.mark.parametrize("override, key", [("num_roundz=3", "num_rounds"), ("+train.lrr=1", "train.lr")])
def test_fedmllm_run_names_an_unknown_key_in_one_line(override, key):
    out = subprocess.run(
        [sys.executable, "-m", "fedmllm.cli", "run", override],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
        env={**__import__("os").environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown setting") and f"did you mean {key}?" in lines[0], (
        out.stderr
    )


def test_no_algorithm_name_is_compared_as_a_string_outside_its_module():
    names = "|".join([*builtin_names(), "standard"])
    compare = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    found = [
        f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}"
        for p in PACKAGE.rglob("*.py")
        if "algorithms" not in p.parts
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if compare.search(line)
    ]
    assert not found, found


def test_algorithms_and_the_client_app_load_without_torch_and_the_algorithms_without_flwr():
    """The ClientApp process hands training to the node's worker and imports neither torch nor the
    client's round (nor Hydra); the algorithm modules (imported by training code on a GPU machine without flwr) import neither."""
    code = textwrap.dedent("""
        import sys
        import fedmllm.algorithms as a
        for name in a.builtin_names():
            a.algorithm_class(name)
        import fedmllm.client.rounds, fedmllm.client.local
        assert 'flwr' not in sys.modules and 'torch' not in sys.modules, 'algorithms'
        import fedmllm.client.app, fedmllm.server.app
        heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules)
        assert not heavy, heavy
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    # deployment starts one flwr-clientapp process per message, which hands the request to the
    # node's worker: alone, the ClientApp imports neither the client's round nor Hydra (about 1 s
    # of start-up a message on a 2-core machine)
    code = textwrap.dedent("""
        import sys
        import fedmllm.client.app
        light = ('hydra', 'omegaconf', 'tqdm', 'fedmllm.client.rounds', 'fedmllm.data', 'fedmllm.models', 'torch')
        loaded = sorted(m for m in light if m in sys.modules)
        assert not loaded, loaded
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-2000:]


# --- an algorithm from outside the package ------------------------------------------------------

OUTSIDE = '''
from fedmllm.algorithms import Algorithm, register
from fedmllm.strategies.aggregate import lora_role

CALLS = {"prepare": 0, "after_backward": 0, "finish": 0}


@register
class ProjectorStaysHome(Algorithm):
    """The projector never travels (each client keeps training the one the server started it
    with); only LoRA factors are averaged, with server momentum."""

    name = "projector_stays_home"

    def travels(self, key):
        return lora_role(key) != "other"

    def strategy_class(self):
        from flwr.serverapp.strategy import FedAvgM

        from fedmllm.strategies.fused import fused

        return fused(FedAvgM)

    def prepare(self, r):
        from fedmllm.models.adapter import load_adapter_state

        CALLS["prepare"] += 1
        load_adapter_state(r.model, r.arrays, partial=True)

    def after_backward(self, r):
        CALLS["after_backward"] += 1

    def finish(self, r, state):
        CALLS["finish"] += 1
        return state, {}
'''


@pytest.fixture
def outside_module(tmp_path, monkeypatch):
    (tmp_path / "my_algorithms.py").write_text(OUTSIDE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_algorithms"
    unregister("projector_stays_home")
    sys.modules.pop("my_algorithms", None)


def test_an_algorithm_registered_outside_the_package_runs_end_to_end(tmp_path, outside_module):
    """One module (given as aggregator.module) and the aggregator keys: its strategy, what travels
    and its client hooks are used; nothing in the package names it."""
    from inprocess import run_in_process

    from fedmllm.tracking import read_metrics

    out = tmp_path / "run"
    overrides = tiny_overrides(
        "num_rounds=2",
        "server_stage=none",
        "dataset.eval_samples=8",
        f"out_dir={out}",
        "aggregator=fedavgm",
        "aggregator.name=projector_stays_home",
        f"aggregator.module={outside_module}",
    )
    run_in_process(overrides)
    calls = sys.modules[outside_module].CALLS
    # 2 clients x 2 rounds, 2 local steps each
    assert calls == {"prepare": 4, "after_backward": 8, "finish": 4}
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    from fedmllm.server.checkpoint import read_state_flat

    z = read_state_flat(out / "checkpoints/round-2/fedmllm-state.npz")
    shared = [k[len("global/") :] for k in z if k.startswith("global/")]
    assert shared and all(".lora_A." in k or ".lora_B." in k for k in shared)
    assert any(k.startswith("state/momentum_vector/") for k in z)  # FedAvgM's server state
    assert all(r["bytes_up"] > 0 for r in rows[1:])


def test_a_run_from_before_the_algorithm_modules_still_resumes(tmp_path):
    """Its config.yaml names the strategy class (`_target_`) and has no `module`."""
    import yaml

    from fedmllm.server.run import ResumeError, check_resumable

    cfg = compose(tiny_overrides("aggregator=fedadam"))
    old = {**cfg, "aggregator": {k: v for k, v in cfg["aggregator"].items() if k != "module"}}
    old["aggregator"]["_target_"] = "fedmllm.strategies.AdapterFedAdam"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    check_resumable(tmp_path, cfg)
    with pytest.raises(ResumeError, match=r"aggregator.eta: 0.001 -> 0.01"):
        check_resumable(tmp_path, compose(tiny_overrides("aggregator=fedadam", "aggregator.eta=0.01")))

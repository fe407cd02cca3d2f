"""`fedmllm inspect`: meta-device counts of module groups, trainable adapter and bytes per round,
for hub presets from the bundled config (no weights) and offline presets (equal to the real model)."""

from __future__ import annotations

import pytest
from conftest import tiny_overrides

from fedmllm.models.adapter import METHODS

# LLaVA-1.5-7B by hand. CLIP ViT-L/14-336 (from the checkpoint's config) counts 303,507,456.
# Projector: 1024x4096 + 4096 + 4096x4096 + 4096.
PROJECTOR_7B = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
# Vicuna-7B: embeddings + lm_head (vocab 32064) + 32 x (attention 4 x 4096^2 + MLP 3 x 4096 x 11008
# + 2 norms) + final norm.
LLM_7B = 2 * 32064 * 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096
# LoRA r=16 on q, v: 32 layers x 16 x (4096 + 4096) x 2.
LORA_7B = 32 * 16 * (4096 + 4096) * 2


def _footprint(*overrides):
    from fedmllm.config import compose
    from fedmllm.models.inspection import footprint

    return footprint(compose(list(overrides)))


def test_hub_preset_counts_from_its_bundled_config_without_weights(monkeypatch):
    from transformers import PreTrainedModel

    def no_weights(*a, **k):
        raise AssertionError("inspect loaded weights")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_weights))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    f = _footprint("model=llava-1.5-7b", "peft=lora")
    assert f["groups"]["projector"] == PROJECTOR_7B
    assert f["groups"]["llm"] == LLM_7B
    assert f["total_params"] == pytest.approx(7.06e9, rel=2e-3)
    assert f["trainable_params"] == LORA_7B + PROJECTOR_7B
    assert f["trainable_by_group"] == {"llm": LORA_7B, "projector": PROJECTOR_7B}
    assert f["bytes_up"] == f["bytes_down"] == 4 * (LORA_7B + PROJECTOR_7B)
    dora = _footprint("model=llava-1.5-7b", "peft=dora", "peft.projector=frozen")
    assert dora["trainable_params"] == LORA_7B + 32 * (4096 + 4096)  # + a magnitude per output feature


@pytest.mark.parametrize("variant", METHODS)
def test_meta_counts_equal_the_loaded_model(variant):
    from fedmllm.config import compose
    from fedmllm.models.adapter import adapter_state, apply_peft, payload_bytes
    from fedmllm.models.load import load_model

    cfg = compose(tiny_overrides(f"peft={variant}", "model.quantization=none", "peft.projector=lora"))
    f = _footprint(*tiny_overrides(f"peft={variant}", "peft.projector=lora"))
    model, _, family = load_model(cfg["model"])
    assert f["total_params"] == sum(p.numel() for p in model.parameters())
    peft_model = apply_peft(model, family, cfg["peft"])
    assert f["bytes_up"] == f["bytes_down"] == payload_bytes(adapter_state(peft_model))
    assert f["trainable_params"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_bytes_follow_the_aggregator_protocol():
    base = _footprint(*tiny_overrides("peft.projector=frozen"))
    ffa = _footprint(*tiny_overrides("peft.projector=frozen", "aggregator=ffa_lora"))
    fedsa = _footprint(*tiny_overrides("peft.projector=frozen", "aggregator=fedsa_lora"))
    scaffold = _footprint(*tiny_overrides("peft.projector=frozen", "aggregator=scaffold"))
    # tiny-llava: hidden 64, kv heads 2 of 4 -> v_proj out 32; LoRA r=16 on q (64->64), v (64->32), 2 layers
    a, b = 2 * 16 * (64 + 64), 2 * (64 + 32) * 16
    assert base["bytes_up"] == base["bytes_down"] == 4 * (a + b)
    assert ffa["bytes_up"] == ffa["bytes_down"] == 4 * b
    assert fedsa["bytes_down"] == fedsa["bytes_up"] == 4 * a  # B never leaves the client
    assert scaffold["bytes_up"] == 2 * base["bytes_up"]


def test_cli_inspect_prints_groups_and_megabytes(capsys):
    from fedmllm.cli import main

    main(["inspect", "model=llava-1.5-7b", "peft=lora"])
    out = capsys.readouterr().out
    for text in (
        "vision_encoder",
        "projector",
        "llm",
        f"{LLM_7B:,}",
        f"{LORA_7B + PROJECTOR_7B:,}",
        f"up {4 * (LORA_7B + PROJECTOR_7B) / 1e6:.3f} MB",
    ):
        assert text in out, text


def test_cli_inspect_names_a_missing_config(capsys):
    from fedmllm.cli import main

    with pytest.raises(SystemExit):
        main(["inspect", "model=llava-1.5-7b", "model.hf_config=null", "model.path=/no/such/dir"])
    assert "add `hf_config: <preset>.json`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", "model=llava-1.5-7b", "model.hf_config=nope.json"])
    assert "model.hf_config='nope.json'" in capsys.readouterr().err


def test_partition_and_inspect_ignore_a_run_setting_they_do_not_use(tmp_path, capsys):
    """clients_per_round bounds a run's sampling; `fedmllm partition` and `inspect` do not sample."""
    from fedmllm.cli import main

    main(["partition", "num_clients=2", "dataset=easyvqa", "partitioner=iid", f"out={tmp_path}"])
    assert "partition dir:" in capsys.readouterr().out
    main(["inspect", "model=tiny-llava", "num_clients=2"])
    assert "model tiny-llava" in capsys.readouterr().out


def test_inspect_reads_a_local_model_path_and_its_family(capsys):
    """model.path=DIR (here the tiny llava build) wins over the default preset (smol-llava, whose
    builder would otherwise be read): the tiny model's parameter count is printed."""
    from fedmllm.cli import main
    from fedmllm.config import compose
    from fedmllm.models.build import ensure_built

    def total_params(argv):
        main(["inspect", *argv])
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("total"))
        return line.split()[1]

    tiny = ensure_built(compose(["model=tiny-llava"])["model"])
    want = total_params(["model=tiny-llava"])
    assert total_params([f"model.path={tiny}"]) == want  # the default preset, pointed at the tiny build
    assert total_params(["model=tiny-qwen2_vl", f"model.path={tiny}"]) == want  # its config.json says llava
    assert total_params([]) != want  # smol-llava itself

"""A round's checkpoint is a Hugging Face artifact: reloaded with transformers and peft calls only
(README, "Using a checkpoint"), it is the model the run evaluated, stage-1 vision tower included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from inprocess import run_in_process

    out = tmp_path_factory.mktemp("run")
    run_in_process(tiny_overrides("model.quantization=none", "dataset.eval_samples=16", f"out_dir={out}"))
    return out


def reload_without_fedmllm(ckpt: Path):
    """The README's snippet, verbatim in substance: transformers + peft + safetensors only."""
    import torch
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base_id = PeftConfig.from_pretrained(ckpt).base_model_name_or_path
    base = AutoModelForImageTextToText.from_pretrained(base_id, dtype=torch.float32)
    base.load_state_dict(load_file(ckpt / "stage1.safetensors"), strict=False)  # the server's stage 1
    model = PeftModel.from_pretrained(base, ckpt)
    processor = AutoProcessor.from_pretrained(ckpt)
    return model.eval(), processor, base_id


def test_a_checkpoint_reloads_with_transformers_and_peft_as_the_evaluated_model(finished_run):
    from safetensors.torch import load_file

    from fedmllm.config import compose
    from fedmllm.data.collate import Collator
    from fedmllm.models.load import resolve_path
    from fedmllm.models.registry import get_family
    from fedmllm.server.evaluate import evaluate, heldout_set
    from fedmllm.tracking import read_metrics

    ckpt = finished_run / "checkpoints" / "round-2"
    cfg = compose(tiny_overrides("model.quantization=none", "dataset.eval_samples=16"))
    model, processor, base_id = reload_without_fedmllm(ckpt)

    # the base it names is the model's own build, not fedmllm's 4-bit cache; the processor came along
    assert base_id == resolve_path(cfg["model"]) and "quantized" not in base_id
    assert (ckpt / "processor_config.json").is_file() or (ckpt / "preprocessor_config.json").is_file()
    # the stage-1 vision tower is in what it loaded (the plain build's differs)
    stage1 = load_file(ckpt / "stage1.safetensors")
    key = next(k for k in stage1 if "vision_tower" in k and k.endswith("weight"))
    loaded = dict(model.get_base_model().named_parameters())[key]
    assert np.array_equal(loaded.detach().numpy(), stage1[key].numpy())
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert {"stage1.safetensors", "adapter_model.safetensors", "tokenizer_config.json"} <= set(manifest)

    # ... and scores the held-out samples exactly as the run logged for that round
    task, heldout = heldout_set(cfg)
    collator = Collator(processor, get_family(cfg["model"]["family"]), task)
    got = evaluate(model, collator, heldout, None, batch_size=8)
    logged = {r["round"]: r for r in read_metrics(finished_run)}[2]
    for name in ("accuracy", "auroc", "accuracy_no_image"):
        assert got[name] == pytest.approx(logged[name], abs=1e-9), name


def test_the_state_file_holds_only_what_the_adapter_file_does_not(finished_run):
    """FedAvg has no server state: the state file keeps the round and the names of the tensors it
    reads back from adapter_model.safetensors, which give the payload exactly."""
    from safetensors.numpy import load_file

    from fedmllm.server.checkpoint import STATE_FILE, read_state

    ckpt = finished_run / "checkpoints" / "round-2"
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert (ckpt / STATE_FILE).stat().st_size < 0.1 * (ckpt / "adapter_model.safetensors").stat().st_size
    server_round, payload, state = read_state(ckpt / STATE_FILE)
    assert server_round == 2 and state == {}
    assert payload.keys() == adapter.keys() and all(np.array_equal(payload[k], adapter[k]) for k in adapter)


@pytest.mark.parametrize("merge", ["true", "false"])
def test_export_writes_a_model_that_from_pretrained_loads_with_the_trained_tower(finished_run, tmp_path, merge):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from fedmllm.cli import main

    out = tmp_path / "exported"
    main(["export", str(finished_run), f"out={out}", f"merge={merge}"])
    ckpt = finished_run / "checkpoints" / "round-2"
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    if merge == "false":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, out / "adapter")
    reference, _, _ = reload_without_fedmllm(ckpt)
    stage1 = load_file(ckpt / "stage1.safetensors")
    key = next(k for k in stage1 if "vision_tower" in k and k.endswith("weight"))
    params = dict((model.get_base_model() if merge == "false" else model).named_parameters())
    assert torch.equal(params[key], stage1[key])  # the trained tower, not the build's
    # the same outputs as the checkpoint loaded with its adapter (merging rounds at float32 level)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


def test_export_names_bad_input(finished_run, tmp_path, capsys):
    from fedmllm.cli import main

    for argv, fragment in [
        ([str(finished_run)], "out=DIR"),
        ([str(finished_run), f"out={tmp_path}"], "exists"),
        ([str(finished_run), f"out={tmp_path / 'x'}", "round=9"], "checkpoints/round-9"),
        ([str(finished_run), f"out={tmp_path / 'x'}", "merge=maybe"], "merge=maybe"),
    ]:
        with pytest.raises(SystemExit):
            main(["export", *argv])
        assert fragment in capsys.readouterr().err

"""Model families: registry rules, per-family prompts / image tokens / loss masks on the tiny
presets, the image-only processors reloading in a fresh process, one federated round per family."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import tiny_overrides
from PIL import Image

from fedmllm.data.collate import IGNORE, Collator
from fedmllm.models.families import FAMILIES
from fedmllm.models.registry import Family, family_for_model_type, get_family, register_family


def _load(family: str, quant: str = "none"):
    from fedmllm.config import compose
    from fedmllm.models.load import load_model

    cfg = compose(tiny_overrides(f"model=tiny-{family}", f"model.quantization={quant}"))
    return (*load_model(cfg["model"]), cfg)


# --- registry -----------------------------------------------------------------------------------


def test_every_family_is_registered_with_a_tiny_preset():
    from pathlib import Path

    presets = {p.stem for p in (Path(__file__).parents[1] / "fedmllm/conf/model").glob("tiny-*.yaml")}
    assert {f"tiny-{f}" for f in FAMILIES} <= presets
    for name in FAMILIES:
        assert get_family(name).name == name


def test_registering_a_name_twice_raises_and_incomplete_families_are_rejected():
    llava = get_family("llava")
    with pytest.raises(KeyError, match="already registered"):
        register_family(llava)
    from dataclasses import replace

    with pytest.raises(ValueError, match="incomplete.*'projector'"):
        register_family(replace(llava, name="broken", module_groups={"vision_encoder": ("a",), "llm": ("b",)}))
    with pytest.raises(ValueError, match="overlapping"):
        register_family(
            replace(
                llava,
                name="broken",
                module_groups={
                    "vision_encoder": ("model.visual",),
                    "projector": ("model.visual.merger",),
                    "llm": ("lm",),
                },
            )
        )
    with pytest.raises(KeyError, match="unknown model family 'nope'.*qwen2_vl"):
        get_family("nope")
    assert family_for_model_type("qwen2_5_vl").name == "qwen2_5_vl"
    with pytest.raises(KeyError, match="no registered model family loads model_type 'mllama'"):
        family_for_model_type("mllama")
    assert isinstance(llava, Family)


# --- per family: prompts, image tokens, loss masks ------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_expand_the_image_and_the_loss_covers_only_the_answer(family):
    from fedmllm.data import load_task

    model, processor, fam, cfg = _load(family)
    assert fam.name == family
    task, train, _ = load_task(cfg["dataset"], cfg["seed"])
    samples = train[:3]
    col = Collator(processor, fam, task)
    image_id = processor.tokenizer.convert_tokens_to_ids(fam.image_token)
    with Image.open(samples[0]["image"]) as im:
        width, height = im.size
    expected = fam.image_seq_len(model.config, processor, height, width)
    assert expected > 0

    batch = col.train_batch(samples)
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [expected] * 3
    blind = col.train_batch(samples, drop_image=True)
    assert (blind["input_ids"] == image_id).sum() == 0 and "pixel_values" not in blind
    mixed = col.train_batch([samples[0], {**samples[1], "image": None}])
    assert (mixed["input_ids"] == image_id).sum(dim=1).tolist() == [expected, 0]

    for b, rows in ((batch, samples), (blind, samples), (mixed, samples[:2])):
        for row, s in enumerate(rows):
            labels = b["labels"][row].tolist()
            answer = col.answer_ids(task.answers[s["label"]])
            # IGNORE everywhere but the last len(answer) positions, which hold the answer + end of turn
            assert labels[-len(answer) :] == answer
            assert set(labels[: -len(answer)]) == {IGNORE}
            assert b["input_ids"][row, -len(answer) :].tolist() == answer
        assert b["keep"] == max(len(col.answer_ids(task.answers[s["label"]])) for s in rows) + 1

    # the prompt ends where the answer starts, in the family's own format
    prompt = col._prompts(samples[:1], drop_image=False)[0][0]
    text = prompt.replace(fam.image_token, "")
    assert samples[0]["text"] in text if samples[0]["text"] else True
    if family != "paligemma":  # PaliGemma has no chat template: image + BOS + prompt + "\n"
        assert "Answer questions about images." in prompt  # the system turn
    import torch

    with torch.no_grad():
        from fedmllm.training import answer_loss

        assert torch.isfinite(answer_loss(model, batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_language_model_is_quantized(family):
    model, _, fam, _ = _load(family, "4bit")
    quantized = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert quantized
    assert {fam.group_of(n) for n in quantized} == {"llm"}, [n for n in quantized if fam.group_of(n) != "llm"]
    # every parameter falls in a group, except LLaVA-OneVision's image_newline row
    stray = [n for n, _ in model.named_parameters() if fam.group_of(n) is None]
    assert stray in ([], ["model.image_newline"]), stray


def test_saved_processors_reload_in_a_fresh_process(tmp_path):
    """The image-only processors (no video half, so no torchvision) save and reload."""
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(image)
    for family in FAMILIES:
        _, processor, _, _ = _load(family)
        processor.save_pretrained(tmp_path / family)
        assert "video_processor" not in (tmp_path / family / "processor_config.json").read_text()
    code = f"""
import json, sys
import fedmllm.models.families
from fedmllm.models.registry import get_family
from PIL import Image
out = {{}}
for name in {list(FAMILIES)!r}:
    fam = get_family(name)
    proc = fam.processor_cls().from_pretrained({str(tmp_path)!r} + "/" + name)
    prompt = fam.prompt(proc, "sys", "what is it?", True)
    batch = fam.encode(proc, [prompt], [Image.open({str(image)!r}).convert("RGB")])
    ids = batch["input_ids"][0].tolist()
    out[name] = ids.count(proc.tokenizer.convert_tokens_to_ids(fam.image_token))
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    for family in FAMILIES:
        model, processor, fam, _ = _load(family)
        assert counts[family] == fam.image_seq_len(model.config, processor, 64, 64), family
    assert "torchvision" not in sys.modules


def test_model_path_loads_any_registered_family(tmp_path):
    from fedmllm.config import compose
    from fedmllm.models.build import ensure_built
    from fedmllm.models.load import load_model

    qwen = ensure_built(compose(["model=tiny-qwen2_vl"])["model"])
    cfg = compose(["model=tiny-llava", f"model.path={qwen}", "model.quantization=none"])
    model, _, family = load_model(cfg["model"])
    assert family.name == "qwen2_vl" and type(model).__name__ == "Qwen2VLForConditionalGeneration"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    with pytest.raises(KeyError, match="mllama.*docs/add-a-model.md"):
        load_model({**cfg["model"], "path": str(tmp_path)})


# --- one federated round per family ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["4bit", "none"])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_federated_round(tmp_path, family, quant):
    import numpy as np
    from inprocess import run_in_process

    from fedmllm.tracking import read_metrics

    run_in_process(
        tiny_overrides(
            f"model=tiny-{family}",
            f"model.quantization={quant}",
            "num_rounds=1",
            "server_stage=none",
            "train.local_steps=1",
            "dataset.eval_samples=8",
            f"out_dir={tmp_path}",
        )
    )
    rows = read_metrics(tmp_path)
    assert [r["round"] for r in rows] == [0, 1]
    assert np.isfinite(rows[1]["train_loss"]) and 0 <= rows[1]["accuracy"] <= 1


# --- hub presets: bundled configs build on the meta device ---------------------------------------

# Published parameter counts of the checkpoints (model cards / safetensors metadata), in billions.
HUB_PARAMS = {
    "llava-1.5-7b": 7.06,
    "llava-onevision-0.5b": 0.89,
    "qwen2-vl-2b": 2.21,
    "qwen2.5-vl-3b": 3.75,
    "qwen2.5-vl-7b": 8.29,
    "smolvlm-256m": 0.256,
    "smolvlm-2.2b": 2.25,
    "paligemma-3b": 2.92,
}


@pytest.mark.parametrize("preset", sorted(HUB_PARAMS))
def test_hub_preset_builds_on_the_meta_device_with_its_published_size(preset):
    from fedmllm.config import compose
    from fedmllm.models.inspection import meta_model

    cfg = compose([f"model={preset}"])["model"]
    assert cfg["hf_config"] == f"{preset}.json" and "/" in cfg["path"]
    model, _ = meta_model(cfg)
    assert type(model) is get_family(cfg["family"]).model_cls()
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert n == pytest.approx(HUB_PARAMS[preset], rel=0.03)
    fam = get_family(cfg["family"])
    stray = {name.split(".")[1] for name, _ in model.named_parameters() if fam.group_of(name) is None}
    assert stray <= {"image_newline"}, stray  # the module groups fit the real layout


@pytest.mark.parametrize("family", FAMILIES)
def test_adaptive_reg_finds_every_decoder_layer_and_no_vision_layer(family):
    # FedMLLM's layer-wise regularization picks payload keys by decoder layer index: with LoRA on
    # the language model and the vision encoder, every decoder layer must be found, no vision one.
    from fedmllm.models.adapter import adapter_state, apply_peft, llm_layer_index

    model, _, fam, cfg = _load(family)
    peft = apply_peft(model, fam, {**cfg["peft"], "targets": ["llm", "vision_encoder"], "projector": "frozen"})
    keys = list(adapter_state(peft))
    layers = {llm_layer_index(k) for k in keys} - {None}
    text_config = peft.base_model.model.config.get_text_config()
    assert layers == set(range(text_config.num_hidden_layers))
    vision = [
        k for k in keys if fam.group_of(k.removeprefix("base_model.model.").split(".lora_")[0]) == "vision_encoder"
    ]
    assert vision and all(llm_layer_index(k) is None for k in vision)


def test_a_target_group_without_matching_layers_is_an_error_naming_the_setting():
    from fedmllm.models.adapter import apply_peft

    model, _, fam, cfg = _load("qwen2_vl")
    with pytest.raises(
        ValueError, match=r"no layer of qwen2_vl's vision_encoder is named \['q_proj'\].*peft.vision_leaves"
    ):
        apply_peft(model, fam, {**cfg["peft"], "targets": ["llm", "vision_encoder"], "vision_leaves": ["q_proj"]})

"""Every hub preset, shape-faithful without its weights (model.random_init): the real widths,
heads, patch sizes and image-processor settings at one layer, a stand-in tokenizer and a shrunk
vocabulary; one federated round in 4-bit on the CPU on Hateful-Memes-format photos, and the
processor's image tokens held against the token formula of each family."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmllm.config import compose
from fedmllm.data.fixtures import photo, write_hateful_memes

PACKAGE = Path(__file__).resolve().parents[1] / "fedmllm"
CONF = PACKAGE / "conf" / "model"
HUB = sorted(p.stem for p in CONF.glob("*.yaml") if "hf_config:" in p.read_text())
SHAPE = ["model.random_init=true", "model.num_layers=1", "model.vocab_size=1024"]
# photo sizes as memes and phone pictures come: landscape, portrait, small, large
SIZES = [(640, 480), (480, 640), (1024, 768), (1600, 1200), (1200, 1600), (800, 533)]

pytestmark = pytest.mark.slow


def test_every_hub_preset_is_covered():
    assert set(HUB) == {
        "llava-1.5-7b",
        "llava-onevision-0.5b",
        "paligemma-3b",
        "qwen2-vl-2b",
        "qwen2.5-vl-3b",
        "qwen2.5-vl-7b",
        "smolvlm-2.2b",
        "smolvlm-256m",
    }


@pytest.fixture(scope="module")
def memes(tmp_path_factory):
    return write_hateful_memes(tmp_path_factory.mktemp("hm"), n_rows=8, seed=0, photo_sizes=SIZES)


@pytest.mark.parametrize("preset", HUB)
def test_image_tokens_equal_the_processor_logic_at_photo_sizes(preset):
    """The built processor (the checkpoint's image-processor settings, the preset's token budget)
    expands one image placeholder to exactly as many image tokens as the family's formula says,
    for every photo size, and the model config keeps the checkpoint's widths."""
    from fedmllm.models.load import load_model

    cfg = compose([f"model={preset}", *SHAPE])  # 4-bit: the load quantizes once into the cache the round reads
    model, processor, family = load_model(cfg["model"])
    text = model.config.get_text_config()
    assert text.hidden_size == _hidden(preset)
    assert text.num_hidden_layers == 1 and text.vocab_size == max(1024, len(processor.tokenizer))
    image_token = processor.tokenizer.convert_tokens_to_ids(family.image_token)
    counts = {}
    for w, h in SIZES:
        prompt = family.prompt(processor, "system", "Is this meme hateful?", True)
        img = Image.open(io.BytesIO(photo(w, h))).convert("RGB")
        ids = family.encode(processor, [prompt], [img])["input_ids"]
        counts[(w, h)] = int((ids == image_token).sum())
        assert counts[(w, h)] == family.image_seq_len(model.config, processor, h, w), (w, h)
    assert max(counts.values()) == BUDGET[preset], counts  # the preset's documented token budget


def _hidden(preset: str) -> int:
    """The checkpoint's decoder width, from its bundled config.json."""
    real = json.loads((PACKAGE / "models" / "hub_configs" / f"{preset}.json").read_text())
    return real.get("text_config", {}).get("hidden_size") or real["hidden_size"]


# The most image tokens one photo of SIZES costs under each preset's defaults (its yaml's token budget)
BUDGET = {
    "llava-1.5-7b": 576,
    "paligemma-3b": 256,
    "qwen2-vl-2b": 1230,
    "qwen2.5-vl-3b": 1230,
    "qwen2.5-vl-7b": 1230,
    "smolvlm-2.2b": 13 * 81,
    "smolvlm-256m": 13 * 64,
    "llava-onevision-0.5b": 2943,
}


# The round runs at a smaller token budget where a preset's allows many tokens (the settings a
# user has for it): a CPU's 4-bit matmul (bitsandbytes' fallback, weights dequantized per call)
# at these widths costs seconds per hundred tokens. The counts at the presets' own budgets are
# checked above; llava-1.5-7b and paligemma-3b have one resolution.
ROUND_BUDGET = {
    "qwen2-vl-2b": ["model.max_pixels=200704"],
    "qwen2.5-vl-3b": ["model.max_pixels=200704"],
    "qwen2.5-vl-7b": ["model.max_pixels=200704"],
    "smolvlm-2.2b": ["model.image_splitting=false"],
    "smolvlm-256m": ["model.image_splitting=false"],
    "llava-onevision-0.5b": ["model.max_grid=1"],
}


def round_overrides(preset: str, memes: Path, out: Path) -> list[str]:
    """One round of two clients, one step of batch 1 each, one held-out sample (bench/hub_presets.py too)."""
    return [
        f"model={preset}",
        *SHAPE,
        "dataset=hateful_memes",
        f"dataset.root={memes}",
        "dataset.eval_samples=1",
        "num_clients=2",
        "clients_per_round=2",
        "num_rounds=1",
        "partitioner=iid",
        "train.local_steps=1",
        "train.batch_size=1",
        "train.eval_batch_size=2",
        f"out_dir={out}",
        *ROUND_BUDGET.get(preset, []),
    ]


@pytest.mark.parametrize("preset", HUB)
def test_a_federated_round_in_4bit_on_photos(preset, memes, tmp_path):
    """One round, two clients, 4-bit, gradient checkpointing on (the hub presets' train=gpu), on
    photo-sized images: the loss is finite, the round is evaluated with and without the image,
    and the adapter the server saved has the real widths."""
    from inprocess import run_in_process
    from safetensors.numpy import load_file

    from fedmllm.tracking import read_metrics

    cfg = compose([f"model={preset}"])
    assert cfg["server_stage"]["name"] == "none" and cfg["train"]["gradient_checkpointing"] is True
    run = run_in_process(round_overrides(preset, memes, tmp_path / "run"))
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1]
    assert math.isfinite(rows[1]["train_loss"]) and 0 <= rows[1]["accuracy"] <= 1
    assert "accuracy_no_image" in rows[1]
    adapter = load_file(str(run / "checkpoints" / "round-1" / "adapter_model.safetensors"))
    for client in rows[1]["clients"]:  # what each client's samples cost, reported per round
        assert client["image-tokens"] > 0 and client["text-tokens"] > 0, client
    q_b = [v for k, v in adapter.items() if "q_proj.lora_B" in k]
    assert q_b and all(v.shape[0] == _hidden(preset) and np.isfinite(v).all() for v in q_b)


def test_partition_stats_give_the_image_token_distribution(memes, tmp_path):
    """`fedmllm partition` with a hub preset: each client's image tokens per sample (min, median,
    max) by the preset's processor logic, offline and without weights."""
    from PIL import Image as PILImage

    from fedmllm.data import load_task
    from fedmllm.models.memory import image_token_counter
    from fedmllm.partitioning.materialise import format_stats, write_partitions

    cfg = compose(["model=qwen2.5-vl-7b", "dataset=hateful_memes", f"dataset.root={memes}", "partitioner=iid"])
    count = image_token_counter(cfg["model"])
    _, stats = write_partitions(cfg, tmp_path, image_tokens=count)
    _, pool, _ = load_task(cfg["dataset"], cfg["seed"])
    sizes = {PILImage.open(s["image"]).size for s in pool}
    # Qwen's smart resize at the preset's budget: 28 px blocks within [256, 1280] of them
    expected = {(640, 480): 391, (480, 640): 391, (1024, 768): 999, (1600, 1200): 1230, (1200, 1600): 1230}
    assert {count(s) for s in pool} <= set(expected.values()) | {551}  # 800x533 -> 551
    assert sizes <= set(SIZES)
    assert sum(r["image_tokens"]["total"] for r in stats) == sum(count(s) for s in pool)
    assert all(r["image_tokens"]["min"] <= r["image_tokens"]["median"] <= r["image_tokens"]["max"] for r in stats)
    assert "image tokens per sample (min / median / max)" in format_stats(stats)

"""Predicted peak GPU memory of a client step (fedmllm.models.memory): on the meta device, offline,
for every preset; held against first principles for LLaVA-1.5-7B and, on the CPU, against a real
tiny 4-bit model's weights, trainable tensors, gradients and AdamW state."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_overrides

from fedmllm.models.memory import GB, MODES, QUANT_STATE_CONST, TEXT_TOKENS

PRESETS = sorted(p.stem for p in (Path(__file__).parents[1] / "fedmllm" / "conf" / "model").glob("*.yaml"))
# LLaVA-1.5-7B by hand (as tests/test_inspect.py): LoRA r=16 on q, v of 32 layers; the projector.
LORA_7B = 32 * 16 * (4096 + 4096) * 2
PROJECTOR_7B = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
LINEARS_7B = 32 * (4 * 4096**2 + 3 * 4096 * 11008)  # the NF4 layers: attention + MLP, not lm_head


def _predict(*overrides, **kw):
    from fedmllm.config import compose
    from fedmllm.models.memory import predict_peak

    return predict_peak(compose(["clients_per_round=${num_clients}", *overrides]), **kw)


def _peaks(p):
    return {m: p["modes"][m]["peak"] for m in MODES}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_predicts_offline_without_weights(preset, monkeypatch):
    from transformers import PreTrainedModel

    from fedmllm.config import compose
    from fedmllm.models.build import ensure_built

    model = compose([f"model={preset}"])["model"]
    if model.get("builder"):  # an offline preset's config is its build's (smol-llava's reads SmolLM2's weights)
        ensure_built(model)

    def no_weights(*a, **k):
        raise AssertionError("the prediction loaded weights")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_weights))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = _predict(f"model={preset}", "train.batch_size=2")
    assert p["image_tokens"] > 0 and p["seq_len"] == p["image_tokens"] + TEXT_TOKENS
    for mode in MODES:
        m = p["modes"][mode]
        assert sum(m["components"].values()) == m["peak"] > 0  # the components add up to the peak
    assert p["modes"]["checkpointing"]["activations"] <= p["modes"]["no_checkpointing"]["activations"]


def test_peak_grows_with_batch_size_and_checkpointing_lowers_activations():
    one, four = _predict("model=qwen2-vl-2b", batch_size=1), _predict("model=qwen2-vl-2b", batch_size=4)
    for mode in MODES:
        assert four["modes"][mode]["peak"] > one["modes"][mode]["peak"]
        assert four["modes"][mode]["activations"] > 3 * one["modes"][mode]["activations"]
    for p in (one, four):
        ckpt, full = p["modes"]["checkpointing"], p["modes"]["no_checkpointing"]
        assert ckpt["activations"] < full["activations"] / 2 and ckpt["peak"] < full["peak"]
        static = ("weights_quantized", "weights_unquantized", "trainable_params", "optimizer_state", "cuda_context")
        assert all(ckpt["components"][k] == full["components"][k] for k in static)  # only activations differ
    longer = _predict("model=qwen2-vl-2b", batch_size=4, seq_len=2 * four["seq_len"])
    assert longer["modes"]["no_checkpointing"]["peak"] > four["modes"]["no_checkpointing"]["peak"]


def test_image_tokens_of_the_hub_presets():
    # 640x480: llava (336/14)^2; paligemma (224/14)^2; qwen 644x476 (multiples of 28), 46 x 34
    # patches / 2x2 merge; SmolVLM the longest edge to 1536 -> 1536x1152 = 4x3 tiles of 384 px +
    # the global image, 81 tokens each (SmolVLM-256M: 2048 px, 512 px tiles of 64 tokens);
    # llava-onevision the 384 px base (729) + a 2x2 grid of 27x27 unpadded to 40 rows (+ a newline each).
    want = {
        "llava-1.5-7b": 576,
        "paligemma-3b": 256,
        "qwen2.5-vl-7b": 391,
        "qwen2-vl-2b": 391,
        "smolvlm-2.2b": 13 * 81,
        "smolvlm-256m": 13 * 64,
        "llava-onevision-0.5b": 729 + 40 * 54 + 40,
    }
    for preset, n in want.items():
        assert _predict(f"model={preset}")["image_tokens"] == n, preset
    # the model section's resolution settings count: Qwen's min_pixels scales a small image up
    small = _predict("model=qwen2-vl-2b", "model.min_pixels=3136", image_size=(224, 224))
    assert small["image_tokens"] == 64  # 16 x 16 patches / 4
    assert _predict("model=qwen2-vl-2b", "model.max_pixels=200704")["image_tokens"] <= 256
    assert _predict("model=smolvlm-2.2b", "model.image_splitting=false")["image_tokens"] == 81


def test_llava_7b_at_batch_4_with_checkpointing_is_plausible():
    """From first principles: 6.48B NF4 parameters at 0.5 byte + a 1-byte absmax per 64 (double
    quant) = 3.34 GB; 0.59B bf16 (CLIP 0.30B, projector 21M, embeddings + lm_head 2 x 32064 x 4096)
    = 1.17 GB; LoRA 8.4M fp32 + projector 21M bf16, each with a gradient and two moments = 0.30 GB;
    checkpointed layer inputs 32 x 4096 x 2 B x 4 x 704 tokens = 0.74 GB plus one layer recomputed
    (~0.5 GB) and a CUDA context (0.5 GB): 6.5-8 GB. Without checkpointing every layer keeps
    ~165 KB a token (8h fp32 norms, 4 x 2h attention, 3 x 2i MLP, 2 x 4h LoRA inputs): ~15 GB more."""
    p = _predict("model=llava-1.5-7b", "train.batch_size=4")
    assert p["batch_size"] == 4 and p["seq_len"] == 576 + TEXT_TOKENS and p["selected"] == "checkpointing"
    assert p["params"]["quantized"] == LINEARS_7B
    c = p["modes"]["checkpointing"]["components"]
    assert 0.5 * LINEARS_7B < c["weights_quantized"] < (0.5 + 1 / 64 + 0.001) * LINEARS_7B  # 4.127 bits
    assert 1.1 * GB < c["weights_unquantized"] < 1.25 * GB
    assert c["trainable_params"] == 4 * LORA_7B + 2 * PROJECTOR_7B  # LoRA fp32, the projector copy bf16
    assert c["optimizer_state"] == 2 * c["gradients"] == 2 * c["trainable_params"]
    assert 0.74 * GB < c["activations_saved"] < 1.5 * GB
    assert c["logits"] < 0.05 * GB  # logits_to_keep: 4 x 9 positions x 32064
    peaks = _peaks(p)
    assert 6.5 * GB < peaks["checkpointing"] < 8 * GB
    assert 17 * GB < peaks["no_checkpointing"] < 24 * GB


def test_cli_inspect_prints_the_predicted_peak(capsys):
    from fedmllm.cli import main

    main(["inspect", "model=llava-1.5-7b", "train.batch_size=4"])
    out = capsys.readouterr().out
    p = _predict("model=llava-1.5-7b", "train.batch_size=4")
    assert "predicted peak GPU memory per client step (batch 4 x 704 tokens" in out
    line = next(x for x in out.splitlines() if x.startswith("predicted peak ") and "GPU memory" not in x)
    assert line.split()[-2:] == [f"{p['modes'][m]['peak'] / GB:.2f}" for m in MODES]
    assert "gradient checkpointing *" in out  # the preset's train=gpu selects it
    main(["inspect", "model=llava-1.5-7b", "train.batch_size=4", "train.gradient_checkpointing=false"])
    assert "no checkpointing *" in capsys.readouterr().out


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-idefics3"])
def test_tiny_prediction_equals_the_real_4bit_model_on_cpu(preset):
    """The real model, 4-bit on the CPU with fp32 compute: the NF4 layers and their quant states,
    the other weights, the trainable tensors, their gradients and AdamW's moments after one step
    are the bytes the meta-device prediction counts."""
    import bitsandbytes as bnb
    import torch

    from fedmllm.config import compose, typed
    from fedmllm.models.adapter import apply_peft
    from fedmllm.models.load import load_model
    from fedmllm.training import TrainSettings, make_optimizer

    overrides = tiny_overrides(f"model={preset}", "model.quantization=4bit", "model.compute_dtype=fp32")
    cfg = compose(overrides)
    c = _predict(*overrides)["modes"]["no_checkpointing"]["components"]
    model, _, family = load_model(cfg["model"])
    quantized = unquantized = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            parts = (m.weight, qs.absmax, qs.state2.absmax)
            quantized += sum(t.numel() * t.element_size() for t in parts) + QUANT_STATE_CONST
            assert qs.code.numel() * 4 + qs.state2.code.numel() * 4 + 4 == QUANT_STATE_CONST
    quantized_ids = {id(m.weight) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    unquantized = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in quantized_ids)
    assert quantized > 0 and c["weights_quantized"] == quantized
    assert c["weights_unquantized"] == unquantized

    model = apply_peft(model, family, cfg["peft"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert c["trainable_params"] == sum(p.numel() * p.element_size() for p in trainable)
    opt = make_optimizer(model, typed(TrainSettings, cfg["train"], "train"))
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert c["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    moments = [t for s in opt.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert len(moments) == 2 * len(trainable)
    assert c["optimizer_state"] == sum(t.numel() * t.element_size() for t in moments)


@pytest.mark.parametrize("attn,batch", [("sdpa", 2), ("sdpa", 1), ("eager", 2)])
def test_layer_formula_is_what_autograd_saves(attn, batch):
    """A bf16 Llama (GQA: 2 kv heads of 4) with LoRA on q, v and a frozen base, on the CPU: the
    tensors autograd saves in a forward (parameters aside, each storage once) are L layers of
    layer_bytes + LoRA's fp32 inputs and rank-r outputs, the final norm's fp32 copy and RoPE's
    cos and sin, per token. A left-padded row makes sdpa repeat k, v and save the mask as a bias;
    the input embeddings require grad as a trained projector's image features do."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedmllm.models.memory import Dims, layer_bytes

    h, i, nh, nkv, layers, vocab, seq, r = 128, 344, 4, 2, 2, 300, 24, 16
    config = LlamaConfig(
        hidden_size=h,
        intermediate_size=i,
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        num_hidden_layers=layers,
        vocab_size=vocab,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM(config).to(torch.bfloat16), LoraConfig(r=r, target_modules=["q_proj", "v_proj"])
    )
    model.train()
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, :5] = 0  # left padding in every row but the first
    embeds = model.get_input_embeddings()(torch.randint(0, vocab, (batch, seq))).detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1)
    d, c = h // nh, 2
    per_layer = layer_bytes(Dims(h, i, nh, nkv, d, layers), c, seq, batch, attn) + 2 * 4 * (h + r)
    want = batch * seq * (layers * per_layer + 4 * h + 2 * c * d)
    assert sum(saved.values()) == pytest.approx(want, rel=0.01)  # RMSNorm's rsqrt (4 B a token) aside

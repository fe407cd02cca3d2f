"""Predicted peak GPU memory of one client training step, on the meta device (no weights, offline).

`fedmllm inspect model=<preset> train.batch_size=B` prints it (format_memory). The model is
instantiated from its config on the meta device and the client's PEFT method applied there, as
fedmllm.models.inspection does, so every parameter count below is the real module's; sizes per
token come from the language model's config (hidden size h, intermediate size i, heads nh of
head_dim d, kv heads nkv, layers L, vocabulary V). `c` is the model's dtype on a GPU: the compute
dtype (`model.compute_dtype=auto`: bf16, 2 bytes) when quantized, bf16 unquantized (load.py).

The token budget of one sample is `image_tokens(...)` of one image at IMAGE_SIZE (a 640x480
photo; Hateful Memes' images are of that order) plus TEXT_TOKENS (128: system prompt, chat
template, FedMLLM's multiple-choice prompt of about 90 tokens, a meme's text and the answer); the
loss reads the last ANSWER_TOKENS + 1 positions (answer_loss's `logits_to_keep`). A batch is
`train.batch_size` rows of that length; `train.grad_accum` does not change the peak (the
gradients accumulate in place).

Counted, in bytes:
- weights: the `nn.Linear` layers outside the skip list (vision tower, projector, lm_head:
  load.quantization_config), i.e. the language model's linear layers, as bitsandbytes stores them.
  NF4: n/2 packed bytes + one uint8 absmax per 64-value block (double quant) + one fp32 absmax
  per 256 blocks + the code tables (1,092 bytes a tensor), about 4.127 bits a parameter; 8-bit:
  n + an fp32 scale per output row. Everything else (vision tower, projector, embeddings,
  lm_head, norms, biases) in c bytes; tied weights once.
- trainable: the client's PEFT parameters: LoRA (DoRA, IA3) tensors in fp32 (PEFT upcasts
  adapters), the fully trained projector (`peft.projector=full`) as PEFT's modules_to_save copy in
  c bytes, beside the frozen original; each with a gradient and two AdamW moments of its dtype.
- saved activations, per token of the B x T batch and per decoder layer: the two RMSNorms' fp32
  copies of their input (2 x 4h), attention q and output (2c nh d), k and v (2c kv d; kv = nh: with
  a padding mask transformers repeats them to every head, flash_attention_2 and a batch of one keep
  nkv), the memory-efficient kernel's fp32 logsumexp (4 nh) and, with padding, the mask as an
  additive bias (c T); eager attention saves q, k, v at every head, the fp32 softmax and its
  c-byte cast instead (3c nh d + (4 + c) nh T); the MLP's gate, act(gate) and up (3c i).
  tests/test_memory.py holds this count to what autograd saves in a bf16 Llama on the CPU. The frozen NF4 base linear layers save
  no input (bitsandbytes keeps only the packed weight); a LoRA layer saves its input cast to fp32
  and its rank-r intermediate (4 in + 4 r; DoRA: + (4 + c) out; IA3: 4 x the scaled tensor).
  Outside the layers: the final norm's fp32 copy (4h), RoPE's cos and sin (2c d), the padding mask
  (B T^2: boolean; eager: c bytes), the trained projector's inputs (each linear's input and each activation's input, per
  image token).
  Gradient checkpointing keeps each layer's input (c h) and recomputes one layer at a time.
- backward transient: the gradients alive while one layer's backward runs: the residual's (2c h)
  and the larger of the MLP's (3c i) and attention's (3c nh d + a 4 nh d fp32 workspace), plus
  the fp32 gradient of the largest LoRA input.
- logits: answer_loss computes logits for the last `keep` positions only: c-byte logits, their
  fp32 copy, the fp32 log-softmax and its gradients: (12 + c) B keep V.
- dequantized weight: bitsandbytes dequantizes one layer's weight to c bytes per matmul; DoRA
  adds fp32 copies of an adapted layer's weight, of B A (through an identity of the input's size)
  and of their sum, for the weight norm (16 in out).
- batch inputs: fp32 pixel values and the int64 ids, mask and labels.
- the vision tower: frozen (LoRA on the language model only), it saves nothing; its forward is a
  transient phase before the language model's: every hidden state (LLaVA and LLaVA-OneVision read
  a hidden layer, so the tower returns all of them) or input and output, plus one layer's working
  set (c (4 w + 2 i_v) a patch). Adapted (`peft.targets` with vision_encoder), its layers save like
  the decoder's (c (6 w + 2 i_v) + 4 heads a patch, plus LoRA's inputs) and checkpoint likewise.
- the optimizer step: torch's foreach AdamW holds about one copy of the trainable tensors in
  temporaries, after backward has freed the activations.
- CUDA_CONTEXT: the CUDA context, cuBLAS workspace and kernels, which nvidia-smi shows and
  torch.cuda.max_memory_allocated does not (about 0.5 GB on recent GPUs and drivers).

The peak is the static part (weights, trainable tensors, gradients, moments, context) plus the
largest of three phases: the vision tower's forward, the language model's end of forward / backward
(all saved activations, one layer's backward, the logits, a dequantized weight, the batch) and
the optimizer step. Gradients and saved activations are counted as alive together, which
overstates by at most the gradients' size (freed activations make room for them during backward).

Approximate or left out: the caching allocator's fragmentation and reserve (nvidia-smi shows
more than the allocated peak, often 5-15%); small temporaries (RoPE per layer, norms' outputs
between their producer and consumer); the text markers around SmolVLM's tiles
(<fake_token_around_image><row_r_col_c>, plain text of several tokens a tile: about a tenth more
tokens at 13 tiles, outside the text budget); eager attention in the vision tower (sdpa
assumed); the aggregator's own state and freezing (SCAFFOLD's control variates; FFA-LoRA's
frozen A counted as trained). Every term is an estimate of PyTorch's, transformers' and
bitsandbytes' behaviour at the versions in use, to be held against a measured step.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from PIL import Image

from fedmllm.config import typed
from fedmllm.models.adapter import PeftSettings, apply_peft, llm_layer_index, projector_linears
from fedmllm.models.build import ensure_built
from fedmllm.models.inspection import family_of_preset, hf_config, local_checkpoint, meta_model
from fedmllm.models.load import ModelSettings, quantization_skip, set_resolution
from fedmllm.models.random_init import image_processor, processor_settings
from fedmllm.models.registry import Family
from fedmllm.training import TrainSettings

GB = 1e9
CUDA_CONTEXT = 500_000_000  # CUDA context + cuBLAS workspace + kernels (outside the allocator)
TEXT_TOKENS = 128  # prompt, chat template and answer of a Hateful Memes sample (FedMLLM's mc prompt)
ANSWER_TOKENS = 8  # "(A) not-hateful" + end of turn: the positions the loss reads, less one
IMAGE_SIZE = (480, 640)  # (height, width) of the representative image: a 640x480 photo
NF4_BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes' 4-bit blocksize; double quant's absmax blocks
QUANT_STATE_CONST = 16 * 4 + 256 * 4 + 4  # per 4-bit tensor: NF4 code, nested code, offset (fp32)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}  # model.compute_dtype=auto: bf16 on a GPU
MODES = ("checkpointing", "no_checkpointing")
# What the three phases of a step hold beyond the static part (predict_peak's components).
PHASE_PARTS = (
    "activations_saved",
    "backward_transient",
    "logits",
    "dequantized_weight",
    "batch_inputs",
    "vision_forward",
    "optimizer_step",
)
# Families whose vision tower returns every hidden state (the projector reads a chosen layer).
ALL_HIDDEN_STATES = ("llava", "llava_onevision")


@dataclass(frozen=True)
class Dims:
    """A transformer stack's sizes: width h, MLP width i, heads nh of head_dim d, kv heads, layers."""

    h: int
    i: int
    nh: int
    nkv: int
    d: int
    layers: int


def text_dims(config) -> tuple[Dims, int]:
    """(the language model's Dims, its vocabulary size) from a model config."""
    t = config.get_text_config()
    nh = t.num_attention_heads
    d = getattr(t, "head_dim", None) or t.hidden_size // nh
    nkv = getattr(t, "num_key_value_heads", None) or nh
    return Dims(t.hidden_size, t.intermediate_size, nh, nkv, d, t.num_hidden_layers), t.vocab_size


def vision_dims(config) -> Dims:
    """The vision tower's Dims: CLIP/SigLIP (hidden_size, num_hidden_layers) or Qwen's ViT
    (embed_dim or hidden_size, depth, num_heads; Qwen2-VL's MLP is mlp_ratio x embed_dim)."""
    v = config.vision_config
    w = getattr(v, "embed_dim", None) or v.hidden_size
    inter = getattr(v, "intermediate_size", None) or int(w * getattr(v, "mlp_ratio", 4))
    heads = getattr(v, "num_attention_heads", None) or v.num_heads
    layers = getattr(v, "num_hidden_layers", None) or v.depth
    return Dims(w, inter, heads, heads, w // heads, layers)


# --- image tokens --------------------------------------------------------------------------


def processor_for(model_cfg: dict[str, Any], family: Family, config):
    """The processor whose settings decide an image's tokens, built offline: a local checkpoint's
    (`model.path=DIR`) or an offline preset's build's; for a hub preset, its image processor (the
    transformers class, PIL backend) from the checkpoint's settings bundled in
    hub_configs/<preset>.processor.json. The model section's resolution settings (min_pixels,
    max_pixels, image_splitting, tile_size, max_grid) are applied as loading applies them
    (load.set_resolution; llava_onevision's max_grid also cuts `config`'s pinpoints)."""
    model = typed(ModelSettings, model_cfg, "model")
    local = local_checkpoint(model_cfg)
    if local is None and not model.hf_config and model.builder:
        local = ensure_built(model_cfg)
    if local is not None:
        processor = family.processor_cls().from_pretrained(local)
    else:
        settings = processor_settings(str(model.hf_config)).get("image_processor") or {}
        processor = SimpleNamespace(image_processor=image_processor(settings))
    set_resolution(processor, config, family, model)
    return processor


def image_tokens(config, family: Family, height: int, width: int, processor) -> int:
    """Image tokens of one height x width image in the language model's sequence, by the family's
    own `image_seq_len` (tests/test_families.py holds it to the processor's expansion):
    llava and paligemma: (size / patch)^2 at any size (576 for LLaVA-1.5, 256 for PaliGemma-224);
    llava_onevision: AnyRes, the base image + the best pinpoint grid unpadded (2,929 at 640x480);
    qwen2_vl, qwen2_5_vl: resized into [min_pixels, max_pixels] in multiples of 28 px, one token
    per 28 x 28 block (640x480 -> 644x476: 391); idefics3: the longest edge resized to `size`,
    tiles of `max_image_size` + the global image (SmolVLM: 1536 px, 4 x 3 tiles of 384 px + 1,
    81 tokens each: 1,053). `processor`: processor_for's."""
    return int(family.image_seq_len(config, processor, height, width))


def image_token_counter(model_cfg: dict[str, Any]):
    """A function sample -> the image tokens its image costs under `model_cfg` (0 without an
    image), by the family's image_seq_len over the processor_for settings; reads each image's
    size from its header only. For `fedmllm partition`'s stats: offline, no weights."""
    family, config = family_of_preset(model_cfg), hf_config(model_cfg)
    processor = processor_for(model_cfg, family, config)

    def count(sample) -> int:
        if sample.get("image") is None:
            return 0
        with Image.open(sample["image"]) as im:
            width, height = im.size
        return image_tokens(config, family, height, width, processor)

    return count


def vision_tokens(config, family: Family, height: int, width: int, n_image: int) -> int:
    """Patches one image puts through the vision tower: llava (+ CLS), paligemma (size/patch)^2;
    llava_onevision the base image plus its AnyRes crops; qwen merge^2 and idefics3
    scale_factor^2 per image token."""
    v = config.vision_config
    side = v.image_size // v.patch_size if hasattr(v, "image_size") else 0
    if family.name == "llava":
        return side**2 + 1
    if family.name == "llava_onevision":
        best_h, best_w = max(config.image_grid_pinpoints, key=lambda r: _effective(r, height, width))
        return (1 + (best_h // v.image_size) * (best_w // v.image_size)) * side**2
    if family.name in ("qwen2_vl", "qwen2_5_vl"):
        return n_image * v.spatial_merge_size**2
    if family.name == "idefics3":
        return n_image * config.scale_factor**2
    return side**2 or n_image


def _effective(resolution, height: int, width: int) -> tuple[int, int]:
    """select_best_resolution's order: most effective pixels, then least waste."""
    h, w = resolution
    s = min(w / width, h / height)
    effective = min(int(width * s) * int(height * s), width * height)
    return (effective, -(w * h - effective))


def pixel_bytes(config, family: Family) -> int:
    """fp32 pixel-value bytes of one patch (3 channels x patch^2, x 2 frames for Qwen's ViT)."""
    v = config.vision_config
    return 4 * 3 * v.patch_size**2 * getattr(v, "temporal_patch_size", 1)


# --- the model's parts ------------------------------------------------------------------------


def weight_bytes(model, family: Family, quantization: str, c: int) -> dict[str, int]:
    """Bytes of a meta model's weights on the GPU (see the module docstring) and its largest
    quantized matrix: quantized (the linear layers outside the skip list), unquantized (c bytes)."""
    import torch

    skip = quantization_skip(family)
    linears = {
        id(m.weight): m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(name == p or name.startswith(p + ".") for p in skip)
    }
    out = {"quantized": 0, "unquantized": 0, "quantized_params": 0, "unquantized_params": 0, "largest": 0}
    for p in model.parameters():  # tied weights once
        n = p.numel()
        if quantization == "none" or id(p) not in linears:
            out["unquantized"] += n * c
            out["unquantized_params"] += n
            continue
        if quantization == "4bit":
            blocks = math.ceil(n / NF4_BLOCK)
            out["quantized"] += math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + QUANT_STATE_CONST
        else:  # 8bit: int8 + an fp32 scale per output row
            out["quantized"] += n + 4 * linears[id(p)]
        out["quantized_params"] += n
        out["largest"] = max(out["largest"], n)
    return out


def projector_inputs(model, family: Family) -> list[int]:
    """in_features of the projector's linear layers, in order."""
    return [model.get_submodule(name).in_features for name in projector_linears(model, family)]


@dataclass(frozen=True)
class Adapted:
    """An adapted layer of a meta PEFT model: its module group, decoder layer (None: not in one),
    the bytes it saves per token, its fp32 input per token, its weight's size (DoRA: 0 otherwise)."""

    group: str
    layer: int | None
    saved: int
    fp32_input: int
    dora_weight: int


def adapter_layers(peft_model, family: Family, peft: PeftSettings, c: int) -> list[Adapted]:
    """Every adapted layer of a meta PEFT model (what it saves: see the module docstring)."""
    out = []
    for name, m in peft_model.named_modules():
        dora = 0
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            saved = 4 * (m.in_features + m.r["default"])
            if peft.name == "dora":  # base output (c) and LoRA output (fp32) rescaled by the magnitude
                saved += (4 + c) * m.out_features
                dora = m.in_features * m.out_features
        elif hasattr(m, "ia3_l") and "default" in m.ia3_l:
            saved = 4 * (m.in_features if m.is_feedforward else m.out_features)
        else:
            continue
        group = family.group_of(name.removeprefix("base_model.model.")) or "other"
        out.append(Adapted(group, llm_layer_index(name), saved, 4 * m.in_features, dora))
    return out


def trainable_bytes(peft_model, c: int) -> tuple[int, int]:
    """(trainable parameters, their bytes): adapter tensors in fp32, modules_to_save copies in c bytes."""
    n = size = 0
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            n += p.numel()
            size += p.numel() * (c if "modules_to_save" in name else 4)
    return n, size


def layer_bytes(dims: Dims, c: int, seq: int, batch: int, attn: str) -> int:
    """Bytes one decoder layer saves for backward per token (LoRA's inputs aside)."""
    padded = batch > 1 and attn != "flash_attention_2"  # a padding mask: sdpa without GQA, a bias a layer
    norms = 2 * 4 * dims.h
    if attn == "eager":  # q, k and v repeated to every head, the fp32 softmax and its cast
        attention = 3 * c * dims.nh * dims.d + (4 + c) * dims.nh * seq
    else:  # q, k, v, output, fp32 logsumexp; with padding the mask as a bias
        kv = dims.nh if padded else dims.nkv
        attention = c * dims.d * (2 * dims.nh + 2 * kv) + 4 * dims.nh + (c * seq if padded else 0)
    return norms + attention + 3 * c * dims.i


def backward_bytes(dims: Dims, c: int) -> int:
    """Gradients alive during one decoder layer's backward, per token."""
    return 2 * c * dims.h + max(3 * c * dims.i, 3 * c * dims.nh * dims.d + 4 * dims.nh * dims.d)


# --- the prediction ---------------------------------------------------------------------------


def predict_peak(
    cfg: dict[str, Any],
    batch_size: int | None = None,
    seq_len: int | None = None,
    *,
    text_tokens: int = TEXT_TOKENS,
    answer_tokens: int = ANSWER_TOKENS,
    image_size: tuple[int, int] = IMAGE_SIZE,
) -> dict[str, Any]:
    """Predicted peak GPU memory of one client training step of a composed config, with and
    without gradient checkpointing (the module docstring says what is counted and how).

    `batch_size`: rows per step (default `train.batch_size`); `seq_len`: tokens per row (default
    the image tokens of one `image_size` (height, width) image + `text_tokens`); the loss reads
    `answer_tokens` + 1 positions. Returns the token budget, parameter counts and, per mode,
    `components` (bytes, adding up to `peak`), `activations` (the peak phase's share) and `phase`;
    `selected` is the mode `train.gradient_checkpointing` picks."""
    model_cfg = cfg["model"]
    settings = typed(ModelSettings, model_cfg, "model")
    peft = typed(PeftSettings, cfg["peft"], "peft")
    train = typed(TrainSettings, cfg["train"], "train")
    batch = int(batch_size if batch_size is not None else train.batch_size)
    quant = settings.quantization
    dtype = settings.compute_dtype if quant != "none" and settings.compute_dtype != "auto" else "bf16"
    c = DTYPE_BYTES[dtype]
    attn = settings.attn_implementation

    model, family = meta_model(model_cfg)
    config = model.config
    dims, vocab = text_dims(config)
    weights = weight_bytes(model, family, quant, c)
    proj_in = projector_inputs(model, family)
    with warnings.catch_warnings():  # PEFT calls transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing")
        peft_model = apply_peft(model, family, cfg["peft"])
    n_trainable, trainable = trainable_bytes(peft_model, c)
    adapted = adapter_layers(peft_model, family, peft, c)

    height, width = image_size
    n_image = image_tokens(config, family, height, width, processor_for(model_cfg, family, config))
    seq = int(seq_len) if seq_len is not None else n_image + int(text_tokens)
    n_image = min(n_image, seq)
    keep = int(answer_tokens) + 1
    tokens, image_rows = batch * seq, batch * n_image  # the language model's tokens; image tokens
    patches = batch * vision_tokens(config, family, height, width, n_image)

    # adapters' saved inputs: per decoder layer (llm), vision tower, projector
    llm_by_layer: dict[int | None, int] = {}
    vision_lora = projector_lora = 0
    for a in adapted:
        if a.group == "vision_encoder":
            vision_lora += a.saved
        elif a.group == "projector":
            projector_lora += a.saved
        else:
            llm_by_layer[a.layer] = llm_by_layer.get(a.layer, 0) + a.saved
    largest_lora_input = max((a.fp32_input for a in adapted if a.group == "llm"), default=0)
    # one matmul's dequantized weight; DoRA also builds, per layer, fp32 copies of the weight, of
    # B A (through an identity the size of the input) and of their sum for the weight's norm
    dequantized = weights["largest"] * c if quant != "none" else 0
    dequantized += 16 * max((a.dora_weight for a in adapted), default=0)

    # the projector's saved inputs per image token (trained fully or through LoRA)
    between = c * sum(proj_in[1:])  # the activations' inputs between its linear layers
    projector = {"full": c * sum(proj_in) + between, "lora": projector_lora + between}.get(peft.projector, 0)
    vision_trained = "vision_encoder" in peft.targets
    vd = vision_dims(config)
    vision_layer = c * (6 * vd.h + 2 * vd.i) + 4 * vd.nh + (vision_lora // max(1, vd.layers))
    kept_states = vd.layers + 1 if family.name in ALL_HIDDEN_STATES else 2
    vision_forward = 0 if vision_trained else patches * c * (kept_states * vd.h + 4 * vd.h + 2 * vd.i)

    inputs = patches * pixel_bytes(config, family) + 3 * 8 * tokens
    static = {
        "weights_quantized": weights["quantized"],
        "weights_unquantized": weights["unquantized"],
        "trainable_params": trainable,
        "gradients": trainable,
        "optimizer_state": 2 * trainable,
        "cuda_context": CUDA_CONTEXT,
    }
    per_layer = layer_bytes(dims, c, seq, batch, attn)
    outside = 4 * dims.h + 2 * c * dims.d  # final norm's fp32 copy, RoPE's cos and sin
    # the 4D padding mask, built once: boolean for sdpa, in the compute dtype for eager
    mask = batch * seq * seq * (c if attn == "eager" else 1) if (batch > 1 and attn != "flash_attention_2") else 0
    modes = {}
    for mode in MODES:
        ckpt = mode == "checkpointing"
        if ckpt:
            llm = dims.layers * c * dims.h + per_layer
            lora = max(llm_by_layer.values(), default=0)
            vision = (vd.layers * c * vd.h + vision_layer) if vision_trained else 0
        else:
            llm = dims.layers * per_layer
            lora = sum(llm_by_layer.values())
            vision = vd.layers * vision_layer if vision_trained else 0
        saved = tokens * (llm + lora + outside) + mask + image_rows * projector + patches * vision
        phases = {
            "vision tower forward": {"vision_forward": vision_forward, "batch_inputs": inputs},
            "language model backward": {
                "activations_saved": saved,
                "backward_transient": tokens * backward_bytes(dims, c) + tokens * largest_lora_input,
                "logits": (12 + c) * batch * keep * vocab,
                "dequantized_weight": dequantized,
                "batch_inputs": inputs,
            },
            "optimizer step": {"optimizer_step": trainable},
        }
        phase = max(phases, key=lambda p: sum(phases[p].values()))
        parts = {**dict.fromkeys(PHASE_PARTS, 0), **phases[phase]}
        components = {**static, **parts}
        modes[mode] = {
            "components": components,
            "activations": sum(parts.values()),
            "phase": phase,
            "peak": sum(components.values()),
        }
    return {
        "preset": settings.name,
        "peft": peft.name,
        "quantization": quant,
        "dtype": dtype,
        "dtype_bytes": c,
        "attn_implementation": attn,
        "batch_size": batch,
        "image_size": (height, width),
        "image_tokens": n_image,
        "text_tokens": seq - n_image,
        "seq_len": seq,
        "keep": keep,
        "vision_trained": vision_trained,
        "peft_projector": peft.projector,
        "params": {
            "quantized": weights["quantized_params"],
            "unquantized": weights["unquantized_params"],
            "trainable": n_trainable,
        },
        "selected": "checkpointing" if train.gradient_checkpointing else "no_checkpointing",
        "modes": modes,
    }


ROWS = (
    ("weights_quantized", "weights, {quant} ({qparams} LM linear params)"),
    ("weights_unquantized", "weights, {dtype} ({unquantized})"),
    ("trainable_params", "trainable params ({peft} fp32{projector})"),
    ("gradients", "their gradients"),
    ("optimizer_state", "AdamW moments (2 per param)"),
    ("activations_saved", "saved activations"),
    ("backward_transient", "backward transient (one layer)"),
    ("logits", "logits + loss (last {keep} positions)"),
    ("dequantized_weight", "dequantized weight (one matmul)"),
    ("batch_inputs", "batch inputs (pixels, ids)"),
    ("vision_forward", "vision tower forward (frozen, transient)"),
    ("optimizer_step", "optimizer step temporaries"),
    ("cuda_context", "CUDA context + workspace"),
)


def format_memory(p: dict[str, Any]) -> str:
    """The section `fedmllm inspect` prints: both modes side by side, in GB (1e9 bytes)."""
    dtype = p["dtype"]
    quant = {"4bit": "4-bit NF4", "8bit": "int8", "none": dtype}[p["quantization"]]
    h, w = p["image_size"]
    names = {m: ("gradient checkpointing" if m == "checkpointing" else "no checkpointing") for m in MODES}
    names[p["selected"]] += " *"
    fill = {
        "quant": quant,
        "qparams": f"{p['params']['quantized'] / 1e9:.2f}B",
        "dtype": dtype,
        "unquantized": "all" if p["quantization"] == "none" else "vision, projector, embeddings, lm_head",
        "projector": f", projector copy {dtype}" if p["peft_projector"] == "full" else "",
        "keep": p["keep"],
        "peft": p["peft"],
    }
    lines = [
        f"predicted peak GPU memory per client step (batch {p['batch_size']} x {p['seq_len']} tokens = "
        f"{p['image_tokens']} image tokens of a {w}x{h} image + {p['text_tokens']} text; {dtype} compute, "
        f"{quant} weights, {p['attn_implementation']} attention; GB = 1e9 bytes)",
        f"{'':<58} {names['checkpointing']:>24} {names['no_checkpointing']:>18}",
    ]
    modes = p["modes"]
    for key, label in ROWS:
        a, b = (modes[m]["components"][key] for m in MODES)
        if a or b:
            lines.append(f"{label.format(**fill):<58} {a / GB:>24.2f} {b / GB:>18.2f}")
    lines.append(
        f"{'predicted peak':<58} {modes['checkpointing']['peak'] / GB:>24.2f} {modes['no_checkpointing']['peak'] / GB:>18.2f}"
    )
    lines.append(
        f"peak phase: {modes['checkpointing']['phase']} / {modes['no_checkpointing']['phase']}; "
        f"* train.gradient_checkpointing={'true' if p['selected'] == 'checkpointing' else 'false'} "
        "(the config's choice); an estimate: see fedmllm/models/memory.py for what it counts"
    )
    return "\n".join(lines)

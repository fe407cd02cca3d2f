"""Compressed uploads (`transport`): what a client sends is its update (its adapter minus the
global one it received), top-k sparsified and/or quantized blockwise, with error feedback.

`transport.codec`: fp32 (off), fp16, bf16, int8 (bitsandbytes' blockwise dynamic 8-bit, one
float32 absmax per block), nf4 (bitsandbytes' blockwise 4-bit NormalFloat, one absmax per block).
`transport.topk`: keep that fraction of each tensor's entries (largest magnitude), sent as int32
indices plus the values in the codec. `transport.error_feedback` (default on): what the encoding
lost is added to the client's next update (`residual`, kept in the client's store), so the sum of
what the server decodes tracks the sum of the true updates.

The encoded payload of one tensor `k` is a few arrays under `k#<part>` (`#` never occurs in an
adapter key): `k#fp16` / `k#bf16` (the 16-bit patterns as uint16), `k#q` + `k#absmax` (int8),
`k#q4` + `k#absmax` (nf4), `k#val` (fp32 values), and `k#idx` with top-k. The server decodes it
against the global adapter it sent (strategies.wrapper) before any check or strategy sees it, so
every algorithm that averages adapters composes with it; FLoRA's stacking (replies of another
rank) is refused.
`transport.down_codec` compresses downloads the same way: the server keeps, per node, the global
adapter as that node decoded it (x_n) and sends the difference between the new global adapter
and x_n, encoded; both sides add the decoded difference to x_n. What the encoding lost stays in
the next difference, so this is error feedback on the server, and it holds with partial
participation (each node's x_n is its own). A node the server has no x_n for (its first round, or
after a resume) gets the difference from zeros (`#base` 0). Downloads carry each tensor's shape
(`k#shape`, int32), since a client decodes them before its model exists.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from fedmllm.config import Number, integer, need, number

CODECS = ("fp32", "fp16", "bf16", "int8", "nf4")
SEP = "#"
HALF = {"fp16": "float16", "bf16": "bfloat16"}  # 16-bit codecs: the torch dtype each travels as (its bits as uint16)
RESIDUAL = "transport-residual"  # the client store's name for the error-feedback residual
MODEL = "transport-model"  # the client store's name for the global adapter as this client decoded it
BASE = f"{SEP}base"  # a download's base: 0 zeros (first contact, or the server lost track), 1 the last one


@dataclass
class TransportSettings:
    """`transport`: how a client's update travels up (fedmllm/conf/config.yaml)."""

    codec: str = "fp32"
    topk: Optional[Number] = None
    error_feedback: bool = True
    block: int = 64
    down_codec: str = "fp32"

    def __post_init__(self) -> None:
        need(self.codec in CODECS, f"transport.codec={self.codec!r}: choose one of {list(CODECS)}")
        need(self.down_codec in CODECS, f"transport.down_codec={self.down_codec!r}: choose one of {list(CODECS)}")
        need(
            self.topk is None or (number(self.topk) and 0 < self.topk <= 1),
            f"transport.topk={self.topk!r} must be null (dense) or a fraction in (0, 1], e.g. 0.1",
        )
        need(
            integer(self.block) and self.block >= 64 and self.block & (self.block - 1) == 0,
            f"transport.block={self.block!r} must be a power of two >= 64 (bitsandbytes' block sizes)",
        )

    @property
    def active(self) -> bool:
        """Whether anything travels encoded (uploads or downloads)."""
        return self.up or self.down

    @property
    def up(self) -> bool:
        return self.codec != "fp32" or self.topk is not None

    @property
    def down(self) -> bool:
        return self.down_codec != "fp32"


def settings_of(cfg: Mapping) -> TransportSettings:
    return TransportSettings(**(cfg.get("transport") or {}))


# --- one tensor -----------------------------------------------------------------------------------


def _quantize(values: np.ndarray, codec: str, block: int) -> dict[str, np.ndarray]:
    """A 1-D float32 array in `codec`: {part: array}."""
    if codec == "fp32":
        return {"val": values}
    import torch

    t = torch.from_numpy(np.ascontiguousarray(values))
    if codec in HALF:  # torch's conversion: numpy's astype(float16) is 15-20x slower
        return {codec: t.to(getattr(torch, HALF[codec])).view(torch.int16).numpy().view(np.uint16).copy()}
    import bitsandbytes.functional as bnbf

    if values.size == 0:
        return {"q" if codec == "int8" else "q4": np.zeros(0, np.uint8), "absmax": np.zeros(0, np.float32)}
    if codec == "int8":
        q, state = bnbf.quantize_blockwise(t, blocksize=block)
        return {"q": q.numpy(), "absmax": state.absmax.float().numpy()}
    q, state = bnbf.quantize_4bit(t, blocksize=block, quant_type="nf4")
    return {"q4": q.reshape(-1).numpy(), "absmax": state.absmax.float().numpy()}


def _dequantize(parts: Mapping[str, np.ndarray], n: int, block: int) -> np.ndarray:
    """The 1-D float32 values of `n` entries encoded as `parts`."""
    if "val" in parts:
        return np.asarray(parts["val"], np.float32)
    import torch

    for codec, dtype in HALF.items():
        if codec in parts:
            bits = torch.from_numpy(np.asarray(parts[codec], np.uint16).view(np.int16).copy())
            return bits.view(getattr(torch, dtype)).float().numpy()
    if n == 0:
        return np.zeros(0, np.float32)
    import bitsandbytes.functional as bnbf

    absmax = torch.from_numpy(np.asarray(parts["absmax"], np.float32).copy())
    if "q" in parts:
        q = torch.from_numpy(np.asarray(parts["q"], np.uint8).copy())
        return bnbf.dequantize_blockwise(q, absmax=absmax, code=_dynamic_map(), blocksize=block).numpy()
    q4 = torch.from_numpy(np.asarray(parts["q4"], np.uint8).copy()).reshape(-1, 1)
    state = bnbf.QuantState(
        absmax=absmax, shape=torch.Size([n]), dtype=torch.float32, blocksize=block, quant_type="nf4", code=_nf4_map()
    )
    return bnbf.dequantize_4bit(q4, quant_state=state).numpy()


@functools.cache
def _dynamic_map():
    """bitsandbytes' 8-bit dynamic code (built in Python, 0.3 ms: once, not per tensor)."""
    import bitsandbytes.functional as bnbf

    return bnbf.create_dynamic_map()


@functools.cache
def _nf4_map():
    import bitsandbytes.functional as bnbf

    return bnbf.get_4bit_type("nf4", device="cpu")


def encode_tensor(update: np.ndarray, settings: TransportSettings) -> dict[str, np.ndarray]:
    """One tensor's update as {part: array}: top-k indices (when set) and the values in the codec."""
    flat = np.ascontiguousarray(update, np.float32).reshape(-1)
    parts: dict[str, np.ndarray] = {}
    if settings.topk is not None and settings.topk < 1:
        k = max(1, int(np.ceil(settings.topk * flat.size))) if flat.size else 0
        idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]) if k else np.zeros(0, np.int64)
        parts["idx"] = idx.astype(np.int32)
        flat = flat[idx]
    parts.update(_quantize(flat, settings.codec, settings.block))
    return parts


def decode_tensor(parts: Mapping[str, np.ndarray], shape: tuple[int, ...], block: int) -> np.ndarray:
    """The float32 update of `shape` that `parts` encode."""
    size = int(np.prod(shape))
    if "idx" in parts:
        idx = np.asarray(parts["idx"], np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            raise ValueError(f"top-k index out of range for shape {tuple(shape)}")
        out = np.zeros(size, np.float32)
        out[idx] = _dequantize(parts, idx.size, block)
        return out.reshape(shape)
    values = _dequantize(parts, size, block)
    if values.size != size:
        raise ValueError(f"{values.size} decoded values for shape {tuple(shape)}")
    return values.reshape(shape)


# --- a payload ------------------------------------------------------------------------------------


def encode(update: Mapping[str, np.ndarray], settings: TransportSettings) -> dict[str, np.ndarray]:
    """An update {key: array} as the flat encoded payload {key#part: array}."""
    out = {}
    for k, v in update.items():
        for part, arr in encode_tensor(v, settings).items():
            out[f"{k}{SEP}{part}"] = arr
    return out


def split(encoded: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{key: {part: array}} of an encoded payload; ValueError when a key has no part."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in encoded.items():
        if name == BASE:
            continue
        key, sep, part = name.rpartition(SEP)
        if not sep:
            raise ValueError(f"{name!r} is not an encoded tensor (expected '<key>{SEP}<part>')")
        out.setdefault(key, {})[part] = arr
    return out


def decode(
    encoded: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], block: int
) -> dict[str, np.ndarray]:
    """The float32 update {key: array} of an encoded payload, each key's shape from `shapes` (the
    global adapter sent); ValueError names a key the adapter does not have."""
    out = {}
    for key, parts in split(encoded).items():
        if key not in shapes:
            raise ValueError(f"encoded tensor {key!r} is not in the adapter sent")
        out[key] = decode_tensor(parts, tuple(shapes[key]), block)
    return out


def compress_update(
    adapter: Mapping[str, np.ndarray],
    sent: Mapping[str, np.ndarray],
    settings: TransportSettings,
    residual: Mapping[str, np.ndarray] | None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The client's side: (encoded payload, new residual) for its trained `adapter` and the global
    adapter it was `sent`. With error feedback the residual (what encoding lost, carried from the
    last round) is added to the update before encoding, and the new one is what this encoding
    lost; without, the residual is None."""
    update = {k: np.asarray(v, np.float32) - np.asarray(sent[k], np.float32) for k, v in adapter.items()}
    if settings.error_feedback and residual:
        update = {
            k: u + residual[k] if k in residual and residual[k].shape == u.shape else u for k, u in update.items()
        }
    encoded = encode(update, settings)
    if not settings.error_feedback:
        return encoded, None
    decoded = decode(encoded, {k: u.shape for k, u in update.items()}, settings.block)
    return encoded, {k: update[k] - decoded[k] for k in update}


# --- downloads ------------------------------------------------------------------------------------


def is_encoded(arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether a payload is encoded (its keys carry a part) rather than plain adapter tensors."""
    return any(SEP in k for k in arrays)


def encode_download(
    new: Mapping[str, np.ndarray], last: Mapping[str, np.ndarray] | None, settings: TransportSettings
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The server's side: (encoded download, the node's adapter after decoding it) for the new
    global adapter and what the node holds (`last`; None: nothing, it decodes onto zeros)."""
    usable = last is not None and all(k in last and last[k].shape == np.shape(v) for k, v in new.items())
    base = {k: (last[k] if usable else np.zeros(np.shape(v), np.float32)) for k, v in new.items()}
    delta = {k: np.asarray(v, np.float32) - base[k] for k, v in new.items()}
    down = TransportSettings(codec=settings.down_codec, block=settings.block)
    encoded = encode(delta, down)
    for k, v in new.items():
        encoded[f"{k}{SEP}shape"] = np.asarray(np.shape(v), np.int32)
    encoded[BASE] = np.asarray([1 if usable else 0], np.uint8)
    decoded = decode(encoded, {k: np.shape(v) for k, v in new.items()}, settings.block)
    return encoded, {k: base[k] + decoded[k] for k in new}


def decode_download(
    encoded: Mapping[str, np.ndarray], last: Mapping[str, np.ndarray] | None, block: int
) -> dict[str, np.ndarray]:
    """The client's side: the global adapter a download encodes, added onto what the client held
    (`last`, when the download says so)."""
    parts = split(encoded)
    shapes = {k: tuple(int(d) for d in p["shape"]) for k, p in parts.items()}
    onto_last = bool(np.asarray(encoded.get(BASE, [0]))[0])
    if onto_last and (last is None or any(k not in last or last[k].shape != s for k, s in shapes.items())):
        raise ValueError("a download onto this client's last adapter, which it does not hold; restart the run")
    delta = decode(encoded, shapes, block)
    return {k: (last[k] if onto_last else 0) + delta[k] for k in shapes}

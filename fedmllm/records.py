"""Flower record glue shared by both apps: adapter dicts <-> ArrayRecord."""

from __future__ import annotations

import math
from functools import lru_cache
from io import BytesIO

import numpy as np
from flwr.app import Array, ArrayRecord

_NPY_MAGIC = b"\x93NUMPY"


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Adapter payload -> ArrayRecord (fp32 numpy, key order kept)."""
    return ArrayRecord({k: encode(v) for k, v in arrays.items()})


@lru_cache(maxsize=4096)
def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def encode(value) -> Array:
    """A float32 Array with exactly the bytes `np.save` writes (what Flower's `Array(ndarray)`
    stores), built with one copy and a cached header instead of a BytesIO round trip per tensor."""
    arr = np.ascontiguousarray(value, dtype=np.float32)
    if arr.dtype.byteorder == ">":
        return Array(arr)
    shape = tuple(int(d) for d in arr.shape)
    return Array(dtype="float32", shape=shape, stype="numpy.ndarray",
                 data=b"".join((_npy_header(shape), memoryview(arr).cast("B") if arr.size else b"")))


@lru_cache(maxsize=64)
def _dtype(name: str) -> np.dtype:
    return np.dtype(name)


def decode(array: Array) -> np.ndarray:
    """An Array's values as a read-only numpy view of its bytes (no copy).

    Flower's `Array.numpy()` runs `np.load`, which parses each header with `ast.literal_eval` and
    copies the data: for an adapter of a few hundred tensors that is most of an aggregation's time.
    Arrays that are not plain C-ordered .npy (or whose header disagrees with the Array's dtype and
    shape) fall back to `Array.numpy()`.
    """
    data = array.data
    if array.stype == "numpy.ndarray" and data[:6] == _NPY_MAGIC:
        size = 2 if data[6] == 1 else 4
        start = 8 + size + int.from_bytes(data[8 : 8 + size], "little")
        dtype = _dtype(array.dtype)
        shape = tuple(array.shape)
        count = math.prod(shape)
        if (len(data) - start == count * dtype.itemsize and not dtype.hasobject
                and data.find(b"'fortran_order': False", 8, start) > 0):
            return np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape)
    return array.numpy()


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> adapter payload (read-only views; copy before modifying in place)."""
    return {k: decode(v) for k, v in record.items()}

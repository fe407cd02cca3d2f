"""Flower record glue shared by both apps: adapter dicts <-> ArrayRecord."""

from __future__ import annotations

import ctypes
import math
import platform
from collections.abc import Mapping
from functools import lru_cache
from io import BytesIO
from typing import NamedTuple

import numpy as np
from flwr.app import Array, ArrayRecord

_NPY_MAGIC = b"\x93NUMPY"


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Adapter payload -> ArrayRecord (fp32 numpy, key order kept)."""
    return _record((k, encode(v)) for k, v in arrays.items())


def _record(items) -> ArrayRecord:
    # Item by item: ArrayRecord(dict) builds every Array a second time (from_array_dict).
    record = ArrayRecord()
    for k, array in items:
        record[k] = array
    return record


@lru_cache(maxsize=4096)
def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


@lru_cache(maxsize=4096)
def _float32_layout(shape: tuple[int, ...]) -> tuple[bytes, int]:
    """(the .npy header of a C-ordered float32 array of `shape`, its element count)."""
    return _npy_header(tuple(int(d) for d in shape)), math.prod(shape)


def encode(value) -> Array:
    """A float32 Array with exactly the bytes `np.save` writes (what Flower's `Array(ndarray)`
    stores), built with one copy and a cached header instead of a BytesIO round trip per tensor."""
    if np.asarray(value).dtype.kind in "iu":  # an encoded upload's codes, indices, bit patterns
        return Array(np.ascontiguousarray(value))
    arr = np.ascontiguousarray(value, dtype=np.float32)
    if arr.dtype.byteorder == ">":
        return Array(arr)
    shape = tuple(int(d) for d in arr.shape)
    return Array(
        dtype="float32",
        shape=shape,
        stype="numpy.ndarray",
        data=b"".join((_npy_header(shape), memoryview(arr).cast("B") if arr.size else b"")),
    )


class RecordBuffer:
    """An ArrayRecord filled in place: the result of an aggregation is written straight into the
    bytes its Arrays will hold, instead of into numpy arrays copied into new bytes afterwards.

        buf = RecordBuffer({"a": (8, 4096), ...})
        average_into(buf.arrays)   # writable float32 views, one per key
        record = buf.seal()        # the ArrayRecord; the views turn read-only

    Flower's Array holds immutable `bytes`. On CPython each buffer is a bytes object created
    uninitialised with the C API (`PyBytes_FromStringAndSize(NULL, n)`), given its .npy header and
    filled through the views before anything else can see it -- how C code builds bytes objects.
    Elsewhere the views are plain numpy arrays and `seal` copies them once (what `to_record` does).
    """

    _zero_copy = platform.python_implementation() == "CPython"

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], touch: bool = False):
        self._data: dict[str, bytes] = {}
        self.arrays: dict[str, np.ndarray] = {}
        for k, shape in shapes.items():
            shape = tuple(int(d) for d in shape)
            if self._zero_copy:
                header = _npy_header(shape)
                data = _new_bytes(None, len(header) + 4 * math.prod(shape))
                raw = (ctypes.c_char * len(data)).from_address(_bytes_address(data))
                raw.owner = data  # the views keep the bytes alive
                view = np.frombuffer(raw, dtype=np.uint8)
                view[: len(header)] = np.frombuffer(header, np.uint8)
                self._data[k] = data
                self.arrays[k] = view[len(header) :].view(np.float32).reshape(shape)
            else:
                self.arrays[k] = np.empty(shape, np.float32)
            if touch:  # the pages mapped now (zeros), not when the average first writes them
                self.arrays[k].fill(0.0)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.arrays.items()}

    def seal(self) -> ArrayRecord:
        """The ArrayRecord holding the values written into `arrays` (call once, after writing)."""
        if not self._zero_copy:
            return to_record(self.arrays)
        items = []
        for k, view in self.arrays.items():
            view.flags.writeable = False
            items.append((k, Array(dtype="float32", shape=view.shape, stype="numpy.ndarray", data=self._data[k])))
        return _record(items)


if RecordBuffer._zero_copy:
    _new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
    _new_bytes.restype, _new_bytes.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
    _bytes_address = ctypes.pythonapi.PyBytes_AsString
    _bytes_address.restype, _bytes_address.argtypes = ctypes.c_void_p, (ctypes.py_object,)


@lru_cache(maxsize=64)
def _dtype(name: str) -> np.dtype:
    return np.dtype(name)


class ArrayMeta(NamedTuple):
    """What an Array declares, without a view of its values."""

    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int


def _npy_layout(array: Array) -> tuple[np.dtype, tuple[int, ...], int, int] | None:
    """(dtype, shape, count, data offset) of a plain C-ordered .npy Array whose header agrees with
    its declared dtype and shape and whose length fits; None for anything else."""
    data = array.data
    if array.stype != "numpy.ndarray" or data[:6] != _NPY_MAGIC:
        return None
    size = 2 if data[6] == 1 else 4
    start = 8 + size + int.from_bytes(data[8 : 8 + size], "little")
    layout = _header_layout(data[8 + size : start], array.dtype, tuple(array.shape), len(data) - start)
    return None if layout is None else (*layout, start)


@lru_cache(maxsize=4096)
def _header_layout(
    header: bytes, dtype_name: str, shape: tuple[int, ...], nbytes: int
) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, count) when a .npy header is C-ordered and the data's length fits the declared
    dtype and shape; None otherwise. Cached: an adapter's tensors share a few headers per round."""
    dtype = _dtype(dtype_name)
    count = math.prod(shape)
    if nbytes == count * dtype.itemsize and not dtype.hasobject and b"'fortran_order': False" in header:
        return dtype, shape, count
    return None


def decode(array: Array) -> np.ndarray:
    """An Array's values as a read-only numpy view of its bytes (no copy).

    Flower's `Array.numpy()` runs `np.load`, which parses each header with `ast.literal_eval` and
    copies the data: for an adapter of a few hundred tensors that is most of an aggregation's time.
    Arrays that are not plain C-ordered .npy (or whose header disagrees with the Array's dtype and
    shape) fall back to `Array.numpy()`.
    """
    data, shape = array.data, array.shape
    if array.dtype == "float32" and array.stype == "numpy.ndarray" and type(shape) is tuple:
        header, count = _float32_layout(shape)  # what to_record and np.save write for this shape
        if len(data) == len(header) + 4 * count and data.startswith(header):
            return np.frombuffer(data, dtype=np.float32, count=count, offset=len(header)).reshape(shape)
    layout = _npy_layout(array)
    if layout is None:
        return array.numpy()
    dtype, shape, count, start = layout
    return np.frombuffer(array.data, dtype=dtype, count=count, offset=start).reshape(shape)


def declared(array: Array) -> ArrayMeta:
    """The shape, dtype and size an Array declares (its bytes unread: `decode` checks them)."""
    shape = tuple(int(d) for d in array.shape)
    dtype = _dtype(array.dtype)
    return ArrayMeta(shape, dtype, math.prod(shape) * dtype.itemsize)


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> adapter payload (read-only views; copy before modifying in place)."""
    return {k: decode(v) for k, v in record.items()}

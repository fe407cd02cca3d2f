"""Pure aggregation math and reply validation over dicts of arrays (no flwr)."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Mapping, Sequence

import numpy as np
from threadpoolctl import ThreadpoolController


class InvalidReply(ValueError):
    """A client reply that must not be aggregated; the message says why."""


# What decoding a malformed reply raises (corrupt .npy bytes, another stype, a missing record), on
# top of our own InvalidReply: each drops that reply with its reason, never the round.
REPLY_ERRORS = (InvalidReply, KeyError, StopIteration, ValueError, TypeError, EOFError, OSError, AttributeError)


class UnusableReplies(InvalidReply):
    """Raised by a strategy that reads the replies' values itself (strategies.wrapper's
    `checks_values`): {index of the reply among those it was given: why it cannot be used}."""

    def __init__(self, reasons: dict[int, str]):
        super().__init__("; ".join(f"reply {i}: {r}" for i, r in sorted(reasons.items())))
        self.reasons = dict(reasons)


def unreadable(err: Exception) -> str:
    """The drop reason of a reply whose decoding raised `err`."""
    return str(err) if isinstance(err, InvalidReply) else f"unreadable reply ({type(err).__name__}: {err})"


def weighted_average(payloads: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """sum_k w_k x_k / sum_k w_k, key by key (FedAvg)."""
    if not payloads:
        raise ValueError("nothing to aggregate")
    w = np.asarray(weights, dtype=np.float64)
    if (w <= 0).any():
        raise ValueError(f"weights must be > 0, got {w.tolist()}")
    w = w / w.sum()
    return {
        k: sum(wi * np.asarray(p[k], dtype=np.float64) for wi, p in zip(w, payloads)).astype(np.float32)
        for k in payloads[0]
    }


def weighted_average_fused(
    payloads: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    out: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], list[int]]:
    """FedAvg in one pass per client and tensor, without temporaries: acc = w_0 x_0, then
    acc += w_k x_k with BLAS saxpy (reads x_k and acc once; numpy's `acc += w * x` makes and reads
    a temporary). `out`: float32 arrays to write the average into (e.g. a records.RecordBuffer's,
    so the result is already in the bytes Flower sends); fresh arrays otherwise. Finiteness is
    checked once, on the result; when it is not finite, the payloads with non-finite values are
    found, left out and the average rebuilt from the others. Returns (average, indices of the
    left-out payloads)."""
    if not payloads:
        raise ValueError("nothing to aggregate")
    w = np.asarray(weights, dtype=np.float64)
    if (w <= 0).any():
        raise ValueError(f"weights must be > 0, got {w.tolist()}")

    def average(idx: list[int]) -> dict[str, np.ndarray]:
        wi = [np.float32(x) for x in w[idx] / w[idx].sum()]
        result = {}
        with np.errstate(invalid="ignore", over="ignore"), _one_blas_thread():
            for k, first in payloads[0].items():
                acc = out[k] if out is not None else np.empty(np.shape(first), np.float32)
                np.multiply(payloads[idx[0]][k], wi[0], out=acc)
                for weight, i in zip(wi[1:], idx[1:]):
                    _axpy(weight, payloads[i][k], acc)
                result[k] = acc
        return result

    everyone = list(range(len(payloads)))
    result = average(everyone)
    if all(all_finite(v) for v in result.values()):
        return result, []
    bad = [i for i, p in enumerate(payloads) if not all(np.isfinite(v).all() for v in p.values())]
    keep = [i for i in everyone if i not in bad]
    return (average(keep) if keep else {}), bad


try:  # scipy comes with scikit-learn; BLAS saxpy is 2-3x faster than numpy's `acc += w * x`
    from scipy.linalg.blas import saxpy as _saxpy
except ImportError:  # pragma: no cover
    _saxpy = None


@functools.lru_cache(maxsize=1)
def _blas_threads():
    return ThreadpoolController()


def _one_blas_thread():
    """saxpy is memory-bound: one thread reaches the bandwidth, and OpenBLAS's worker threads,
    spinning on cores busy with other work (clients, evaluation), made it 5x slower (measured)."""
    if _saxpy is None:
        return contextlib.nullcontext()
    return _blas_threads().limit(limits=1, user_api="blas")


def _axpy(a: np.float32, x: np.ndarray, y: np.ndarray) -> None:
    """y += a * x in place (y: a C-contiguous float32 array)."""
    x = np.asarray(x)
    if x.size == 0:
        return
    if (
        _saxpy is not None
        and x.dtype == np.float32
        and x.flags.c_contiguous
        and y.flags.c_contiguous
        and x.size < 2**31
    ):  # LP64 BLAS counts in int32
        _saxpy(x.reshape(-1), y.reshape(-1), a=a)
    else:
        y += a * x.astype(np.float32, copy=False)


def all_finite(arr: np.ndarray) -> bool:
    """Whether every value is finite, in one read of the array: the float32 sum is finite unless
    a value is NaN or infinite (or the sum of finite values overflows: then each value is checked)."""
    arr = np.asarray(arr)
    if arr.dtype.kind != "f":
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.sum(arr, dtype=arr.dtype)):
            return True
    return bool(np.isfinite(arr).all())


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm over all tensors of `arrays` minus `reference` (float64); a tensor the reference
    lacks, or holds at another shape (FLoRA's other-rank factors), counts whole."""
    sq = 0.0
    for k, v in arrays.items():
        diff = v.astype(np.float64)
        ref = reference.get(k)
        if ref is not None and ref.shape == v.shape:
            diff -= ref
        sq += float(np.vdot(diff, diff))
    return math.sqrt(sq)


def check_weight(num_examples) -> None:
    """Raise InvalidReply unless a reply's num-examples (its aggregation weight) is a finite number > 0."""
    if (
        not isinstance(num_examples, (int, float))
        or isinstance(num_examples, bool)
        or not np.isfinite(num_examples)
        or num_examples <= 0
    ):
        raise InvalidReply(f"num-examples={num_examples!r} must be a finite number > 0")  # NaN <= 0 is False


def check_reply(
    reference: Mapping[str, np.ndarray],
    payload: Mapping[str, np.ndarray],
    num_examples,
    free_rank: bool = False,
    finite: bool = True,
) -> None:
    """Raise InvalidReply unless the payload has the reference's keys, shapes, a float dtype,
    finite values and a finite num_examples > 0. `free_rank`: LoRA A/B may have any rank r (A [r, in],
    B [out, r], the same r for a module's pair), other dimensions as the reference's."""
    missing, extra = set(reference) - set(payload), set(payload) - set(reference)
    if missing or extra:
        raise InvalidReply(f"adapter keys differ (missing {sorted(missing)[:2]}, unexpected {sorted(extra)[:2]})")
    for k, ref in reference.items():
        arr = payload[k] if hasattr(payload[k], "dtype") else np.asarray(payload[k])  # an array or records.ArrayMeta
        shape = tuple(arr.shape)
        want = list(np.shape(ref))
        role = lora_role(k) if free_rank else "other"
        if role != "other" and len(shape) == 2:
            want[0 if role == "A" else 1] = shape[0 if role == "A" else 1]
        if list(shape) != want:
            raise InvalidReply(f"{k}: shape {shape} != {tuple(want)}")
        if arr.dtype != np.float32:
            raise InvalidReply(f"{k}: dtype {arr.dtype}, expected float32")
        if finite and not np.isfinite(arr).all():
            raise InvalidReply(f"{k}: non-finite values")
    check_weight(num_examples)
    if free_rank:
        for a_key, b_key in lora_pairs(list(payload)).values():
            if np.shape(payload[a_key])[0] != np.shape(payload[b_key])[1]:
                raise InvalidReply(
                    f"{a_key}: rank {np.shape(payload[a_key])[0]} != its B's {np.shape(payload[b_key])[1]}"
                )


# --- SCAFFOLD (Karimireddy et al. 2020) over adapter tensors -----------------------------------


def scaffold_server_update(
    x: Mapping[str, np.ndarray],
    c: Mapping[str, np.ndarray],
    delta_y: Sequence[Mapping[str, np.ndarray]],
    delta_c: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    num_clients: int,
    server_lr: float = 1.0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One SCAFFOLD server step: x <- x + lr_g * avg_k(dy_k),  c <- c + (|S|/N) * mean_k(dc_k).

    `delta_y[k] = y_k - x` (client k's model change), `delta_c[k] = c_k+ - c_k` (its control
    variate change); the model step is weighted by `weights` (examples), the variate step is the
    plain mean over the |S| sampled clients scaled by |S|/N, as in the paper.
    """
    if len(delta_y) != len(delta_c) or not delta_y:
        raise ValueError("need one delta_c per delta_y and at least one client")
    if num_clients < len(delta_y):
        raise ValueError(f"num_clients={num_clients} < {len(delta_y)} sampled clients")
    dy = weighted_average(delta_y, weights)
    dc = weighted_average(delta_c, [1.0] * len(delta_c))
    frac = len(delta_c) / num_clients
    new_x = {k: (np.asarray(x[k], np.float64) + server_lr * dy[k]).astype(np.float32) for k in x}
    new_c = {k: (np.asarray(c[k], np.float64) + frac * dc[k]).astype(np.float32) for k in c}
    return new_x, new_c


def scaffold_client_variate(grad_sum: Mapping[str, np.ndarray], steps: int) -> dict[str, np.ndarray]:
    """c_k+ = the mean minibatch gradient over the round's `steps` local steps.

    Option I of the paper (the local gradient at the global model), estimated along the local
    trajectory. It is in gradient units, the same units as the correction added to each step's
    gradient; option II's (x - y_k)/(K lr) is not when the local optimizer is Adam.
    """
    return {k: (np.asarray(v, np.float64) / steps).astype(np.float32) for k, v in grad_sum.items()}


# --- LoRA-aware aggregation --------------------------------------------------------------------


def lora_role(key: str) -> str:
    """'A', 'B' (LoRA factors) or 'other' (e.g. the fully trained projector)."""
    if ".lora_A." in key or key.endswith(".lora_A"):
        return "A"
    if ".lora_B." in key or key.endswith(".lora_B"):
        return "B"
    return "other"


def lora_pairs(keys) -> dict[str, tuple[str, str]]:
    """module prefix -> (A key, B key) for every LoRA module among `keys`."""
    pairs: dict[str, dict[str, str]] = {}
    for k in keys:
        role = lora_role(k)
        if role != "other":
            prefix = k.split(f".lora_{role}")[0]
            pairs.setdefault(prefix, {})[role] = k
    bad = [p for p, d in pairs.items() if set(d) != {"A", "B"}]
    if bad:
        raise ValueError(f"LoRA modules without both factors: {bad[:3]}")
    return {p: (d["A"], d["B"]) for p, d in sorted(pairs.items())}


def flora_stack(payloads: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """FLoRA stacking: per LoRA module, A = vstack_k(p_k A_k), B = hstack_k(B_k), so that
    B @ A = sum_k p_k B_k A_k exactly, whatever each client's rank. Other tensors: weighted mean."""
    w = np.asarray(weights, dtype=np.float64)
    if not payloads or (w <= 0).any():
        raise ValueError(f"need payloads and weights > 0, got {w.tolist()}")
    p = w / w.sum()
    keys = list(payloads[0])
    out = {}
    for a_key, b_key in lora_pairs(keys).values():
        out[a_key] = np.concatenate([pk * np.asarray(x[a_key], np.float64) for pk, x in zip(p, payloads)], 0)
        out[b_key] = np.concatenate([np.asarray(x[b_key], np.float64) for x in payloads], 1)
    others = [k for k in keys if lora_role(k) == "other"]
    if others:
        out.update(weighted_average([{k: x[k] for k in others} for x in payloads], weights))
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def low_rank_factors(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(B [out, rank], A [rank, in], relative Frobenius error) with B @ A the best rank-`rank`
    approximation of `delta` (truncated SVD, split as U sqrt(S), sqrt(S) V^T; zero-padded when
    delta's rank is lower, so the shapes never change)."""
    u, s, vt = np.linalg.svd(np.asarray(delta, np.float64), full_matrices=False)
    k = min(rank, len(s))
    root = np.sqrt(s[:k])
    b = np.zeros((delta.shape[0], rank))
    a = np.zeros((rank, delta.shape[1]))
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vt[:k]
    total = float(np.sqrt((s**2).sum()))
    err = float(np.sqrt((s[k:] ** 2).sum()) / total) if total > 0 else 0.0
    return b.astype(np.float32), a.astype(np.float32), err


def flora_merge(
    global_payload: Mapping[str, np.ndarray],
    stacked: Mapping[str, np.ndarray],
    max_rank: int,
) -> tuple[dict[str, np.ndarray], float]:
    """The new global adapter: per LoRA module, the rank-`max_rank` factors of
    B_g A_g + B_s A_s (the previous global update plus this round's stacked aggregate; FLoRA
    merges it into the base weights, which a 4-bit base cannot take, so it stays an adapter of
    bounded rank). Other tensors are taken from `stacked`. Returns (payload, worst relative error)."""
    out: dict[str, np.ndarray] = {}
    worst = 0.0
    for a_key, b_key in lora_pairs(list(global_payload)).values():
        delta = np.asarray(global_payload[b_key], np.float64) @ np.asarray(global_payload[a_key], np.float64)
        delta += np.asarray(stacked[b_key], np.float64) @ np.asarray(stacked[a_key], np.float64)
        out[b_key], out[a_key], err = low_rank_factors(delta, max_rank)
        worst = max(worst, err)
    for k, v in stacked.items():
        if lora_role(k) == "other":
            out[k] = np.asarray(v, np.float32)
    order = [k for k in global_payload if k in out] + [k for k in out if k not in global_payload]
    return {k: out[k] for k in order}, worst

"""Pure aggregation math and reply validation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmllm.records import RecordBuffer, from_record, to_record
from fedmllm.strategies.aggregate import InvalidReply, check_reply, weighted_average, weighted_average_fused


def test_weighted_average_matches_hand_result():
    # Prepare: two clients, 1 and 3 examples
    a = {"w": np.array([0.0, 4.0], np.float32)}
    b = {"w": np.array([4.0, 0.0], np.float32)}
    # Execute
    out = weighted_average([a, b], [1, 3])
    # Assert: (1*[0,4] + 3*[4,0]) / 4 = [3, 1]
    np.testing.assert_allclose(out["w"], [3.0, 1.0])
    assert out["w"].dtype == np.float32


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-10, 10), st.integers(1, 50)), min_size=1, max_size=6),
    st.randoms(use_true_random=False),
)
def test_weighted_average_is_permutation_invariant_and_scale_free(items, rnd):
    payloads = [{"k": np.full(3, v, np.float32)} for v, _ in items]
    weights = [w for _, w in items]
    order = list(range(len(items)))
    rnd.shuffle(order)
    base = weighted_average(payloads, weights)["k"]
    perm = weighted_average([payloads[i] for i in order], [weights[i] for i in order])["k"]
    scaled = weighted_average(payloads, [w * 7 for w in weights])["k"]
    np.testing.assert_allclose(base, perm, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(base, scaled, rtol=1e-5, atol=1e-5)
    assert min(v for v, _ in items) - 1e-4 <= base[0] <= max(v for v, _ in items) + 1e-4


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=6), st.integers(0, 2**16))
def test_fused_average_equals_the_reference_written_into_flower_bytes(weights, seed):
    # Prepare: random payloads with a contiguous, a transposed (non-contiguous: numpy path) and an empty tensor
    rng = np.random.default_rng(seed)
    payloads = [
        {
            "a": rng.standard_normal((3, 5)).astype(np.float32),
            "b": rng.standard_normal((4, 2)).astype(np.float32).T,
            "e": np.zeros((0, 3), np.float32),
        }
        for _ in weights
    ]
    want = weighted_average(payloads, weights)
    buffer = RecordBuffer({k: v.shape for k, v in payloads[0].items()})
    # Execute: once into fresh arrays, once into the bytes of an ArrayRecord
    fresh, bad = weighted_average_fused(payloads, weights)
    _, bad_buffered = weighted_average_fused(payloads, weights, out=buffer.arrays)
    record = buffer.seal()
    # Assert: both equal the float64 reference; the record is what to_record would have built
    assert bad == bad_buffered == []
    got = from_record(record)
    for k in want:
        np.testing.assert_allclose(fresh[k], want[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got[k], fresh[k])
        assert record[k].data == to_record({k: fresh[k]})[k].data  # the exact np.save bytes
        assert record[k].numpy().shape == want[k].shape  # Flower's own decoder reads it


def test_fused_average_leaves_out_non_finite_payloads():
    payloads = [
        {"w": np.array([1.0, 2.0], np.float32)},
        {"w": np.array([np.nan, 0.0], np.float32)},
        {"w": np.array([3.0, 4.0], np.float32)},
    ]
    out, bad = weighted_average_fused(payloads, [1, 5, 1])
    assert bad == [1]
    np.testing.assert_allclose(out["w"], [2.0, 3.0])


def test_record_buffer_is_read_only_after_seal_and_outlives_its_views():
    import gc

    buffer = RecordBuffer({"x": (2, 3)})
    buffer.arrays["x"][:] = np.arange(6, dtype=np.float32).reshape(2, 3)
    record = buffer.seal()
    with pytest.raises(ValueError):
        buffer.arrays["x"][0, 0] = 1.0
    del buffer
    gc.collect()
    np.testing.assert_array_equal(record["x"].numpy(), np.arange(6).reshape(2, 3))


def test_record_buffer_without_the_c_api_copies_once(monkeypatch):
    monkeypatch.setattr(RecordBuffer, "_zero_copy", False)
    buffer = RecordBuffer({"x": (2,)})
    buffer.arrays["x"][:] = [1.5, -2.0]
    np.testing.assert_array_equal(buffer.seal()["x"].numpy(), [1.5, -2.0])


def test_check_reply_names_the_problem():
    ref = {"a": np.zeros((2, 2), np.float32)}
    check_reply(ref, {"a": np.ones((2, 2), np.float32)}, 5)
    with pytest.raises(InvalidReply, match="keys differ"):
        check_reply(ref, {"b": np.ones((2, 2), np.float32)}, 5)
    with pytest.raises(InvalidReply, match="shape"):
        check_reply(ref, {"a": np.ones((2, 3), np.float32)}, 5)
    with pytest.raises(InvalidReply, match="dtype"):
        check_reply(ref, {"a": np.ones((2, 2), np.float64)}, 5)
    with pytest.raises(InvalidReply, match="non-finite"):
        check_reply(ref, {"a": np.full((2, 2), np.nan, np.float32)}, 5)
    with pytest.raises(InvalidReply, match="num-examples"):
        check_reply(ref, {"a": np.ones((2, 2), np.float32)}, 0)

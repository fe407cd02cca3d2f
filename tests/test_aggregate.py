"""Pure aggregation math and reply validation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmllm.strategies.aggregate import InvalidReply, check_reply, weighted_average


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

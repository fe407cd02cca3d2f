"""Compressed uploads (fedmllm/transport.py, issue 24): codecs, top-k, error feedback, byte counts,
and runs whose clients send encoded updates that the server decodes."""

import math

import numpy as np
import pytest
from conftest import tiny_overrides

from fedmllm.config import ConfigError, compose
from fedmllm.models.adapter import payload_bytes as nbytes  # what a payload weighs on the wire
from fedmllm.transport import TransportSettings, compress_update, decode, encode

RNG = np.random.default_rng(7)
UPDATE = {
    "m.lora_A.weight": (RNG.standard_normal((8, 96)) * 1e-3).astype(np.float32),
    "m.lora_B.weight": (RNG.standard_normal((96, 8)) * 1e-4).astype(np.float32),
    "proj.bias": (RNG.standard_normal(37) * 1e-2).astype(np.float32),  # not a multiple of the block
}
SHAPES = {k: v.shape for k, v in UPDATE.items()}


def block_absmax(x: np.ndarray, block: int = 64) -> np.ndarray:
    """Each entry's block absmax (bitsandbytes' blocks run over the flattened tensor)."""
    flat = np.abs(x.reshape(-1))
    pad = np.concatenate([flat, np.zeros(-len(flat) % block, np.float32)]).reshape(-1, block)
    return np.repeat(pad.max(axis=1), block)[: len(flat)].reshape(x.shape)


@pytest.mark.parametrize(
    "codec, bound",
    [
        ("fp32", lambda x: np.zeros_like(x)),
        ("fp16", lambda x: np.abs(x) * 2**-11 + 6e-8),  # half a unit in the last place (+ subnormals)
        ("bf16", lambda x: np.abs(x) * 2**-8),
        ("int8", lambda x: block_absmax(x) * 0.02),  # the dynamic map's widest half gap near absmax
        ("nf4", lambda x: block_absmax(x) * 0.15),  # NF4's widest half gap (0.72 -> 1.0)
    ],
)
def test_each_codec_round_trips_within_its_error_bound(codec, bound):
    settings = TransportSettings(codec=codec)
    decoded = decode(encode(UPDATE, settings), SHAPES, settings.block)
    for k, x in UPDATE.items():
        assert decoded[k].shape == x.shape and decoded[k].dtype == np.float32
        assert (np.abs(decoded[k] - x) <= bound(x)).all(), (codec, k, float(np.abs(decoded[k] - x).max()))


def test_byte_counts_are_the_encoded_sizes():
    n = {k: v.size for k, v in UPDATE.items()}
    blocks = {k: math.ceil(v / 64) for k, v in n.items()}
    assert nbytes(encode(UPDATE, TransportSettings("fp32"))) == sum(4 * v for v in n.values())
    assert nbytes(encode(UPDATE, TransportSettings("fp16"))) == sum(2 * v for v in n.values())
    assert nbytes(encode(UPDATE, TransportSettings("int8"))) == sum(n[k] + 4 * blocks[k] for k in n)
    assert nbytes(encode(UPDATE, TransportSettings("nf4"))) == sum(math.ceil(n[k] / 2) + 4 * blocks[k] for k in n)
    k = {key: math.ceil(0.1 * v) for key, v in n.items()}
    assert nbytes(encode(UPDATE, TransportSettings("fp16", topk=0.1))) == sum(4 * v + 2 * v for v in k.values())
    sparse = decode(encode(UPDATE, TransportSettings("fp32", topk=0.1)), SHAPES, 64)
    for key, x in UPDATE.items():  # the largest-magnitude tenth, exactly; the rest zero
        kept = np.flatnonzero(sparse[key])
        assert len(kept) == k[key]
        assert np.abs(x.reshape(-1))[kept].min() >= np.sort(np.abs(x.reshape(-1)))[-k[key]]
        np.testing.assert_array_equal(sparse[key].reshape(-1)[kept], x.reshape(-1)[kept])


@pytest.mark.parametrize("codec, topk", [("nf4", None), ("int8", 0.1), ("fp32", 0.05)])
def test_error_feedback_keeps_the_decoded_sum_on_the_true_sum(codec, topk):
    """Over 40 rounds the decoded updates' sum differs from the true updates' sum by exactly the
    last residual (bounded by one round's encoding); without feedback the lost part accumulates."""
    rng = np.random.default_rng(3)
    sent = {k: np.zeros_like(v) for k, v in UPDATE.items()}

    def run(feedback: bool) -> tuple[float, float]:
        """(largest |true sum - decoded sum|, largest |entry| of one round's update)."""
        settings = TransportSettings(codec=codec, topk=topk, error_feedback=feedback)
        residual, true_sum, got_sum, one = None, {}, {}, 0.0
        for _ in range(40):
            step = {k: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for k, v in UPDATE.items()}
            encoded, residual = compress_update(step, sent, settings, residual)
            got = decode(encoded, SHAPES, settings.block)
            for k in step:
                true_sum[k] = true_sum.get(k, 0) + step[k].astype(np.float64)
                got_sum[k] = got_sum.get(k, 0) + got[k].astype(np.float64)
                one = max(one, float(np.abs(step[k]).max()))
        if feedback:  # the gap is the last residual, exactly
            for k in true_sum:
                np.testing.assert_allclose(true_sum[k] - got_sum[k], residual[k], rtol=0, atol=1e-6)
        return max(float(np.abs(true_sum[k] - got_sum[k]).max()) for k in true_sum), one

    gap, one = run(True)
    assert gap <= 3 * one  # bounded by what one round's encoding can lose
    no_feedback_gap, _ = run(False)
    assert no_feedback_gap > 3 * gap  # without feedback the lost part piles up


def test_error_feedback_residual_is_exactly_what_encoding_lost():
    settings = TransportSettings(codec="int8", topk=0.2)
    sent = {k: np.ones_like(v) for k, v in UPDATE.items()}
    adapter = {k: sent[k] + v for k, v in UPDATE.items()}
    encoded, residual = compress_update(adapter, sent, settings, None)
    got = decode(encoded, SHAPES, settings.block)
    ulp = float(np.spacing(np.float32(1)))  # the update is (1 + x) - 1 in float32: x to within one ulp of 1
    for k in UPDATE:
        np.testing.assert_allclose(got[k] + residual[k], UPDATE[k], rtol=0, atol=ulp)
    encoded2, residual2 = compress_update(adapter, sent, settings, residual)  # the residual rides along
    got2 = decode(encoded2, SHAPES, settings.block)
    for k in UPDATE:
        np.testing.assert_allclose(got2[k] + residual2[k], UPDATE[k] + residual[k], rtol=0, atol=2 * ulp)


def test_settings_are_checked_and_flora_is_refused():
    with pytest.raises(ConfigError, match=r"transport.codec='int4': choose one of"):
        compose(["transport.codec=int4"])
    with pytest.raises(ConfigError, match=r"transport.topk=1.5 must be null"):
        compose(["transport.topk=1.5"])
    with pytest.raises(ConfigError, match=r"transport.block=100 must be a power of two"):
        compose(["transport.block=100"])
    with pytest.raises(ConfigError, match=r"aggregator=flora's adapters have each client's own rank"):
        compose(["aggregator=flora", "transport.codec=int8"])
    with pytest.raises(ConfigError, match=r"down_codec=nf4\): aggregator=flora"):
        compose(["aggregator=flora", "transport.down_codec=nf4"])
    with pytest.raises(ConfigError, match=r"transport.down_codec='fp8': choose one of"):
        compose(["transport.down_codec=fp8"])
    compose(["aggregator=flora"])  # fp32 uploads: as before


def test_a_reply_that_does_not_decode_is_dropped_naming_why():
    from fedmllm.strategies.aggregate import InvalidReply
    from fedmllm.transport import decode as dec

    bad = encode({"m.lora_A.weight": UPDATE["m.lora_A.weight"]}, TransportSettings("int8"))
    bad["m.lora_A.weight#q"] = bad["m.lora_A.weight#q"][:10]  # cut short
    with pytest.raises((ValueError, RuntimeError)):
        dec(bad, SHAPES, 64)
    with pytest.raises(ValueError, match="not in the adapter sent"):
        dec(encode({"other.weight": UPDATE["proj.bias"]}, TransportSettings("fp16")), SHAPES, 64)
    assert issubclass(InvalidReply, Exception)


def test_downloads_track_the_global_adapter_per_node_with_partial_participation():
    """The server encodes each node's difference from what that node holds; a node that sat out
    rounds catches up in one download; what both sides hold is bit-identical, and its distance to
    the global adapter stays one encoding's error (the error feedback)."""
    from fedmllm.transport import decode_download, encode_download

    settings = TransportSettings(down_codec="nf4")
    rng = np.random.default_rng(11)
    glob = {k: v * 100 for k, v in UPDATE.items()}
    server: dict[int, dict] = {}
    client: dict[int, dict] = {}
    for rnd in range(12):
        glob = {k: v + (rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for k, v in glob.items()}
        for node in [0, 1] if rnd % 3 else [0, 1, 2]:  # node 2 is sampled every third round
            encoded, server[node] = encode_download(glob, server.get(node), settings)
            assert encoded["#base"][0] == (node in client)  # first contact decodes onto zeros
            client[node] = decode_download(encoded, client.get(node), settings.block)
            for k in glob:
                np.testing.assert_array_equal(client[node][k], server[node][k])
                assert (np.abs(client[node][k] - glob[k]) <= block_absmax(glob[k] - 0) * 0.15 + 1e-6).all()
    n = sum(v.size for v in glob.values())
    assert nbytes(encoded) < 0.2 * 4 * n  # nf4: half a byte + a 4-byte absmax per 64, + the shapes
    with pytest.raises(ValueError, match="does not hold"):
        decode_download(encode_download(glob, server[0], settings)[0], None, 64)


@pytest.mark.slow
@pytest.mark.parametrize("aggregator", ["fedavg", "ffa_lora", "fedsa_lora", "scaffold"])
def test_runs_with_compressed_uploads_count_what_travels(tmp_path, aggregator):
    """Clients send int8 updates with error feedback; the server decodes them against the adapter
    it sent; bytes_up is what travelled and the ratio to fp32 is logged per round."""
    from inprocess import run_in_process

    from fedmllm.tracking import read_metrics

    out = tmp_path / "run"
    run_in_process(
        tiny_overrides(
            f"aggregator={aggregator}",
            "server_stage=none",
            "transport.codec=int8",
            "transport.down_codec=int8",
            "num_rounds=3",
            f"out_dir={out}",
        )
    )
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        ratio = r["transport_ratio"]
        assert 0.26 <= ratio <= 0.30, ratio  # 1 byte + a 4-byte absmax per 64 entries, per 4 bytes
        assert all(not c.get("dropped") for c in r["clients"])
        if aggregator in ("fedavg", "ffa_lora"):  # the adapter is all that travels (SCAFFOLD's c and
            dense = 2 * r["bytes_up"] / ratio  # FedSA-LoRA's B ride beside it in fp32)
            assert r["bytes_up"] + r["bytes_down"] < 0.3 * 2 * dense
        assert np.isfinite(r["accuracy"])
    state = list((out / "client-state").glob("partition-0-round-3.npz"))
    with np.load(state[0]) as z:  # the residual and the decoded global adapter, per client and round
        assert any(k.startswith("transport-residual/") for k in z.files)
        assert any(k.startswith("transport-model/") for k in z.files)

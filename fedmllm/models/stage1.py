"""Loading a server stage-1 result (vision tower + projector weights) into a base model; where
it lives and how it is built: fedmllm.stages."""

from __future__ import annotations

from pathlib import Path


def load_stage1(model, path: str | Path) -> None:
    """Load stage-1 weights (vision tower + projector keys of the base model) into `model`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"stage-1 weights {path} are missing on this node. The server builds them before round 1 "
            "(server_stage.pretrain); in a deployment copy that directory from the server's "
            "$FEDMLLM_CACHE, or run with server_stage=none"
        )
    state = load_file(str(path))
    own = model.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(f"stage-1 weights {path} do not fit this model (first mismatches: {bad[:3]})")
    model.load_state_dict(state, strict=False)

"""One client's local round, shaped by its algorithm (fedmllm.algorithms: what to load, freeze,
correct and send) and by the penalties (FedProx, FedMLLM's adaptive regularization), and the
arrays a client keeps across rounds. No flwr here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedmllm.algorithms import Algorithm
from fedmllm.models.adapter import adapter_params, adapter_state, llm_layer_index


class ClientStore:
    """Arrays a client keeps across rounds (SCAFFOLD's c_k, FedSA-LoRA's B_k), as a flat
    {"<name>/<key>": array} dict that the ClientApp keeps in Flower's Context.state.

    With `path` (a run started by `fedmllm run`, which knows its run dir) the store is also
    written per round, `<run dir>/client-state/partition-<id>-round-<r>.npz`, and a store without
    in-memory state reads the latest file of a round before `server_round`: `fedmllm run
    resume=<run dir>`, which reruns the round after its last checkpoint, reads the state the
    client had before that round, not what it wrote in a round that was cut short. The newest
    KEEP_ROUNDS files per client are kept.
    """

    KEEP_ROUNDS = 3

    def __init__(self, flat: dict[str, np.ndarray] | None = None, path: Path | None = None, server_round: int = 1):
        self.flat = dict(flat or {})
        self.path, self.server_round = path, int(server_round)
        if not self.flat and path is not None:
            before = [(r, p) for r, p in self._files() if r < self.server_round]
            if before:
                with np.load(max(before)[1]) as z:
                    self.flat = {k: z[k] for k in z.files}

    def _files(self) -> list[tuple[int, Path]]:
        """(round, file) of this client's state files."""
        if self.path is None or not self.path.parent.is_dir():
            return []
        stem = self.path.name[: -len(".npz")]
        out = []
        for p in self.path.parent.glob(f"{stem}-round-*.npz"):
            tail = p.name[len(stem) + len("-round-") : -len(".npz")]
            if tail.isdigit():
                out.append((int(tail), p))
        return sorted(out)

    def get(self, name: str) -> dict[str, np.ndarray] | None:
        pre = name + "/"
        out = {k[len(pre) :]: v for k, v in self.flat.items() if k.startswith(pre)}
        return out or None

    def put(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        self.flat = {k: v for k, v in self.flat.items() if not k.startswith(name + "/")}
        self.flat.update({f"{name}/{k}": np.asarray(v, np.float32) for k, v in arrays.items()})
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            out = self.path.with_name(f"{self.path.name[: -len('.npz')]}-round-{self.server_round}.npz")
            tmp = out.with_name(out.name + ".tmp.npz")
            np.savez(tmp, **self.flat)
            tmp.replace(out)
            for _, old in self._files()[: -self.KEEP_ROUNDS]:
                old.unlink(missing_ok=True)


def client_state_path(cfg: dict[str, Any], partition_id: int) -> Path | None:
    """The base name of a client's state files under the run dir (ClientStore adds the round)."""
    out = cfg.get("out_dir")
    return Path(out) / "client-state" / f"partition-{partition_id}.npz" if out else None


class LocalRound:
    """One round of one client: prepare() -> train with penalty / after_backward -> finish() ->
    (payload, extra records). The algorithm's hooks get this object: `model`, `arrays` (what the
    server sent), `extra` (the message's other records), `store`, `seed` (the run's),
    `round_seed`, `params` (the adapter's parameters), `trainable` (after prepare), `hooks`
    (gradient hooks removed by release) and `scratch` (what one hook leaves for the next)."""

    def __init__(
        self,
        algorithm: Algorithm,
        model,
        arrays: dict[str, np.ndarray],
        extra: dict[str, dict],
        store: ClientStore,
        seed: int,
        round_seed: int,
        proximal_mu: float = 0.0,
        adaptive_reg: dict[str, float] | None = None,
        num_llm_layers: int | None = None,
    ):
        self.algorithm, self.model, self.arrays, self.extra, self.store = algorithm, model, arrays, extra, store
        self.seed, self.round_seed = seed, round_seed
        self.proximal_mu, self.adaptive_reg, self.num_llm_layers = proximal_mu, adaptive_reg, num_llm_layers
        self.hooks: list = []
        self.scratch: dict[str, Any] = {}
        self.params: dict[str, Any] = {}
        self.trainable: dict[str, Any] = {}

    # --- before training ---------------------------------------------------------------------
    def prepare(self) -> None:
        self.params = adapter_params(self.model)
        for p in self.params.values():
            p.requires_grad_(True)  # a cached model may come from a round under another algorithm
        self.algorithm.prepare(self)
        self.trainable = {k: p for k, p in self.params.items() if p.requires_grad}
        self._reg_keys = self._layer_range_keys() if self.adaptive_reg else []
        # the global values the penalties pull towards, only when a penalty is on
        self.anchor = {k: p.detach().clone() for k, p in self.trainable.items()} if self.has_penalty else {}

    def prepare_evaluation(self) -> None:
        """Load the model the client evaluates on its own split (the algorithm's evaluation_model)."""
        self.params = adapter_params(self.model)
        self.algorithm.evaluation_model(self)
        self.release()

    # --- during training ---------------------------------------------------------------------
    def penalty(self):
        """FedProx (mu/2)||theta - theta_g||^2 over the trained adapter tensors, plus FedMLLM's
        adaptive regularization (mu/2) mu_w ||theta - theta_g||^2 over LLM layers
        s_layer .. L-1-s_layer; None when neither is on."""
        terms = []
        if self.proximal_mu > 0:
            terms.append(
                self.proximal_mu / 2 * sum(((p - self.anchor[k]) ** 2).sum() for k, p in self.trainable.items())
            )
        if self._reg_keys:
            r = self.adaptive_reg
            terms.append(
                r["mu"] / 2 * r["mu_w"] * sum(((self.trainable[k] - self.anchor[k]) ** 2).sum() for k in self._reg_keys)
            )
        return sum(terms) if terms else None

    def regularized_keys(self) -> list[str]:
        """Trained keys in LLM layers with index in [s_layer, L-1-s_layer] (fixed by prepare())."""
        return list(self._reg_keys)

    def _layer_range_keys(self) -> list[str]:
        s, n = int(self.adaptive_reg["s_layer"]), self.num_llm_layers
        if n is None:
            raise ValueError("adaptive regularization needs the number of LLM layers")
        return [k for k in self.trainable if (i := llm_layer_index(k)) is not None and s <= i <= n - 1 - s]

    def after_backward(self) -> None:
        self.algorithm.after_backward(self)

    @property
    def has_penalty(self) -> bool:
        return self.proximal_mu > 0 or bool(self._reg_keys)

    # --- after training ----------------------------------------------------------------------
    def release(self) -> None:
        """Remove the gradient hooks (the cached model serves the next client and round)."""
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def finish(self) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
        self.release()
        state, extra = self.algorithm.finish(self, adapter_state(self.model))
        return self.algorithm.shared_payload(state), extra

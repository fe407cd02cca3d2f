"""Client side of each aggregator (fedmllm.strategies.protocol): load what the server sent, shape
local training (penalties, gradient corrections, frozen tensors), build the reply, and keep what
the client holds across rounds. No flwr here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedmllm.models.adapter import adapter_params, adapter_state, init_lora_a, llm_layer_index, load_adapter_state
from fedmllm.strategies.aggregate import lora_pairs, lora_role, scaffold_client_variate
from fedmllm.strategies.protocol import ClientSpec, shared_payload


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
            tail = p.name[len(stem) + len("-round-"): -len(".npz")]
            if tail.isdigit():
                out.append((int(tail), p))
        return sorted(out)

    def get(self, name: str) -> dict[str, np.ndarray] | None:
        pre = name + "/"
        out = {k[len(pre):]: v for k, v in self.flat.items() if k.startswith(pre)}
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
    """One round of one client under `spec.algorithm`: prepare() -> train with penalty /
    after_backward -> finish() -> (payload, extra records)."""

    def __init__(self, spec: ClientSpec, model, arrays: dict[str, np.ndarray], extra: dict[str, dict],
                 store: ClientStore, seed: int, round_seed: int, proximal_mu: float = 0.0,
                 adaptive_reg: dict[str, float] | None = None, num_llm_layers: int | None = None):
        self.spec, self.model, self.arrays, self.extra, self.store = spec, model, arrays, extra, store
        self.seed, self.round_seed = seed, round_seed
        self.proximal_mu, self.adaptive_reg, self.num_llm_layers = proximal_mu, adaptive_reg, num_llm_layers
        self._hooks: list = []
        self._grad_sum: dict[str, Any] = {}
        self._steps = 0

    # --- before training ---------------------------------------------------------------------
    def prepare(self) -> None:
        import torch

        params = adapter_params(self.model)
        for p in params.values():
            p.requires_grad_(True)  # a cached model may come from a round under another algorithm
        algo = self.spec.algorithm
        if algo in ("standard", "scaffold"):
            load_adapter_state(self.model, self.arrays)
        elif algo == "ffa_lora":
            init_lora_a(self.model, self.seed)  # the same A in every process: derived from the run seed
            for k, p in params.items():
                if lora_role(k) == "A":
                    p.requires_grad_(False)
            load_adapter_state(self.model, self.arrays, partial=True)
        elif algo == "fedsa_lora":
            own_b = self.store.get("lora_b") or {
                k: np.zeros(tuple(p.shape), np.float32) for k, p in params.items() if lora_role(k) == "B"
            }
            load_adapter_state(self.model, {**self.arrays, **own_b})
        elif algo == "flora":
            self._prepare_flora(params)
        self.trainable = {k: p for k, p in params.items() if p.requires_grad}
        self._reg_keys = self._layer_range_keys() if self.adaptive_reg else []
        # the global values the penalties pull towards, only when a penalty is on
        self.anchor = ({k: p.detach().clone() for k, p in self.trainable.items()} if self.has_penalty else {})
        if algo == "scaffold":
            c = self.extra.get("scaffold-c")
            if c is None:
                raise KeyError("aggregator=scaffold: the server's message has no 'scaffold-c' record")
            c_i = self.store.get("scaffold_c") or {k: np.zeros_like(v) for k, v in c.items()}
            self.c_i = c_i
            self._correction = {k: torch.from_numpy(np.asarray(c[k]) - c_i[k]).to(p.device, p.dtype)
                                for k, p in self.trainable.items()}

    def _prepare_flora(self, params) -> None:
        """Model rank = R (global update, frozen) + r (this round's fresh local factors)."""
        import torch

        rank = self.spec.max_rank
        init_lora_a(self.model, self.round_seed)  # fresh local A; B starts at zero as in PEFT
        full = {}
        for a_key, b_key in lora_pairs(params).values():
            a, b = params[a_key], params[b_key]
            ga, gb = np.asarray(self.arrays[a_key]), np.asarray(self.arrays[b_key])
            if ga.shape[0] != rank or a.shape[0] <= rank:
                raise ValueError(f"{a_key}: global rank {ga.shape[0]} / model rank {a.shape[0]} "
                                 f"do not fit max_rank={rank}")
            new_a = a.detach().cpu().float().numpy().copy()
            new_a[:rank] = ga
            new_b = np.zeros(tuple(b.shape), np.float32)
            new_b[:, :rank] = gb
            full[a_key], full[b_key] = new_a, new_b
            mask_a = torch.ones_like(a)
            mask_a[:rank] = 0
            mask_b = torch.ones_like(b)
            mask_b[:, :rank] = 0
            self._hooks += [a.register_hook(lambda g, m=mask_a: g * m), b.register_hook(lambda g, m=mask_b: g * m)]
        others = {k: v for k, v in self.arrays.items() if lora_role(k) == "other"}
        load_adapter_state(self.model, {**full, **others})

    # --- during training ---------------------------------------------------------------------
    def penalty(self):
        """FedProx (mu/2)||theta - theta_g||^2 over the trained adapter tensors, plus FedMLLM's
        adaptive regularization (mu/2) mu_w ||theta - theta_g||^2 over LLM layers
        s_layer .. L-1-s_layer; None when neither is on."""
        terms = []
        if self.proximal_mu > 0:
            terms.append(self.proximal_mu / 2 * sum(((p - self.anchor[k]) ** 2).sum()
                                                    for k, p in self.trainable.items()))
        if self._reg_keys:
            r = self.adaptive_reg
            terms.append(r["mu"] / 2 * r["mu_w"] * sum(((self.trainable[k] - self.anchor[k]) ** 2).sum()
                                                       for k in self._reg_keys))
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
        if self.spec.algorithm != "scaffold":
            return
        for k, p in self.trainable.items():
            if p.grad is None:
                continue
            g = p.grad.detach()
            self._grad_sum[k] = self._grad_sum[k] + g if k in self._grad_sum else g.clone()
            p.grad.add_(self._correction[k])  # g + c - c_k
        self._steps += 1

    @property
    def has_penalty(self) -> bool:
        return self.proximal_mu > 0 or bool(self._reg_keys)

    # --- after training ----------------------------------------------------------------------
    def release(self) -> None:
        """Remove the gradient hooks (the cached model serves the next client and round)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def finish(self) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
        self.release()
        state = adapter_state(self.model)
        algo = self.spec.algorithm
        extra: dict[str, dict[str, np.ndarray]] = {}
        if algo == "scaffold":
            grads = {k: v.float().cpu().numpy() for k, v in self._grad_sum.items()}
            c_new = scaffold_client_variate(grads, max(self._steps, 1))
            c_new = {k: c_new.get(k, self.c_i[k]) for k in self.c_i}
            extra["scaffold-dc"] = {k: (c_new[k] - self.c_i[k]).astype(np.float32) for k in self.c_i}
            self.store.put("scaffold_c", c_new)
        elif algo == "fedsa_lora":
            own_b = {k: v for k, v in state.items() if lora_role(k) == "B"}
            self.store.put("lora_b", own_b)
            extra["lora-b"] = own_b  # for the server's centralized evaluation only; never sent back
        elif algo == "flora":
            rank = self.spec.max_rank
            for k in list(state):
                if lora_role(k) == "A":
                    state[k] = state[k][rank:].copy()
                elif lora_role(k) == "B":
                    state[k] = state[k][:, rank:].copy()
        return shared_payload(algo, state), extra

"""Checkpoints per round, as Hugging Face artifacts: the PEFT adapter (adapter_model.safetensors +
adapter_config.json naming the real base model), the processor's files, and `stage1.safetensors`
(what the server's stage 1 trained outside the adapter: vision tower + projector) when the run has
one; plus fedmllm's own state file and a manifest. Reloading without fedmllm: README, "Using a
checkpoint"."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from fedmllm.common import write_atomically
from fedmllm.models.adapter import load_adapter_state, save_peft
from fedmllm.stages.cache import WEIGHTS


def save_checkpoint(
    model,
    arrays: dict[str, np.ndarray],
    run_dir: Path,
    server_round: int,
    *,
    base: str | None = None,
    processor=None,
    files: tuple[Path, ...] = (),
) -> Path:
    """Write the global adapter of a round, loadable with `PeftModel.from_pretrained(base, dir)`.
    `base`: what adapter_config.json names as the base model (the hub id, the user's directory or
    the offline build; not the 4-bit cache); `processor`: saved beside the adapter; `files`: copied
    in (hard links where the filesystem allows: the stage-1 weights are the same file every round)."""
    out = Path(run_dir) / "checkpoints" / f"round-{server_round}"
    load_adapter_state(model, arrays)
    return save_peft(model, out, base=base, processor=processor, files=files)


STATE_FILE = "fedmllm-state.npz"  # next to the PEFT files: what resuming needs that they do not hold
ADAPTER_FILE = "adapter_model.safetensors"


def save_strategy_state(ckpt_dir: Path, server_round: int, payload: dict[str, np.ndarray], state: dict) -> Path:
    """What `fedmllm run resume=<run dir>` needs to continue after this round: the global payload
    as it travels (`global/<key>`), the strategy's state (`state/<attr>/<key>`) and the round.
    Tensors the adapter file beside it already holds bit for bit (the payload, `fixed` tensors)
    are not written twice: `in_adapter` lists them and read_state takes them from there."""
    ckpt_dir = Path(ckpt_dir)
    adapter = _adapter_tensors(ckpt_dir)
    arrays, in_adapter = {}, []
    entries = [(f"global/{k}", k, v) for k, v in payload.items()]
    entries += [(f"state/{k}", k[len("fixed/") :] if k.startswith("fixed/") else None, v) for k, v in state.items()]
    for name, key, value in entries:
        value = np.asarray(value)
        same = adapter.get(key) if key is not None else None
        if same is not None and same.dtype == value.dtype and np.array_equal(same, value):
            in_adapter.append(name)
        else:
            arrays[name] = value
    arrays["in_adapter"] = np.asarray(in_adapter, dtype=str)
    arrays["round"] = np.asarray(server_round)
    out = ckpt_dir / STATE_FILE
    tmp = out.with_name("tmp-" + out.name)
    np.savez(tmp, **arrays)
    tmp.replace(out)
    return out


def _adapter_tensors(ckpt_dir: Path) -> dict[str, np.ndarray]:
    path = Path(ckpt_dir) / ADAPTER_FILE
    if not path.is_file():
        return {}
    return load_file(str(path))


MANIFEST = "manifest.json"  # every file of a round's checkpoint with its size and sha256, written last


def write_manifest(ckpt_dir: Path) -> Path:
    """Record the size and sha256 of every file in a round's checkpoint dir, atomically (written
    last: a round whose manifest exists was written completely)."""
    ckpt_dir = Path(ckpt_dir)
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(ckpt_dir.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("tmp-")
    }
    tmp = ckpt_dir / f"tmp-{MANIFEST}"
    tmp.write_text(json.dumps(files, indent=1))
    tmp.replace(ckpt_dir / MANIFEST)
    return ckpt_dir / MANIFEST


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_round(ckpt_dir: Path) -> str | None:
    """Why a round's checkpoint cannot be resumed from, or None: its manifest's files must all be
    there with their sizes and hashes (a checkpoint from before manifests is taken as it is)."""
    manifest = Path(ckpt_dir) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        return f"{MANIFEST} unreadable ({err})"
    for name, want in files.items():
        path = Path(ckpt_dir) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, {want['size']} were written"
        if _sha256(path) != want["sha256"]:
            return f"{name} differs from what was written (sha256)"
    return None


def checkpoint_rounds(run_dir: Path) -> list[int]:
    """The rounds whose checkpoint dir (checkpoints/round-<N>) a run has, in order."""
    return sorted(
        int(p.name.split("-")[1])
        for p in Path(run_dir).glob("checkpoints/round-*")
        if p.is_dir() and p.name.split("-")[1].isdigit()
    )


def read_state_flat(path: Path) -> dict[str, np.ndarray]:
    """A state file's tensors by their saved names (`global/<key>`, `state/<attr>/<key>`, `round`),
    with the ones it left to the adapter file beside it filled in."""
    with np.load(path) as z:
        flat = {k: z[k] for k in z.files if k != "in_adapter"}
        in_adapter = [str(n) for n in z["in_adapter"]] if "in_adapter" in z.files else []
    if in_adapter:
        adapter = _adapter_tensors(Path(path).parent)
        for name in in_adapter:
            key = name[len("global/") :] if name.startswith("global/") else name[len("state/fixed/") :]
            if key not in adapter:
                raise KeyError(f"{name}: not in {ADAPTER_FILE} beside {Path(path).name}")
            flat[name] = adapter[key]
    return flat


def read_state(path: Path) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(round, global payload, strategy state) of one round's state file."""
    flat = read_state_flat(path)
    payload = {k[len("global/") :]: v for k, v in flat.items() if k.startswith("global/")}
    state = {k[len("state/") :]: v for k, v in flat.items() if k.startswith("state/")}
    return int(flat["round"]), payload, state


def latest_state(run_dir: Path) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(round, global payload, strategy state) of the last round a run checkpointed completely.

    A round whose files fail their manifest, or whose state file cannot be read, is skipped with
    a line naming it and why, for the round before it."""
    ckpts = Path(run_dir) / "checkpoints"
    rounds = [
        (r, ckpts / f"round-{r}" / STATE_FILE)
        for r in reversed(checkpoint_rounds(run_dir))
        if (ckpts / f"round-{r}" / STATE_FILE).is_file()
    ]
    if not rounds:
        raise FileNotFoundError(
            f"{run_dir} has no checkpoints/round-<N>/{STATE_FILE}; pass the run dir of a fedmllm run "
            "that finished at least one round"
        )
    problems = []
    for server_round, path in rounds:
        problem = check_round(path.parent)
        if problem is None:
            try:
                saved_round, payload, state = read_state(path)
                if saved_round != server_round:
                    raise ValueError(f"it says round {saved_round}")
                if not payload:
                    raise ValueError("it holds no adapter")
                return server_round, payload, state
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
                problem = f"{STATE_FILE} unreadable ({type(err).__name__}: {err})"
        problems.append(f"round {server_round}: {problem}")
        print(
            f"checkpoints/round-{server_round} cannot be resumed from: {problem}; trying the round before",
            file=sys.stderr,
            flush=True,
        )
    raise FileNotFoundError(f"{run_dir} has no intact checkpoint to resume from ({'; '.join(problems)})")


def prune_checkpoints(run_dir: Path, keep: int | None, best: int | None = None) -> list[int]:
    """Remove all but the newest `keep` rounds' checkpoint dirs (None: keep all) and round `best`
    (the best-scoring one, when the run keeps it); returns the rounds removed. The newest ones
    stay, so a resume or `fedmllm evaluate` still finds them."""
    if keep is None:
        return []
    rounds = checkpoint_rounds(run_dir)
    gone = [r for r in rounds[: max(0, len(rounds) - int(keep))] if r != best]
    for r in gone:
        shutil.rmtree(Path(run_dir) / "checkpoints" / f"round-{r}", ignore_errors=True)
    return gone


STAGE1_FILE = WEIGHTS  # the server's stage-1 vision tower + projector, as its cache names it


def checkpoint_dir(run_dir: Path, server_round: int | None = None) -> Path:
    """A run's checkpoints/round-<N> (default: the last round whose files are intact); raises
    FileNotFoundError naming the rounds kept when that round cannot be used."""
    run_dir = Path(run_dir)
    if server_round is None:
        server_round = latest_state(run_dir)[0]
    ckpt = run_dir / "checkpoints" / f"round-{server_round}"
    problem = check_round(ckpt) if (ckpt / STATE_FILE).is_file() else f"no {STATE_FILE}"
    if problem:
        raise FileNotFoundError(
            f"checkpoints/round-{server_round} of {run_dir} cannot be used: {problem} "
            f"(rounds kept: {checkpoint_rounds(run_dir)})"
        )
    return ckpt


def export_checkpoint(ckpt: Path, out: Path, family, merge: bool = True, dtype: str = "float32") -> Path:
    """Write a round's model as a standalone Hugging Face model under `out`, with transformers and
    peft calls only (the README's reload): the base named in adapter_config.json at full precision
    (`dtype`), the server's stage-1 tower and projector loaded into it, the adapter on top, and the
    processor. `merge`: the adapter merged into the weights (`from_pretrained(out)` is the model);
    otherwise `out` is the base with the stage-1 weights and `out/adapter` the adapter naming it."""
    import torch
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoProcessor

    ckpt, out = Path(ckpt), Path(out)
    if out.exists():
        raise FileExistsError(f"out={out} exists; name a new directory")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype={dtype!r}: choose float32, bfloat16 or float16")
    base = family.model_cls().from_pretrained(
        PeftConfig.from_pretrained(ckpt).base_model_name_or_path, dtype=torch_dtype
    )
    if (ckpt / STAGE1_FILE).is_file():
        base.load_state_dict(load_file(ckpt / STAGE1_FILE), strict=False)
    processor = AutoProcessor.from_pretrained(ckpt)

    def fill(tmp: Path) -> None:
        if merge:
            PeftModel.from_pretrained(base, ckpt).merge_and_unload().save_pretrained(tmp)
        else:
            base.save_pretrained(tmp)
            model = PeftModel.from_pretrained(base, ckpt)
            for config in model.peft_config.values():
                config.base_model_name_or_path = str(out.resolve())
            model.save_pretrained(tmp / "adapter", save_embedding_layers=False)
        processor.save_pretrained(tmp)

    write_atomically(out, fill)
    return out

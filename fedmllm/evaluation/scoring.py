"""Score every answer option by its log-likelihood under the model (no generation needed)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from fedmllm.data.collate import Collator
from fedmllm.data.schema import Sample
from fedmllm.models.device import to_model
from fedmllm.training import shared_prefix_logits


def option_token_ids(collator: Collator) -> list[list[int]]:
    """Token ids of each option's answer text (`task.answers`, without the end-of-turn token)."""
    tok = collator.tokenizer
    return [tok(o, add_special_tokens=False)["input_ids"] for o in collator.task.answers]


def score_options(
    model,
    collator: Collator,
    samples: list[Sample],
    batch_size: int = 32,
    drop_image: bool = False,
    on_batch: Callable[[int], None] | None = None,
    fast: bool = True,
    share_prefix: bool = False,
) -> np.ndarray:
    """Log-likelihood of each option's answer tokens after the prompt: array [n_samples, n_options].

    Each option's score is the summed log-probability of all its answer tokens (the mc template's
    '(A) not-hateful': '(', 'A', ')', ' not', ...), one forward pass per option and batch; the
    end-of-turn token is not scored (every option ends with it, after distinct text).
    Fast path: when every option is one distinct token (easy-vqa's 'yes'/'no'), one forward pass
    over the prompt scores all options at once (K times cheaper), with the same result; with
    `share_prefix`, the tokens every prompt of a text-only batch begins with run once
    (fedmllm.training.shared_prefix_logits).
    """
    import torch

    ids = option_token_ids(collator)
    single = fast and all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids)
    out = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            if single:
                batch = to_model(collator.prompt_batch(chunk, drop_image=drop_image), model)
                logits = shared_prefix_logits(model, batch, 1) if share_prefix else None
                if logits is None:
                    logits = model(**batch, logits_to_keep=1).logits  # left padding: -1 is each prompt's end
                logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
                out.append(logp[:, [i[0] for i in ids]].cpu().numpy())
            else:
                cols = []
                for option, oid in zip(collator.task.answers, ids):
                    batch = to_model(collator.option_batch(chunk, option, drop_image=drop_image), model)
                    k = len(oid)
                    logits = model(**batch, logits_to_keep=k + 1).logits[:, :-1].float()
                    logp = torch.log_softmax(logits, dim=-1)  # [B, k, V]: predictions of the k option tokens
                    target = batch["input_ids"][:, -k:]
                    if (target.cpu() != torch.as_tensor(oid)).any():  # merged across the prompt/answer boundary
                        raise ValueError(
                            f"option {option!r} does not tokenize apart from its prompt: {target[0].tolist()} != {oid}"
                        )
                    cols.append(logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(dim=1).tolist())
                out.append(np.asarray(cols).T)
            if on_batch is not None:
                on_batch(len(chunk))
    return np.concatenate(out, axis=0) if out else np.zeros((0, len(ids)))

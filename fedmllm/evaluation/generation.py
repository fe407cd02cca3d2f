"""Greedy generation of short answers (FedMLLM's evaluation protocol) and their parsed predictions."""

from __future__ import annotations

from typing import Callable

import numpy as np

from fedmllm.data.collate import Collator
from fedmllm.data.schema import Sample
from fedmllm.evaluation.metrics import UNPARSED
from fedmllm.evaluation.parsing import parse_answer
from fedmllm.models.device import to_model


def generate_answers(
    model,
    collator: Collator,
    samples: list[Sample],
    max_new_tokens: int = 8,
    batch_size: int = 32,
    drop_image: bool = False,
    on_batch: Callable[[int], None] | None = None,
    sampling: dict | None = None,
) -> list[str]:
    """Greedy answer text of every sample (at most `max_new_tokens` tokens, special tokens dropped).

    `sampling` (temperature, top_p, top_k, repetition_penalty, seed): sample instead, as FedMLLM's
    evaluation does through MiniCPM-V's chat defaults; torch's generator is seeded with `seed`
    once, before the first batch (their scripts call torch.manual_seed(0) once at import).

    The collator's prompt batch is left-padded, so every row's prompt ends at the last column and
    the new tokens of all rows start at the same index.
    """
    import torch

    if collator.tokenizer.padding_side != "left":
        raise ValueError(
            f"generation needs a left-padded prompt batch; the tokenizer pads on the "
            f"{collator.tokenizer.padding_side!r}: build the batch with fedmllm.data.collate.Collator"
        )
    tok = collator.tokenizer
    out: list[str] = []
    how: dict = {"do_sample": False, "num_beams": 1}
    if sampling is not None:
        how = {
            "do_sample": True,
            "num_beams": 1,
            **{k: sampling[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")},
        }
        torch.manual_seed(int(sampling.get("seed", 0)))
    model.eval()
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            batch = to_model(collator.prompt_batch(chunk, drop_image=drop_image), model)
            ids = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                **how,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            out += tok.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            if on_batch is not None:
                on_batch(len(chunk))
    return out


def parse_predictions(answers: list[str], options: tuple[str, ...]) -> np.ndarray:
    """Option index of each answer; UNPARSED where it names no option."""
    parsed = (parse_answer(a, options) for a in answers)
    return np.asarray([UNPARSED if p is None else p for p in parsed], dtype=np.int64)

"""Generated answer text -> option index (FedMLLM's generation protocol: first option letter or word)."""

from __future__ import annotations

import re
from typing import Sequence

# "(B) hateful": a task whose answer options carry their letter, as in FedMLLM's templates.
_LETTERED = re.compile(r"^\(([A-Z])\)\s*(.*)$", re.S)
# Bare "A" and "I" start English prose ("A red circle", "I think ..."), so a bare letter
# followed by a lowercase word is not read as an option; "(A)", "A.", "A)" and "A" alone are.
_PROSE = {"A", "I"}


def option_letters(options: Sequence[str]) -> list[str] | None:
    """The options' letters when every option is written "(X) text", else None (word options)."""
    found = [_LETTERED.match(o) for o in options]
    if not options or not all(found):
        return None
    return [m.group(1) for m in found]  # type: ignore[union-attr]


def parse_letter(text: str, letters: Sequence[str]) -> int | None:
    """Index of the first option letter in `text` ("(B)", "B", "B.", "b)" -> 1), or None.

    Letters outside `letters` are skipped ("(C)" with two options is not an answer), and so is
    a bare "A"/"I" used as a word ("A hateful meme").
    """
    # (X) in any case | bare capital X not inside a word
    pattern = re.compile(r"\(([A-Za-z])\)|(?<![\w'’-])([A-Z])(?![\w'’-])")
    for m in pattern.finditer(text):
        letter = (m.group(1) or m.group(2)).upper()
        if letter not in letters:
            continue
        if m.group(2) and letter in _PROSE and re.match(r"\s+[a-z]", text[m.end() :]):
            continue
        return list(letters).index(letter)
    return None


def parse_word(text: str, words: Sequence[str]) -> int | None:
    """Index of the option word that occurs first in `text` (case-insensitive, whole words), or None.

    Whole word means not inside a longer word or hyphenated compound: "yes" is not found in
    "yesterday", and "hateful" is not found in "not-hateful" (which is its own option).
    """
    if not words:
        raise ValueError("parse_word needs at least one option word; got an empty list")
    by_length = sorted(range(len(words)), key=lambda i: -len(words[i]))  # longest first at one position
    alternation = "|".join(re.escape(words[i]) for i in by_length)
    m = re.search(rf"(?<![\w-])({alternation})(?![\w-])", text, re.I)
    if m is None:
        return None
    lowered = [w.lower() for w in words]
    return lowered.index(m.group(1).lower())


def parse_answer(text: str, options: Sequence[str]) -> int | None:
    """Option index of a generated answer, or None when it names no option.

    Lettered options ("(A) not-hateful", ...) are read by their first letter, as FedMLLM does;
    word options ("no", "yes") by the first option word.
    """
    letters = option_letters(options)
    if letters is not None:
        return parse_letter(text, letters)
    return parse_word(text, list(options))


# FedMLLM's eval_hateful.py / eval_crisismmd.py (`meld_dump`), for eval.protocol=fedmllm.
FEDMLLM_FALLBACK = 2  # their `except: pred_idx = 2`: an answer naming no option becomes index 2


def fedmllm_parse(text: str, letters: Sequence[str], letter_range: str = "A-H") -> int:
    """Option index of a generated answer exactly as FedMLLM's evaluation scripts read it.

    Drop "answer"/"Answer"; take the first match of `[\\(\\ ]*[<range>][\\)\\ ]*` anywhere in the
    text (case-sensitive, no word boundaries, so the "B" of "Based" counts); strip spaces, then
    parentheses; its index among `letters`. Anything else (no match, "( A )", a letter in the range
    but not an option) gives FEDMLLM_FALLBACK, which for a two-option task is no option at all
    (it then ranks above "(B)" in their AUROC) and for CrisisMMD a real class (C). Their ranges:
    A-G for Hateful Memes, A-H for CrisisMMD (dataset.fedmllm_letters)."""
    if not re.fullmatch(r"[A-Z]-[A-Z]", letter_range):
        raise ValueError(f"dataset.fedmllm_letters={letter_range!r}: write a capital letter range such as A-H")
    text = text.replace("answer", "").replace("Answer", "")
    found = re.findall(rf"[\(\ ]*[{letter_range}][\)\ ]*", text)
    try:
        return list(letters).index(found[0].strip().strip("()"))
    except (IndexError, ValueError):
        return FEDMLLM_FALLBACK

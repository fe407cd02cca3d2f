"""Hateful Memes (Facebook AI release): `img/` + `{split}.jsonl` rows {"id", "img", "label", "text"}."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fedmllm.data.reading import DataError, RowLog, image_problem, read_jsonl, require_files
from fedmllm.data.schema import Sample, Task

SPLITS = ("train", "dev_seen", "dev_unseen", "test_seen", "test_unseen")
LABELS = ("not-hateful", "hateful")  # label 0, 1 (FedMLLM's option wording)
# FedMLLM's question (data_gen/gen_data_hateful_missing.py): "Is the content hateful based on the text?"
TASK = Task(
    "hateful_memes",
    labels=LABELS,
    question="Is the content hateful{based_on}?",
    instruction="Is the content hateful? Answer not-hateful or hateful.",
    template="mc",
)
FIELDS = ("id", "img", "label", "text")
LAYOUT = ["img/", *(f"{s}.jsonl" for s in SPLITS)]
HINT = "Set dataset.root to the unpacked Hateful Memes folder (the one holding img/ and the .jsonl files)"


def expected_files(root: Path, splits: tuple[str, ...]) -> None:
    """Raise DataError (one line) unless `root` holds img/ and the `splits` files."""
    for s in splits:
        if s not in SPLITS:
            raise DataError(f"hateful_memes: split {s!r} is unknown; choose one of {list(SPLITS)}")
    require_files("hateful_memes", root, ["img/", *(f"{s}.jsonl" for s in splits)], HINT, LAYOUT)


def normalize_id(raw: object) -> str:
    """5316 and "05316" name the same meme: digit ids lose their zero padding."""
    text = str(raw).strip()
    return str(int(text)) if text.isdigit() else text


@lru_cache(maxsize=8)
def load_split(root: str, split: str, strict: bool = False) -> tuple[Sample, ...]:
    """The usable samples of `{root}/{split}.jsonl` (cached: a worker process reads a file once).

    Rows with bad JSON, a missing field or a label other than 0/1, and rows whose image is
    missing or unreadable are dropped with a one-line summary (`strict`: the first raises).
    """
    base = Path(root)
    expected_files(base, (split,))
    path = base / f"{split}.jsonl"
    log = RowLog(path, strict)
    out: list[Sample] = []
    for line, row in read_jsonl(path, log):
        missing = [f for f in FIELDS if f not in row or row[f] is None]
        if missing:
            log.drop(line, "missing field", f"row lacks {missing} (rows need {list(FIELDS)})")
            continue
        label = row["label"]
        if isinstance(label, str) and label.strip().isdigit():
            label = int(label)
        if isinstance(label, bool) or label not in (0, 1):
            log.drop(line, "unknown label", f"label {row['label']!r}; expected 0 (not-hateful) or 1 (hateful)")
            continue
        image = base / str(row["img"])
        problem = image_problem(image, decode=strict)
        if problem:
            log.drop(line, *problem)
            continue
        text = str(row["text"]).strip()
        if not text:
            log.keep(line, "empty text, kept as image-only")
        out.append(Sample(id=normalize_id(row["id"]), image=str(image), text=text or None, label=int(label)))
    log.report()
    return tuple(out)

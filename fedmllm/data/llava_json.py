"""LLaVA-style conversation JSON for custom classification tasks.

A file holds one array of `{"id", "image", "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "<label>"}]}`; the gpt answer must be one of the
configured labels. Sample text = the human turn without `<image>`; no `image` key: text-only.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmllm.data.reading import DataError, RowLog, image_problem, iter_json_array, read_jsonl
from fedmllm.data.schema import Sample, Task

if TYPE_CHECKING:  # data/__init__.py owns the settings and imports this module
    from fedmllm.data import DatasetSettings

IMAGE_TAG = "<image>"


def task(cfg: DatasetSettings) -> Task:
    """The Task declared by the dataset config (`labels`, optional `question` / `instruction`)."""
    labels = tuple(str(x) for x in (cfg.labels or ()))
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise DataError(
            f"llava_json: dataset.labels={list(labels)} must list at least two distinct answers, "
            "e.g. dataset.labels='[no,yes]' (each gpt answer must be one of them)"
        )
    question = str(cfg.question or "")
    instruction = str(cfg.instruction or "")
    return Task("llava_json", labels=labels, question=question, instruction=instruction, template="mc")


def check_path(path: str | None, key: str) -> Path:
    """The file named by `dataset.<key>`; DataError (one line) when unset or absent."""
    if not path:
        raise DataError(f"llava_json: dataset.{key} is not set; add dataset.{key}=FILE (a LLaVA conversation .json)")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"llava_json: dataset.{key}={path} does not exist; expected a LLaVA conversation .json file")
    return p


def _turns(row: Any) -> tuple[str, str] | str:
    """(human text, gpt answer) of a record, or the reason it has none."""
    if not isinstance(row, dict):
        return f"expected an object, got {type(row).__name__}"
    conv = row.get("conversations")
    if not isinstance(conv, list):
        return "no 'conversations' list"
    human = next((t for t in conv if isinstance(t, dict) and t.get("from") == "human"), None)
    gpt = next((t for t in conv if isinstance(t, dict) and t.get("from") == "gpt"), None)
    if human is None or gpt is None or not isinstance(human.get("value"), str) or not isinstance(gpt.get("value"), str):
        return "conversations need a 'human' and a 'gpt' turn with string values"
    return human["value"], gpt["value"]


@lru_cache(maxsize=8)
def load_file(path: str, image_root: str | None, labels: tuple[str, ...], strict: bool = False) -> tuple[Sample, ...]:
    """The usable samples of one file (`.json` array, or `.jsonl` with one record a line).

    Images resolve against `image_root` (default: the file's folder). Records without turns,
    with an answer outside `labels`, or with a missing/unreadable image are dropped with a
    one-line summary (`strict`: the first raises).
    """
    p = Path(path)
    root = Path(image_root) if image_root else p.parent
    log = RowLog(p, strict)
    rows = read_jsonl(p, log) if p.suffix == ".jsonl" else iter_json_array(p, log)
    out: list[Sample] = []
    for index, (line, row) in enumerate(rows):
        turns = _turns(row)
        if isinstance(turns, str):
            log.drop(line, "missing field", turns)
            continue
        human, answer = turns
        answer = answer.strip()
        if answer not in labels:
            log.drop(line, "unknown label", f"gpt answer {answer!r} is not one of dataset.labels {list(labels)}")
            continue
        image = None
        if row.get("image"):
            image = root / str(row["image"])
            problem = image_problem(image, decode=strict)
            if problem:
                log.drop(line, *problem)
                continue
        text = human.replace(IMAGE_TAG, "").strip()
        sid = str(row.get("id", f"{p.stem}-{index}"))
        out.append(Sample(id=sid, image=str(image) if image else None, text=text or None, label=labels.index(answer)))
    log.report()
    return tuple(out)

"""CrisisMMD v2: `crisismmd_datasplit_all/task_<task>_text_img_<split>.tsv` + images under the root."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from fedmllm.data.reading import DataError, RowLog, image_problem, read_tsv, require_files
from fedmllm.data.schema import Sample, Task

SPLITS = ("train", "dev", "test")
# Option order is fixed: it decides the letters. Humanitarian: FedMLLM's order (DESIGN §6).
LABELS = {
    "humanitarian": (
        "affected_individuals",
        "infrastructure_and_utility_damage",
        "injured_or_dead_people",
        "missing_or_found_people",
        "rescue_volunteering_or_donation_effort",
        "vehicle_damage",
        "other_relevant_information",
        "not_humanitarian",
    ),
    "informative": ("informative", "not_informative"),
    "damage": ("little_or_no_damage", "mild_damage", "severe_damage"),
}
# FedMLLM's humanitarian question names both modalities "image and text" (its preamble: "text and image").
QUESTIONS = {
    "humanitarian": "What is the humanitarian category{based_on}?",
    "informative": "Is the content informative for humanitarian aid{based_on}?",
    "damage": "What is the damage severity{based_on}?",
}
ALL_DIR = "crisismmd_datasplit_all"
# CrisisMMD v2's agreed-label splits (text and image annotators agree) ship as their own archive;
# they exist for informative and humanitarian only. In them the humanitarian task has 5 of the 8
# categories (injured/dead and missing/found merged into affected_individuals, vehicle_damage into
# infrastructure_and_utility_damage): the 8 options stay, 3 are never the answer.
AGREED_DIRS = ("crisismmd_datasplit_agreed_label", ALL_DIR)
COLUMNS = ("image_id", "tweet_text", "image")
URL = re.compile(r"http\S+")  # FedMLLM's remove_url


def task(name: str) -> Task:
    """The Task of a CrisisMMD task name (humanitarian, informative, damage)."""
    if name not in LABELS:
        raise DataError(f"crisismmd: dataset.task={name!r} is unknown; choose one of {sorted(LABELS)}")
    labels = LABELS[name]
    return Task(
        f"crisismmd_{name}",
        labels=labels,
        question=QUESTIONS[name],
        instruction=f"{QUESTIONS[name].format(based_on='')} Answer with one of: {', '.join(labels)}.",
        template="mc",
        both="image and text",
    )


def split_file(root: Path, name: str, split: str, agreed: bool) -> Path:
    """The TSV of one split; DataError (one line, listing what is expected) when absent."""
    task(name)
    if split not in SPLITS:
        raise DataError(f"crisismmd: split {split!r} is unknown; choose one of {list(SPLITS)}")
    hint = "Set dataset.root to the unpacked CrisisMMD_v2.0 folder (holding data_image/ and the split folders)"
    if not agreed:
        rel = f"{ALL_DIR}/task_{name}_text_img_{split}.tsv"
        layout = [f"{ALL_DIR}/task_{name}_text_img_{s}.tsv" for s in SPLITS] + ["data_image/"]
        require_files("crisismmd", root, [rel], hint, layout)
        return root / rel
    if name == "damage":
        raise DataError("crisismmd: CrisisMMD has no agreed-label damage split; set dataset.agreed=false")
    fname = f"task_{name}_text_img_agreed_lab_{split}.tsv"
    for d in AGREED_DIRS:
        if (root / d / fname).is_file():
            return root / d / fname
    where = f"directory {root} does not exist" if not root.is_dir() else f"{root} lacks it"
    raise DataError(
        f"crisismmd: agreed-label split {fname} not found ({where}); expected {root}/{AGREED_DIRS[0]}/{fname} "
        f"(or in {ALL_DIR}/). {hint}"
    )


def clean_tweet(text: str) -> str:
    """Tweet text without URLs (FedMLLM removes `http\\S+`), whitespace runs collapsed."""
    return " ".join(URL.sub("", text).split())


@lru_cache(maxsize=8)
def load_split(
    root: str, name: str, split: str, agreed: bool = False, label_column: str = "label_image", strict: bool = False
) -> tuple[Sample, ...]:
    """The usable samples of one CrisisMMD split (cached: a worker process reads a file once).

    `label_column`: `label_image` by default, the label FedMLLM partitions, trains and evaluates on
    (`label` is the tweet-level one). Bad TSV
    rows, labels outside the task's options and missing/unreadable images are dropped with a
    one-line summary (`strict`: the first raises).
    """
    base = Path(root)
    path = split_file(base, name, split, agreed)
    labels = LABELS[name]
    log = RowLog(path, strict)
    out: list[Sample] = []
    for line, row in read_tsv(path, log, (*COLUMNS, label_column)):
        label = row[label_column].strip()
        if label not in labels:
            log.drop(line, "unknown label", f"{label_column} {label!r} is not one of {list(labels)}")
            continue
        if not row["image"].strip() or not row["image_id"].strip():
            log.drop(line, "missing field", "empty image or image_id")
            continue
        image = base / row["image"].strip()
        problem = image_problem(image, decode=strict)
        if problem:
            log.drop(line, *problem)
            continue
        text = clean_tweet(row["tweet_text"])
        if not text:
            log.keep(line, "empty tweet text (after URLs are removed), kept as image-only")
        out.append(Sample(id=row["image_id"].strip(), image=str(image), text=text or None, label=labels.index(label)))
    log.report()
    return tuple(out)

"""Data sources, sample schema, prompt templates and collation."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, List, Optional

from fedmllm.config import Number, need, number, typed
from fedmllm.data import crisismmd, easyvqa, hateful_memes, hf, llava_json
from fedmllm.data.prompts import PromptSettings
from fedmllm.data.reading import DataError
from fedmllm.data.schema import Sample, Task

__all__ = ["DataError", "Sample", "Task", "check_source", "load_public", "load_task", "task_for"]


NEW_SOURCES = ("hateful_memes", "crisismmd", "llava_json", "hf")
TEMPLATES = ("mc", "short")


@dataclass
class DatasetSettings:
    """`dataset`: the task's source and its held-out set (fedmllm/conf/dataset/*.yaml say which keys
    each source reads; a key a source does not read stays unset)."""

    name: str = "easyvqa"
    template: Optional[str] = None  # None: the source's own (mc for the FedMLLM tasks, short for easy-vqa)
    eval_samples: int = 200
    public_fraction: Number = 0.0
    strict: bool = False
    balanced: bool = False  # easyvqa
    root: Optional[str] = None  # hateful_memes, crisismmd
    train_split: Optional[str] = None
    test_split: Optional[str] = None
    fedmllm_letters: Optional[str] = None
    fedmllm_topup: Optional[str] = None
    task: Optional[str] = None  # crisismmd
    agreed: Optional[bool] = None
    label_column: Optional[str] = None
    path: Optional[str] = None  # llava_json
    test_path: Optional[str] = None
    image_root: Optional[str] = None
    labels: Optional[List[str]] = None
    question: Optional[str] = None
    instruction: Optional[str] = None
    format: Optional[str] = None  # hf
    image_column: Optional[str] = None
    text_column: Optional[str] = None
    answer_column: Optional[str] = None
    answers: str = "closed"  # closed: options scored | open: free-text answers generated (hf)

    @property
    def captioned(self) -> bool:
        """Whether the source gives its images captions (the server stages' public pool): easy-vqa only."""
        return self.name.startswith("easyvqa")

    def __post_init__(self) -> None:
        frac = self.public_fraction
        need(
            number(frac) and 0 <= frac < 1,
            f"dataset.public_fraction={frac!r} must be a number in [0, 1) (0.2: a fifth of the images stay with the server)",
        )
        need(
            self.template is None or self.template in TEMPLATES,
            f"dataset.template={self.template!r}: choose mc or short",
        )
        if not self.captioned:
            # The server stages need the public pool's image captions, which only easy-vqa provides.
            need(
                frac == 0,
                f"dataset.public_fraction={frac} is supported for easy-vqa only; "
                f"set dataset.public_fraction=0 for dataset={self.name}",
            )
        need(
            self.answers in hf.ANSWERS,
            f"dataset.answers={self.answers!r}: choose closed (answer options, scored) or open (free text, generated)",
        )
        need(
            self.format is None or self.format in hf.FORMATS,
            f"dataset.format={self.format!r}: choose one of {list(hf.FORMATS)}",
        )
        need(
            self.answers != "open" or self.template == "short",
            "dataset.answers=open needs dataset.template=short (the answer is written out, not a lettered option)",
        )
        if self.name == "crisismmd":
            need(
                self.task is None or self.task in crisismmd.LABELS,
                f"dataset.task={self.task!r}: choose humanitarian, informative or damage",
            )
            need(
                not (self.agreed and self.task == "damage"),
                "CrisisMMD has no agreed-label damage split; set dataset.agreed=false for dataset.task=damage",
            )


def load_task(
    dataset: DatasetSettings | dict[str, Any],
    seed: int = 42,
    prompt: PromptSettings | dict[str, Any] | str | None = None,
) -> tuple[Task, list[Sample], list[Sample]]:
    """Return (task, train pool, held-out eval samples) for a dataset config.

    The held-out set is `dataset.eval_samples` samples drawn with `seed` from the source's
    test split; it never overlaps the training pool that clients partition. `prompt` is the
    `prompt` config group (`plain` or `aug`); `dataset.template` (mc or short) overrides the
    source's default template. Samples are fresh dicts: callers may edit them.
    """
    dataset = typed(DatasetSettings, dataset, "dataset")
    task, train, test = _source(dataset, seed)
    task = task_for(task, dataset, prompt)
    public_images = _public_images(train, float(dataset.public_fraction), seed)
    if public_images:
        train = [s for s in train if s["image"] not in public_images]
    n = int(dataset.eval_samples)
    if 0 < n < len(test):
        test = random.Random(seed).sample(test, n)
    return task, train, test


def task_for(
    task: Task, dataset: DatasetSettings | dict[str, Any], prompt: PromptSettings | dict[str, Any] | str | None = None
) -> Task:
    """`task` as a run phrases it: `dataset.template` (when set) and the `prompt` group's wording."""
    template = typed(DatasetSettings, dataset, "dataset").template
    return replace(task, template=template or task.template, aug=prompt_name(prompt) == "aug")


def prompt_name(prompt: PromptSettings | dict[str, Any] | str | None) -> str:
    """`plain` or `aug` from the prompt config group (None: plain)."""
    if prompt is None or isinstance(prompt, str):
        prompt = {"name": prompt or "plain"}
    return typed(PromptSettings, prompt, "prompt").name


def _source(cfg: DatasetSettings, seed: int) -> tuple[Task, list[Sample], list[Sample]]:
    """(task, train split, test split) of the configured source, before held-out sampling."""

    name, strict = cfg.name, bool(cfg.strict)
    if name == "easyvqa":
        return (
            easyvqa.YESNO,
            easyvqa.yesno_samples("train", balanced=bool(cfg.balanced), seed=seed),
            easyvqa.yesno_samples("test", balanced=bool(cfg.balanced), seed=seed),
        )
    if name == "easyvqa_caption":
        return easyvqa.CAPTION, easyvqa.caption_samples("train", seed=seed), easyvqa.caption_samples("test", seed=seed)
    if name == "easyvqa_flag":
        return easyvqa.FLAG, easyvqa.flag_samples("train", seed=seed), easyvqa.flag_samples("test", seed=seed)
    if name == "hateful_memes":
        root, splits = _root(cfg), _splits(cfg)
        hateful_memes.expected_files(Path(root), splits)  # both files checked before either is read
        train, test = (_copy(hateful_memes.load_split(root, s, strict)) for s in splits)
        return hateful_memes.TASK, train, test
    if name == "crisismmd":
        root, t, agreed = _root(cfg), _crisis_task(cfg), bool(cfg.agreed)
        column, splits = cfg.label_column or "label_image", _splits(cfg)
        for s in splits:
            crisismmd.split_file(Path(root), t, s, agreed)
        train, test = (_copy(crisismmd.load_split(root, t, s, agreed, column, strict)) for s in splits)
        return crisismmd.task(t), train, test
    if name == "llava_json":
        task = llava_json.task(cfg)
        path = str(llava_json.check_path(cfg.path, "path"))
        if cfg.test_path:
            llava_json.check_path(cfg.test_path, "test_path")
        rows = _copy(llava_json.load_file(path, cfg.image_root, task.labels, strict))
        if cfg.test_path:
            return task, rows, _copy(llava_json.load_file(str(cfg.test_path), cfg.image_root, task.labels, strict))
        # No test file: hold out `eval_samples` records of the one file (a fifth when 0), seeded.
        n = int(cfg.eval_samples) or round(0.2 * len(rows))
        if not 0 < n < len(rows):
            raise DataError(
                f"llava_json: {path} has {len(rows)} usable records, too few to hold out "
                f"dataset.eval_samples={n}; lower it or set dataset.test_path=FILE"
            )
        held = set(random.Random(seed).sample(range(len(rows)), n))
        return task, [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
    if name == "hf":
        return hf.load(cfg, seed)
    raise ValueError(
        f"dataset.name={name!r} is unknown; choose easyvqa, easyvqa_caption, easyvqa_flag, {', '.join(NEW_SOURCES)}"
    )


# The split each source reads when its yaml names none: (train_split, test_split).
DEFAULT_SPLITS = {"hateful_memes": ("train", "test_seen"), "crisismmd": ("train", "test")}


def _splits(cfg: DatasetSettings) -> tuple[str, str]:
    train, test = DEFAULT_SPLITS[cfg.name]
    return str(cfg.train_split or train), str(cfg.test_split or test)


def _crisis_task(cfg: DatasetSettings) -> str:
    return str(cfg.task or "humanitarian")


def check_source(dataset: DatasetSettings | dict[str, Any]) -> None:
    """Raise DataError (one line) when the configured files are absent; reads no rows.

    For `fedmllm run`'s preflight: a wrong path fails before any worker starts.
    """

    cfg = typed(DatasetSettings, dataset, "dataset")
    if cfg.name == "hateful_memes":
        hateful_memes.expected_files(Path(_root(cfg)), _splits(cfg))
    elif cfg.name == "crisismmd":
        root, t, agreed = Path(_root(cfg)), _crisis_task(cfg), bool(cfg.agreed)
        for s in _splits(cfg):
            crisismmd.split_file(root, t, s, agreed)
    elif cfg.name == "llava_json":
        llava_json.task(cfg)
        llava_json.check_path(cfg.path, "path")
        if cfg.test_path:
            llava_json.check_path(cfg.test_path, "test_path")
        if cfg.image_root and not Path(cfg.image_root).is_dir():
            raise DataError(f"llava_json: dataset.image_root={cfg.image_root} is not a directory")
    elif cfg.name == "hf":
        hf.check(cfg)


def _root(cfg: DatasetSettings) -> str:
    if not cfg.root:
        raise DataError(f"{cfg.name}: dataset.root is not set; add dataset.root=DIR (see README, Data)")
    return str(Path(cfg.root).expanduser())


def _copy(samples: tuple[Sample, ...]) -> list[Sample]:
    """Fresh dicts from a cached tuple, so a caller's edits (scenarios) never reach the cache."""
    return [Sample(**s) for s in samples]


def load_public(dataset: DatasetSettings | dict[str, Any], seed: int = 42) -> list[Sample]:
    """The server's public pool: every training-split sample whose image is among the
    `dataset.public_fraction` of images drawn with `seed`. Clients never see these images
    (load_task drops them from the pool they partition)."""
    dataset = typed(DatasetSettings, dataset, "dataset")
    frac = float(dataset.public_fraction)
    if frac <= 0:
        return []
    full = load_task(replace(dataset, public_fraction=0.0, eval_samples=0), seed)[1]
    public_images = _public_images(full, frac, seed)
    return [s for s in full if s["image"] in public_images]


def _public_images(samples: list[Sample], fraction: float, seed: int) -> set[str]:
    """A seeded `fraction` of the distinct images (split by image, so no image is on both sides)."""
    if fraction <= 0:
        return set()
    images = sorted({s["image"] for s in samples if s["image"] is not None})
    k = round(fraction * len(images))
    return set(random.Random(seed).sample(images, k)) if k else set()

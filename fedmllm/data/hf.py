"""Hugging Face `datasets` on disk as a task (`dataset=hf`): a saved dataset (`load_from_disk`),
parquet or json files, or an image folder (`imagefolder`), with a column mapping.

A row becomes a Sample: its image (an Image feature, or a path column), its text (`text_column`,
e.g. a question) and its answer (`answer_column`, text) or class (`label_column`, a ClassLabel or
text). `answers: closed` makes the answers options (`labels`, default: the ClassLabel names or the
sorted distinct answers), scored like every other task; `answers: open` keeps free-text answers
(VQA-RAD, SLAKE): the model is trained on the whole answer and evaluated by generation, exact
match and VQA-normalized accuracy (fedmllm.evaluation.metrics.open_metrics).

Images the dataset holds as bytes are written once under the cache (`<cache>/hf-images/<the
split's fingerprint>/`), so samples keep image paths as every other source does.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmllm.common import cache_root, write_atomically
from fedmllm.data.reading import DataError, RowLog, image_problem
from fedmllm.data.schema import Sample, Task

if TYPE_CHECKING:  # data/__init__.py owns the settings and imports this module
    from fedmllm.data import DatasetSettings

FORMATS = ("auto", "disk", "parquet", "json", "imagefolder")
ANSWERS = ("closed", "open")
_FILE_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}


def detect_format(path: Path, fmt: str) -> str:
    """`dataset.format`, or the one `path` is in (auto): a saved dataset's folder (its
    dataset_dict.json or state.json), a parquet/json file, else a folder of images."""
    if fmt != "auto":
        return fmt
    if path.is_dir():
        saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        return "disk" if saved else "imagefolder"
    if path.suffix in _FILE_FORMATS:
        return _FILE_FORMATS[path.suffix]
    raise DataError(
        f"hf: dataset.path={path} is neither a saved dataset, a folder of images nor a .parquet/.json/.jsonl "
        "file; set dataset.format=disk|parquet|json|imagefolder"
    )


def check(cfg: DatasetSettings) -> Path:
    """The configured path; DataError (one line) when unset or absent."""
    if not cfg.path:
        raise DataError(
            "hf: dataset.path is not set; add dataset.path=DIR (load_from_disk or an image folder) or FILE "
            "(.parquet, .json, .jsonl)"
        )
    path = Path(str(cfg.path)).expanduser()
    if not path.exists():
        raise DataError(f"hf: dataset.path={path} does not exist")
    if cfg.test_path and not Path(str(cfg.test_path)).expanduser().exists():
        raise DataError(f"hf: dataset.test_path={cfg.test_path} does not exist")
    return path


def _splits(cfg: DatasetSettings):
    """{split name: datasets.Dataset} of the configured source."""
    import datasets

    path = check(cfg)
    fmt = detect_format(path, str(cfg.format or "auto"))
    cache = str(cache_root() / "hf-datasets")
    if fmt == "disk":
        loaded = datasets.load_from_disk(str(path))
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if fmt == "imagefolder":
        return dict(datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache))
    files = {"train": str(path)}
    if cfg.test_path:
        files["test"] = str(Path(str(cfg.test_path)).expanduser())
    return dict(datasets.load_dataset(fmt, data_files=files, cache_dir=cache))


def _column(ds, name: str | None, key: str, split: str) -> str | None:
    if name and name not in ds.column_names:
        raise DataError(
            f"hf: dataset.{key}={name!r} is not a column of split {split!r}; its columns: {ds.column_names}"
        )
    return name or None


def _image_paths(ds, column: str, split: str, base: Path) -> list[str | None]:
    """Each row's image as a file path: the file an Image feature came from when it still exists,
    else its bytes written once under the cache; a text column is a path relative to `base`."""
    import datasets

    feature = ds.features[column]
    if not isinstance(feature, datasets.Image):
        return [None if v is None else str(base / str(v)) for v in ds[column]]
    cells = ds.cast_column(column, datasets.Image(decode=False))[column]
    folder = cache_root() / "hf-images" / f"{split}-{ds._fingerprint}"

    def source(cell: dict) -> str | None:  # the file the image came from, when it still exists
        return cell["path"] if cell.get("path") and Path(cell["path"]).is_file() else None

    def written(i: int, cell: dict) -> Path:  # where its bytes go otherwise
        return folder / f"{i}{Path(cell.get('path') or 'x.png').suffix or '.png'}"

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        for i, cell in enumerate(cells):
            if cell and cell.get("bytes") and not source(cell):
                (tmp / written(i, cell).name).write_bytes(cell["bytes"])

    if not folder.is_dir() and any(c and c.get("bytes") and not source(c) for c in cells):
        write_atomically(folder, write)
    return [None if not cell else str(source(cell) or written(i, cell)) for i, cell in enumerate(cells)]


def _answers(ds, cfg: DatasetSettings, split: str) -> list[str | None]:
    """Each row's answer text (the label column's class name for a ClassLabel)."""
    import datasets

    label = _column(ds, cfg.label_column, "label_column", split)
    if label:
        feature = ds.features[label]
        names = feature.names if isinstance(feature, datasets.ClassLabel) else None
        return [None if v is None else (names[v] if names else str(v)).strip() for v in ds[label]]
    answer = _column(ds, cfg.answer_column or "answer", "answer_column", split)
    return [None if v is None else str(v).strip() for v in ds[answer]]


def load(cfg: DatasetSettings, seed: int) -> tuple[Task, list[Sample], list[Sample]]:
    """(task, train split, test split): the test split is `test_split` (or `test_path`'s rows);
    without one, `eval_samples` rows of train are held out (a fifth when 0), seeded."""
    splits = _splits(cfg)
    train_name, test_name = str(cfg.train_split or "train"), cfg.test_split or "test"
    if train_name not in splits:
        raise DataError(f"hf: dataset.train_split={train_name!r} is not a split of {cfg.path}: {sorted(splits)}")
    base = Path(str(cfg.image_root or Path(str(cfg.path)).expanduser().parent))
    names = [train_name] + ([test_name] if test_name != train_name and test_name in splits else [])
    rows = {name: _rows(splits[name], cfg, name, base) for name in names}
    answers = str(cfg.answers or "closed")
    labels = _labels(cfg, rows, answers)
    strict = bool(cfg.strict)
    train = _samples(rows[train_name], labels, train_name, cfg, strict)
    if test_name in rows:
        test = _samples(rows[test_name], labels, test_name, cfg, strict)
    else:
        n = int(cfg.eval_samples) or round(0.2 * len(train))
        if not 0 < n < len(train):
            raise DataError(
                f"hf: {len(train)} usable rows in split {train_name!r}, too few to hold out dataset.eval_samples={n}; "
                "lower it or give a test split"
            )
        held = set(random.Random(seed).sample(range(len(train)), n))
        train, test = [s for i, s in enumerate(train) if i not in held], [s for i, s in enumerate(train) if i in held]
    task = Task(
        "hf",
        labels=tuple(labels),
        instruction=str(cfg.instruction or ""),
        question=str(cfg.question or ""),
        template=str(cfg.template or "short"),
        open=answers == "open",
    )
    return task, train, test


def _rows(ds, cfg: DatasetSettings, split: str, base: Path) -> list[dict[str, Any]]:
    image = _column(ds, cfg.image_column, "image_column", split)
    text = _column(ds, cfg.text_column, "text_column", split)
    images = _image_paths(ds, image, split, base) if image else [None] * len(ds)
    texts = [None if v is None else str(v).strip() or None for v in ds[text]] if text else [None] * len(ds)
    return [
        {"id": f"{split}-{i}", "image": im, "text": tx, "answer": an}
        for i, (im, tx, an) in enumerate(zip(images, texts, _answers(ds, cfg, split)))
    ]


def _labels(cfg: DatasetSettings, rows: dict[str, list[dict]], answers: str) -> list[str]:
    """The options (closed: `dataset.labels`, else the distinct answers sorted) or the answer
    vocabulary (open: every distinct answer of every split, sorted)."""
    given = [str(x) for x in (cfg.labels or ())]
    if answers == "closed" and given:
        if len(given) < 2 or len(set(given)) != len(given):
            raise DataError(f"hf: dataset.labels={given} must list at least two distinct answers")
        return given
    found = sorted({r["answer"] for split in rows.values() for r in split if r["answer"]})
    if len(found) < 2:
        raise DataError(f"hf: the answer column holds {len(found)} distinct answer(s); a task needs at least two")
    return found


def _samples(rows: list[dict], labels: list[str], split: str, cfg: DatasetSettings, strict: bool) -> list[Sample]:
    """Rows with an answer among `labels` and a readable image (when they have one); the others
    dropped with one summary line (`strict`: the first raises)."""
    index = {label: i for i, label in enumerate(labels)}
    log = RowLog(Path(f"{cfg.path}[{split}]"), strict)
    log.rows = len(rows)
    out: list[Sample] = []
    for line, row in enumerate(rows, start=1):
        if row["answer"] not in index:
            log.drop(line, "unknown label", f"answer {row['answer']!r} is not one of dataset.labels")
            continue
        if row["image"] is not None:
            problem = image_problem(Path(row["image"]), decode=strict)
            if problem:
                log.drop(line, *problem)
                continue
        out.append(Sample(id=row["id"], image=row["image"], text=row["text"], label=index[row["answer"]]))
    log.report()
    return out

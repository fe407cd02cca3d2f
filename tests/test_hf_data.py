"""dataset=hf: Hugging Face datasets from disk (load_from_disk, imagefolder, parquet) with a column
mapping, and open-ended answers (dataset.answers=open) evaluated by generation (issue 20)."""

from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides

from fedmllm.config import ConfigError, compose
from fedmllm.data import DataError, load_task
from fedmllm.data.fixtures import COLOR_NAMES, write_hf_vqa, write_imagefolder
from fedmllm.evaluation.metrics import UNPARSED, open_metrics, open_predictions, vqa_normalize


def hf(*extra: str) -> dict:
    return compose(["dataset=hf", *extra])["dataset"]


def test_a_saved_dataset_with_open_answers_becomes_samples_with_image_files(tmp_path):
    write_hf_vqa(tmp_path / "vqa", n_rows=24)
    cfg = hf(
        f"dataset.path={tmp_path / 'vqa'}",
        "dataset.text_column=question",
        "dataset.answers=open",
        "dataset.eval_samples=0",
        "eval.mode=generate",
    )
    task, train, test = load_task(cfg, seed=1)
    assert task.open and task.template == "short"
    assert set(task.labels) <= {*COLOR_NAMES, "yes", "no"} and "yes" in task.labels and "red" in task.labels
    assert len(train) == 24 and len(test) == 4  # the saved test split, whole (eval_samples=0)
    assert all(Path(s["image"]).is_file() for s in train + test)  # bytes written once under the cache
    assert {s["text"] for s in train} >= {"What colour is the image?"}
    first = train[0]["image"]
    assert load_task(cfg, seed=1)[1][0]["image"] == first  # a second load reuses the written files


def test_an_image_folder_is_a_closed_task_whose_labels_are_its_classes(tmp_path):
    write_imagefolder(tmp_path / "pets", n_rows=20, classes=("cat", "dog"))
    cfg = hf(f"dataset.path={tmp_path / 'pets'}", "dataset.label_column=label", "dataset.instruction=Cat or dog?")
    task, train, test = load_task(cfg, seed=1)
    assert not task.open and task.labels == ("cat", "dog")
    assert len(train) == 20 and len(test) == 4
    for s in train:  # the original files, their class the folder
        assert Path(s["image"]).is_relative_to(tmp_path / "pets" / "train") and s["text"] is None
        assert Path(s["image"]).parent.name == task.labels[s["label"]]


def test_parquet_with_a_path_column_and_a_held_out_share(tmp_path):
    import datasets

    (tmp_path / "img").mkdir()
    write_imagefolder(tmp_path / "src", n_rows=12)
    files = sorted((tmp_path / "src" / "train").rglob("*.png"))
    rows = {"file": [f"../src/train/{f.parent.name}/{f.name}" for f in files], "answer": [f.parent.name for f in files]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "img" / "rows.parquet"))
    cfg = hf(
        f"dataset.path={tmp_path / 'img' / 'rows.parquet'}",
        "dataset.image_column=file",
        "dataset.eval_samples=3",
        "dataset.labels=[dog,cat]",
    )
    task, train, test = load_task(cfg, seed=3)
    assert task.labels == ("dog", "cat") and len(train) == 9 and len(test) == 3
    assert all(Path(s["image"]).is_file() for s in train + test)
    assert {task.labels[s["label"]] for s in train + test} <= {"cat", "dog"}


def test_bad_settings_name_the_column_or_the_setting(tmp_path):
    write_hf_vqa(tmp_path / "vqa", n_rows=8)
    with pytest.raises(DataError, match=r"dataset.text_column='prompt' is not a column of split 'train'.*question"):
        load_task(hf(f"dataset.path={tmp_path / 'vqa'}", "dataset.text_column=prompt"))
    with pytest.raises(DataError, match="dataset.path=.*does not exist"):
        load_task(hf(f"dataset.path={tmp_path / 'nothing'}"))
    with pytest.raises(ConfigError, match="dataset.answers=open: .*add eval.mode=generate"):
        compose(["dataset=hf", "dataset.answers=open"])
    with pytest.raises(ConfigError, match="dataset.answers=open needs dataset.template=short"):
        compose(["dataset=hf", "dataset.answers=open", "dataset.template=mc", "eval.mode=generate"])
    with pytest.raises(ConfigError, match="dataset.answers='maybe'"):
        compose(["dataset=hf", "dataset.answers=maybe"])


def test_open_answers_are_compared_after_vqa_normalization():
    assert vqa_normalize("The Lung.\nmore text") == "lung"
    assert vqa_normalize("Two") == "2" and vqa_normalize("1.5 cm") == "1.5 cm" and vqa_normalize("don't") == "dont"
    answers = ["The lung.", "Yes", "left kidney", "no", "RIGHT"]
    truths = ["lung", "yes", "right kidney", "yes", "right"]
    m = open_metrics(answers, truths)
    assert m["accuracy"] == pytest.approx(3 / 5)  # lung, yes, right
    assert m["exact_match"] == pytest.approx(2 / 5)  # "Yes" and "RIGHT" equal ignoring case; "The lung." is not
    assert m["accuracy_closed"] == pytest.approx(1 / 2) and m["accuracy_open"] == pytest.approx(2 / 3)
    vocab = ("left kidney", "lung", "no", "right", "right kidney", "yes")
    labels = np.array([1, 5, 4, 5, 3])
    pred = open_predictions(answers, vocab, labels)
    assert pred.tolist() == [1, 5, 0, 2, 3]
    assert open_predictions(["spleen"], vocab, np.array([1])).tolist() == [UNPARSED]


@pytest.mark.slow
def test_an_open_ended_task_runs_end_to_end_on_the_tiny_model(tmp_path):
    """Trained on the whole answer, evaluated by generation: every round's row holds the
    open-ended metrics, the held-out answers are saved."""
    from inprocess import run_in_process

    from fedmllm.tracking import read_metrics

    write_hf_vqa(tmp_path / "vqa", n_rows=24)
    out = tmp_path / "run"
    run_in_process(
        tiny_overrides(
            "dataset=hf",
            f"dataset.path={tmp_path / 'vqa'}",
            "dataset.text_column=question",
            "dataset.answers=open",
            "dataset.instruction=Answer with one word.",
            "eval.mode=generate",
            "eval.max_new_tokens=4",
            "partitioner=iid",
            "dataset.eval_samples=0",
            f"out_dir={out}",
        )
    )
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["exact_match"] <= 1
        assert "accuracy_closed" in r and "accuracy_open" in r and r["eval_samples"] == 4
    assert all(r["train_loss"] > 0 for r in rows[1:] if "train_loss" in r)
    saved = np.load(out / "predictions" / "round-2.npz")
    assert len(saved["answers"]) == 4 and saved["labels"].shape == (4,)

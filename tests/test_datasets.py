"""On-disk dataset loaders (Hateful Memes, CrisisMMD, LLaVA JSON) on fixtures written in the real
formats: drops with file and line, strict mode, layout errors, and the prompt->collate->score path."""

import json

import numpy as np
import pytest

from fedmllm.config import ConfigError
from fedmllm.data import DataError, check_source, crisismmd, hateful_memes, load_task
from fedmllm.data.fixtures import (
    BROKEN_CRISISMMD,
    BROKEN_HATEFUL,
    BROKEN_LLAVA,
    write_crisismmd,
    write_hateful_memes,
    write_llava_json,
)


def hm_cfg(root, **kw):
    return {"name": "hateful_memes", "root": str(root), "eval_samples": 0, **kw}


def cm_cfg(root, **kw):
    return {"name": "crisismmd", "root": str(root), "task": "humanitarian", "eval_samples": 0, **kw}


# ---- Hateful Memes ----------------------------------------------------------------------------


def test_hateful_memes_reads_rows_and_normalises_ids(tmp_path):
    root = write_hateful_memes(tmp_path / "hm", n_rows=12, seed=0)
    task, train, test = load_task(hm_cfg(root))
    assert task.name == "hateful_memes" and task.labels == ("not-hateful", "hateful") and task.template == "mc"
    assert len(train) == 12 and len(test) == 4  # test_seen by default
    raw = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    assert {type(r["id"]) for r in raw} == {int, str} and raw[0]["id"] == "00001"  # both forms on disk
    assert [s["id"] for s in train] == [str(i) for i in range(1, 13)]
    assert hateful_memes.normalize_id(5316) == hateful_memes.normalize_id("05316") == "5316"
    assert [s["label"] for s in train] == [r["label"] for r in raw]
    assert train[0]["image"] == str(root / "img" / "00001.png") and train[0]["text"] == raw[0]["text"]


def test_hateful_memes_split_names_and_seeded_heldout(tmp_path):
    root = write_hateful_memes(tmp_path / "hm", n_rows=40, seed=1)
    _, train, test = load_task(hm_cfg(root, train_split="dev_seen", test_split="dev_unseen"))
    assert len(train) == len(test) == 4 and not {s["id"] for s in train} & {s["id"] for s in test}
    a = load_task(hm_cfg(root, test_split="train", eval_samples=5), seed=3)[2]
    b = load_task(hm_cfg(root, test_split="train", eval_samples=5), seed=3)[2]
    assert len(a) == 5 and a == b
    with pytest.raises(DataError, match="split 'test' is unknown; choose one of"):
        load_task(hm_cfg(root, test_split="test"))


def test_hateful_memes_drops_bad_rows_with_file_and_line(tmp_path, capsys):
    root = write_hateful_memes(tmp_path / "hm", n_rows=10, seed=0, broken=True)
    _, train, _ = load_task(hm_cfg(root))
    assert len(train) == 10 and all(int(s["id"]) < 99990 for s in train)
    err = capsys.readouterr().err
    lines = ", ".join(f"1 {kind} (line {11 + i})" for i, kind in enumerate(BROKEN_HATEFUL))
    assert f"dropped 5 of 15 rows in {root / 'train.jsonl'}: {lines}" in err
    assert err.count("dropped") == 1  # the clean test file adds no line


def test_hateful_memes_strict_raises_on_the_first_bad_row(tmp_path):
    root = write_hateful_memes(tmp_path / "hm", n_rows=6, seed=0, broken=True)
    with pytest.raises(DataError) as err:
        load_task(hm_cfg(root, strict=True))
    msg = str(err.value)
    assert msg.startswith(f"{root / 'train.jsonl'}:7: bad JSON:") and "dataset.strict=true" in msg


def test_hateful_memes_missing_root_or_split_lists_the_expected_files(tmp_path):
    with pytest.raises(DataError) as err:
        load_task(hm_cfg(tmp_path / "nowhere"))
    msg = str(err.value)
    assert "does not exist" in msg and "img/, train.jsonl, dev_seen.jsonl, dev_unseen.jsonl, test_seen.jsonl" in msg
    root = write_hateful_memes(tmp_path / "hm", n_rows=4, seed=0)
    (root / "test_seen.jsonl").unlink()
    with pytest.raises(DataError, match=r"lacks test_seen.jsonl; expected there: img/, train.jsonl"):
        check_source(hm_cfg(root))
    with pytest.raises(DataError, match="dataset.root is not set; add dataset.root=DIR"):
        load_task({"name": "hateful_memes", "root": None})


def test_cached_samples_are_copies(tmp_path):
    root = write_hateful_memes(tmp_path / "hm", n_rows=4, seed=0)
    _, first, _ = load_task(hm_cfg(root))
    first[0]["image"] = None  # a scenario dropping the image
    _, again, _ = load_task(hm_cfg(root))
    assert again[0]["image"] is not None
    assert hateful_memes.load_split.cache_info().hits >= 2


def test_ten_thousand_rows_load(tmp_path):
    """(The time is measured by bench/partition.py, not asserted here.)"""
    root = write_hateful_memes(tmp_path / "hm", n_rows=10_000, seed=2)
    _, train, _ = load_task(hm_cfg(root))
    assert len(train) == 10_000


# ---- CrisisMMD --------------------------------------------------------------------------------


def test_crisismmd_reads_tsv_strips_urls_and_maps_labels(tmp_path):
    root = write_crisismmd(tmp_path / "cm", "humanitarian", n_rows=12, seed=0)
    task, train, test = load_task(cm_cfg(root))
    assert task.labels == crisismmd.LABELS["humanitarian"] and len(train) == 12 and len(test) == 4
    tsv = (root / "crisismmd_datasplit_all/task_humanitarian_text_img_train.tsv").read_text().splitlines()
    header, first = tsv[0].split("\t"), dict(zip(tsv[0].split("\t"), tsv[1].split("\t")))
    assert header[:5] == ["event_name", "tweet_id", "image_id", "tweet_text", "image"]
    assert "https://t.co/" in first["tweet_text"]
    s = train[0]
    assert s["id"] == first["image_id"] and s["image"] == str(root / first["image"])
    assert "http" not in s["text"] and s["text"] == " ".join(first["tweet_text"].split()[:-2] + ["#help"])
    assert task.labels[s["label"]] == first["label_image"]  # FedMLLM's label column, the default
    assert crisismmd.clean_tweet("Help https://t.co/abc  now http://x.y/z") == "Help now"


def test_crisismmd_label_column_and_tasks(tmp_path):
    root = write_crisismmd(tmp_path / "cm", "damage", n_rows=30, seed=1)
    task, by_label, _ = load_task(cm_cfg(root, task="damage", label_column="label"))
    _, by_image, _ = load_task(cm_cfg(root, task="damage"))
    assert task.answers == ("(A) little_or_no_damage", "(B) mild_damage", "(C) severe_damage")
    assert [s["label"] for s in by_label] != [s["label"] for s in by_image]
    # the dataset settings refuse both before any file is read
    with pytest.raises(ConfigError, match="no agreed-label damage split"):
        load_task(cm_cfg(root, task="damage", agreed=True))
    with pytest.raises(ConfigError, match="dataset.task='floods': choose humanitarian, informative or damage"):
        load_task(cm_cfg(root, task="floods"))


def test_crisismmd_agreed_files(tmp_path):
    root = write_crisismmd(tmp_path / "cm", "informative", n_rows=40, seed=0, agreed=True)
    agreed_tsv = root / "crisismmd_datasplit_agreed_label" / "task_informative_text_img_agreed_lab_train.tsv"
    n_agreed = len(agreed_tsv.read_text().splitlines()) - 1
    _, every, _ = load_task(cm_cfg(root, task="informative"))
    _, agreed, _ = load_task(cm_cfg(root, task="informative", agreed=True))
    assert 0 < len(agreed) == n_agreed < len(every)
    agreed_tsv.unlink()
    with pytest.raises(DataError, match="task_informative_text_img_agreed_lab_train.tsv not found"):
        load_task(cm_cfg(root, task="informative", agreed=True))


def test_crisismmd_drops_bad_rows_and_strict(tmp_path, capsys):
    root = write_crisismmd(tmp_path / "cm", "humanitarian", n_rows=8, seed=0, broken=True)
    _, train, _ = load_task(cm_cfg(root))
    assert len(train) == 8
    path = root / "crisismmd_datasplit_all" / "task_humanitarian_text_img_train.tsv"
    lines = ", ".join(f"1 {kind} (line {10 + i})" for i, kind in enumerate(BROKEN_CRISISMMD))
    assert f"dropped 4 of 12 rows in {path}: {lines}" in capsys.readouterr().err
    with pytest.raises(DataError, match=rf"{path}:10: bad TSV row: 4 tab-separated fields, the header has 9"):
        load_task(cm_cfg(root, strict=True))


def test_crisismmd_missing_split_file_names_it(tmp_path):
    root = write_crisismmd(tmp_path / "cm", "humanitarian", n_rows=4, seed=0)
    with pytest.raises(DataError, match=r"lacks crisismmd_datasplit_all/task_informative_text_img_train.tsv"):
        load_task(cm_cfg(root, task="informative"))


# ---- LLaVA JSON -------------------------------------------------------------------------------


def test_llava_json_parses_conversations(tmp_path):
    path = write_llava_json(tmp_path / "lj" / "data.json", n_rows=10, seed=0)
    cfg = {"name": "llava_json", "path": str(path), "labels": ["no", "yes"], "eval_samples": 3}
    task, train, heldout = load_task(cfg, seed=0)
    assert task.answers == ("(A) no", "(B) yes") and len(train) == 7 and len(heldout) == 3
    assert not {s["id"] for s in train} & {s["id"] for s in heldout}
    by_id = {s["id"]: s for s in train + heldout}
    assert by_id["rec-0"]["text"] == "Is the shape round?"
    assert by_id["rec-0"]["image"] == str(path.parent / "images/0000.png")
    assert by_id["rec-4"]["image"] is None and by_id["rec-4"]["text"] == "Is it round?"
    raw = json.loads(path.read_text())
    assert [by_id[r["id"]]["label"] for r in raw] == [task.labels.index(r["conversations"][1]["value"]) for r in raw]
    _, train2, test2 = load_task({**cfg, "test_path": str(path), "image_root": str(path.parent)}, seed=0)
    assert len(train2) == 10 and len(test2) == 3
    with pytest.raises(DataError, match="dataset.labels=\\[\\] must list at least two"):
        load_task({**cfg, "labels": []})
    with pytest.raises(DataError, match="dataset.path is not set"):
        load_task({**cfg, "path": None})


def test_llava_json_drops_bad_records_with_lines(tmp_path, capsys):
    path = write_llava_json(tmp_path / "lj" / "data.json", n_rows=6, seed=0, broken=True)
    _, train, heldout = load_task({"name": "llava_json", "path": str(path), "labels": ["no", "yes"], "eval_samples": 2})
    assert len(train) + len(heldout) == 6
    kinds = ", ".join(f"1 {kind} (line {8 + i})" for i, kind in enumerate(BROKEN_LLAVA))
    assert f"dropped 5 of 11 rows in {path}: {kinds}, 1 bad JSON (line 12)" in capsys.readouterr().err
    with pytest.raises(DataError, match=rf"{path}:8: unknown label: gpt answer 'maybe'"):
        load_task({"name": "llava_json", "path": str(path), "labels": ["no", "yes"], "strict": True})


# ---- config, preflight, the whole prompt -> collate -> score path -----------------------------


def test_new_datasets_compose_without_server_stage(tmp_path):
    from fedmllm.cli import preflight
    from fedmllm.config import ConfigError, compose

    for name in ("hateful_memes", "crisismmd", "llava_json"):
        cfg = compose(["model=tiny-llava", f"dataset={name}"])
        assert cfg["server_stage"]["name"] == "none" and cfg["dataset"]["template"] == "mc"
        with pytest.raises(DataError) as err:
            preflight(cfg)
        assert "\n" not in str(err.value) and "dataset." in str(err.value)
    with pytest.raises(ConfigError, match="add server_stage=none for dataset=hateful_memes"):
        compose(["dataset=hateful_memes", "server_stage=pretrain"])
    with pytest.raises(ConfigError, match="supported for easy-vqa only"):
        compose(["dataset=crisismmd", "dataset.public_fraction=0.5"])
    assert compose()["server_stage"]["name"] == "pretrain"  # the easy-vqa default is unchanged
    root = write_hateful_memes(tmp_path / "hm", n_rows=4, seed=0)
    preflight(compose(["model=tiny-llava", "dataset=hateful_memes", f"dataset.root={root}"]))


def test_hateful_memes_prompt_collate_score_with_and_without_images(tmp_path):
    import torch
    from conftest import tiny_overrides

    from fedmllm.config import compose
    from fedmllm.data.collate import IGNORE, Collator
    from fedmllm.data.prompts import SYSTEM, user_prompt
    from fedmllm.evaluation.scoring import score_options
    from fedmllm.models.load import load_model
    from fedmllm.server.evaluate import evaluate

    root = write_hateful_memes(tmp_path / "hm", n_rows=8, seed=0)
    cfg = compose(
        tiny_overrides("dataset=hateful_memes", f"dataset.root={root}", "model.quantization=none", "prompt=aug")
    )
    task, train, heldout = load_task(cfg["dataset"], cfg["seed"], cfg["prompt"])
    assert task.aug and len(heldout) == 4
    heldout[1]["image"] = None  # text-only
    heldout[2]["text"] = None  # image-only
    torch.manual_seed(0)
    model, processor, family = load_model(cfg["model"])
    col = Collator(processor, family, task)
    batch = col.train_batch(heldout)
    for row, s in enumerate(heldout):
        assert [t for t in batch["labels"][row].tolist() if t != IGNORE] == col.answer_ids(task.answers[s["label"]])
    metrics = evaluate(model, col, heldout, None, batch_size=3)
    scores = metrics["_predictions"]["scores"]
    assert scores.shape == (4, 2) and np.isfinite(scores).all()
    assert {"accuracy", "macro_f1", "accuracy_no_image"} <= set(metrics)
    # each score is the full answer's log-likelihood: check one by hand
    s = heldout[0]
    prompt = family.prompt(processor, SYSTEM, user_prompt(task, s, ""), True)
    from PIL import Image

    with Image.open(s["image"]) as im:
        enc = processor(
            text=[prompt + task.answers[1]], images=[im.convert("RGB")], return_tensors="pt", add_special_tokens=False
        )
    k = len(processor.tokenizer(task.answers[1], add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(**enc).logits[0, -k - 1 : -1].float(), dim=-1)
    manual = logp.gather(-1, enc["input_ids"][0, -k:].unsqueeze(-1)).sum().item()
    np.testing.assert_allclose(score_options(model, col, [s], batch_size=1)[0, 1], manual, atol=1e-4)


# ---- easy-vqa flag task -----------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_flag_task_balances_labels_and_each_modality_carries_its_stated_part(split):
    """Labels balanced; the rule (text) and roundness (image) independent; the Bayes accuracy of
    each modality alone, computed on the samples, is FLAG_BAYES's (up to the thirds' rounding)."""
    from collections import Counter

    from fedmllm.data import easyvqa

    samples = easyvqa.flag_samples(split, seed=42)
    shape = {easyvqa._image_paths(split)[i]: s for i, (s, _) in easyvqa.image_attributes(split).items()}
    assert len({s["image"] for s in samples}) == len(samples)  # each image once
    rounds = [shape[s["image"]] == "circle" for s in samples]
    assert sum(rounds) * 2 == len(samples)  # half round
    labels = [s["label"] for s in samples]
    assert abs(sum(labels) / len(labels) - 0.5) < 0.02

    def bayes(keys):  # accuracy of the majority label within each group of `keys`
        by: dict = {}
        for k, y in zip(keys, labels):
            by.setdefault(k, Counter())[y] += 1
        return sum(max(c.values()) for c in by.values()) / len(labels)

    texts = [s["text"] for s in samples]
    assert set(texts) == set(easyvqa.RULES)
    assert bayes(texts) == pytest.approx(easyvqa.FLAG_BAYES["text"], abs=0.02)
    assert bayes(rounds) == pytest.approx(easyvqa.FLAG_BAYES["image"], abs=0.02)
    assert bayes(list(zip(texts, rounds))) == 1.0
    assert bayes([0] * len(labels)) == pytest.approx(easyvqa.FLAG_BAYES["none"], abs=0.02)
    assert easyvqa.flag_samples(split, seed=42) == samples and easyvqa.flag_samples(split, seed=7) != samples

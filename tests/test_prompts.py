"""Prompt templates: FedMLLM's multiple-choice prompt word for word, the aug wording, the short
easy-vqa template, and answers that tokenize apart from their prompts."""

from dataclasses import replace

import pytest

from fedmllm.data import crisismmd, easyvqa, hateful_memes
from fedmllm.data.prompts import user_prompt
from fedmllm.data.schema import Sample

CUE = "Answer with the option's letter from the given choices directly and only give the best option. The best answer is: "
HM = hateful_memes.TASK


def sample(image="img/1.png", text="its their character not their color that matters", label=1) -> Sample:
    return Sample(id="1", image=image, text=text, label=label)


def test_mc_prompt_with_text_and_image_is_design_section_6_verbatim():
    expected = (
        "<image>\nSelect the best answer to the following multiple-choice question based on the text and image.\n"
        "its their character not their color that matters\nIs the content hateful based on the text and image?\n"
        "Options:\n(A) not-hateful\n(B) hateful\n" + CUE
    )
    assert user_prompt(HM, sample(), "<image>") == expected
    assert HM.answers == ("(A) not-hateful", "(B) hateful")


def test_mc_prompt_names_the_modalities_the_sample_shows():
    text_only = (
        "Select the best answer to the following multiple-choice question based on the text.\n"
        "its their character not their color that matters\nIs the content hateful based on the text?\n"
        "Options:\n(A) not-hateful\n(B) hateful\n" + CUE
    )
    assert user_prompt(HM, sample(image=None), "<image>") == text_only
    # drop_image (the no-image evaluation copy) shows the model the text-only prompt
    assert user_prompt(HM, sample(), "<image>", drop_image=True) == text_only
    image_only = (
        "<image>\nSelect the best answer to the following multiple-choice question based on the image.\n"
        "Is the content hateful based on the image?\nOptions:\n(A) not-hateful\n(B) hateful\n" + CUE
    )
    assert user_prompt(HM, sample(text=None), "<image>") == image_only
    assert user_prompt(HM, sample(text=""), "<image>") == image_only
    neither = (
        "Select the best answer to the following multiple-choice question.\n"
        "Is the content hateful?\nOptions:\n(A) not-hateful\n(B) hateful\n" + CUE
    )
    assert user_prompt(HM, sample(image=None, text=None), "<image>") == neither


def test_aug_replaces_the_modality_phrase_in_preamble_and_question():
    aug = replace(HM, aug=True)
    expected = (
        "<image>\nSelect the best answer to the following multiple-choice question, without considering the modality.\n"
        "its their character not their color that matters\nIs the content hateful, without considering the modality?\n"
        "Options:\n(A) not-hateful\n(B) hateful\n" + CUE
    )
    assert user_prompt(aug, sample(), "<image>") == expected
    image_only = user_prompt(aug, sample(text=None), "<image>")
    assert image_only.startswith("<image>\nSelect the best answer to the following multiple-choice question, without")
    assert "based on" not in image_only


def test_crisismmd_humanitarian_options_and_question():
    task = crisismmd.task("humanitarian")
    prompt = user_prompt(task, sample(text="Flooded homes in Houston"), "<image>")
    assert "question based on the text and image.\nFlooded homes in Houston\n" in prompt
    assert "\nWhat is the humanitarian category based on the image and text?\nOptions:\n" in prompt
    letters = "\n".join(task.answers)
    assert letters.startswith("(A) affected_individuals\n(B) infrastructure_and_utility_damage\n(C) injured_or_dead")
    assert letters.endswith("(G) other_relevant_information\n(H) not_humanitarian")
    assert letters in prompt
    assert crisismmd.task("damage").answers == ("(A) little_or_no_damage", "(B) mild_damage", "(C) severe_damage")


def test_short_template_keeps_the_tuned_easyvqa_prompt_and_names_a_missing_modality():
    task, s = easyvqa.YESNO, sample(text="is there a red shape?")
    assert user_prompt(task, s, "<image>") == "<image>\nis there a red shape?\nAnswer yes or no."
    assert (
        user_prompt(task, s, "<image>", drop_image=True) == "is there a red shape?\nAnswer yes or no based on the text."
    )
    assert user_prompt(task, sample(text=None), "<image>") == "<image>\nAnswer yes or no based on the image."
    aug = replace(task, aug=True)
    expected = "<image>\nis there a red shape?\nAnswer yes or no, without considering the modality."
    assert user_prompt(aug, s, "<image>") == expected
    assert task.answers == ("no", "yes")
    cap = replace(easyvqa.CAPTION, aug=True)
    assert user_prompt(cap, s, "<image>").endswith(
        "Does the caption describe the image? Answer yes or no, without considering the modality."
    )


def test_load_task_applies_prompt_group_and_template_override():
    from fedmllm.data import load_task

    cfg = {"name": "easyvqa", "balanced": True, "eval_samples": 4}
    task, _, _ = load_task(cfg, 42)
    assert (task.template, task.aug) == ("short", False)
    task, _, _ = load_task(cfg, 42, {"name": "aug"})
    assert task.aug
    task, _, heldout = load_task({**cfg, "template": "mc"}, 42)
    assert task.answers == ("(A) no", "(B) yes")
    assert user_prompt(task, heldout[0], "<image>").startswith("<image>\nSelect the best answer")
    with pytest.raises(ValueError, match="choose plain or aug"):
        load_task(cfg, 42, "loud")


def _processor(preset: str):
    from fedmllm.common import MissingAssetError
    from fedmllm.config import compose
    from fedmllm.models.load import resolve_path
    from fedmllm.models.registry import get_family

    cfg = compose([f"model={preset}"])
    try:
        path = resolve_path(cfg["model"])
    except MissingAssetError as err:
        pytest.skip(str(err))
    family = get_family(cfg["model"]["family"])
    processor = family.processor_cls().from_pretrained(path)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor, family


@pytest.mark.parametrize("preset", ["tiny-llava", "smol-llava"])
def test_mc_answers_tokenize_apart_from_their_prompts(preset, tmp_path):
    """train_batch raises when an answer merges with its prompt; every option of every task passes."""
    from PIL import Image

    from fedmllm.data.collate import IGNORE, Collator

    processor, family = _processor(preset)
    img = tmp_path / "x.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(img)
    for task in (HM, replace(HM, aug=True), crisismmd.task("humanitarian"), crisismmd.task("damage")):
        col = Collator(processor, family, task)
        samples = [
            sample(image=str(img) if i % 2 else None, text=None if i == 3 else "a text", label=i % len(task.labels))
            for i in range(len(task.labels))
        ]
        batch = col.train_batch(samples)
        for row, s in enumerate(samples):
            answer = [t for t in batch["labels"][row].tolist() if t != IGNORE]
            assert answer == col.answer_ids(task.answers[s["label"]])
            assert processor.tokenizer.decode(answer).startswith(task.answers[s["label"]])

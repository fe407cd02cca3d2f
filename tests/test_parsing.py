"""Generated answer -> option index (FedMLLM's generation protocol)."""

import pytest

from fedmllm.evaluation.parsing import option_letters, parse_answer, parse_letter, parse_word

HATEFUL = ("(A) not-hateful", "(B) hateful")
CRISIS = tuple(
    f"({chr(65 + i)}) {w}"
    for i, w in enumerate(
        (
            "affected_individuals",
            "infrastructure_and_utility_damage",
            "injured_or_dead_people",
            "missing_or_found_people",
            "rescue_volunteering_or_donation_effort",
            "vehicle_damage",
            "other_relevant_information",
            "not_humanitarian",
        )
    )
)
YESNO = ("no", "yes")


def test_lettered_options_are_detected_and_word_options_are_not():
    assert option_letters(HATEFUL) == ["A", "B"]
    assert option_letters(CRISIS) == list("ABCDEFGH")
    assert option_letters(YESNO) is None
    assert option_letters(("(A) x", "y")) is None  # all or nothing


@pytest.mark.parametrize(
    "text,expected",
    [
        ("(B) hateful", 1),
        ("B", 1),
        ("B.", 1),
        (" b) hateful", None),  # lowercase bare letter is prose, not an option
        ("(b)", 1),  # but in parentheses it is unambiguous
        ("A", 0),
        ("A.", 0),
        ("(A) not-hateful", 0),
        ("The best answer is: (B)", 1),
        ("The best answer is B", 1),
        ("A hateful meme. (B)", 1),  # the article "A" is skipped; the first real letter counts
        ("I think (A)", 0),  # so is the pronoun "I"
        ("(C) neither", None),  # no option C among two
        ("(C) or (B)", 1),  # ... so the first valid letter wins
        ("hateful", None),  # letter tasks read letters only, as FedMLLM does
        ("Both (A) and (B)", 0),  # the first letter
        ("", None),
        ("\n\n\n", None),
        ("BA", None),  # inside a word
        ("It's", None),
    ],
)
def test_parse_letter_reads_the_first_option_letter(text, expected):
    assert parse_answer(text, HATEFUL) == expected


def test_parse_letter_covers_eight_options():
    assert parse_answer("(H) not_humanitarian", CRISIS) == 7
    assert parse_answer("G", CRISIS) == 6
    assert parse_letter("(I)", list("ABCDEFGH")) is None


@pytest.mark.parametrize(
    "text,expected",
    [
        ("yes", 1),
        ("Yes", 1),
        ("YES.", 1),
        (" no", 0),
        ("No, it is not.", 0),
        ("yes or no? no", 1),  # the first option word
        ("The answer is no", 0),
        ("yesterday", None),  # not inside a longer word
        ("nothing", None),
        ("no-one knows", None),  # nor inside a hyphenated compound
        ("yes-man", None),
        ("I don't know", None),
        ("", None),
        ("yesyes", None),
    ],
)
def test_parse_word_reads_the_first_whole_option_word(text, expected):
    assert parse_answer(text, YESNO) == expected


def test_parse_word_prefers_the_longer_option_at_one_position():
    words = ["not-hateful", "hateful"]
    assert parse_word("not-hateful", words) == 0
    assert parse_word("Hateful.", words) == 1
    assert parse_word("it is not-hateful, not hateful", words) == 0


def test_parse_word_without_options_names_the_problem():
    with pytest.raises(ValueError, match="at least one option word"):
        parse_word("yes", [])


# FedMLLM's meld_dump: first regex match anywhere, case-sensitive, no word boundaries, index 2 else.
@pytest.mark.parametrize(
    "answer,crisis,hateful",
    [
        ("(B) hateful", 1, 1),
        ("Based on the image", 1, 1),  # the capital B inside "Based" is their answer
        ("Hateful (B)", 7, 1),  # H is in CrisisMMD's A-H, not in Hateful's A-G
        ("ANSWER: B", 0, 0),  # only "answer"/"Answer" are removed: the A of ANSWER matches
        ("( A )", 2, 2),  # "( A )" stripped of spaces then parentheses is " A ": no option
        ("(b)", 2, 2),  # case-sensitive
        ("hateful", 2, 2),  # names no option: index 2
        ("I think (G)", 6, 2),  # G is an option of CrisisMMD, in Hateful's range but not an option
        ("The best answer is: (C)", 2, 2),
    ],
)
def test_fedmllm_parse_reads_answers_as_their_scripts_do(answer, crisis, hateful):
    from fedmllm.evaluation.parsing import fedmllm_parse

    assert fedmllm_parse(answer, option_letters(CRISIS), "A-H") == crisis
    assert fedmllm_parse(answer, option_letters(HATEFUL), "A-G") == hateful


def test_fedmllm_metrics_take_auroc_on_hard_predictions_with_the_fallback():
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from fedmllm.evaluation.metrics import fedmllm_metrics

    labels = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 0])  # one unparsed answer (2) on a not-hateful sample
    m = fedmllm_metrics(pred, labels, 2)
    # by hand: scores 0,2,1,0 for labels 0,0,1,1 -> pairs (pos, neg): (1,0)>, (1,2)<, (0,0)=, (0,2)< -> 1.5/4
    assert m["auroc"] == pytest.approx(0.375) == roc_auc_score(labels, pred)
    assert m["accuracy"] == 0.5 and m["unparsed"] == 1
    with pytest.raises(ValueError, match="capital letter range"):
        from fedmllm.evaluation.parsing import fedmllm_parse

        fedmllm_parse("A", ["A", "B"], "a-h")

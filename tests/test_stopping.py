"""Stopping rules for generated replies: a closed JSON value and a reply that loops."""

from __future__ import annotations

import pytest

from patch_matters_core.models.stopping import cut_repetition, json_value_closed, repetition_cut


@pytest.mark.parametrize(
    ("text", "closed"),
    [
        ('{"consistent": [', False),
        ('{"consistent": []}', True),
        ('{"a": "}"', False),
        ('{"a": "}"}', True),
        ('{"a": "say \\"}\\" here"', False),
        ('{"a": "say \\"}\\" here"}', True),
        ("[1, [2, 3]", False),
        ("[1, [2, 3]] and more", True),
        ("Sure! Here it is: {\"x\": 1}", True),
        ("no json at all } ]", False),
        ("", False),
    ],
)
def test_json_value_closed(text, closed):
    assert json_value_closed(text) is closed


LOOPING_JSON = (
    '{"consistent": [{"statement": "a man rides a bicycle", "details": {'
    + '\n    "nationality": "Spain",' * 12
)


@pytest.mark.parametrize(
    "text",
    [
        "A man rides a bicycle. The sky is blue and clear. A dog runs beside him on the path.",
        "The cat sat. The cat sat. The cat sat.",
        '{"consistent": [{"statement": "a dog", "descriptions": [1, 2]}, {"statement": "a cat", "descriptions": [1, 3]}]}',
        "Numbers 1, 2, 3, 4, 5, 6 and 7 are on the board.",
        "",
    ],
)
def test_repetition_cut_ordinary_text(text):
    assert repetition_cut(text) is None
    assert cut_repetition(text) == (text, False)


def test_repetition_cut_looping_json_line():
    cut, repeated = cut_repetition(LOOPING_JSON)

    assert repeated
    assert cut.endswith('"nationality": "Spain",')
    assert cut.count('"nationality": "Spain"') == 1
    assert cut.startswith('{"consistent": [{"statement": "a man rides a bicycle"')


def test_repetition_cut_counting_loop():
    text = "The photo shows people." + "".join(f' {{"statement": "a woman wears a dress", "number": {n}}},' for n in range(1, 6))

    cut, repeated = cut_repetition(text)

    assert repeated
    assert cut.count("a woman wears a dress") == 1


def test_repetition_cut_short_phrase():
    assert repetition_cut("Ciudad de la " * 3) is None
    assert cut_repetition("The address is Ciudad de la " + "Ciudad de la " * 10) == ("The address is Ciudad de la", True)


def test_repetition_cut_repeated_sentence():
    sentence = "A man in a red jacket rides a bicycle along the river. "
    text = "The photo shows a park. " + sentence * 3

    assert cut_repetition(text) == ("The photo shows a park. " + sentence.strip(), True)

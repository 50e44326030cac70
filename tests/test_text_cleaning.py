"""Cleaning of generated text, sentence splitting and JSON extraction."""

from __future__ import annotations

import pytest

from patch_matters_core.models.text import clean_generated_text, extract_json, split_sentences

CLEANING_CASES = [
    ("plain text", "A dog runs on the beach.", "A dog runs on the beach."),
    ("im_end token", "A dog runs on the beach.<|im_end|>", "A dog runs on the beach."),
    ("eos token", "A red car is parked.</s>", "A red car is parked."),
    ("end of utterance", "Two cats sleep.<end_of_utterance>", "Two cats sleep."),
    ("endoftext", "A man holds an umbrella.<|endoftext|>", "A man holds an umbrella."),
    ("eot_id", "A bowl of fruit.<|eot_id|>", "A bowl of fruit."),
    ("instruction tokens", "[/INST] A kite flies over a field.", "A kite flies over a field."),
    ("unknown pipe token", "A bus<|reserved_token_7|> stops at a station.", "A bus stops at a station."),
    (
        "invented next turn after end token",
        "A cat on a sofa.<|im_end|>\n<|im_start|>user\nNow describe the dog.<|im_end|>",
        "A cat on a sofa.",
    ),
    ("invented user line", "A cat on a sofa.\nUser: describe it again", "A cat on a sofa."),
    (
        "reasoning block",
        "<think>The user wants a caption. I see a dog.</think>\n\nA brown dog sits on grass.",
        "A brown dog sits on grass.",
    ),
    ("unclosed reasoning block", "<think>Let me look at the image. There is a", ""),
    ("closing tag only", "I should be short.</think>A bicycle leans on a wall.", "A bicycle leans on a wall."),
    (
        "sure preamble",
        "Sure! Here's a detailed description of the image:\n\nA woman rides a horse on a trail.",
        "A woman rides a horse on a trail.",
    ),
    ("certainly preamble", "Certainly. A clock tower stands in a square.", "A clock tower stands in a square."),
    (
        "merged description preamble",
        "Here is the merged description:\nA table with plates and cups.",
        "A table with plates and cups.",
    ),
    ("description label", "Final description: A train crosses a bridge.", "A train crosses a bridge."),
    ("role label", "Assistant: A giraffe eats leaves.", "A giraffe eats leaves."),
    (
        "happy to help preamble",
        "I'd be happy to help! The photo shows a snowy street.",
        "The photo shows a snowy street.",
    ),
    ("sentence starting with great", "Great Danes are lying on a rug.", "Great Danes are lying on a rug."),
    ("sentence starting with here", "Here is a dog next to a fence.", "Here is a dog next to a fence."),
    ("surrounding quotes", '"A sailboat on a calm lake."', "A sailboat on a calm lake."),
    ("inner quotes kept", '"Stop" is written on a sign, says "Stop".', '"Stop" is written on a sign, says "Stop".'),
    (
        "markdown header dropped",
        "### Merged description\n\nA kitchen with a **white** fridge.",
        "A kitchen with a white fridge.",
    ),
    ("header alone kept", "# A lone tree on a hill", "A lone tree on a hill"),
    (
        "numbered list",
        "1. a red apple on a table\n2. A green bottle.\n3) a knife",
        "A red apple on a table. A green bottle. A knife.",
    ),
    (
        "bullet list after lead",
        "The image shows:\n- two dogs\n* a ball\n\u2022 a tree",
        "The image shows: Two dogs. A ball. A tree.",
    ),
    ("whitespace runs", "A  man\n\n walks\t a dog .", "A man walks a dog ."),
    ("code fence", "```\nA cat sits on a mat.\n```", "A cat sits on a mat."),
    ("empty", "", ""),
    ("only special tokens", "<|im_end|></s>", ""),
]


@pytest.mark.parametrize("raw, expected", [case[1:] for case in CLEANING_CASES], ids=[case[0] for case in CLEANING_CASES])
def test_clean_generated_text_cases(raw: str, expected: str) -> None:
    assert clean_generated_text(raw) == expected


def test_clean_prefill_added_when_missing() -> None:
    assert clean_generated_text(" a dog runs.", prefill="The image shows") == "The image shows a dog runs."


def test_clean_prefill_not_doubled() -> None:
    assert clean_generated_text("The image shows a dog.", prefill="The image shows") == "The image shows a dog."


def test_clean_prefill_keeps_opening_words() -> None:
    # With a prefill the start of the response is the prefill, so "Sure," is content there.
    assert clean_generated_text(" thing, a dog.", prefill="Sure") == "Sure thing, a dog."


def test_clean_json_prefill_kept_intact() -> None:
    text = clean_generated_text('red", "blue"]<|im_end|>', prefill='["')
    assert text == '["red", "blue"]'
    assert extract_json(text) == ["red", "blue"]


SENTENCE_CASES = [
    ("two sentences", "A dog runs. A cat sleeps.", ["A dog runs.", "A cat sleeps."]),
    ("abbreviation mr", "Mr. Smith holds a cup. He smiles.", ["Mr. Smith holds a cup.", "He smiles."]),
    ("abbreviation e.g.", "Fruit, e.g. apples, lies on a plate. It is red.", ["Fruit, e.g. apples, lies on a plate.", "It is red."]),
    ("decimal", "The sign reads 3.5 km. A road follows.", ["The sign reads 3.5 km.", "A road follows."]),
    ("no final punctuation", "A boat floats. The sky is blue", ["A boat floats.", "The sky is blue"]),
    ("question and exclamation", "Is it a cat? Yes! It is.", ["Is it a cat?", "Yes!", "It is."]),
    ("closing quote", 'A sign says "Open." A man waits.', ['A sign says "Open."', "A man waits."]),
    ("initial", "A poster of J. Smith hangs. It is old.", ["A poster of J. Smith hangs.", "It is old."]),
    ("line breaks", "A dog\nA cat.", ["A dog", "A cat."]),
    ("etc", "Cups, plates, etc. are on the table. A chair.", ["Cups, plates, etc. are on the table.", "A chair."]),
    ("ellipsis", "The road goes on... A car waits.", ["The road goes on...", "A car waits."]),
    ("empty", "   ", []),
]


@pytest.mark.parametrize("text, expected", [case[1:] for case in SENTENCE_CASES], ids=[case[0] for case in SENTENCE_CASES])
def test_split_sentences_cases(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


JSON_CASES = [
    ("plain array", '["a", "b"]', ["a", "b"]),
    ("plain object", '{"unique": ["a"], "n": 2}', {"unique": ["a"], "n": 2}),
    ("json fence", 'Here you go:\n```json\n{"x": [1, 2]}\n```\nHope this helps!', {"x": [1, 2]}),
    ("bare fence", '```\n["one"]\n```', ["one"]),
    ("trailing prose", '["a dog", "a cat"] These are the statements.', ["a dog", "a cat"]),
    ("leading prose", 'The answer is {"kind": "unique"} as requested.', {"kind": "unique"}),
    ("trailing comma in array", '["a", "b",]', ["a", "b"]),
    ("trailing comma in object", '{"a": 1,}', {"a": 1}),
    ("curly quotes", "[\u201ca dog\u201d, \u201ca cat\u201d]", ["a dog", "a cat"]),
    ("single quotes", "['a dog', 'the dog\\'s ball']", ["a dog", "the dog's ball"]),
    ("truncated array", '["a dog runs", "a cat sle', ["a dog runs"]),
    ("truncated nested", '{"groups": [["a", "b"], ["c"', {"groups": [["a", "b"], ["c"]]}),
    ("truncated in string", '{"groups": [["a", "b"], ["c', {"groups": [["a", "b"]]}),
    ("apostrophe in string", '["the dog\'s ball"]', ["the dog's ball"]),
    ("invalid then valid", '[not json] then ["ok"]', ["ok"]),
]


@pytest.mark.parametrize("text, expected", [case[1:] for case in JSON_CASES], ids=[case[0] for case in JSON_CASES])
def test_extract_json_cases(text: str, expected) -> None:
    assert extract_json(text) == expected


@pytest.mark.parametrize("text", ["", "no json here", "{broken: ", "[", "{}}"[:1], "just [ text"])
def test_extract_json_nothing_parses(text: str) -> None:
    assert extract_json(text) is None


UNPRINTABLE_CASES = [
    ("nul and etb", "A dog\x00 runs\x17 on the beach.", "A dog runs on the beach."),
    ("escape and delete", "A red\x1b car\x7f is parked.", "A red car is parked."),
    ("c1 control", "Two cats\x9b sleep.", "Two cats sleep."),
    ("replacement character", "A caf\ufffd with tables\ufffd.", "A caf with tables."),
    ("lone surrogate", "A kite\ud83d flies.", "A kite flies."),
    ("before an opening phrase", "\x00\x02Sure! Here's a caption: A bus stops.", "A bus stops."),
    ("newline and tab kept as spaces", "A dog\n\truns.", "A dog runs."),
    ("emoji and accents kept", "A caf\u00e9 sign with \U0001f600.", "A caf\u00e9 sign with \U0001f600."),
]


@pytest.mark.parametrize(
    "raw, expected", [case[1:] for case in UNPRINTABLE_CASES], ids=[case[0] for case in UNPRINTABLE_CASES]
)
def test_clean_removes_unprintable(raw: str, expected: str) -> None:
    assert clean_generated_text(raw) == expected


def test_clean_removes_unprintable_from_prefill() -> None:
    assert clean_generated_text(" sits\x00 on a mat.", prefill="A cat\x17") == "A cat sits on a mat."

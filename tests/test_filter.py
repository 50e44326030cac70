"""Filter stage: sorting validation, retries and fallbacks, keep rules and sample indexing.

The unit tests drive the stage with a scripted text model and a table-driven scorer. The last
test runs it with the real SmolLM2 GGUF and a tiny BLIP image-text matching model.
"""

from __future__ import annotations

import json
from typing import Callable, Optional, Sequence, Union

import pytest
from PIL import Image

from patch_matters_core.config import FilterConfig, GenerationSettings
from patch_matters_core.models.base import ChatRequest, Generation
from patch_matters_core.models.text import clean_generated_text
from patch_matters_core.stages.filter import (
    SORT_PREFILL,
    SourceText,
    StatementSet,
    filter_descriptions,
    parse_sorting,
    sort_by_sentences,
)
from patch_matters_core.types import (
    BOTTOM_LEFT,
    BOTTOM_RIGHT,
    GLOBAL,
    SEMANTIC,
    TOP_LEFT,
    TOP_RIGHT,
    Box,
    Descriptions,
    ModelInfo,
    Patch,
    PatchSet,
)

Reply = Union[str, Callable[[ChatRequest], str]]


class ScriptedLLM:
    """Text model that answers each chat call from a script: one list of replies per call.

    A reply is the continuation after the request's prefill, or a function of the request.
    Like the transformers backend, ``raw`` and ``text`` start with the prefill.
    """

    def __init__(self, script: Sequence[Sequence[Reply]]) -> None:
        self.info = ModelInfo(role="llm", source="scripted")
        self.script = [list(call) for call in script]
        self.calls: list[list[ChatRequest]] = []
        self.seeds: list[Optional[int]] = []

    def chat(self, requests, settings, seed=None, progress=None):
        self.calls.append(list(requests))
        self.seeds.append(seed)
        if not self.script:
            raise AssertionError(f"unexpected chat call number {len(self.calls)}")
        replies = self.script.pop(0)
        assert len(replies) == len(requests), f"script has {len(replies)} replies for {len(requests)} requests"
        generations = []
        for request, reply in zip(requests, replies):
            continuation = reply(request) if callable(reply) else reply
            raw = request.prefill + continuation
            generations.append(Generation(text=clean_generated_text(raw, request.prefill), raw=raw))
        return generations


class TableScorer:
    """Scorer that returns a fixed score per text (``default`` for others) and records each call."""

    def __init__(self, scores: dict[str, float], default: float = 0.0, threshold: float = 0.3) -> None:
        self.info = ModelInfo(role="scorer", source="table")
        self.default_threshold = threshold
        self.scores = scores
        self.default = default
        self.calls: list[tuple[tuple[int, int], list[str]]] = []

    def score(self, image, texts):
        self.calls.append((image.size, list(texts)))
        return [self.scores.get(text, self.default) for text in texts]


def sorting_json(consistent=(), contradictory=(), unique=()) -> str:
    """Continuation of the sorting prefill that completes a JSON reply."""
    full = json.dumps(
        {
            "consistent": [{"statement": t, "descriptions": list(d)} for t, d in consistent],
            "contradictory": [[{"statement": t, "description": d} for t, d in group] for group in contradictory],
            "unique": [{"statement": t, "description": d} for t, d in unique],
        }
    )
    assert full.startswith(SORT_PREFILL)
    return full[len(SORT_PREFILL):]


IMAGE = Image.new("RGB", (200, 100), (120, 90, 60))
BOXES = {
    TOP_LEFT: Box(0, 0, 100, 50),
    TOP_RIGHT: Box(100, 0, 200, 50),
    BOTTOM_LEFT: Box(0, 50, 100, 100),
    BOTTOM_RIGHT: Box(100, 50, 200, 100),
    SEMANTIC: Box(40, 20, 160, 90),
}

RED_CAR = [
    "A red car is parked on the street. A man walks a dog.",
    "A red car is parked on the street. The car has a dented door.",
    "A blue car is parked on the street. A man walks a dog.",
]


def make_descriptions(samples: dict[str, list[str]], global_text: str = "A street with a car.") -> Descriptions:
    patches = [Patch(GLOBAL, Box(0, 0, 200, 100))]
    patches += [Patch(name, BOXES[name]) for name in samples]
    patch_set = PatchSet(width=200, height=100, patches=patches)
    return Descriptions(patches=patch_set, samples={GLOBAL: [global_text], **samples})


def statement_set(texts: list[str], name: str = TOP_LEFT) -> StatementSet:
    sources = [SourceText(text=t, patch=name, sample_index=i, box=BOXES[name]) for i, t in enumerate(texts)]
    return StatementSet(name=name, sources=sources, box=BOXES[name])


def good_red_car_sorting() -> str:
    return sorting_json(
        consistent=[("a car is parked on the street", [1, 2, 3]), ("a man walks a dog", [1, 3])],
        contradictory=[[("a red car", 1), ("a blue car", 3)]],
        unique=[("the car has a dented door", 2)],
    )


def by_text(filtered_set):
    return {s.text: s for s in filtered_set.statements}


# ---------------------------------------------------------------------------------------------
# Keep rules


def test_valid_sorting_applies_keep_rules():
    llm = ScriptedLLM([[good_red_car_sorting()]])
    scorer = TableScorer({"a red car": 0.6, "a blue car": 0.4, "the car has a dented door": 0.2})
    result = filter_descriptions(IMAGE, make_descriptions({TOP_LEFT: RED_CAR}), scorer, llm, FilterConfig())

    filtered_set = result.sets[TOP_LEFT]
    statements = by_text(filtered_set)
    assert filtered_set.sorting_path == "llm"
    assert statements["a car is parked on the street"].kind == "consistent"
    assert statements["a car is parked on the street"].kept
    assert statements["a car is parked on the street"].score is None
    assert statements["a red car"].kept
    assert not statements["a blue car"].kept
    assert statements["a red car"].group == statements["a blue car"].group == 0
    assert not statements["the car has a dented door"].kept
    assert statements["the car has a dented door"].score == pytest.approx(0.2)
    assert set(filtered_set.reliable) == {"a car is parked on the street", "a man walks a dog", "a red car"}
    assert result.fallbacks == []


@pytest.mark.parametrize(
    ("score", "threshold", "kept"),
    [(0.3, None, False), (0.3001, None, True), (0.5, 0.5, False), (0.51, 0.5, True), (0.01, 0.0, True), (0.0, 0.0, False)],
)
def test_unique_threshold_edges(score, threshold, kept):
    llm = ScriptedLLM([[good_red_car_sorting()]])
    scorer = TableScorer({"the car has a dented door": score, "a red car": 0.9})
    config = FilterConfig(threshold=threshold)
    result = filter_descriptions(IMAGE, make_descriptions({TOP_LEFT: RED_CAR}), scorer, llm, config)
    assert by_text(result.sets[TOP_LEFT])["the car has a dented door"].kept is kept


def test_contradictory_best_below_threshold_keeps_none():
    llm = ScriptedLLM([[good_red_car_sorting()]])
    scorer = TableScorer({"a red car": 0.3, "a blue car": 0.1})
    result = filter_descriptions(IMAGE, make_descriptions({TOP_LEFT: RED_CAR}), scorer, llm, FilterConfig())
    statements = by_text(result.sets[TOP_LEFT])
    assert not statements["a red car"].kept
    assert not statements["a blue car"].kept
    assert statements["a red car"].score == pytest.approx(0.3)


def test_scorer_called_once_per_crop_on_patch_box():
    llm = ScriptedLLM([[good_red_car_sorting()]])
    scorer = TableScorer({})
    filter_descriptions(IMAGE, make_descriptions({BOTTOM_RIGHT: RED_CAR}), scorer, llm, FilterConfig())
    assert len(scorer.calls) == 1
    size, texts = scorer.calls[0]
    assert size == (100, 50)
    assert sorted(texts) == ["a blue car", "a red car", "the car has a dented door"]


def test_no_scorer_keeps_unverified_and_majority_version():
    reply = sorting_json(
        consistent=[("a car is parked on the street", [1, 2, 3]), ("a man walks a dog", [1, 3])],
        contradictory=[[("a blue car", 3), ("a red car", [1, 2])]],
        unique=[("the car has a dented door", 2)],
    )
    llm = ScriptedLLM([[reply]])
    result = filter_descriptions(IMAGE, make_descriptions({TOP_LEFT: RED_CAR}), None, llm, FilterConfig())
    statements = by_text(result.sets[TOP_LEFT])
    assert statements["the car has a dented door"].kept
    assert statements["the car has a dented door"].score is None
    assert statements["a red car"].kept
    assert not statements["a blue car"].kept
    assert len(result.fallbacks) == 1
    assert "no scorer" in result.fallbacks[0].reason
    assert result.fallbacks[0].patch == TOP_LEFT


# ---------------------------------------------------------------------------------------------
# Retries and fallbacks


def test_invalid_then_valid_retries_only_failed_set():
    llm = ScriptedLLM([["I think they are similar.", good_red_car_sorting()], [good_red_car_sorting()]])
    descriptions = make_descriptions({TOP_LEFT: RED_CAR, TOP_RIGHT: RED_CAR})
    result = filter_descriptions(IMAGE, descriptions, TableScorer({}), llm, FilterConfig(), seed=7)

    assert [len(call) for call in llm.calls] == [2, 1]
    assert llm.seeds == [7, 8]
    assert "could not be used" in llm.calls[1][0].user
    assert result.sets[TOP_LEFT].sorting_path == "llm_retry"
    assert result.sets[TOP_RIGHT].sorting_path == "llm"
    assert [f.patch for f in result.fallbacks] == [TOP_LEFT]
    assert "asking once more" in result.fallbacks[0].reason


def test_invalid_twice_groups_sentences():
    llm = ScriptedLLM([['"statement": nothing'], ["[1, 2, 3]"]])
    result = filter_descriptions(IMAGE, make_descriptions({TOP_LEFT: RED_CAR}), None, llm, FilterConfig())

    filtered_set = result.sets[TOP_LEFT]
    statements = by_text(filtered_set)
    assert filtered_set.sorting_path == "sentence_fallback"
    assert statements["A red car is parked on the street."].kind == "contradictory"
    assert statements["A red car is parked on the street."].kept
    assert not statements["A blue car is parked on the street."].kept
    assert statements["A man walks a dog."].kind == "consistent"
    assert statements["The car has a dented door."].kind == "unique"
    reasons = [f.reason for f in result.fallbacks if f.patch == TOP_LEFT]
    assert any("asking once more" in r for r in reasons)
    assert any("grouped by word overlap" in r for r in reasons)


def test_hallucinated_statement_dropped_and_recorded():
    reply = sorting_json(
        consistent=[("a car is parked on the street", [1, 2, 3]), ("a man walks a dog", [1, 3])],
        unique=[("a giraffe eats ice cream", 2), ("the car has a dented door", 2)],
    )
    llm = ScriptedLLM([[reply]])
    result = filter_descriptions(IMAGE, make_descriptions({TOP_LEFT: RED_CAR}), TableScorer({}), llm, FilterConfig())
    texts = [s.text for s in result.sets[TOP_LEFT].statements]
    assert "a giraffe eats ice cream" not in texts
    assert any("giraffe" in f.reason and "not found" in f.reason for f in result.fallbacks)
    assert result.sets[TOP_LEFT].sorting_path == "llm"


def test_out_of_range_index_demotes_consistent():
    reply = sorting_json(
        consistent=[("a car is parked on the street", [1, 9]), ("a man walks a dog", [1, 3])],
        unique=[("the car has a dented door", 0)],
    )
    result = parse_sorting(Generation(text=SORT_PREFILL + reply, raw=SORT_PREFILL + reply), statement_set(RED_CAR), 0.5)
    statements, problems = result
    found = {s.text: s for s in statements}
    assert found["a car is parked on the street"].kind == "unique"
    assert found["a car is parked on the street"].sources == [0]
    assert any("out of range 1..3" in p for p in problems)
    assert found["the car has a dented door"].sources == [1]


def test_single_citation_becomes_unique():
    reply = sorting_json(consistent=[("the car has a dented door", [2])], unique=[("a man walks a dog", [1, 3])])
    statements, _ = parse_sorting(Generation(text="", raw=SORT_PREFILL + reply), statement_set(RED_CAR), 0.5)
    found = {s.text: s for s in statements}
    assert found["the car has a dented door"].kind == "unique"
    assert found["a man walks a dog"].kind == "consistent"


def test_added_attribute_is_not_contradiction():
    reply = sorting_json(
        contradictory=[[("a car is parked", 1), ("a car is parked on the street", 2)]],
        consistent=[("a man walks a dog", [1, 3])],
    )
    statements, problems = parse_sorting(Generation(text="", raw=SORT_PREFILL + reply), statement_set(RED_CAR), 0.5)
    assert all(s.kind != "contradictory" for s in statements)
    assert any("only adds" in p for p in problems)


def test_contradiction_within_one_description_is_split():
    reply = sorting_json(contradictory=[[("a red car", 1), ("a man walks a dog", 1)]])
    statements, problems = parse_sorting(Generation(text="", raw=SORT_PREFILL + reply), statement_set(RED_CAR), 0.5)
    assert all(s.kind != "contradictory" for s in statements)
    assert any("single description" in p for p in problems)


def test_left_out_sentences_added_as_unique():
    reply = sorting_json(consistent=[("a car is parked on the street", [1, 2, 3])])
    statements, problems = parse_sorting(Generation(text="", raw=SORT_PREFILL + reply), statement_set(RED_CAR), 0.5)
    found = {s.text: s for s in statements}
    assert found["The car has a dented door."].kind == "unique"
    assert found["The car has a dented door."].sources == [1]
    assert "A man walks a dog." in found
    assert any("left out" in p for p in problems)


@pytest.mark.parametrize(
    "reply",
    ["", "no json here", "]", '"x"]}', '{"statement": "a purple elephant", "descriptions": [7]}]}'],
)
def test_unusable_replies_raise_invalid(reply):
    from patch_matters_core.stages.filter import _InvalidSorting

    with pytest.raises(_InvalidSorting):
        parse_sorting(Generation(text="", raw=SORT_PREFILL + reply), statement_set(RED_CAR), 0.5)


def test_truncated_reply_names_token_limit():
    from patch_matters_core.stages.filter import _InvalidSorting

    generation = Generation(text="", raw='{"consis', hit_token_limit=True)
    with pytest.raises(_InvalidSorting, match="max_new_tokens=12"):
        parse_sorting(generation, statement_set(RED_CAR), 0.5, GenerationSettings(max_new_tokens=12))


def test_sort_by_sentences_groups_across_samples():
    statements = sort_by_sentences(statement_set(RED_CAR), 0.5)
    found = {s.text: s for s in statements}
    assert found["A man walks a dog."].kind == "consistent"
    assert found["A man walks a dog."].sources == [0, 2]
    assert found["The car has a dented door."].kind == "unique"


def test_sort_by_sentences_finds_conflicting_values():
    statements = sort_by_sentences(statement_set(RED_CAR), 0.5)
    found = {s.text: s for s in statements}
    assert found["A red car is parked on the street."].kind == "contradictory"
    assert found["A red car is parked on the street."].sources == [0, 1]
    assert found["A blue car is parked on the street."].kind == "contradictory"
    assert found["A blue car is parked on the street."].group == found["A red car is parked on the street."].group


def test_sort_by_sentences_added_detail_is_consistent():
    texts = ["A man walks a dog.", "A man is walking a brown dog."]
    statements = sort_by_sentences(statement_set(texts), 0.5)
    assert len(statements) == 1
    assert statements[0].kind == "consistent"
    assert statements[0].text == "A man walks a dog."


def test_sort_by_sentences_never_groups_same_sample():
    texts = ["A dog runs. A dog runs fast.", "A cat sleeps."]
    statements = sort_by_sentences(statement_set(texts), 0.3)
    assert all(s.kind == "unique" for s in statements)
    assert len(statements) == 3


# ---------------------------------------------------------------------------------------------
# Sets, indexing and batching


def test_one_sample_needs_no_llm():
    llm = ScriptedLLM([])
    result = filter_descriptions(
        IMAGE, make_descriptions({TOP_LEFT: [RED_CAR[1]]}), TableScorer({}, default=0.9), llm, FilterConfig()
    )
    filtered_set = result.sets[TOP_LEFT]
    assert llm.calls == []
    assert filtered_set.sorting_path == "single_sample"
    assert [s.kind for s in filtered_set.statements] == ["unique", "unique"]
    assert all(s.kept for s in filtered_set.statements)


def test_empty_samples_skipped_and_indexes_kept():
    samples = [RED_CAR[0], "", RED_CAR[1]]

    def reply(request: ChatRequest) -> str:
        assert "Description 3" not in request.user
        return sorting_json(consistent=[("a red car is parked on the street", [1, 2])], unique=[("the car has a dented door", 2)])

    llm = ScriptedLLM([[reply]])
    result = filter_descriptions(IMAGE, make_descriptions({TOP_LEFT: samples}), None, llm, FilterConfig())
    statements = by_text(result.sets[TOP_LEFT])
    assert statements["the car has a dented door"].sample_index == 2
    assert statements["a red car is parked on the street"].sample_index is None
    assert statements["a red car is parked on the street"].sample_indexes == [0, 2]
    assert statements["a red car is parked on the street"].source_patch == TOP_LEFT


def test_patch_without_samples_gets_empty_set():
    llm = ScriptedLLM([])
    result = filter_descriptions(IMAGE, make_descriptions({TOP_LEFT: ["", " "]}), None, llm, FilterConfig())
    assert result.sets[TOP_LEFT].statements == []
    assert result.sets[TOP_LEFT].sorting_path == "sentence_fallback"
    assert [f.patch for f in result.fallbacks] == [TOP_LEFT]


def test_each_patch_sorts_only_its_own_samples():
    samples = {
        name: [f"The {name} holds a lamp number {i}." for i in range(3)]
        for name in (TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT, BOTTOM_RIGHT, SEMANTIC)
    }

    def reply(request: ChatRequest) -> str:
        names = [name for name in samples if f"The {name} holds" in request.user]
        assert len(names) == 1, request.user
        name = names[0]
        for i in range(3):
            assert f"Description {i + 1}: The {name} holds a lamp number {i}." in request.user
        return sorting_json(unique=[(f"the {name} holds a lamp number {i}", i + 1) for i in range(3)])

    llm = ScriptedLLM([[reply] * 5])
    scorer = TableScorer({}, default=0.8)
    result = filter_descriptions(IMAGE, make_descriptions(samples), scorer, llm, FilterConfig())

    assert len(llm.calls) == 1
    assert set(result.sets) == set(samples)
    for name, filtered_set in result.sets.items():
        for statement in filtered_set.statements:
            assert statement.patch == name
            assert statement.source_patch == name
            assert statement.text == f"the {name} holds a lamp number {statement.sample_index}"


def test_global_and_undescribed_patches_not_filtered():
    descriptions = make_descriptions({TOP_LEFT: RED_CAR, SEMANTIC: RED_CAR})
    descriptions.patches.patches[-1].described = False
    llm = ScriptedLLM([[good_red_car_sorting()]])
    result = filter_descriptions(IMAGE, descriptions, None, llm, FilterConfig())
    assert set(result.sets) == {TOP_LEFT}


def test_progress_after_each_model_call():
    labels: list[str] = []
    llm = ScriptedLLM([["nothing"], [good_red_car_sorting()]])
    filter_descriptions(
        IMAGE, make_descriptions({TOP_LEFT: RED_CAR}), TableScorer({}), llm, FilterConfig(), progress=labels.append
    )
    assert labels == ["sort", "sort retry", "score"]


# ---------------------------------------------------------------------------------------------
# Real models


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from patch_matters_core.models.llm import load_llm

    return load_llm(str(smollm2_gguf))


def realistic_samples(coco_images: list[dict], count: int) -> dict[str, list[str]]:
    """Build three overlapping samples per patch from sentences of real LLaVA-1.6 captions."""
    from patch_matters_core.models.text import split_sentences

    samples = {}
    for offset, name in enumerate((TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT, BOTTOM_RIGHT)[:count]):
        sentences = split_sentences(coco_images[offset]["global_caption_llava16"])[:4]
        samples[name] = [
            " ".join(sentences[0:2]),
            " ".join(sentences[0:1] + sentences[2:3]),
            " ".join(sentences[1:2] + sentences[3:4]),
        ]
    return samples


@pytest.mark.slow
def test_filter_with_smollm2_and_blip(smollm2, tiny_models, coco_images):
    from patch_matters_core.images import load_image
    from patch_matters_core.models.scorer import load_scorer

    scorer = load_scorer(str(tiny_models / "itm-blip"))
    image = load_image(coco_images[0]["path"]).resize((200, 100))
    descriptions = make_descriptions(realistic_samples(coco_images, 2), coco_images[0]["global_caption_llava16"])
    config = FilterConfig(sorting_generation=GenerationSettings(max_new_tokens=64, temperature=0.2))

    labels: list[str] = []
    result = filter_descriptions(image, descriptions, scorer, smollm2, config, seed=0, progress=labels.append)

    assert set(result.sets) == {TOP_LEFT, TOP_RIGHT}
    assert labels[0] == "sort"
    for name, filtered_set in result.sets.items():
        assert filtered_set.sorting_path in ("llm", "llm_retry", "sentence_fallback", "single_sample")
        assert filtered_set.statements, name
        for statement in filtered_set.statements:
            assert statement.patch == name
            assert statement.text.strip()
            if statement.kind == "consistent":
                assert statement.kept
            else:
                assert statement.score is not None
                assert 0.0 <= statement.score <= 1.0


def test_repeated_reply_is_read_and_noted():
    reply = sorting_json(consistent=[("a man walks a dog", [1, 3])], unique=[("the car has a dented door", 2)])
    generation = Generation(text="", raw=SORT_PREFILL + reply, repeated=True)

    statements, problems = parse_sorting(generation, statement_set(RED_CAR), 0.5)

    assert "a man walks a dog" in {s.text for s in statements}
    assert any("repeating one passage" in p for p in problems)

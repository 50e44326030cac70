"""Aggregate stage: level-1, semantic, level-2 and level-3 texts, their fallbacks and coverage.

The unit tests use a text model that answers by prompt kind and a table-driven scorer. The last
test runs the filter and aggregate stages with the real SmolLM2 GGUF and a tiny BLIP ITM model.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Callable, Optional

import pytest
from PIL import Image

from patch_matters_core.config import AggregateConfig, FilterConfig, GenerationSettings
from patch_matters_core.errors import PatchMattersError
from patch_matters_core.models.base import ChatRequest, Generation
from patch_matters_core.models.text import clean_generated_text
from patch_matters_core.stages.aggregate import (
    ENRICHED_GLOBAL,
    FINAL,
    aggregate,
    append_uncovered,
    describe_location,
    final_regions,
    validate_prose,
)
from patch_matters_core.stages.filter import SORT_PREFILL, filter_descriptions
from patch_matters_core.types import (
    ADJACENT_PAIRS,
    BOTTOM_LEFT,
    BOTTOM_RIGHT,
    GLOBAL,
    SEMANTIC,
    SPATIAL_PATCH_NAMES,
    TOP_LEFT,
    TOP_RIGHT,
    Box,
    Descriptions,
    FilteredDescriptions,
    FilteredSet,
    LevelText,
    ModelInfo,
    Patch,
    PatchSet,
    Statement,
    pair_name,
)

IMAGE = Image.new("RGB", (100, 100), (90, 140, 60))
WHOLE = Box(0, 0, 100, 100)
OBJECTS = {
    TOP_LEFT: "red kite",
    TOP_RIGHT: "tall tree",
    BOTTOM_LEFT: "brown dog",
    BOTTOM_RIGHT: "blue bench",
    SEMANTIC: "smiling child",
}
GLOBAL_TEXT = "A park on a sunny day with people."

LAYOUTS = {
    "quadrants": {
        TOP_LEFT: Box(0, 0, 50, 50),
        TOP_RIGHT: Box(50, 0, 100, 50),
        BOTTOM_LEFT: Box(0, 50, 50, 100),
        BOTTOM_RIGHT: Box(50, 50, 100, 100),
    },
    "one pair": {
        TOP_LEFT: Box(0, 0, 60, 50),
        TOP_RIGHT: Box(40, 0, 100, 50),
        BOTTOM_LEFT: Box(0, 50, 50, 100),
        BOTTOM_RIGHT: Box(50, 50, 100, 100),
    },
    "shared pairs": {
        TOP_LEFT: Box(0, 0, 50, 50),
        TOP_RIGHT: Box(25, 0, 100, 75),
        BOTTOM_LEFT: Box(0, 50, 50, 100),
        BOTTOM_RIGHT: Box(50, 50, 100, 100),
    },
    "all pairs": {name: WHOLE for name in SPATIAL_PATCH_NAMES},
}
EXPECTED_PAIRS = {
    "quadrants": [],
    "one pair": [(TOP_LEFT, TOP_RIGHT)],
    "shared pairs": [(TOP_LEFT, TOP_RIGHT), (TOP_RIGHT, BOTTOM_RIGHT)],
    "all pairs": list(ADJACENT_PAIRS),
}
CONFIG = AggregateConfig(pair_iou=0.1)


def samples_of(name: str) -> list[str]:
    thing = OBJECTS[name]
    return [f"A {thing} is here. The light is soft.", f"A {thing} stands out.", f"There is a {thing} in view."]


def prompt_kind(request: ChatRequest) -> str:
    if "Put every statement in one of three lists" in request.user:
        return "sort"
    if "Write one description of this part of the photo" in request.user:
        return "level1"
    if "main region" in request.user:
        return "semantic"
    if "Two neighbouring parts" in request.user:
        return "pair"
    if "Write the final description" in request.user:
        return "final"
    raise AssertionError(f"unknown prompt: {request.user[:80]!r}")


def objects_in(text: str) -> list[str]:
    return [thing for thing in OBJECTS.values() if thing in text]


def sort_each_description_unique(request: ChatRequest) -> str:
    """Sorting reply that lists every description, minus its opening, as one unique statement."""
    entries = []
    for number, text in re.findall(r"Description (\d+): (.+)", request.user):
        statement = text.replace("This part of the photo shows ", "").rstrip(".")
        entries.append({"statement": statement, "description": int(number)})
    full = json.dumps({"consistent": [], "contradictory": [], "unique": entries})
    return full[len(SORT_PREFILL):]


def default_reply(request: ChatRequest) -> str:
    kind = prompt_kind(request)
    if kind == "sort":
        return sort_each_description_unique(request)
    things = objects_in(request.user)
    if kind == "level1":
        return f" a {things[0]} in soft light, seen clearly."
    if kind == "semantic":
        return " a park on a sunny day with people and a smiling child in the middle."
    if kind == "pair":
        return " " + " and ".join(f"a {t}" for t in things) + " side by side in soft light."
    return " a park on a sunny day with people, with " + ", ".join(f"a {t}" for t in things) + " in soft light."


class RoutingLLM:
    """Text model that answers each request by its prompt kind; ``overrides`` replace kinds."""

    def __init__(self, overrides: Optional[dict[str, Callable[[ChatRequest], str]]] = None) -> None:
        self.info = ModelInfo(role="llm", source="routing")
        self.overrides = overrides or {}
        self.calls: list[tuple[str, list[ChatRequest]]] = []

    def chat(self, requests, settings, seed=None, progress=None):
        kinds = {prompt_kind(r) for r in requests}
        assert len(kinds) == 1, f"one call mixes prompt kinds {kinds}"
        kind = kinds.pop()
        self.calls.append((kind, list(requests)))
        generations = []
        for request in requests:
            raw = request.prefill + self.overrides.get(kind, default_reply)(request)
            generations.append(Generation(text=clean_generated_text(raw, request.prefill), raw=raw))
        return generations

    def requests(self, kind: str) -> list[ChatRequest]:
        return [r for k, call in self.calls if k == kind for r in call]


class TableScorer:
    def __init__(self, scores: Optional[dict[str, float]] = None, default: float = 0.9) -> None:
        self.info = ModelInfo(role="scorer", source="table")
        self.default_threshold = 0.3
        self.scores = scores or {}
        self.default = default
        self.calls: list[tuple[tuple[int, int], list[str]]] = []

    def score(self, image, texts):
        self.calls.append((image.size, list(texts)))
        return [self.scores.get(t, self.default) for t in texts]


def make_filtered(
    boxes: dict[str, Box],
    semantic: Optional[Box] = None,
    samples: Optional[dict[str, list[str]]] = None,
    global_text: str = GLOBAL_TEXT,
) -> FilteredDescriptions:
    """Descriptions and filtered sets in which every first-sample sentence is a kept statement."""
    patches = [Patch(GLOBAL, WHOLE)]
    if semantic is not None:
        patches.append(Patch(SEMANTIC, semantic))
    patches += [Patch(name, box) for name, box in boxes.items()]
    all_samples = {GLOBAL: [global_text]}
    sets = {}
    for patch in patches[1:]:
        texts = (samples or {}).get(patch.name, samples_of(patch.name))
        all_samples[patch.name] = texts
        kept = [f"a {OBJECTS[patch.name]} is here"] if any(t.strip() for t in texts) else []
        statements = [Statement(patch=patch.name, text=t, kind="consistent", kept=True) for t in kept]
        sets[patch.name] = FilteredSet(name=patch.name, statements=statements, sorting_path="llm")
    descriptions = Descriptions(patches=PatchSet(100, 100, patches), samples=all_samples)
    return FilteredDescriptions(descriptions=descriptions, sets=sets)


def run(filtered, llm=None, scorer=None, config=CONFIG, progress=None):
    llm = llm or RoutingLLM()
    result = aggregate(IMAGE, filtered, llm, scorer, config, FilterConfig(), seed=3, progress=progress)
    return result, llm


def level(result, name: str) -> LevelText:
    return next(lv for lv in result.levels if lv.name == name)


# ---------------------------------------------------------------------------------------------
# Levels


def test_levels_in_order_with_covers():
    filtered = make_filtered(LAYOUTS["quadrants"], semantic=Box(20, 20, 80, 80))
    result, _ = run(filtered)

    names = [(lv.level, lv.name) for lv in result.levels]
    assert names == [
        (1, SEMANTIC),
        (1, TOP_LEFT),
        (1, TOP_RIGHT),
        (1, BOTTOM_LEFT),
        (1, BOTTOM_RIGHT),
        (1, ENRICHED_GLOBAL),
        (3, FINAL),
    ]
    assert level(result, TOP_LEFT).covers == [TOP_LEFT]
    assert level(result, TOP_LEFT).box == LAYOUTS["quadrants"][TOP_LEFT]
    assert level(result, ENRICHED_GLOBAL).covers == [GLOBAL, SEMANTIC]
    assert level(result, FINAL).covers == [GLOBAL, SEMANTIC, *SPATIAL_PATCH_NAMES]
    assert result.caption == level(result, FINAL).text
    assert "\n" not in result.caption
    assert result.fallbacks == []


def test_level1_one_call_for_all_patches():
    filtered = make_filtered(LAYOUTS["quadrants"], semantic=Box(20, 20, 80, 80))
    result, llm = run(filtered)
    assert [kind for kind, _ in llm.calls] == ["level1", "semantic", "final"]
    assert len(llm.requests("level1")) == 5
    assert level(result, BOTTOM_LEFT).text == "This part of the photo shows a brown dog in soft light, seen clearly."


def test_level1_prompt_has_only_own_samples():
    filtered = make_filtered(LAYOUTS["quadrants"])
    _, llm = run(filtered)
    for request in llm.requests("level1"):
        assert len(objects_in(request.user)) == 1
        thing = objects_in(request.user)[0]
        name = next(n for n, t in OBJECTS.items() if t == thing)
        for sample in samples_of(name):
            assert sample in request.user
        assert f"- a {thing} is here" in request.user


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (" 1. a red kite.\n2. a tall tree.\n3. a dog.", "list"),
        ("", "empty"),
        (' {"text": "a kite"}', "JSON"),
        (" it.", "words"),
        (" Description 1: a red kite is here and there.", "prompt"),
    ],
)
def test_level1_unusable_uses_reliable(reply, problem):
    llm = RoutingLLM({"level1": lambda request: reply})
    result, _ = run(make_filtered(LAYOUTS["quadrants"]), llm)
    assert level(result, TOP_LEFT).text == "A red kite is here."
    fallbacks = [f for f in result.fallbacks if f.patch == TOP_LEFT]
    assert len(fallbacks) == 1
    assert problem in fallbacks[0].reason
    assert fallbacks[0].stage == "aggregate"


def test_level1_copied_samples_rejected():
    def copy_samples(request: ChatRequest) -> str:
        return " " + " ".join(re.findall(r"Description \d+: (.+)", request.user))

    llm = RoutingLLM({"level1": copy_samples})
    result, _ = run(make_filtered(LAYOUTS["quadrants"]), llm)
    assert level(result, TOP_RIGHT).text == "A tall tree is here."
    assert any("copies" in f.reason for f in result.fallbacks if f.patch == TOP_RIGHT)


def test_level1_without_reliable_uses_longest_sample():
    filtered = make_filtered(LAYOUTS["quadrants"])
    filtered.sets[TOP_LEFT].statements.clear()
    llm = RoutingLLM({"level1": lambda request: ""})
    result, _ = run(filtered, llm)
    assert level(result, TOP_LEFT).text == "A red kite is here. The light is soft."
    assert any("longest sample" in f.reason for f in result.fallbacks if f.patch == TOP_LEFT)


def test_patch_without_samples_has_empty_level():
    filtered = make_filtered(LAYOUTS["quadrants"], samples={BOTTOM_RIGHT: ["", ""]})
    result, llm = run(filtered)
    assert level(result, BOTTOM_RIGHT).text == ""
    assert any(f.patch == BOTTOM_RIGHT and "no usable sample" in f.reason for f in result.fallbacks)
    assert len(llm.requests("level1")) == 3
    assert "blue bench" not in llm.requests("final")[0].user
    assert BOTTOM_RIGHT in level(result, FINAL).covers


# ---------------------------------------------------------------------------------------------
# Semantic patch


def test_semantic_enrichment_replaces_global():
    result, llm = run(make_filtered(LAYOUTS["quadrants"], semantic=Box(20, 20, 80, 80)))
    enriched = level(result, ENRICHED_GLOBAL).text
    assert "smiling child" in enriched
    semantic_request = llm.requests("semantic")[0]
    assert GLOBAL_TEXT in semantic_request.user
    assert "centre [0.20, 0.20, 0.80, 0.80]" in semantic_request.user
    final_request = llm.requests("final")[0]
    assert enriched in final_request.user
    assert GLOBAL_TEXT not in final_request.user


def test_semantic_fallback_appends_missing_statements():
    filtered = make_filtered(LAYOUTS["quadrants"], semantic=Box(20, 20, 80, 80))
    filtered.sets[SEMANTIC].statements.append(
        Statement(patch=SEMANTIC, text="a park on a sunny day", kind="consistent", kept=True)
    )
    llm = RoutingLLM({"semantic": lambda request: ""})
    result, _ = run(filtered, llm)
    assert level(result, ENRICHED_GLOBAL).text == GLOBAL_TEXT + " A smiling child is here."
    assert any(f.patch == SEMANTIC and "enriched global" in f.reason for f in result.fallbacks)


def test_semantic_shorter_than_global_rejected():
    long_global = "A park on a sunny day with many people walking, sitting on benches and playing with dogs near trees."
    filtered = make_filtered(LAYOUTS["quadrants"], semantic=Box(20, 20, 80, 80), global_text=long_global)
    llm = RoutingLLM({"semantic": lambda request: " a smiling child in a park."})
    result, _ = run(filtered, llm)
    assert level(result, ENRICHED_GLOBAL).text.startswith(long_global)
    assert any("less than half" in f.reason for f in result.fallbacks)


# ---------------------------------------------------------------------------------------------
# Level 2 and coverage of level 3


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_pairs_and_final_coverage(layout):
    result, llm = run(make_filtered(LAYOUTS[layout]))

    pairs = [lv for lv in result.levels if lv.level == 2]
    assert [lv.name for lv in pairs] == [pair_name(a, b) for a, b in EXPECTED_PAIRS[layout]]
    for lv, (a, b) in zip(pairs, EXPECTED_PAIRS[layout]):
        assert lv.covers == [a, b]
        assert lv.box == Box(
            min(LAYOUTS[layout][a].x0, LAYOUTS[layout][b].x0),
            min(LAYOUTS[layout][a].y0, LAYOUTS[layout][b].y0),
            max(LAYOUTS[layout][a].x1, LAYOUTS[layout][b].x1),
            max(LAYOUTS[layout][a].y1, LAYOUTS[layout][b].y1),
        )

    final_prompt = llm.requests("final")[0].user
    in_pairs = {name for a, b in EXPECTED_PAIRS[layout] for name in (a, b)}
    for lv in pairs:
        assert lv.text in final_prompt
    for name in SPATIAL_PATCH_NAMES:
        assert OBJECTS[name] in final_prompt
        if name not in in_pairs:
            assert level(result, name).text in final_prompt
    assert "stands out" not in final_prompt
    assert level(result, FINAL).covers == [GLOBAL, *SPATIAL_PATCH_NAMES]


@pytest.mark.parametrize(
    "merged",
    [list(subset) for size in range(5) for subset in itertools.combinations(ADJACENT_PAIRS, size)],
    ids=lambda merged: "+".join(f"{a[0]}{a.split('_')[1][0]}-{b[0]}{b.split('_')[1][0]}" for a, b in merged) or "none",
)
def test_final_regions_cover_every_patch(merged):
    spatial = {name: Patch(name, WHOLE) for name in SPATIAL_PATCH_NAMES}
    level1 = {name: LevelText(1, name, [name], f"text of {name}", WHOLE) for name in SPATIAL_PATCH_NAMES}
    pair_levels = [LevelText(2, pair_name(a, b), [a, b], f"text of {a} and {b}", WHOLE) for a, b in merged]

    regions = final_regions(spatial, level1, pair_levels)

    covered = {name for region in regions for name in region.covers}
    assert covered == set(SPATIAL_PATCH_NAMES)
    assert regions[: len(pair_levels)] == pair_levels
    in_pairs = {name for a, b in merged for name in (a, b)}
    singles = [region.name for region in regions[len(pair_levels):]]
    assert singles == [name for name in SPATIAL_PATCH_NAMES if name not in in_pairs]


def test_pair_scoring_uses_union_and_own_crops():
    def contradicting(request: ChatRequest) -> str:
        full = json.dumps(
            {
                "consistent": [],
                "contradictory": [
                    [
                        {"statement": "a red kite in soft light", "description": 1},
                        {"statement": "a tall tree in soft light", "description": 2},
                    ]
                ],
                "unique": [
                    {"statement": "a red kite seen clearly", "description": 1},
                    {"statement": "a tall tree seen clearly", "description": 2},
                ],
            }
        )
        return full[len(SORT_PREFILL):]

    scorer = TableScorer({"a tall tree seen clearly": 0.1, "a red kite in soft light": 0.2})
    llm = RoutingLLM({"sort": contradicting})
    result, _ = run(make_filtered(LAYOUTS["one pair"]), llm, scorer)

    sizes = {tuple(texts): size for size, texts in scorer.calls}
    assert sizes[("a red kite in soft light", "a tall tree in soft light")] == (100, 50)
    assert sizes[("a red kite seen clearly",)] == (60, 50)
    assert sizes[("a tall tree seen clearly",)] == (60, 50)

    statements = {s.text: s for s in result.statements}
    name = pair_name(TOP_LEFT, TOP_RIGHT)
    assert all(s.patch == name for s in statements.values())
    assert statements["a red kite seen clearly"].source_patch == TOP_LEFT
    assert statements["a red kite seen clearly"].kept
    assert not statements["a tall tree seen clearly"].kept
    assert statements["a tall tree in soft light"].kept
    assert not statements["a red kite in soft light"].kept
    pair_prompt = llm.requests("pair")[0].user
    assert "- a tall tree in soft light" in pair_prompt
    assert "- a tall tree seen clearly" not in pair_prompt


def test_pair_merge_fallback_uses_reliable():
    llm = RoutingLLM({"pair": lambda request: " 1. a kite\n2. a tree"})
    result, _ = run(make_filtered(LAYOUTS["one pair"]), llm, TableScorer())
    pair = level(result, pair_name(TOP_LEFT, TOP_RIGHT))
    assert pair.text == "A red kite in soft light, seen clearly. A tall tree in soft light, seen clearly."
    assert any(f.patch == pair.name and "merged description unusable" in f.reason for f in result.fallbacks)


def test_pair_sorting_retry_and_fallback_recorded():
    llm = RoutingLLM({"sort": lambda request: "not json"})
    result, _ = run(make_filtered(LAYOUTS["one pair"]), llm, TableScorer())
    name = pair_name(TOP_LEFT, TOP_RIGHT)
    assert [kind for kind, _ in llm.calls].count("sort") == 2
    reasons = [f.reason for f in result.fallbacks if f.patch == name]
    assert any("asking once more" in r for r in reasons)
    assert any("word overlap" in r for r in reasons)
    assert all(f.stage == "aggregate" for f in result.fallbacks)


def test_pair_with_empty_member_not_merged():
    filtered = make_filtered(LAYOUTS["one pair"], samples={TOP_RIGHT: ["", "", ""]})
    result, llm = run(filtered)
    assert not [lv for lv in result.levels if lv.level == 2]
    assert any("not merged" in f.reason for f in result.fallbacks)
    assert level(result, TOP_LEFT).text in llm.requests("final")[0].user


def test_no_scorer_pair_statements_kept_unverified():
    result, _ = run(make_filtered(LAYOUTS["one pair"]), scorer=None)
    assert result.statements
    assert all(s.kept and s.score is None for s in result.statements)
    assert any("no scorer" in f.reason for f in result.fallbacks)


# ---------------------------------------------------------------------------------------------
# Level 3


def test_final_fallback_appends_missing_region_sentences():
    global_text = "A park on a sunny day. A red kite is in soft light, seen clearly."
    llm = RoutingLLM({"final": lambda request: ""})
    result, _ = run(make_filtered(LAYOUTS["quadrants"], global_text=global_text), llm)
    caption = result.caption
    assert caption.startswith(global_text)
    assert caption.count("red kite") == 1
    for thing in ("tall tree", "brown dog", "blue bench"):
        assert caption.count(thing) == 1
    assert any(f.patch == FINAL for f in result.fallbacks)


def test_final_prompt_gives_locations():
    _, llm = run(make_filtered(LAYOUTS["quadrants"]))
    prompt = llm.requests("final")[0].user
    assert "top left [0.00, 0.00, 0.50, 0.50]" in prompt
    assert "bottom right [0.50, 0.50, 1.00, 1.00]" in prompt


def test_everything_empty_raises():
    filtered = make_filtered(
        LAYOUTS["quadrants"], samples={name: ["", ""] for name in SPATIAL_PATCH_NAMES}, global_text=""
    )
    with pytest.raises(PatchMattersError, match="no usable text"):
        run(filtered)


def test_empty_global_still_gives_caption():
    llm = RoutingLLM({"final": lambda request: ""})
    result, _ = run(make_filtered(LAYOUTS["quadrants"], global_text=""), llm)
    assert result.caption
    assert "brown dog" in result.caption
    assert any(f.patch == GLOBAL for f in result.fallbacks)


def test_only_global_needs_no_llm():
    descriptions = Descriptions(patches=PatchSet(100, 100, [Patch(GLOBAL, WHOLE)]), samples={GLOBAL: [GLOBAL_TEXT]})
    result, llm = run(FilteredDescriptions(descriptions=descriptions, sets={}))
    assert llm.calls == []
    assert result.caption == GLOBAL_TEXT


def test_progress_after_each_model_call():
    labels: list[str] = []
    run(make_filtered(LAYOUTS["one pair"], semantic=Box(20, 20, 80, 80)), scorer=TableScorer(), progress=labels.append)
    assert labels == ["level 1", "semantic", "sort", "score", "score", "pair merge", "final"]


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.mark.parametrize(
    ("raw", "base", "reason"),
    [
        ("The photo shows", "", "empty"),
        ('{"a": 1}', "", "JSON"),
        ("The photo shows:\n- a kite in the sky\n- a tree by the path", "", "list"),
        ("The photo shows a kite. Write the final description now please.", "", "prompt"),
        ("The photo shows a kite.", "", "words"),
        ("The photo shows a kite over a park today.", "one two three four five six seven eight nine ten " * 2, "half"),
        ("The photo shows a kite. " * 4, "", "repeats"),
        ("The photo shows " + "many kites " * 80, "", "far more"),
    ],
)
def test_validate_prose_rejects(raw, base, reason):
    generation = Generation(text=clean_generated_text(raw, "The photo shows"), raw=raw)
    text, problem = validate_prose(generation, "The photo shows", ["a kite over a park by a tree"], base=base)
    assert text == ""
    assert reason in problem


@pytest.mark.parametrize("cut", [{"hit_token_limit": True}, {"repeated": True}], ids=["token_limit", "repeated"])
def test_validate_prose_trims_cut_sentence(cut):
    raw = "The photo shows a kite over a green park. A tall tree stands near the"
    generation = Generation(text=raw, raw=raw, **cut)
    text, problem = validate_prose(generation, "The photo shows", ["a kite over a park and a tall tree"])
    assert problem is None
    assert text == "The photo shows a kite over a green park."


def test_append_uncovered_skips_known_sentences():
    text = append_uncovered("A red car is parked.", ["a red car is parked", "a dog barks", "A dog barks loudly."], 0.5)
    assert text == "A red car is parked. A dog barks."


def test_describe_location_words():
    assert describe_location(Box(0, 0, 50, 50), WHOLE) == "top left [0.00, 0.00, 0.50, 0.50]"
    assert describe_location(Box(0, 40, 100, 60), WHOLE) == "centre [0.00, 0.40, 1.00, 0.60]"
    assert describe_location(Box(40, 70, 60, 100), WHOLE) == "bottom centre [0.40, 0.70, 0.60, 1.00]"


# ---------------------------------------------------------------------------------------------
# Real models


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from patch_matters_core.models.llm import load_llm

    return load_llm(str(smollm2_gguf))


@pytest.mark.slow
def test_filter_and_aggregate_with_smollm2(smollm2, tiny_models, coco_images):
    from patch_matters_core.images import load_image
    from patch_matters_core.models.scorer import load_scorer
    from patch_matters_core.models.text import split_sentences

    entry = coco_images[1]
    image = load_image(entry["path"])
    width, height = image.size
    boxes = {
        TOP_LEFT: Box(0, 0, width * 0.6, height * 0.5),
        TOP_RIGHT: Box(width * 0.4, 0, width, height * 0.5),
        BOTTOM_LEFT: Box(0, height / 2, width / 2, height),
        BOTTOM_RIGHT: Box(width / 2, height / 2, width, height),
    }
    sentences = split_sentences(entry["global_caption_llava16"])
    samples = {}
    for offset, name in enumerate(SPATIAL_PATCH_NAMES):
        picked = sentences[offset : offset + 3] or sentences[:3]
        samples[name] = [" ".join(picked[:2]), " ".join(picked[1:]), picked[0]]
    patches = [Patch(GLOBAL, Box(0, 0, width, height))] + [Patch(name, box) for name, box in boxes.items()]
    descriptions = Descriptions(
        patches=PatchSet(width, height, patches),
        samples={GLOBAL: [entry["global_caption_llava16"]], **samples},
    )
    short = GenerationSettings(max_new_tokens=64, temperature=0.6)
    filter_config = FilterConfig(sorting_generation=GenerationSettings(max_new_tokens=64, temperature=0.2))
    config = AggregateConfig(merge_generation=short, final_generation=short, pair_iou=0.1)
    scorer = load_scorer(str(tiny_models / "itm-blip"))

    filtered = filter_descriptions(image, descriptions, scorer, smollm2, filter_config, seed=0)
    result = aggregate(image, filtered, smollm2, scorer, config, filter_config, seed=0)

    assert set(filtered.sets) == set(SPATIAL_PATCH_NAMES)
    for filtered_set in filtered.sets.values():
        assert filtered_set.sorting_path in ("llm", "llm_retry", "sentence_fallback")
        for statement in filtered_set.statements:
            assert statement.kept if statement.kind == "consistent" else statement.score is not None
    assert result.caption.strip()
    assert "\n" not in result.caption
    assert [lv.name for lv in result.levels if lv.level == 2] == [pair_name(TOP_LEFT, TOP_RIGHT)]
    assert all(s.patch == pair_name(TOP_LEFT, TOP_RIGHT) for s in result.statements)
    final = result.levels[-1]
    assert final.level == 3
    assert final.covers == [GLOBAL, *SPATIAL_PATCH_NAMES]
    assert all(f.stage == "aggregate" for f in result.fallbacks)

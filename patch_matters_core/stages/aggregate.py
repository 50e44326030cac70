"""Aggregate stage: merge the filtered patch descriptions, level by level, into one caption.

``Aggregation.levels`` lists every text written, in this order:

- level 1, named after the patch: one description per described patch (semantic and spatial),
  written from the patch's samples on top of its reliable statements;
- level 1, named ``global+semantic``: the global description enriched with the semantic
  patch's level-1 description, present only when the semantic patch was described;
- level 2, named ``pair:<a>+<b>``: the merged description of two neighbouring spatial patches
  whose boxes overlap with an IoU above ``AggregateConfig.pair_iou``;
- level 3, named ``final``: the global description corrected and enriched with every region.

Every spatial patch reaches level 3 exactly through one of these routes: each merged pair that
contains it, or its own level-1 description when it is in no merged pair. Raw samples never go
to level 3. Each LLM answer is validated, and an unusable one is replaced by a stated fallback
built from the reliable statements.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Optional, Sequence

from PIL import Image

from ..config import AggregateConfig, FilterConfig, GenerationSettings
from ..errors import PatchMattersError
from ..geometry import iou, normalized_box, union_box
from ..models.base import ChatRequest, Generation, ProgressCallback, Scorer, TextModel
from ..models.text import extract_json, split_sentences
from ..prompts import render
from ..types import (
    ADJACENT_PAIRS,
    GLOBAL,
    SEMANTIC,
    SPATIAL_PATCH_NAMES,
    Aggregation,
    Box,
    Fallback,
    FilteredDescriptions,
    LevelText,
    Patch,
    Statement,
    pair_name,
)
from .filter import (
    SourceText,
    StatementSet,
    chat,
    content_words,
    jaccard,
    reply_text,
    resolve_threshold,
    score_statements,
    sort_statements,
)

logger = logging.getLogger(__name__)

STAGE = "aggregate"
ENRICHED_GLOBAL = "global+semantic"
FINAL = "final"

# Openings of the assistant's reply. They keep small models writing prose instead of lists.
PATCH_PREFILL = "This part of the photo shows"
PAIR_PREFILL = "This area of the photo shows"
PHOTO_PREFILL = "The photo shows"

# A reply with fewer words than this after its opening describes nothing.
MIN_WORDS = 5

# A sentence counts as already present in a text when this fraction of its content words occurs
# in the text, or when it matches one of the text's sentences at the filter's Jaccard similarity.
COVERED_FRACTION = 0.8

# Phrases of the prompt templates. A reply that contains one repeats the prompt.
_PROMPT_MARKERS = (
    "description 1:",
    "description 2:",
    "region 1,",
    "part a,",
    "part b,",
    "checked against the photo",
    "write one description",
    "write the final description",
    "single paragraph",
    "description of the whole photo:",
    "reply with",
)
_LIST_LINE = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*\u2022])\s+\S", re.MULTILINE)
# Items "1." and "2." of a numbered list, also when the first item follows the prefill on its line.
_NUMBERED_LIST = re.compile(r"(?:^|\s)1[.)]\s+\S.*?(?:^|\s)2[.)]\s+\S", re.DOTALL)


def aggregate(
    image: Optional[Image.Image],
    filtered: FilteredDescriptions,
    llm: TextModel,
    scorer: Optional[Scorer],
    config: AggregateConfig,
    filter_config: FilterConfig,
    seed: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
) -> Aggregation:
    """Write the level-1, level-2 and level-3 texts and return them with the final caption.

    Raise PatchMattersError when the global description and every sample are empty, because
    there is then no text to build a caption from.
    """
    start = time.perf_counter()
    descriptions = filtered.descriptions
    patch_set = descriptions.patches
    whole = Box(0, 0, patch_set.width or (image.width if image else 1), patch_set.height or (image.height if image else 1))
    described = [p for p in patch_set.patches if p.name != GLOBAL and p.described]
    global_description = descriptions.global_description.strip()
    fallbacks: list[Fallback] = []
    levels: list[LevelText] = []

    has_text = bool(global_description) or any(
        text.strip() for p in described for text in descriptions.samples.get(p.name, [])
    )
    if not has_text:
        raise PatchMattersError(
            "The VLM produced no usable text for this image: the global description and every patch "
            "sample are empty, so no caption can be written. The describe stage's fallbacks give the "
            "reason for each sample; check the VLM, its prompt and describe max_new_tokens."
        )
    logger.info("Aggregating %d described patches.", len(described))

    level1 = write_patch_descriptions(described, filtered, llm, config, whole, seed, progress, fallbacks)
    levels.extend(level1[p.name] for p in described)

    if SEMANTIC in level1 and level1[SEMANTIC].text:
        enriched = enrich_global(
            global_description, level1[SEMANTIC], filtered, llm, config, filter_config, whole, seed, progress, fallbacks
        )
        levels.append(enriched)
        global_description = enriched.text

    spatial = {p.name: p for p in described if p.name in SPATIAL_PATCH_NAMES}
    pairs = select_pairs(spatial, level1, config.pair_iou, fallbacks)
    pair_levels, statements = merge_pairs(
        image, pairs, spatial, level1, llm, scorer, config, filter_config, whole, seed, progress, fallbacks
    )
    levels.extend(pair_levels)

    regions = final_regions(spatial, level1, pair_levels)
    covers = [GLOBAL] + [p.name for p in described]
    final = write_final(global_description, regions, covers, llm, config, filter_config, whole, seed, progress, fallbacks)
    levels.append(final)

    caption = " ".join(final.text.split())
    if not caption:
        raise PatchMattersError(
            "The aggregate stage ended with an empty caption although some descriptions had text; "
            "this is a bug, please report it with the trace."
        )
    logger.info(
        "Aggregated %d levels (%d merged pairs) into %d characters, %d fallbacks, in %.1f s.",
        len(levels),
        len(pair_levels),
        len(caption),
        len(fallbacks),
        time.perf_counter() - start,
    )
    return Aggregation(caption=caption, levels=levels, statements=statements, fallbacks=fallbacks)


# ---------------------------------------------------------------------------------------------
# Level 1


def write_patch_descriptions(
    patches: Sequence[Patch],
    filtered: FilteredDescriptions,
    llm: TextModel,
    config: AggregateConfig,
    whole: Box,
    seed: Optional[int],
    progress: Optional[ProgressCallback],
    fallbacks: list[Fallback],
) -> dict[str, LevelText]:
    """Write one description per patch from its samples and reliable statements, in one chat call."""
    texts: dict[str, str] = {}
    asked: list[tuple[Patch, list[str], list[str]]] = []
    for patch in patches:
        samples = [t.strip() for t in filtered.descriptions.samples.get(patch.name, []) if t and t.strip()]
        reliable = filtered.sets[patch.name].reliable if patch.name in filtered.sets else []
        if not samples:
            _fallback(fallbacks, patch.name, "no usable sample; the level-1 description is empty")
            texts[patch.name] = ""
        else:
            asked.append((patch, samples, reliable))

    requests = [
        ChatRequest(
            user=render("level1", count=len(samples), descriptions=_numbered(samples), reliable=_bullets(reliable)),
            system=render("writer_system"),
            prefill=PATCH_PREFILL,
        )
        for _, samples, reliable in asked
    ]
    replies = chat(llm, requests, config.merge_generation, seed, "level 1", progress) if requests else []

    for (patch, samples, reliable), reply in zip(asked, replies, strict=True):
        text, problem = validate_prose(reply, PATCH_PREFILL, samples, echo_inputs=True)
        _note_repetition(fallbacks, patch.name, reply, problem)
        if problem is None:
            texts[patch.name] = text
            continue
        if reliable:
            texts[patch.name] = join_sentences(reliable)
            substitute = "its reliable statements are used"
        else:
            texts[patch.name] = max(samples, key=len)
            substitute = "it has no reliable statement, so its longest sample is used"
        _fallback(fallbacks, patch.name, f"level-1 description unusable ({problem}); {substitute}")

    return {
        patch.name: LevelText(level=1, name=patch.name, covers=[patch.name], text=texts[patch.name], box=patch.box)
        for patch in patches
    }


# ---------------------------------------------------------------------------------------------
# Semantic patch


def enrich_global(
    global_description: str,
    semantic: LevelText,
    filtered: FilteredDescriptions,
    llm: TextModel,
    config: AggregateConfig,
    filter_config: FilterConfig,
    whole: Box,
    seed: Optional[int],
    progress: Optional[ProgressCallback],
    fallbacks: list[Fallback],
) -> LevelText:
    """Add the semantic patch's details to the global description; the result replaces it."""
    covers = [GLOBAL, SEMANTIC]
    if not global_description:
        _fallback(fallbacks, GLOBAL, "the global description is empty; the semantic patch's description replaces it")
        return LevelText(level=1, name=ENRICHED_GLOBAL, covers=covers, text=semantic.text, box=whole)

    request = ChatRequest(
        user=render(
            "semantic",
            global_description=global_description,
            location=describe_location(semantic.box or whole, whole),
            region_description=semantic.text,
        ),
        system=render("writer_system"),
        prefill=PHOTO_PREFILL,
    )
    [reply] = chat(llm, [request], config.merge_generation, seed, "semantic", progress)
    text, problem = validate_prose(reply, PHOTO_PREFILL, [global_description, semantic.text], base=global_description)
    _note_repetition(fallbacks, SEMANTIC, reply, problem)
    if problem is not None:
        reliable = filtered.sets[SEMANTIC].reliable if SEMANTIC in filtered.sets else []
        additions = reliable or split_sentences(semantic.text)
        text = append_uncovered(global_description, additions, filter_config.fallback_similarity)
        _fallback(
            fallbacks,
            SEMANTIC,
            f"enriched global description unusable ({problem}); the global description followed by the "
            "semantic patch's statements that it lacks is used",
        )
    return LevelText(level=1, name=ENRICHED_GLOBAL, covers=covers, text=text, box=whole)


# ---------------------------------------------------------------------------------------------
# Level 2


def select_pairs(
    spatial: dict[str, Patch],
    level1: dict[str, LevelText],
    pair_iou: float,
    fallbacks: list[Fallback],
) -> list[tuple[str, str]]:
    """Return the adjacent pairs whose boxes have an IoU above ``pair_iou`` and that both have text."""
    pairs = []
    for first, second in ADJACENT_PAIRS:
        if first not in spatial or second not in spatial:
            continue
        overlap = iou(spatial[first].box, spatial[second].box)
        if overlap <= pair_iou:
            continue
        empty = [name for name in (first, second) if not level1[name].text]
        if empty:
            _fallback(
                fallbacks,
                pair_name(first, second),
                f"the pair overlaps (IoU {overlap:.2f}) but {empty} has no description; the pair is not merged",
            )
            continue
        pairs.append((first, second))
    return pairs


def merge_pairs(
    image: Optional[Image.Image],
    pairs: Sequence[tuple[str, str]],
    spatial: dict[str, Patch],
    level1: dict[str, LevelText],
    llm: TextModel,
    scorer: Optional[Scorer],
    config: AggregateConfig,
    filter_config: FilterConfig,
    whole: Box,
    seed: Optional[int],
    progress: Optional[ProgressCallback],
    fallbacks: list[Fallback],
) -> tuple[list[LevelText], list[Statement]]:
    """Sort, score and merge the two level-1 descriptions of every pair; return the texts and statements.

    Members of a contradictory group are scored on the crop of the pair's union box, and unique
    statements on the crop of the patch they come from. Sorting and merging are each one chat
    call for all pairs.
    """
    if not pairs:
        return [], []

    sets = []
    for first, second in pairs:
        sources = [
            SourceText(text=level1[name].text, patch=name, sample_index=None, box=spatial[name].box)
            for name in (first, second)
        ]
        union = union_box(spatial[first].box, spatial[second].box)
        sets.append(StatementSet(name=pair_name(first, second), sources=sources, box=union))

    sorted_sets = sort_statements(
        llm,
        sets,
        filter_config.sorting_generation,
        filter_config.fallback_similarity,
        seed,
        progress,
        stage=STAGE,
    )
    threshold = resolve_threshold(filter_config, scorer)
    statements: list[Statement] = []
    reliable: list[list[str]] = []
    for statement_set, sorted_set in zip(sets, sorted_sets, strict=True):
        fallbacks.extend(sorted_set.fallbacks)
        records, score_fallbacks = score_statements(
            image, statement_set, sorted_set, scorer, threshold, progress=progress, stage=STAGE
        )
        fallbacks.extend(score_fallbacks)
        statements.extend(records)
        reliable.append([s.text for s in records if s.kept])

    requests = []
    for (first, second), kept in zip(pairs, reliable):
        user = render(
            "pair",
            location_a=describe_location(spatial[first].box, whole),
            text_a=level1[first].text,
            location_b=describe_location(spatial[second].box, whole),
            text_b=level1[second].text,
            reliable=_bullets(kept),
        )
        requests.append(ChatRequest(user=user, system=render("writer_system"), prefill=PAIR_PREFILL))
    replies = chat(llm, requests, config.merge_generation, seed, "pair merge", progress)

    levels = []
    for (first, second), kept, statement_set, reply in zip(pairs, reliable, sets, replies, strict=True):
        inputs = [level1[first].text, level1[second].text]
        text, problem = validate_prose(reply, PAIR_PREFILL, inputs, echo_inputs=True)
        _note_repetition(fallbacks, statement_set.name, reply, problem)
        if problem is not None:
            if kept:
                text = join_sentences(kept)
                substitute = "the pair's reliable statements are used"
            else:
                text = append_uncovered(inputs[0], split_sentences(inputs[1]), filter_config.fallback_similarity)
                substitute = "the two descriptions without repeated sentences are used"
            _fallback(fallbacks, statement_set.name, f"merged description unusable ({problem}); {substitute}")
        levels.append(
            LevelText(level=2, name=statement_set.name, covers=[first, second], text=text, box=statement_set.box)
        )
    return levels, statements


# ---------------------------------------------------------------------------------------------
# Level 3


def final_regions(
    spatial: dict[str, Patch],
    level1: dict[str, LevelText],
    pair_levels: Sequence[LevelText],
) -> list[LevelText]:
    """Return the regions that go to level 3: every merged pair, then every patch in no merged pair.

    Two pairs that share a patch both go in, so the patch in neither of them still reaches level
    3 on its own level-1 description.
    """
    regions = list(pair_levels)
    in_pairs = {name for level in pair_levels for name in level.covers}
    for name in SPATIAL_PATCH_NAMES:
        if name in spatial and name not in in_pairs and level1[name].text:
            regions.append(level1[name])
    return regions


def write_final(
    global_description: str,
    regions: Sequence[LevelText],
    covers: list[str],
    llm: TextModel,
    config: AggregateConfig,
    filter_config: FilterConfig,
    whole: Box,
    seed: Optional[int],
    progress: Optional[ProgressCallback],
    fallbacks: list[Fallback],
) -> LevelText:
    """Correct and enrich the global description with the region descriptions and their locations."""
    if not regions:
        logger.info("Level 3: no region description; the global description is the final text.")
        return LevelText(level=3, name=FINAL, covers=covers, text=global_description, box=whole)
    if not global_description:
        _fallback(fallbacks, GLOBAL, "the global description is empty; level 3 builds on the regions alone")

    region_lines = "\n\n".join(
        f"Region {number}, {describe_location(region.box or whole, whole)}: {region.text}"
        for number, region in enumerate(regions, 1)
    )
    request = ChatRequest(
        user=render("final", global_description=global_description or "(none)", regions=region_lines),
        system=render("writer_system"),
        prefill=PHOTO_PREFILL,
    )
    [reply] = chat(llm, [request], config.final_generation, seed, "final", progress)
    region_texts = [region.text for region in regions]
    text, problem = validate_prose(reply, PHOTO_PREFILL, [global_description, *region_texts], base=global_description)
    _note_repetition(fallbacks, FINAL, reply, problem)
    if problem is not None:
        additions = [sentence for region in regions for sentence in region_sentences(region, whole)]
        text = append_uncovered(global_description, additions, filter_config.fallback_similarity)
        _fallback(
            fallbacks,
            FINAL,
            f"final description unusable ({problem}); the global description followed by the region "
            "sentences that it lacks is used",
        )
    return LevelText(level=3, name=FINAL, covers=covers, text=text, box=whole)


# ---------------------------------------------------------------------------------------------
# Validation of written replies


def validate_prose(
    generation: Generation,
    prefill: str,
    inputs: Sequence[str],
    base: str = "",
    echo_inputs: bool = False,
) -> tuple[str, Optional[str]]:
    """Check a written paragraph; return (text, None) when usable, else ("", the reason).

    A reply cut at the token limit or after a repeated passage is trimmed to its last complete
    sentence. The reply is
    rejected when it is empty, JSON, a list, a copy of the prompt or shorter than ``MIN_WORDS``
    words after the prefill. It is also rejected when it is less than half as long as ``base``
    (the text it should extend), more than twice as long as all inputs together plus 40 words,
    or stuck repeating a sentence. With ``echo_inputs``, a reply that copies two or more inputs
    of six words or more whole is rejected too.
    """
    text = reply_text(generation, prefill)
    if generation.hit_token_limit or generation.repeated:
        sentences = split_sentences(text)
        if len(sentences) > 1 and sentences[-1][-1:] not in ".!?":
            text = " ".join(sentences[:-1])
    text = " ".join(text.split())
    words = text.split()
    if prefill and text.startswith(prefill.strip()):
        words = words[len(prefill.split()):]

    if not words:
        return "", "the reply is empty"
    if text[0] in "{[" or (text.count("{") and isinstance(extract_json(text), dict)):
        return "", "the reply is JSON, not a paragraph"
    raw = generation.raw or ""
    if len(_LIST_LINE.findall(raw)) >= 2 or _NUMBERED_LIST.search(raw):
        return "", "the reply is a list, not a paragraph"
    lowered = text.lower()
    marker = next((m for m in _PROMPT_MARKERS if m in lowered), None)
    if marker:
        return "", f"the reply repeats the prompt ({marker!r})"
    if len(words) < MIN_WORDS:
        return "", f"the reply has only {len(words)} words after its opening"
    base_words = len(base.split())
    if base_words and len(words) < base_words / 2:
        return "", f"the reply has {len(words)} words, less than half of the {base_words} it should extend"
    input_words = sum(len(t.split()) for t in inputs)
    if len(words) > 2 * input_words + 40:
        return "", f"the reply has {len(words)} words, far more than the {input_words} words it was given"
    if _repeats_itself(text):
        return "", "the reply repeats the same sentence"
    if echo_inputs and len(inputs) >= 2:
        # Inputs of a few words occur inside any good merge, so only longer ones count as copied.
        copied = sum(1 for t in inputs if len(t.split()) >= 6 and _normalised(t) in _normalised(text))
        if copied >= 2:
            return "", f"the reply copies {copied} of its inputs one after another instead of merging them"
    return text, None


def _repeats_itself(text: str) -> bool:
    counts: dict[str, int] = {}
    for sentence in split_sentences(text):
        key = _normalised(sentence)
        if key:
            counts[key] = counts.get(key, 0) + 1
    if counts and max(counts.values()) >= 3:
        return True
    words = text.lower().split()
    return len(words) >= 40 and len(set(words)) / len(words) < 0.25


# ---------------------------------------------------------------------------------------------
# Text and geometry helpers


def region_sentences(region: LevelText, whole: Box) -> list[str]:
    """Split a region's text into sentences, naming the region where its text opens with a prefill.

    "This part of the photo shows a dog." from the top left patch becomes "The top left of the
    photo shows a dog.", which still reads right once the sentence is part of the whole caption.
    """
    sentences = split_sentences(region.text)
    if not sentences:
        return []
    place = describe_location(region.box or whole, whole).split(" [")[0]
    for prefill in (PATCH_PREFILL, PAIR_PREFILL):
        if sentences[0].startswith(prefill):
            sentences[0] = f"The {place} of the photo shows" + sentences[0][len(prefill):]
            break
    return sentences


def join_sentences(statements: Sequence[str]) -> str:
    """Join statements into one paragraph, each starting with a capital and ending with a period."""
    sentences = []
    for statement in statements:
        sentence = " ".join(statement.split()).strip()
        if not sentence:
            continue
        sentence = sentence[0].upper() + sentence[1:]
        if sentence[-1] not in ".!?":
            sentence += "."
        sentences.append(sentence)
    return " ".join(sentences)


def append_uncovered(text: str, additions: Sequence[str], similarity: float) -> str:
    """Append each addition that ``text`` does not already state, checked against the growing text."""
    result = " ".join(text.split())
    for addition in additions:
        if not content_words(addition) or is_covered(addition, result, similarity):
            continue
        result = (result + " " + join_sentences([addition])).strip()
    return result


def is_covered(sentence: str, text: str, similarity: float) -> bool:
    """Tell whether ``text`` already states ``sentence``, by content-word overlap."""
    words = content_words(sentence)
    if not words:
        return True
    if len(words & content_words(text)) / len(words) >= COVERED_FRACTION:
        return True
    return any(jaccard(words, content_words(other)) >= similarity for other in split_sentences(text))


def describe_location(box: Box, whole: Box) -> str:
    """Return a box's place in words and as normalised ``[x0, y0, x1, y1]``, e.g. ``top left [0.00, ...]``."""
    values = normalized_box(box, max(whole.width, 1.0), max(whole.height, 1.0))
    centre_x = (values[0] + values[2]) / 2
    centre_y = (values[1] + values[3]) / 2
    vertical = "middle"
    if centre_y < 1 / 3:
        vertical = "top"
    elif centre_y > 2 / 3:
        vertical = "bottom"
    horizontal = "centre"
    if centre_x < 1 / 3:
        horizontal = "left"
    elif centre_x > 2 / 3:
        horizontal = "right"
    words = "centre" if (vertical, horizontal) == ("middle", "centre") else f"{vertical} {horizontal}"
    return f"{words} [{', '.join(f'{v:.2f}' for v in values)}]"


def _fallback(fallbacks: list[Fallback], patch: Optional[str], reason: str) -> None:
    logger.warning("Aggregate: %s: %s.", patch, reason)
    fallbacks.append(Fallback(stage=STAGE, patch=patch, reason=reason))


def _note_repetition(fallbacks: list[Fallback], patch: str, reply: Generation, problem: Optional[str]) -> None:
    """Record that a usable reply was cut after a repeated passage; an unusable one gets its own fallback."""
    if reply.repeated and problem is None:
        _fallback(fallbacks, patch, "the reply kept repeating one passage; it was cut after the first copy and used")


def _numbered(texts: Sequence[str]) -> str:
    return "\n\n".join(f"Description {number}: {text}" for number, text in enumerate(texts, 1))


def _bullets(statements: Sequence[str]) -> str:
    return "\n".join(f"- {statement}" for statement in statements) if statements else "(none)"


def _normalised(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))

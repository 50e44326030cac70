"""Filter stage: keep the statements of a patch's samples that agree or that the image confirms.

The samples of one patch are sorted into statements of three kinds. A consistent statement is
stated by at least two samples and is kept as it is. A contradictory group gives different values
for the same attribute of the same object, and only its best-scoring member is kept, and only
when the image-text matching (ITM) score on the patch crop is above the threshold. A unique
statement, stated by one sample, is kept when its ITM score on its own patch crop is above the
threshold.

An LLM does the sorting and replies in JSON. Its reply is validated: indexes in range, members
grounded in the descriptions they cite, real contradictions only. Invalid replies get one batched
retry, and then the samples are grouped by sentence word overlap instead. The aggregate stage
reuses ``sort_statements`` and ``score_statements`` for the two descriptions of neighbouring
patches.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from PIL import Image

from ..config import FilterConfig, GenerationSettings
from ..models.base import ChatRequest, Generation, ProgressCallback, Scorer, TextModel
from ..models.text import extract_json, split_sentences
from ..prompts import render
from ..types import (
    GLOBAL,
    Box,
    Descriptions,
    Fallback,
    FilteredDescriptions,
    FilteredSet,
    SortingPath,
    Statement,
    StatementKind,
)

logger = logging.getLogger(__name__)

# Opening of the assistant's reply; small models follow the JSON shape far more often with it.
SORT_PREFILL = '{"consistent": ['

# A statement counts as taken from a description when at least this fraction of its content
# words occurs in that description.
MIN_GROUNDING = 0.5

# A sentence of a description counts as covered by the sorted statements when at least this
# fraction of its content words occurs in statements that cite the description.
MIN_SENTENCE_COVERAGE = 0.5

_WORD = re.compile(r"[a-z0-9]+")

# Function words and words that every description of a photo uses; overlap ignores them.
_STOPWORDS = frozenset(
    """
    a an the and or but nor of to in on at by for with from into onto over under about as than
    then that this these those there here it its it's is are was were be been being am has have
    had having do does did can could may might will would shall should must also very some any
    each every all both either neither not no yes so such which who whom whose what where when
    while how why one ones other another their them they he she his her him we our you your i me
    my up down out off just only more most much many few several image images picture photo
    photograph scene shows show showing shown visible appears appear appearing seems seem seen
    see looks look looking depicted depicts depicting features featuring
    """.split()
)


@dataclass
class SourceText:
    """One description in a set to sort, with the patch it describes and the crop that scores it."""

    text: str
    patch: str
    # Sample index within the patch; None for a level-1 description of a patch.
    sample_index: Optional[int]
    # Crop on which a unique statement taken from this description is scored.
    box: Box


@dataclass
class StatementSet:
    """Descriptions of the same content that are sorted and scored together."""

    name: str
    sources: list[SourceText]
    # Crop on which the members of a contradictory group are scored.
    box: Box


@dataclass
class SortedStatement:
    """A statement after sorting and before scoring."""

    text: str
    kind: StatementKind
    # Positions in ``StatementSet.sources`` of the descriptions that state it.
    sources: list[int]
    group: Optional[int] = None


@dataclass
class SortedSet:
    """Sorting result of one StatementSet: its statements, how they were found and what went wrong."""

    statements: list[SortedStatement]
    path: SortingPath
    fallbacks: list[Fallback] = field(default_factory=list)


class _InvalidSorting(ValueError):
    """The LLM's reply cannot be used as a sorting; the message gives the reason."""


# ---------------------------------------------------------------------------------------------
# Stage entry point


def filter_descriptions(
    image: Image.Image,
    descriptions: Descriptions,
    scorer: Optional[Scorer],
    llm: TextModel,
    config: FilterConfig,
    seed: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
) -> FilteredDescriptions:
    """Build one FilteredSet per described patch from that patch's samples.

    The global description is not filtered. Samples are taken by (patch name, sample index),
    and empty samples are skipped. Without a scorer, unique statements are kept unverified and
    each contradictory group keeps the version that most samples state.
    """
    start = time.perf_counter()
    fallbacks: list[Fallback] = []

    statement_sets: list[StatementSet] = []
    for patch in descriptions.patches.patches:
        if patch.name == GLOBAL or not patch.described:
            continue
        samples = descriptions.samples.get(patch.name, [])
        sources = [
            SourceText(text=text.strip(), patch=patch.name, sample_index=index, box=patch.box)
            for index, text in enumerate(samples)
            if text and text.strip()
        ]
        empty = [index for index, text in enumerate(samples) if not (text and text.strip())]
        if empty:
            logger.warning("Filter: %s samples %s are empty and are skipped.", patch.name, empty)
        statement_sets.append(StatementSet(name=patch.name, sources=sources, box=patch.box))

    logger.info(
        "Filtering %d patches with %d samples in all.",
        len(statement_sets),
        sum(len(s.sources) for s in statement_sets),
    )

    sorted_sets = sort_statements(
        llm, statement_sets, config.sorting_generation, config.fallback_similarity, seed, progress
    )

    threshold = resolve_threshold(config, scorer)
    filtered: dict[str, FilteredSet] = {}
    for statement_set, sorted_set in zip(statement_sets, sorted_sets, strict=True):
        fallbacks.extend(sorted_set.fallbacks)
        statements, score_fallbacks = score_statements(
            image, statement_set, sorted_set, scorer, threshold, progress=progress
        )
        fallbacks.extend(score_fallbacks)
        filtered[statement_set.name] = FilteredSet(
            name=statement_set.name, statements=statements, sorting_path=sorted_set.path
        )

    total = sum(len(s.statements) for s in filtered.values())
    kept = sum(len(s.reliable) for s in filtered.values())
    logger.info(
        "Filtered %d patches: %d statements, %d kept, %d fallbacks, in %.1f s.",
        len(filtered),
        total,
        kept,
        len(fallbacks),
        time.perf_counter() - start,
    )
    return FilteredDescriptions(descriptions=descriptions, sets=filtered, fallbacks=fallbacks)


def resolve_threshold(config: FilterConfig, scorer: Optional[Scorer]) -> Optional[float]:
    """Return the ITM threshold: the configured one, else the scorer's default; None without a scorer."""
    if config.threshold is not None:
        return config.threshold
    if scorer is None:
        return None
    return float(scorer.default_threshold)


# ---------------------------------------------------------------------------------------------
# Sorting


def sort_statements(
    llm: TextModel,
    sets: Sequence[StatementSet],
    settings: GenerationSettings,
    similarity: float,
    seed: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    stage: str = "filter",
) -> list[SortedSet]:
    """Sort the descriptions of every set into consistent, contradictory and unique statements.

    All sets with two or more descriptions go to the LLM in one chat call. The sets whose reply
    is invalid are asked once more in a second call, with the reason in the prompt and the seed
    plus one. A set whose second reply is invalid too is grouped by sentence word overlap
    (Jaccard of content words at least ``similarity``). A set with a single description needs no
    comparison: each of its sentences is a unique statement, and no LLM call is made.
    """
    results: list[Optional[SortedSet]] = [None] * len(sets)
    to_ask: list[int] = []
    for index, statement_set in enumerate(sets):
        if not statement_set.sources:
            reason = "no usable description; there is nothing to filter"
            logger.warning("Sort: %s: %s.", statement_set.name, reason)
            results[index] = SortedSet([], "sentence_fallback", [Fallback(stage, statement_set.name, reason)])
        elif len(statement_set.sources) == 1:
            logger.info("Sort: %s has one description; its sentences are unique statements.", statement_set.name)
            results[index] = SortedSet(_sentences_as_unique(statement_set), "single_sample")
        else:
            to_ask.append(index)

    first_errors: dict[int, str] = {}
    if to_ask:
        replies = _ask_sorting(llm, [sets[i] for i in to_ask], None, settings, seed, "sort", progress)
        for index, reply in zip(to_ask, replies, strict=True):
            try:
                statements, problems = parse_sorting(reply, sets[index], similarity, settings)
            except _InvalidSorting as error:
                first_errors[index] = str(error)
                continue
            results[index] = SortedSet(statements, "llm", _problem_fallbacks(stage, sets[index].name, problems))

    if first_errors:
        retry = list(first_errors)
        retry_fallbacks: dict[int, list[Fallback]] = {}
        for index in retry:
            reason = f"the LLM's sorting was invalid ({first_errors[index]}); asking once more"
            logger.warning("Sort: %s: %s.", sets[index].name, reason)
            retry_fallbacks[index] = [Fallback(stage, sets[index].name, reason)]

        retry_seed = None if seed is None else seed + 1
        replies = _ask_sorting(
            llm, [sets[i] for i in retry], [first_errors[i] for i in retry], settings, retry_seed, "sort retry", progress
        )
        for index, reply in zip(retry, replies, strict=True):
            statement_set = sets[index]
            try:
                statements, problems = parse_sorting(reply, statement_set, similarity, settings)
            except _InvalidSorting as error:
                reason = (
                    f"the LLM's second sorting was invalid too ({error}); the descriptions' sentences "
                    f"are grouped by word overlap instead"
                )
                logger.warning("Sort: %s: %s.", statement_set.name, reason)
                fallbacks = retry_fallbacks[index] + [Fallback(stage, statement_set.name, reason)]
                results[index] = SortedSet(sort_by_sentences(statement_set, similarity), "sentence_fallback", fallbacks)
                continue
            fallbacks = retry_fallbacks[index] + _problem_fallbacks(stage, statement_set.name, problems)
            results[index] = SortedSet(statements, "llm_retry", fallbacks)

    return [result for result in results if result is not None]


def _ask_sorting(
    llm: TextModel,
    sets: Sequence[StatementSet],
    errors: Optional[Sequence[str]],
    settings: GenerationSettings,
    seed: Optional[int],
    label: str,
    progress: Optional[ProgressCallback],
) -> list[Generation]:
    requests = []
    for position, statement_set in enumerate(sets):
        retry_note = render("sort_retry_note", reason=errors[position]) if errors else ""
        user = render(
            "sort",
            count=len(statement_set.sources),
            descriptions=_numbered(statement_set.sources),
            retry_note=retry_note,
        )
        requests.append(
            ChatRequest(user=user, system=render("sort_system"), prefill=SORT_PREFILL, stop_after_json=True)
        )
    return chat(llm, requests, settings, seed, label, progress)


def chat(
    llm: TextModel,
    requests: Sequence[ChatRequest],
    settings: GenerationSettings,
    seed: Optional[int],
    label: str,
    progress: Optional[ProgressCallback],
) -> list[Generation]:
    """Send the requests in one chat call, log it, check the reply count and report progress."""
    start = time.perf_counter()
    logger.info("LLM %s: %d request(s).", label, len(requests))
    replies = llm.chat(requests, settings, seed=seed)
    if len(replies) != len(requests):
        raise RuntimeError(f"The LLM returned {len(replies)} replies for {len(requests)} requests ({label}).")
    logger.info("LLM %s: %d reply(s) in %.1f s.", label, len(replies), time.perf_counter() - start)
    if progress is not None:
        progress(label)
    return list(replies)


def reply_text(generation: Generation, prefill: str) -> str:
    """Return the whole reply, with the prefill in front when the backend left it out of ``text``."""
    text = generation.text.strip()
    if not prefill or text.startswith(prefill.strip()):
        return text
    needs_space = prefill[-1:].isalnum() and text[:1].isalnum()
    return prefill + (" " if needs_space else "") + text


def _numbered(sources: Sequence[SourceText]) -> str:
    return "\n\n".join(f"Description {number}: {source.text}" for number, source in enumerate(sources, 1))


def _problem_fallbacks(stage: str, name: str, problems: Sequence[str]) -> list[Fallback]:
    fallbacks = []
    for problem in problems:
        logger.warning("Sort: %s: %s.", name, problem)
        fallbacks.append(Fallback(stage, name, problem))
    return fallbacks


# ---------------------------------------------------------------------------------------------
# Parsing and validation of the LLM's sorting


def parse_sorting(
    generation: Generation,
    statement_set: StatementSet,
    similarity: float,
    settings: Optional[GenerationSettings] = None,
) -> tuple[list[SortedStatement], list[str]]:
    """Validate the LLM's JSON sorting of one set and return its statements and the repairs made.

    Description numbers in the reply are 1-based. Entries with no valid description number, or
    not grounded in any description, are dropped. A consistent statement that fewer than two
    descriptions support becomes unique. A contradictory group needs at least two members from
    different descriptions that really differ, and is otherwise split into its members. Sentences
    of a description that no statement covers are added as unique statements. Each repair is
    returned as a sentence for the trace. Raise _InvalidSorting when nothing usable remains.
    """
    texts = [source.text for source in statement_set.sources]
    data = _reply_json(generation)
    if data is None:
        reason = "the reply contains no JSON object"
        if generation.repeated:
            reason += "; it kept repeating one passage"
        elif generation.hit_token_limit and settings is not None:
            reason += (
                f"; it was cut at max_new_tokens={settings.max_new_tokens}, so raise "
                "filter.sorting_generation.max_new_tokens"
            )
        raise _InvalidSorting(reason)
    if not isinstance(data, dict):
        raise _InvalidSorting(f"the reply is a JSON {type(data).__name__}, not an object with the three lists")

    keys = ("consistent", "contradictory", "unique")
    if not any(key in data for key in keys):
        raise _InvalidSorting(f"the JSON object has none of the keys {list(keys)}; it has {sorted(data)[:6]}")
    for key in keys:
        if data.get(key) is not None and not isinstance(data[key], list):
            raise _InvalidSorting(f"{key!r} is a JSON {type(data[key]).__name__}, not a list")

    problems: list[str] = []
    builder = _StatementBuilder(texts)

    for entry in (data.get("consistent") or []) + (data.get("unique") or []):
        member = _read_member(entry, len(texts), problems)
        if member is not None:
            builder.add_single(*member, problems)

    for entry in data.get("contradictory") or []:
        entries = entry.get("statements", entry.get("members")) if isinstance(entry, dict) else entry
        if not isinstance(entries, list):
            problems.append(f"a contradictory group is not a list of statements ({_preview(entry)}); it was dropped")
            continue
        members = [m for m in (_read_member(e, len(texts), problems) for e in entries) if m is not None]
        builder.add_group(members, problems)

    if not builder.statements:
        detail = f"; {problems[0]}" if problems else ""
        if generation.repeated:
            detail += "; the reply kept repeating one passage"
        raise _InvalidSorting(f"no usable statement in the reply{detail}")

    if generation.repeated:
        problems.append("the reply kept repeating one passage; it was cut after the first copy and read up to there")
    builder.add_uncovered_sentences(similarity, problems)
    return builder.statements, problems


def _reply_json(generation: Generation) -> Any:
    data = extract_json(reply_text(generation, SORT_PREFILL))
    if data is None:
        data = extract_json(generation.raw)
    return data


def _read_member(entry: Any, count: int, problems: list[str]) -> Optional[tuple[str, list[int]]]:
    """Read one ``{"statement": ..., "descriptions": [...]}`` entry; return (text, 0-based sources)."""
    if not isinstance(entry, dict):
        problems.append(f"an entry is not a JSON object ({_preview(entry)}); it was dropped")
        return None

    text = entry.get("statement", entry.get("text"))
    if not isinstance(text, str) or not _clean_statement(text):
        problems.append(f"an entry has no statement text ({_preview(entry)}); it was dropped")
        return None
    text = _clean_statement(text)

    cited: list[Any] = []
    for key in ("descriptions", "description", "samples", "sample", "sources", "source"):
        value = entry.get(key)
        if value is not None:
            cited = value if isinstance(value, list) else [value]
            break

    sources: list[int] = []
    for number in cited:
        if isinstance(number, str) and number.strip().isdigit():
            number = int(number.strip())
        if isinstance(number, bool) or not isinstance(number, int):
            problems.append(f"statement {text!r} cites {_preview(number)}, which is not a description number")
        elif not 1 <= number <= count:
            problems.append(f"statement {text!r} cites description {number}, out of range 1..{count}")
        elif number - 1 not in sources:
            sources.append(number - 1)
    return text, sources


class _StatementBuilder:
    """Collects validated statements of one set, merging duplicates and numbering groups."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.words = [content_words(text) for text in texts]
        self.statements: list[SortedStatement] = []
        self.next_group = 0

    def support(self, text: str, candidates: Sequence[int]) -> list[int]:
        """Return the candidate descriptions that contain most of the statement's content words."""
        words = content_words(text)
        return [i for i in candidates if words and len(words & self.words[i]) / len(words) >= MIN_GROUNDING]

    def attribute(self, text: str, cited: list[int], problems: list[str]) -> list[int]:
        """Return the descriptions that ground the statement: the cited ones, else any that do."""
        if not content_words(text):
            problems.append(f"statement {text!r} has no content words; it was dropped")
            return []
        grounded = self.support(text, cited)
        if grounded:
            dropped = [i + 1 for i in cited if i not in grounded]
            if dropped:
                problems.append(f"statement {text!r} is not found in descriptions {dropped}, which it cites")
            return grounded
        grounded = self.support(text, range(len(self.texts)))
        if grounded:
            problems.append(
                f"statement {text!r} cites descriptions {[i + 1 for i in cited]} but is found in "
                f"{[i + 1 for i in grounded]}; it was attributed to those"
            )
            return grounded
        problems.append(f"statement {text!r} is not found in any description; it was dropped")
        return []

    def add_single(self, text: str, cited: list[int], problems: list[str]) -> None:
        """Add a consistent or unique statement; its kind follows from how many descriptions state it."""
        sources = self.attribute(text, cited, problems)
        if not sources:
            return
        existing = self._find(text)
        if existing is not None:
            for source in sources:
                if source not in existing.sources:
                    existing.sources.append(source)
            if existing.kind == "unique" and len(existing.sources) >= 2:
                existing.kind = "consistent"
            return
        kind: StatementKind = "consistent" if len(sources) >= 2 else "unique"
        self.statements.append(SortedStatement(text=text, kind=kind, sources=sorted(sources)))

    def add_group(self, members: list[tuple[str, list[int]]], problems: list[str]) -> None:
        """Add a contradictory group, or its members one by one when it is no real contradiction."""
        grounded: list[tuple[str, list[int]]] = []
        for text, cited in members:
            sources = self.attribute(text, cited, problems)
            if not sources:
                continue
            same = next((m for m in grounded if _normalise(m[0]) == _normalise(text)), None)
            if same is not None:
                same[1].extend(s for s in sources if s not in same[1])
            else:
                grounded.append((text, sources))

        reason = self._not_a_contradiction(grounded)
        if reason:
            if grounded:
                problems.append(f"a contradictory group {[m[0] for m in grounded]} {reason}; its members are kept as single statements")
            for text, sources in grounded:
                self.add_single(text, sources, [])
            return

        group = self.next_group
        self.next_group += 1
        for text, sources in grounded:
            self.statements.append(
                SortedStatement(text=text, kind="contradictory", sources=sorted(sources), group=group)
            )

    def add_uncovered_sentences(self, similarity: float, problems: list[str]) -> None:
        """Add each sentence that no statement citing its description covers as a unique statement."""
        added = 0
        for index, text in enumerate(self.texts):
            covered: set[str] = set()
            for statement in self.statements:
                if index in statement.sources:
                    covered |= content_words(statement.text)
            for sentence in split_sentences(text):
                words = content_words(sentence)
                if not words or len(words & covered) / len(words) >= MIN_SENTENCE_COVERAGE:
                    continue
                if any(jaccard(words, content_words(s.text)) >= similarity for s in self.statements):
                    continue
                self.statements.append(SortedStatement(text=_clean_statement(sentence), kind="unique", sources=[index]))
                covered |= words
                added += 1
        if added:
            problems.append(f"{added} sentences that the sorting left out were added as unique statements")

    def _find(self, text: str) -> Optional[SortedStatement]:
        key = _normalise(text)
        return next((s for s in self.statements if s.kind != "contradictory" and _normalise(s.text) == key), None)

    @staticmethod
    def _not_a_contradiction(members: list[tuple[str, list[int]]]) -> str:
        if len(members) < 2:
            return "has fewer than two usable members"
        if len({source for _, sources in members for source in sources}) < 2:
            return "comes from a single description"
        for i, (first, _) in enumerate(members):
            for j, (second, _) in enumerate(members):
                if i != j and content_words(first) <= content_words(second):
                    return f"is no contradiction, because {second!r} only adds to {first!r}"
        return ""


# ---------------------------------------------------------------------------------------------
# Sorting without the LLM


def sort_by_sentences(statement_set: StatementSet, similarity: float) -> list[SortedStatement]:
    """Group sentences of different descriptions whose content-word Jaccard is at least ``similarity``.

    Sentences with the same content words are one member stated by several descriptions. A
    group in which one member's content words occur in every other member is consistent, in
    that member's wording, because the others only add details. A group whose members each
    have words the others lack ("a red car" and "a blue car") is contradictory, so its members
    are scored. A sentence in no group is unique.
    """
    clusters: list[list[tuple[int, str, frozenset[str]]]] = []
    for index, source in enumerate(statement_set.sources):
        for sentence in split_sentences(source.text):
            words = frozenset(content_words(sentence))
            if not words:
                continue
            best: Optional[list[tuple[int, str, frozenset[str]]]] = None
            best_similarity = 0.0
            for cluster in clusters:
                if any(member[0] == index for member in cluster):
                    continue
                value = max(jaccard(words, member[2]) for member in cluster)
                if value >= similarity and value > best_similarity:
                    best, best_similarity = cluster, value
            if best is None:
                clusters.append([(index, _clean_statement(sentence), words)])
            else:
                best.append((index, _clean_statement(sentence), words))

    statements: list[SortedStatement] = []
    group = 0
    for cluster in clusters:
        members: list[tuple[str, list[int], frozenset[str]]] = []
        for index, text, words in cluster:
            same = next((m for m in members if m[2] == words), None)
            if same is None:
                members.append((text, [index], words))
            else:
                same[1].append(index)

        if len(members) == 1:
            text, sources, _ = members[0]
            kind: StatementKind = "consistent" if len(sources) >= 2 else "unique"
            statements.append(SortedStatement(text=text, kind=kind, sources=sorted(sources)))
            continue

        core = [m for m in members if all(m[2] <= other[2] for other in members)]
        if core:
            text = min((m[0] for m in core), key=len)
            sources = sorted({index for m in members for index in m[1]})
            statements.append(SortedStatement(text=text, kind="consistent", sources=sources))
        else:
            statements.extend(
                SortedStatement(text=text, kind="contradictory", sources=sorted(sources), group=group)
                for text, sources, _ in members
            )
            group += 1
    return statements


def _sentences_as_unique(statement_set: StatementSet) -> list[SortedStatement]:
    statements: list[SortedStatement] = []
    for index, source in enumerate(statement_set.sources):
        for sentence in split_sentences(source.text):
            if content_words(sentence):
                statements.append(SortedStatement(text=_clean_statement(sentence), kind="unique", sources=[index]))
    return statements


# ---------------------------------------------------------------------------------------------
# Scoring


def score_statements(
    image: Optional[Image.Image],
    statement_set: StatementSet,
    sorted_set: SortedSet,
    scorer: Optional[Scorer],
    threshold: Optional[float],
    progress: Optional[ProgressCallback] = None,
    stage: str = "filter",
) -> tuple[list[Statement], list[Fallback]]:
    """Apply the keep rules and return the set's Statement records and any fallbacks.

    Consistent statements are kept without scoring. Each contradictory group keeps its best
    member if that member's score on ``statement_set.box`` is above the threshold. A unique
    statement is kept if its score on the box of its own description is above the threshold.
    The scorer is called once per distinct box. Without a scorer, unique statements are kept
    unverified, each group keeps the member that most descriptions state (the first on a tie),
    and one fallback per set records it.
    """
    fallbacks: list[Fallback] = []
    statements = [_record(statement_set, sorted_statement) for sorted_statement in sorted_set.statements]
    to_score = [i for i, s in enumerate(sorted_set.statements) if s.kind != "consistent"]

    for i, sorted_statement in enumerate(sorted_set.statements):
        if sorted_statement.kind == "consistent":
            statements[i].kept = True

    if scorer is None or image is None:
        if to_score:
            reason = (
                f"no scorer: {sum(1 for i in to_score if sorted_set.statements[i].kind == 'unique')} unique "
                "statements were kept unverified, and each contradictory group kept the version that most "
                "descriptions state"
            )
            logger.warning("Score: %s: %s.", statement_set.name, reason)
            fallbacks.append(Fallback(stage, statement_set.name, reason))
        for i in to_score:
            if sorted_set.statements[i].kind == "unique":
                statements[i].kept = True
        for members in _groups(sorted_set.statements).values():
            best = max(members, key=lambda i: (len(sorted_set.statements[i].sources), -i))
            statements[best].kept = True
        return statements, fallbacks

    by_box: dict[tuple[float, ...], list[int]] = {}
    for i in to_score:
        sorted_statement = sorted_set.statements[i]
        if sorted_statement.kind == "contradictory":
            box = statement_set.box
        else:
            box = statement_set.sources[sorted_statement.sources[0]].box
        by_box.setdefault(tuple(box.to_list()), []).append(i)

    for box_values, indexes in by_box.items():
        crop = crop_box(image, Box(*box_values))
        texts = [statements[i].text for i in indexes]
        start = time.perf_counter()
        scores = list(scorer.score(crop, texts))
        if len(scores) != len(texts):
            raise RuntimeError(f"The scorer returned {len(scores)} scores for {len(texts)} statements.")
        logger.info(
            "Scored %d statements of %s on box %s in %.1f s.",
            len(texts),
            statement_set.name,
            [round(v) for v in box_values],
            time.perf_counter() - start,
        )
        if progress is not None:
            progress("score")
        for i, value in zip(indexes, scores):
            value = float(value)
            statements[i].score = value if math.isfinite(value) else None

    if threshold is None:
        threshold = float(scorer.default_threshold)
    for i in to_score:
        if sorted_set.statements[i].kind == "unique":
            statements[i].kept = _above(statements[i].score, threshold)
    for members in _groups(sorted_set.statements).values():
        best = max(members, key=lambda i: (_score_key(statements[i].score), -i))
        statements[best].kept = _above(statements[best].score, threshold)
    return statements, fallbacks


def crop_box(image: Image.Image, box: Box) -> Image.Image:
    """Crop ``box`` clipped to the image, at least one pixel wide and high."""
    x0 = min(max(0, math.floor(box.x0)), image.width - 1)
    y0 = min(max(0, math.floor(box.y0)), image.height - 1)
    x1 = max(x0 + 1, min(image.width, math.ceil(box.x1)))
    y1 = max(y0 + 1, min(image.height, math.ceil(box.y1)))
    return image.crop((x0, y0, x1, y1))


def _record(statement_set: StatementSet, sorted_statement: SortedStatement) -> Statement:
    """Build the Statement; source_patch and sample_index are set when all its sources share them."""
    sources = [statement_set.sources[i] for i in sorted_statement.sources]
    patches = {source.patch for source in sources}
    samples = {source.sample_index for source in sources}
    return Statement(
        patch=statement_set.name,
        text=sorted_statement.text,
        kind=sorted_statement.kind,
        source_patch=patches.pop() if len(patches) == 1 else statement_set.name,
        sample_index=next(iter(samples)) if len(samples) == 1 else None,
        group=sorted_statement.group,
        sample_indexes=sorted(index for index in samples if index is not None),
    )


def _groups(statements: Sequence[SortedStatement]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, statement in enumerate(statements):
        if statement.kind == "contradictory" and statement.group is not None:
            groups.setdefault(statement.group, []).append(i)
    return groups


def _above(score: Optional[float], threshold: float) -> bool:
    return score is not None and score > threshold


def _score_key(score: Optional[float]) -> float:
    return -math.inf if score is None else score


# ---------------------------------------------------------------------------------------------
# Word overlap


def content_words(text: str) -> set[str]:
    """Return the lower-cased content words of ``text`` without stopwords.

    Endings -s, -ies, -ing and -ed are cut so that "walks", "walking" and "walked" match. The cut
    is a rough stem, good enough for overlap but not for display.
    """
    words = set()
    for word in _WORD.findall(text.lower()):
        if word in _STOPWORDS:
            continue
        if len(word) > 4 and word.endswith("ies"):
            word = word[:-3] + "y"
        elif len(word) > 5 and word.endswith("ing"):
            word = word[:-3]
        elif len(word) > 4 and word.endswith("ed") and not word.endswith("eed"):
            word = word[:-2]
        elif len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        words.add(word)
    return words


def jaccard(first: set[str] | frozenset[str], second: set[str] | frozenset[str]) -> float:
    """Return the Jaccard similarity of two word sets; 0 when both are empty."""
    union = first | second
    return len(first & second) / len(union) if union else 0.0


def _normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def _clean_statement(text: str) -> str:
    return " ".join(text.split()).strip(" \"'`-*•")


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

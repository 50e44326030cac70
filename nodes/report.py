"""Readable text report of the filter stage: kept and dropped statements with their scores."""

from __future__ import annotations

from patch_matters_core.types import FilteredDescriptions, Statement

_SORTING_NAMES = {
    "llm": "sorted by the LLM",
    "llm_retry": "sorted by the LLM on the second try",
    "sentence_fallback": "LLM sorting unusable, grouped by word overlap",
}


def _statement_line(statement: Statement) -> str:
    score = "  -  " if statement.score is None else f"{statement.score:.2f}"
    kind = statement.kind
    if statement.group is not None:
        kind = f"{kind} #{statement.group}"
    return f"  {score}  {kind:<17} {statement.text}"


def filter_report(filtered: FilteredDescriptions, threshold: float | None = None) -> str:
    """Return one block per filtered set: its sorting path, then the kept and dropped statements.

    A score of "-" marks a statement that was not scored (consistent statements are kept
    without scoring).
    """
    lines: list[str] = []
    if threshold is not None:
        lines.append(f"Statements need an image-text score above {threshold:.2f} to be kept.")
    for name, filtered_set in filtered.sets.items():
        kept = [s for s in filtered_set.statements if s.kept]
        dropped = [s for s in filtered_set.statements if not s.kept]
        sorting = _SORTING_NAMES.get(filtered_set.sorting_path, filtered_set.sorting_path)
        lines.append("")
        lines.append(f"{name} ({sorting}): {len(kept)} kept, {len(dropped)} dropped")
        if kept:
            lines.append(" kept:")
            lines.extend(_statement_line(s) for s in kept)
        if dropped:
            lines.append(" dropped:")
            lines.extend(_statement_line(s) for s in dropped)
    for fallback in filtered.fallbacks:
        lines.append("")
        lines.append(f"fallback in {fallback.stage} ({fallback.patch or 'all patches'}): {fallback.reason}")
    return "\n".join(lines).strip()

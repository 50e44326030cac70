"""Stopping a generated reply early: when it contains one complete JSON value, or when it loops.

A model asked for JSON often keeps writing after the closing brace (an explanation, a second
copy), and a small model may never emit its end-of-sequence token. Stopping at the close saves
those tokens without changing what the parser reads.

Small models also fall into loops: the same line, phrase or JSON entry again and again until
the token limit. Once the end of a reply repeats one passage several times over, no new content
can follow, so generation stops and the reply is cut after the passage's first copy.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional, Sequence

from .base import Generation

# A reply loops when its end is one passage repeated at least this many times in a row...
MIN_COPIES = 3
# ...and the repeated part is at least this many characters long, so that "ha ha ha" or a row
# of dots in ordinary text does not count.
MIN_REPEATED_CHARACTERS = 64
# Longest passage, in characters, that the check looks for.
MAX_PERIOD = 400
# New tokens between two loop checks of one row.
CHECK_INTERVAL = 8

_DIGIT = re.compile(r"\d")


def json_value_closed(text: str) -> bool:
    """Return True when ``text`` contains a JSON object or array whose brackets are all closed.

    Brackets inside JSON strings, including escaped quotes, do not count.
    """
    depth = 0
    opened = False
    in_string = False
    escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = opened
        elif char in "{[":
            depth += 1
            opened = True
        elif char in "}]" and opened:
            depth -= 1
            if depth == 0:
                return True
    return False


def repetition_cut(text: str) -> Optional[int]:
    """Return where to cut ``text`` so that a passage repeated at its end is kept once, or None.

    The end of the text loops when one passage of 1 to ``MAX_PERIOD`` characters occurs there at
    least ``MIN_COPIES`` times in a row, covering at least ``MIN_REPEATED_CHARACTERS``. Digits
    count as equal, so a loop that counts ("item 8", "item 9", ...) is found too. The returned
    length keeps the text before the loop and one copy of the passage.
    """
    normalized = _DIGIT.sub("0", text)
    length = len(normalized)
    for period in range(1, min(MAX_PERIOD, length // MIN_COPIES) + 1):
        needed = max(MIN_COPIES, -(-MIN_REPEATED_CHARACTERS // period))
        if needed * period > length:
            continue
        block = normalized[length - period:]
        copies = 1
        while (copies + 1) * period <= length and normalized.endswith(block, 0, length - copies * period):
            copies += 1
        if copies >= needed:
            return length - (copies - 1) * period
    return None


def cut_repetition(text: str) -> tuple[str, bool]:
    """Return ``text`` cut after the first copy of a passage that its end repeats, and whether it was cut."""
    cut = repetition_cut(text)
    if cut is None:
        return text, False
    return text[:cut].rstrip(), True


def reply_stopping_criteria(tokenizer: Any, prompt_length: int, prefills: Sequence[str], json_rows: Sequence[bool]):
    """Build a transformers StoppingCriteria that ends each row once its JSON closes or it loops.

    ``json_rows[i]`` makes row i stop at its first complete JSON value, and every row stops when it
    loops (see ``repetition_cut``). ``prefills[i]`` is the text the prompt already put at the
    start of the reply. The returned object's ``stopped_at[i]`` is the number of new tokens row i
    had when it stopped, or None, and ``reasons[i]`` is "json", "repetition" or None.
    """
    import torch
    from transformers import StoppingCriteria

    class ReplyStop(StoppingCriteria):
        def __init__(self) -> None:
            self.stopped_at: list[Optional[int]] = [None] * len(prefills)
            self.reasons: list[Optional[str]] = [None] * len(prefills)

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            new_count = int(input_ids.shape[1]) - prompt_length
            check_loop = new_count % CHECK_INTERVAL == 0
            for row in range(min(len(prefills), input_ids.shape[0])):
                if self.stopped_at[row] is not None:
                    done[row] = True
                    continue
                if not (json_rows[row] or check_loop):
                    continue
                text = prefills[row] + tokenizer.decode(input_ids[row, prompt_length:], skip_special_tokens=True)
                if json_rows[row] and json_value_closed(text):
                    reason = "json"
                elif check_loop and repetition_cut(text) is not None:
                    reason = "repetition"
                else:
                    continue
                self.stopped_at[row] = new_count
                self.reasons[row] = reason
                done[row] = True
            return done

    return ReplyStop()


def warn_cut_outputs(
    results: Sequence[Generation], label: str, max_new_tokens: int, logger: logging.Logger
) -> None:
    """Log one warning for the outputs cut after a repeated passage and one for those cut at the token limit."""
    repeated = sum(1 for result in results if result.repeated)
    if repeated:
        logger.warning(
            "%d of %d %s outputs kept repeating one passage, so generation stopped and each was cut after "
            "the passage's first copy.",
            repeated,
            len(results),
            label,
        )

    limited = sum(1 for result in results if result.hit_token_limit)
    if limited:
        logger.warning(
            "%d of %d %s outputs stopped at max_new_tokens=%d before the end-of-sequence token, so "
            "they may be cut off mid-sentence.",
            limited,
            len(results),
            label,
            max_new_tokens,
        )

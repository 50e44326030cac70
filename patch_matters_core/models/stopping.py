"""Stopping a generated reply as soon as it contains one complete JSON value.

A model asked for JSON often keeps writing after the closing brace (an explanation, a second
copy), and a small model may never emit its end-of-sequence token. Stopping at the close saves
those tokens without changing what the parser reads.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence


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


def json_stopping_criteria(tokenizer: Any, prompt_length: int, prefills: Sequence[str], rows: Sequence[bool]):
    """Build a transformers StoppingCriteria that ends each selected row once its JSON closes.

    ``rows[i]`` selects row i; ``prefills[i]`` is the text the prompt already put at the start of
    its reply. The returned object's ``closed_at[i]`` is the number of new tokens row i had when
    it closed, or None.
    """
    import torch
    from transformers import StoppingCriteria

    class JsonClosed(StoppingCriteria):
        def __init__(self) -> None:
            self.closed_at: list[Optional[int]] = [None] * len(rows)

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for row, selected in enumerate(rows):
                if self.closed_at[row] is not None:
                    done[row] = True
                    continue
                if not selected:
                    continue
                new_ids = input_ids[row, prompt_length:]
                text = prefills[row] + tokenizer.decode(new_ids, skip_special_tokens=True)
                if json_value_closed(text):
                    self.closed_at[row] = int(new_ids.shape[0])
                    done[row] = True
            return done

    return JsonClosed()

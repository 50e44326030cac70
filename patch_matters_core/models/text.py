"""Cleaning of generated text, sentence splitting and JSON extraction from model output.

Chat models wrap their response in things a caption must not contain: special tokens left by
decoding, reasoning blocks, chatty openings ("Sure! Here's a detailed description:"), role
labels, markdown and numbered lists. ``clean_generated_text`` removes them and returns one
paragraph of plain sentences.
"""

from __future__ import annotations

import ast
import json
import re
import unicodedata
from typing import Any, Optional

# Tokens after which a chat model's turn is over; text after them belongs to a new turn.
_END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_utterance>",
    "<end_of_turn>",
    "</s>",
    "<eos>",
)

# Special tokens removed wherever they appear. ``<|...|>`` tokens are removed by a pattern.
_SPECIAL_TOKENS = re.compile(
    r"<\|im_start\|>\s*(?:system|user|assistant)?"
    r"|<start_of_turn>\s*(?:user|model)?"
    r"|<\|start_header_id\|>\s*\w*\s*<\|end_header_id\|>"
    r"|<\|[^<>|]{1,40}\|>"
    r"|</?s>|<pad>|<unk>|<bos>|<eos>|<end_of_utterance>|<end_of_turn>"
    r"|<fake_token_around_image>|<global-img>|<image>|<row_\d+_col_\d+>"
    r"|\[/?INST\]|<<SYS>>|<</SYS>>"
)

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)

# A new turn that the model invented after its response, such as "\nUser: ...".
_INVENTED_TURN = re.compile(r"\n\s*(?:user|human|###\s*(?:user|instruction))\s*:", re.IGNORECASE)

_ROLE_LABEL = re.compile(r"^\s*(?:assistant|ai|bot|gpt|model)\s*:\s*", re.IGNORECASE)

# Chatty openings that carry no content. Each is removed only at the start of the response.
_PREAMBLES = (
    re.compile(r"^(?:sure|certainly|of course|absolutely|okay|ok|alright|great)\b[!.,]+(?:\s|$)", re.IGNORECASE),
    re.compile(r"^i'?d be (?:happy|glad) to[^.!:\n]{0,100}[.!:]\s*", re.IGNORECASE),
    re.compile(
        r"^here(?:'s|\s+is|\s+are)\b[^.!:\n]{0,100}?"
        r"\b(?:description|caption|summary|merged|combined|rewritten|revised|version|answer|result|"
        r"response|output|paragraph|list|json|text)\b[^.!:\n]{0,60}[.!:]\s*",
        re.IGNORECASE,
    ),
    re.compile(
        r"^(?:the\s+)?(?:(?:final|merged|combined|detailed|enhanced|new|image|improved)\s+)*"
        r"(?:description|caption|summary|answer|output|response)(?:\s+of\s+the\s+image)?(?:\s+is)?\s*:\s*",
        re.IGNORECASE,
    ),
)

_MARKDOWN_HEADER = re.compile(r"^\s*#{1,6}\s+(.*)$")
_CODE_FENCE_LINE = re.compile(r"^\s*```[\w-]*\s*$")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+\u2022]|\d{1,3}[.)]|\(?[a-z][.)])\s+(.*)$")
_EMPHASIS = re.compile(r"(\*\*|__)(.+?)\1|(?<![\w*])\*(?!\s)([^*\n]+?)(?<!\s)\*(?![\w*])")
_QUOTE_PAIRS = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`"}

# Unicode categories of characters that a caption never contains: control characters (Cc)
# and lone surrogate halves (Cs), which byte-level decoding can leave behind.
_UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cs"})
# U+FFFD, which decoding puts where a token ended inside a multi-byte UTF-8 character.
_REPLACEMENT_CHARACTER = "\ufffd"


def clean_generated_text(raw: str, prefill: str = "") -> str:
    """Turn a decoded model response into one paragraph of plain text.

    ``prefill`` is the text the assistant turn was started with. It is put in front of ``raw``
    unless ``raw`` already starts with it. When it is not blank, the start of the response is
    kept as it is (no role label or opening phrase can precede a prefill).

    Control characters other than whitespace, lone surrogates and U+FFFD replacement
    characters are removed first. The text is cut at the first end-of-turn token or invented
    new turn. Then reasoning
    blocks, special tokens, role labels, chatty openings, markdown headers, emphasis and code
    fences are removed. List items become sentences, quotes around the whole response are
    removed and whitespace is collapsed.

    A ``<think>`` block that is never closed is dropped up to the end, because a model stopped
    in mid-reasoning has produced no response yet, so the result is empty. A ``</think>``
    without an opening tag drops the text before it, because some chat templates open the
    reasoning block in the prompt.
    """
    text = raw or ""
    if prefill and not text.startswith(prefill):
        text = prefill + text

    text = _remove_unprintable(text)
    text = _cut_after_turn(text)
    text = _remove_reasoning(text)
    text = _SPECIAL_TOKENS.sub(" ", text)

    if not prefill.strip():
        text = _remove_opening(text)

    text = _flatten_markdown(text)
    text = _strip_surrounding_quotes(text.strip())
    return re.sub(r"\s+", " ", text).strip()


def _remove_unprintable(text: str) -> str:
    """Remove control characters, surrogates and U+FFFD; whitespace controls (newline, tab) stay."""
    return "".join(
        char
        for char in text
        if char.isspace()
        or (char != _REPLACEMENT_CHARACTER and unicodedata.category(char) not in _UNPRINTABLE_CATEGORIES)
    )


def _cut_after_turn(text: str) -> str:
    """Cut the text at the first end-of-turn token that follows some content."""
    cut = len(text)
    for token in _END_OF_TURN_TOKENS:
        start = 0
        while True:
            index = text.find(token, start)
            if index < 0:
                break
            if _SPECIAL_TOKENS.sub("", text[:index]).strip():
                cut = min(cut, index)
                break
            start = index + len(token)

    invented = _INVENTED_TURN.search(text, 0, cut)
    if invented and text[: invented.start()].strip():
        cut = min(cut, invented.start())
    return text[:cut]


def _remove_reasoning(text: str) -> str:
    text = _THINK_BLOCK.sub(" ", text)

    closing = re.search(r"</think>", text, re.IGNORECASE)
    if closing:
        text = text[closing.end():]

    opening = re.search(r"<think>", text, re.IGNORECASE)
    if opening:
        text = text[: opening.start()]
    return text


def _remove_opening(text: str) -> str:
    """Remove role labels and chatty opening phrases, repeatedly, from the start of the response."""
    text = text.lstrip()
    while True:
        before = text
        text = _ROLE_LABEL.sub("", text).lstrip()
        for pattern in _PREAMBLES:
            text = pattern.sub("", text, count=1).lstrip()
        if text == before:
            return text


def _flatten_markdown(text: str) -> str:
    """Remove headers, emphasis and code fences, and turn list items into sentences."""
    lines = [line for line in text.splitlines() if not _CODE_FENCE_LINE.match(line)]

    headers = [i for i, line in enumerate(lines) if _MARKDOWN_HEADER.match(line)]
    has_body = any(line.strip() and i not in headers for i, line in enumerate(lines))
    pieces = []
    for i, line in enumerate(lines):
        header = _MARKDOWN_HEADER.match(line)
        if header:
            # A header above other text is a title such as "### Merged description" and is
            # dropped, but a header that is the whole response is kept as text.
            if not has_body:
                pieces.append(header.group(1))
            continue

        line = _EMPHASIS.sub(lambda m: m.group(2) or m.group(3), line)
        item = _LIST_ITEM.match(line)
        if item:
            line = _as_sentence(item.group(1))
        pieces.append(line)
    return "\n".join(pieces)


def _as_sentence(item: str) -> str:
    item = item.strip()
    if not item:
        return item
    item = item[0].upper() + item[1:]
    if item[-1] not in ".!?:;\"')":
        item += "."
    return item


def _strip_surrounding_quotes(text: str) -> str:
    """Remove one pair of quotes around the whole text when no quote of that kind is inside."""
    if len(text) < 2:
        return text
    opening = text[0]
    closing = _QUOTE_PAIRS.get(opening)
    if closing is None or text[-1] != closing:
        return text
    inner = text[1:-1]
    if opening in inner or closing in inner:
        return text
    return inner.strip()


# Words that end with a period without ending a sentence, compared in lower case.
_ABBREVIATIONS = frozenset(
    {
        "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "approx", "fig", "figs",
        "cf", "inc", "ltd", "co", "corp", "no", "nos", "vol", "mt", "ft", "lt", "sgt", "gen",
        "col", "capt", "rev", "ave", "blvd", "rd", "dept", "est", "e.g", "i.e", "a.m", "p.m",
        "u.s", "u.k", "approx", "ca", "al",
    }
)
_BOUNDARY = re.compile(r"([.!?]+|\u2026)[\"'\u201d\u2019)\]]*\s+|\n\s*")
_DOTTED_INITIALS = re.compile(r"^(?:[A-Za-z]\.)+[A-Za-z]$")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences, keeping abbreviations, initials and decimals inside them.

    A sentence ends at ".", "!", "?" or an ellipsis followed by whitespace, or at a line break.
    A period after an abbreviation ("Mr.", "e.g.", "etc."), after a single capital letter (an
    initial) or inside a number ("3.5") ends nothing. Text after the last punctuation mark is
    returned as the last sentence. Empty sentences are dropped.
    """
    sentences = []
    start = 0
    for boundary in _BOUNDARY.finditer(text or ""):
        punctuation = boundary.group(1)
        if punctuation == "." and _is_abbreviation(text, boundary.start()):
            continue
        sentence = text[start:boundary.end()].strip()
        if sentence:
            sentences.append(re.sub(r"\s+", " ", sentence))
        start = boundary.end()

    rest = (text or "")[start:].strip()
    if rest:
        sentences.append(re.sub(r"\s+", " ", rest))
    return sentences


def _is_abbreviation(text: str, period_index: int) -> bool:
    """Tell whether the period at ``period_index`` closes an abbreviation or an initial."""
    word_start = period_index
    while word_start > 0 and not text[word_start - 1].isspace() and text[word_start - 1] not in "(\"'":
        word_start -= 1
    word = text[word_start:period_index]
    if not word:
        return False
    if word.lower() in _ABBREVIATIONS or _DOTTED_INITIALS.match(word):
        return True
    return len(word) == 1 and word.isupper()


_TRAILING_COMMA = re.compile(r",\s*([\]}])")
_FENCED_BLOCK = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)
_SMART_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})


def extract_json(text: str) -> Optional[Any]:
    """Find and parse the first JSON object or array in a model response; None when none parses.

    Code fences (```json ... ```) are searched first, then the whole text from each ``{`` or
    ``[`` in order. Trailing commas before ``]`` or ``}`` and curly quotes are repaired, and a
    Python literal with single quotes is accepted. An array or object cut off at the end of
    the text, as when a model stops at its token limit, is closed after its last complete
    element.
    """
    if not text:
        return None

    for block in _FENCED_BLOCK.findall(text):
        value = _parse_from_first_bracket(block)
        if value is not None:
            return value
    return _parse_from_first_bracket(text)


def _parse_from_first_bracket(text: str) -> Optional[Any]:
    text = text.translate(_SMART_QUOTES)
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        start = match.start()

        try:
            value, _ = decoder.raw_decode(text, start)
            return value
        except json.JSONDecodeError:
            pass

        span = _balanced_span(text, start)
        if span is not None:
            value = _parse_repaired(span)
        else:
            value = _parse_truncated(text[start:])
        if value is not None:
            return value
    return None


def _parse_repaired(span: str) -> Optional[Any]:
    repaired = _TRAILING_COMMA.sub(r"\1", span)
    try:
        return json.loads(repaired)
    except json.JSONDecodeError:
        pass
    try:
        value = ast.literal_eval(repaired)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None
    return value if isinstance(value, (list, dict)) else None


def _balanced_span(text: str, start: int) -> Optional[str]:
    """Return text[start:] up to the bracket that closes the one at ``start``, or None."""
    stack = []
    quote = None
    escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
            continue
        if char in "\"'":
            # A single quote inside a word ("dog's") is an apostrophe, not a string.
            if char == "'" and index > 0 and text[index - 1].isalnum():
                continue
            quote = char
        elif char in "[{":
            stack.append("]" if char == "[" else "}")
        elif char in "]}":
            if not stack or char != stack.pop():
                return None
            if not stack:
                return text[start:index + 1]
    return None


def _parse_truncated(text: str) -> Optional[Any]:
    """Close an array or object that the text ends inside of, after its last complete element."""
    stack = []
    quote = None
    escaped = False
    # Positions just after a complete element at which the open brackets can be closed.
    last_complete: Optional[tuple[int, list[str]]] = None
    for index, char in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
                if stack and stack[-1] == "]":
                    last_complete = (index + 1, list(stack))
            continue
        if char == '"':
            quote = char
        elif char in "[{":
            stack.append("]" if char == "[" else "}")
        elif char in "]}":
            if not stack or char != stack.pop():
                return None
            if stack:
                last_complete = (index + 1, list(stack))
        elif char == "," and stack:
            last_complete = (index, list(stack))

    if not stack or last_complete is None:
        return None
    end, open_brackets = last_complete
    candidate = text[:end].rstrip().rstrip(",") + "".join(reversed(open_brackets))
    try:
        return json.loads(_TRAILING_COMMA.sub(r"\1", candidate))
    except json.JSONDecodeError:
        return None

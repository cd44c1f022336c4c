"""The AUTOMATIC1111 prompt syntax as text: attention weights, BREAK and LoRA tags.

No torch here, so the bot can validate prompts and resolve `<lora:…>` tags before a job
is queued; `pipeline.prompts.encoding` turns the parsed text into embeddings on a worker.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pipeline.contract.jobs import JobError

BREAK = "BREAK"

# A1111 modules/prompt_parser.py, verbatim: the order of the alternatives is the grammar.
_RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_RE_LORA = re.compile(r"<(?:lora|lyco):([^>]*)>", re.I)
_ROUND = 1.1
_SQUARE = 1 / 1.1


def extract_loras(text: str, *, max_weight: float = 4.0) -> tuple[str, list[tuple[str, float]]]:
    """Remove `<lora:name:w>` / `<lyco:name:w>` tags; return the text and (name, weight) pairs.

    Fields after the weight (A1111's separate UNet weight, named args) are ignored.
    """
    loras: list[tuple[str, float]] = []

    def take(match: re.Match[str]) -> str:
        loras.append(_parse_lora_tag(match.group(1), max_weight))
        return ""

    return _RE_LORA.sub(take, text), loras


def _parse_lora_tag(body: str, max_weight: float) -> tuple[str, float]:
    fields = body.split(":")
    name = fields[0].strip()
    if not name:
        raise JobError(f"a LoRA tag needs a name: <lora:{body}>")
    raw = fields[1].strip() if len(fields) > 1 else ""
    try:
        weight = float(raw) if raw else 1.0
    except ValueError:
        raise JobError(f"LoRA '{name}' weight must be a number, not {raw!r}") from None
    if not (math.isfinite(weight) and -max_weight <= weight <= max_weight):
        raise JobError(
            f"LoRA '{name}' weight must be between {-max_weight:g} and {max_weight:g}, not {raw}"
        )
    return name, weight


def strip_loras(text: str) -> str:
    """Drop any LoRA tag without validating it: text that reaches the encoder."""
    return _RE_LORA.sub("", text)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split text into (text, weight) runs exactly as A1111's parser does.

    >>> parse_prompt_attention("a (b:1.5) c")
    [('a ', 1.0), ('b', 1.5), (' c', 1.0)]

    Unclosed brackets apply to the end of the prompt; stray closers are literal text.
    BREAK markers come back as ("BREAK", -1.0). Two deliberate differences from A1111,
    both where it would misbehave: a weight like `(x:1.2.3)` that is no number is kept
    as literal text (A1111 raises), and brackets around a BREAK leave the marker alone
    (A1111 scales it to -1.1 and then encodes the word "BREAK").
    """
    res: list[list[Any]] = []  # [text, weight, is_break]
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for item in res[start:]:
            if not item[2]:
                item[1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        number = _float_or_none(weight)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0, False])
        elif piece == "(":
            round_brackets.append(len(res))
        elif piece == "[":
            square_brackets.append(len(res))
        elif number is not None and round_brackets:
            multiply_range(round_brackets.pop(), number)
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), _ROUND)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), _SQUARE)
        else:
            for i, part in enumerate(_RE_BREAK.split(piece)):
                if i > 0:
                    res.append([BREAK, -1.0, True])
                res.append([part, 1.0, False])

    for pos in round_brackets:
        multiply_range(pos, _ROUND)
    for pos in square_brackets:
        multiply_range(pos, _SQUARE)
    return _merge_runs(res)


def _float_or_none(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _merge_runs(res: list[list[Any]]) -> list[tuple[str, float]]:
    """Join neighbours of equal weight, as A1111 does (so `(a)(b)` is one run)."""
    if not res:
        return [("", 1.0)]
    merged = [res[0]]
    for item in res[1:]:
        last = merged[-1]
        if item[1] == last[1] and not item[2] and not last[2]:
            last[0] += item[0]
        else:
            merged.append(item)
    return [(text, float(weight)) for text, weight, _ in merged]

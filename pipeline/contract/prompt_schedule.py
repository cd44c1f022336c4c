"""AUTOMATIC1111's prompt editing, alternation and `AND`, as text (no torch).

- `[from:to:when]` uses `from` up to step `when`, then `to`; `[to:when]` adds `to` after
  `when`; `[from::when]` drops `from` after it. `when` with a decimal point is a fraction
  of the steps (`0.25`), without one a step count (`5`): A1111's default since 1.6.
- `[a|b|c]` cycles a, b, c, a… one per step.
- `a AND b :1.2` is composable diffusion: one noise prediction per part, combined by
  weight (`pipeline.generate.conditioning` does the math).

The parser is ours, written to give A1111's results (its own doctest table is in
tests/test_prompt_schedule.py): A1111 parses with a lark grammar, we with a small
recursive descent over the same shapes. Text that is no valid editing syntax stays as
it is, brackets and all, and reaches the attention parser (`prompt_syntax`) unchanged.
One deliberate difference: a `|` that does not form an alternation is text here; in
A1111 1.10 it makes the whole prompt literal, which its own doctest
`a [{b|d{:.5] c` shows was not intended.

`check_prompt_schedule` refuses, before a job is queued, what would silently not do what
the member wrote: a negative `when`, a fraction above 1, more `AND` parts than the
limit, and a '[' that is never closed whose own words are editing or alternation syntax
(`a [cat:dog:5`). Every other prompt A1111 reads, malformed ones included, is accepted
with A1111's meaning (docs/DECISIONS.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

# lark's SIGNED_NUMBER: [+-] then an integer, a decimal (`1.`, `.5`, `1.5`), exponent allowed.
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_WHEN_CLOSE = re.compile(rf"\s*({_NUMBER})\s*\]")
_PLAIN = re.compile(r"[^\\()\[\]:|]+")
_PLAIN_WITH_BAR = re.compile(r"[^\\()\[\]:]+")
_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*$")
_TRAILING_SPACE = re.compile(r"\s+$")


@dataclass
class _Edit:
    """`[before:after:when]`; `before` is None for the two-part form."""

    before: list | None
    after: list
    when: str
    start: int  # position of the `[` in the prompt, for messages
    end: int
    step: int = 0  # `when` resolved against a step count


@dataclass
class _Alternation:
    options: list[list]


# --- parsing ------------------------------------------------------------------------


def parse(text: str) -> list:
    """The prompt as a list of nodes: str (literal text), _Edit or _Alternation."""
    nodes, _ = _sequence(text, 0, top=True)
    return nodes


def _sequence(text: str, i: int, *, top: bool, bar_is_text: bool = False) -> tuple[list, int]:
    """Nodes up to a `:`, `|`, `)` or `]` that ends this level (top level: to the end).

    Returns (nodes, position); nested, a bracket that cannot be parsed returns ([], -1).
    """
    nodes: list = []
    plain = _PLAIN_WITH_BAR if bar_is_text or top else _PLAIN
    while i < len(text):
        char = text[i]
        if char == "\\":
            if i + 1 < len(text):
                nodes.append(text[i : i + 2])
                i += 2
                continue
            nodes.append(char)
            i += 1
            continue
        if char in "([":
            parsed, end = (_round if char == "(" else _square)(text, i)
            if end >= 0:
                nodes.extend(parsed)
                i = end
                continue
            if not top:
                return [], -1
            nodes.append(char)
            i += 1
            continue
        if char in ")]:|" and not (char == "|" and (top or bar_is_text)):
            if not top:
                return nodes, i
            nodes.append(char)
            i += 1
            continue
        match = plain.match(text, i)
        assert match is not None
        nodes.append(match.group(0))
        i = match.end()
    return nodes, i


def _round(text: str, i: int) -> tuple[list, int]:
    """`(prompt)` or `(prompt:prompt)`: emphasis, kept as text for the attention parser."""
    inner, pos = _sequence(text, i + 1, top=False)
    if pos < 0 or pos >= len(text):
        return [], -1
    if text[pos] == ")":
        return ["(", *inner, ")"], pos + 1
    if text[pos] == ":":
        second, end = _sequence(text, pos + 1, top=False)
        if end >= 0 and end < len(text) and text[end] == ")":
            return ["(", *inner, ":", *second, ")"], end + 1
    return [], -1


def _square(text: str, i: int) -> tuple[list, int]:
    parsed, end = _square_once(text, i, bar_is_text=False)
    if end < 0 and "|" in text[i:]:
        # A `|` that forms no alternation is text (A1111's doctest `[{b|d{:.5]`).
        parsed, end = _square_once(text, i, bar_is_text=True)
    return parsed, end


def _square_once(text: str, i: int, *, bar_is_text: bool) -> tuple[list, int]:
    first, pos = _sequence(text, i + 1, top=False, bar_is_text=bar_is_text)
    if pos < 0 or pos >= len(text):
        return [], -1
    char = text[pos]
    if char == "]":  # [prompt]: de-emphasis, text for the attention parser
        return ["[", *first, "]"], pos + 1
    if char == "|":
        options = [first]
        while pos < len(text) and text[pos] == "|":
            option, pos = _sequence(text, pos + 1, top=False)
            if pos < 0:
                return [], -1
            options.append(option)
        if pos < len(text) and text[pos] == "]":
            return [_Alternation(options)], pos + 1
        return [], -1
    if char != ":":
        return [], -1
    # [to:when] or [from:to:when]
    close = _WHEN_CLOSE.match(text, pos + 1)
    if close:
        return [_Edit(None, first, close.group(1), i, close.end())], close.end()
    second, pos = _sequence(text, pos + 1, top=False, bar_is_text=bar_is_text)
    if pos < 0 or pos >= len(text) or text[pos] != ":":
        return [], -1
    close = _WHEN_CLOSE.match(text, pos + 1)
    if not close:
        return [], -1
    return [_Edit(first, second, close.group(1), i, close.end())], close.end()


def _walk(nodes: list) -> Iterator[_Edit | _Alternation]:
    for node in nodes:
        if isinstance(node, _Edit):
            yield node
            yield from _walk(node.before or [])
            yield from _walk(node.after)
        elif isinstance(node, _Alternation):
            yield node
            for option in node.options:
                yield from _walk(option)


def _resolve_when(when: str, steps: int) -> int:
    value = float(when)
    if "." in when:
        value *= steps
    return min(steps, int(value))


def _text_at(nodes: list, step: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            out.append(_text_at(node.before or [] if step <= node.step else node.after, step))
        else:
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step))
    return "".join(out)


# --- schedules ----------------------------------------------------------------------


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """[(last step, text)…]: which text to encode up to which step, as A1111's
    `get_learned_conditioning_prompt_schedules` gives it for one prompt."""
    nodes = parse(text)
    marks = {steps}
    for node in _walk(nodes):
        if isinstance(node, _Edit):
            node.step = _resolve_when(node.when, steps)
            if node.step >= 1:
                marks.add(node.step)
        else:
            marks.update(range(1, steps + 1))
    return [(mark, _text_at(nodes, mark)) for mark in sorted(marks)]


def text_at_step(schedule: list[tuple[int, str]], step: int) -> str:
    """The text for a 0-based step, as A1111 picks it: the first entry whose last step is
    at or after the step counter (so the first text also covers step 0)."""
    for last, text in schedule:
        if step <= last:
            return text
    return schedule[-1][1]


def split_and(prompt: str) -> list[tuple[str, float]]:
    """A1111's composable prompt: parts split at the word AND, each with an optional
    trailing `:weight` (1 when absent). A single part gets a weight too: `a cat:1.5`."""
    parts = []
    for part in _AND.split(prompt):
        match = _PART_WEIGHT.search(part)
        if match:
            parts.append((part[: match.start()], float(match.group(1))))
        else:
            parts.append((_TRAILING_SPACE.sub("", part), 1.0))
    return parts


@dataclass(frozen=True)
class PromptPlan:
    """One sample's conditioning over the steps: the composable parts with their
    weights and schedules, and the negative prompt's schedule (no AND there, as in A1111)."""

    parts: tuple[tuple[float, tuple[tuple[int, str], ...]], ...]
    negative: tuple[tuple[int, str], ...]

    @property
    def plain(self) -> bool:
        """One part at weight 1 and no text changing over the steps."""
        return (
            len(self.parts) == 1
            and self.parts[0][0] == 1.0
            and len(self.parts[0][1]) == 1
            and len(self.negative) == 1
        )

    def texts(self) -> list[str]:
        """Every distinct text this sample encodes, negative ones first."""
        seen = [text for _, text in self.negative]
        for _, schedule in self.parts:
            seen += [text for _, text in schedule]
        return list(dict.fromkeys(seen))


def plan_prompt(prompt: str, negative: str, steps: int) -> PromptPlan:
    """The plan for text already free of LoRA tags, over `steps` denoising evaluations."""
    parts = tuple((w, tuple(prompt_schedule(text, steps))) for text, w in split_and(prompt))
    return PromptPlan(parts, tuple(prompt_schedule(negative, steps)))


# --- validation (the bot, before queueing) --------------------------------------------


def check_prompt_schedule(prompt: str, negative: str, max_parts: int) -> None:
    """Raise JobError with one line when the prompt's editing syntax would not do what
    it says, or it has more AND parts than `max_parts`."""
    from pipeline.contract.jobs import JobError

    parts = len(_AND.split(prompt))
    if parts > max_parts:
        raise JobError(
            f"the prompt has {parts} parts joined by AND; the limit is {max_parts} "
            "(each part costs one more model pass per step)"
        )
    for label, text in (("prompt", prompt), ("negative prompt", negative)):
        nodes = parse(text)
        for node in _walk(nodes):
            if isinstance(node, _Edit):
                _check_when(label, text[node.start : node.end], node.when)
        _check_unclosed(label, text)


def _check_when(label: str, fragment: str, when: str) -> None:
    from pipeline.contract.jobs import JobError

    value = float(when)
    if value < 0 or ("." in when and value > 1):
        raise JobError(
            f"{fragment} in the {label}: the switch point must be a step count (0 or more) "
            f"or a fraction of the steps from 0 to 1 (like 0.5), not {when}"
        )


def _check_unclosed(label: str, text: str) -> None:
    """Refuse a '[' that A1111 reads as literal text when its own words show the member
    meant prompt editing or alternation.

    A1111 reads every prompt: a '[' that opens no valid editing, alternation or emphasis
    bracket stays in the text, de-emphasising what follows (its doctest
    `((a][:b:c [d:3]` schedules the `[d:3]` and keeps `[:b:c ` as text). We accept all of
    that with A1111's meaning, and speak up only where the literal bracket's own text
    (up to the next bracket that does parse) holds a `:number` or a `|`: `a [cat:dog:5`
    or `a [cat|dog` is a forgotten ']', and encoding it as text would quietly draw a
    different picture.
    """
    from pipeline.contract.jobs import JobError

    for start, own_text in _literal_square_brackets(text):
        if re.search(rf":\s*{_NUMBER}|\|", own_text):
            fragment = text[start : start + 40]
            raise JobError(
                f"the {label} has a '[' that is never closed: {fragment!r}; prompt editing "
                "is [from:to:when] and alternation [a|b] (write \\[ for a literal bracket)"
            )


def _literal_square_brackets(text: str) -> Iterator[tuple[int, str]]:
    """(position, own text) of each top-level '[' that parses as nothing and is never
    closed, walking the top level as `_sequence` does. Its own text is what follows it
    at the top level, leaving out the brackets that do parse (`[d:3]`, `(b:1.2)`)."""
    opened: list[tuple[int, list[str]]] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in "([":
            _, end = (_round if char == "(" else _square)(text, i)
            if end >= 0:
                i = end
                continue
        if char == "[":
            opened.append((i, []))
        elif char == "]" and opened:
            opened.pop()  # closed, just not valid syntax: A1111's text, as the member wrote
        else:
            if char == "\\":  # an escaped character is plain text, `\|` included
                char, i = " ", i + 1
            for _, own in opened:
                own.append(char)
        i += 1
    for start, own in opened:
        yield start, "".join(own)

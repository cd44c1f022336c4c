"""Texts that must fit Discord's 2,000 characters keep every parameter: the prompt gives way.

An infotext is ``prompt``, an optional ``Negative prompt: …`` line and one line of
parameters (``Steps: 20, Sampler: …, Seed: …``), the format A1111 reads back.
Cutting its end would cut the Seed/Steps/Sampler line, the part a member copies;
so the prompt is shortened first (then the negative prompt), and the text says so.
"""

from __future__ import annotations

from pipeline.contract.infotext import _PAIR

ELLIPSIS = "…"


def split_infotext(infotext: str) -> tuple[str, str | None, str]:
    """(prompt, negative prompt or None, parameters line)."""
    lines = infotext.split("\n")
    params = ""
    if lines and len(_PAIR.findall(lines[-1])) >= 3:
        params = lines.pop()
    negative = None
    for i, line in enumerate(lines):
        if line.startswith("Negative prompt:"):
            negative = "\n".join([line[len("Negative prompt:") :].strip(), *lines[i + 1 :]])
            lines = lines[:i]
            break
    return "\n".join(lines), negative, params


def join_infotext(prompt: str, negative: str | None, params: str) -> str:
    lines = [prompt]
    if negative is not None:
        lines.append(f"Negative prompt: {negative}")
    if params:
        lines.append(params)
    return "\n".join(lines)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)] + ELLIPSIS


def fit_infotext(infotext: str, limit: int) -> tuple[str, int]:
    """The infotext within ``limit`` characters, and how many prompt characters were cut
    (0: whole). The parameters line is never cut unless it alone is over the limit."""
    if len(infotext) <= limit:
        return infotext, 0
    prompt, negative, params = split_infotext(infotext)
    cut = 0
    # The prompt gives way first, then the negative prompt; one character for the "…".
    keep = max(0, limit - len(join_infotext("", negative, params)) - 1)
    if keep < len(prompt):
        cut += len(prompt) - keep
        prompt = prompt[:keep] + ELLIPSIS
    text = join_infotext(prompt, negative, params)
    if len(text) > limit and negative is not None:
        keep = max(0, limit - len(join_infotext(prompt, "", params)) - 1)
        cut += len(negative) - keep
        negative = negative[:keep] + ELLIPSIS
        text = join_infotext(prompt, negative, params)
    if len(text) > limit:  # a parameters line alone over the limit: nothing else to give
        text = _cut(text, limit)
    return text, cut


def shortened_note(cut: int) -> str:
    return (
        f"(prompt shortened by {cut} characters to fit Discord's 2,000-character limit; "
        "the PNG's parameters hold it whole)"
    )

"""Per-server word and regex filters on prompts, LoRA names, training names and captions.

Matching runs on a folded copy of the text, so the usual evasions do not work:
A1111 markup (``(word:1.3)``, ``[a|b]``, ``BREAK``, ``<lora:…>``) is stripped; the text
is NFKC-normalised, accents and zero-width/format characters (ZWSP, ZWJ, soft hyphen…)
removed, homoglyphs mapped to Latin through Unicode's confusables table (from the
`confusable_homoglyphs` package), and case-folded. Word filters match whole words and
words spelt out with spacing or punctuation ("n u d e", "n.u.d.e"). Regex filters run on
the folded text with the `regex` module's time limit; a pattern that backtracks
catastrophically on a probe is refused when it is added.

The refusal never names the matched term (repeating it to the member helps nobody).
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import regex

from bot.errors import UserError
from pipeline.contract.prompt_syntax import parse_prompt_attention, strip_loras

REGEX_TIMEOUT_S = 0.05  # one filter on one prompt; prompts are at most a few kB
PROBE_TIMEOUT_S = 0.2
MAX_PATTERN_CHARS = 200
REFUSAL = "your {what} contains a term this server does not allow; rephrase it"
_WORD = re.compile(r"[^\W_]+")
_LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]*)[^>]*>", re.I)


class FilterError(UserError):
    """A filter an admin tried to add that cannot be used; the message says why."""


@functools.lru_cache(maxsize=1)
def _homoglyphs() -> dict[int, str]:
    """Non-ASCII character → the ASCII letter or digit it is confusable with."""
    import confusable_homoglyphs

    path = Path(confusable_homoglyphs.__file__).with_name("confusables.json")
    table = json.loads(path.read_text(encoding="utf-8"))
    mapping = {}
    for char, glyphs in table.items():
        if len(char) != 1 or char.isascii():
            continue
        for glyph in glyphs:
            target = glyph["c"]
            if len(target) == 1 and target.isascii() and target.isalnum():
                mapping[ord(char)] = target
                break
    return mapping


def fold(text: str) -> str:
    """The text as filters see it: NFKC, no marks or format characters, confusables
    mapped to Latin, case-folded."""
    text = unicodedata.normalize("NFKC", text)
    decomposed = unicodedata.normalize("NFD", text)
    kept = "".join(
        c for c in decomposed if unicodedata.category(c) not in ("Mn", "Me", "Cf", "Cc", "Co")
    )
    text = unicodedata.normalize("NFC", kept).translate(_homoglyphs())
    return unicodedata.normalize("NFKC", text).casefold()


def strip_markup(prompt: str) -> str:
    """A1111 prompt syntax removed: the words a member typed, separated by spaces."""
    names = " ".join(_LORA_TAG.findall(prompt))
    chunks = parse_prompt_attention(strip_loras(prompt))
    words = " ".join(text for text, _ in chunks)
    words = re.sub(r"\bBREAK\b|[|:]", " ", words)
    return f"{words} {names}".strip()


MAX_SPELT_OUT = 24  # longest word found spelt out letter by letter


def words_of(folded: str) -> list[str]:
    """Words, plus the words spelt out in runs of single characters: "a n u d e" also
    gives "nude" (every stretch of 2 to MAX_SPELT_OUT letters of the run)."""
    tokens = _WORD.findall(folded)
    out = list(tokens)
    run: list[str] = []
    for token in [*tokens, ""]:
        if len(token) == 1:
            run.append(token)
            continue
        letters = "".join(run)
        for start in range(len(letters)):
            for end in range(start + 2, min(len(letters), start + MAX_SPELT_OUT) + 1):
                out.append(letters[start:end])
        run = []
    return out


@dataclass(frozen=True)
class Filters:
    words: tuple[str, ...] = ()  # folded words or phrases
    patterns: tuple[str, ...] = ()

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> Filters:
        rows = list(rows)
        return cls(
            words=tuple(r["pattern"] for r in rows if r["kind"] == "word"),
            patterns=tuple(r["pattern"] for r in rows if r["kind"] == "regex"),
        )

    def matches(self, text: str, *, markup: bool = True) -> bool:
        """Whether any filter matches ``text`` (a prompt when ``markup``, else a name)."""
        if not (self.words or self.patterns):
            return False
        folded = fold(strip_markup(text) if markup else text)
        words = words_of(folded)
        joined = " " + " ".join(words) + " "
        for word in self.words:
            if " " in word:
                if f" {word} " in joined:
                    return True
            elif word in words:
                return True
        for pattern in self.patterns:
            try:
                if _compiled(pattern).search(folded, timeout=REGEX_TIMEOUT_S):
                    return True
            except TimeoutError:
                return True  # cannot tell in time: refuse rather than let it through
        return False

    def check(self, what: str, *texts: str, markup: bool = True) -> None:
        if any(self.matches(t, markup=markup) for t in texts if t):
            raise UserError(REFUSAL.format(what=what))


@functools.lru_cache(maxsize=512)
def _compiled(pattern: str) -> regex.Pattern:
    return regex.compile(pattern, regex.IGNORECASE | regex.V0)


def normalise_word(text: str) -> str:
    """How a word filter is stored: folded, its words joined by single spaces."""
    words = _WORD.findall(fold(text))
    if not words:
        raise FilterError("a word filter needs at least one letter or digit")
    return " ".join(words)


# Inputs on which a pattern with nested or overlapping quantifiers takes exponential time.
_PROBES = tuple(
    c * 60 + tail for c in ("a", "1", " ", "ab", "a ", "-", ".", "x") for tail in ("!", "\x00", "")
)


def check_pattern(pattern: str) -> str:
    """A regex filter as stored; FilterError if it does not compile or backtracks
    catastrophically (probed with inputs that make such patterns explode)."""
    if not pattern or len(pattern) > MAX_PATTERN_CHARS:
        raise FilterError(f"a regex filter must be 1 to {MAX_PATTERN_CHARS} characters")
    try:
        compiled = regex.compile(pattern, regex.IGNORECASE | regex.V0)
    except regex.error as exc:
        raise FilterError(f"that regex does not compile: {exc}") from None
    for probe in _PROBES:
        try:
            compiled.search(probe, timeout=PROBE_TIMEOUT_S)
        except TimeoutError:
            raise FilterError(
                "that regex backtracks catastrophically (nested repetition such as (a+)+); "
                "rewrite it without repeating a repeated group"
            ) from None
    if compiled.search(""):
        raise FilterError("that regex matches empty text, so it would refuse every prompt")
    return pattern

"""A1111 infotext: the `parameters` PNG text chunk every SD tool reads back.

    <prompt>
    Negative prompt: <negative>
    Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, ...

Keys without a value are left out; values containing commas (or quotes) are quoted
as JSON strings, the way A1111 writes `Lora hashes: "a: 1234, b: 5678"`.
No torch import: the bot parses infotext for the Info button.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, PngImagePlugin

from pipeline.contract.version import sdbot_version

VERSION = f"sdbot {sdbot_version()}"  # the infotext's `Version:` field

# A1111's own regex for one `key: value` pair, quoted values allowed.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    # A1111's quote(): a comma, newline or colon; a quote mark too, so it reads back.
    if any(c in text for c in ',"\n:'):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_infotext(prompt: str, negative: str, params: dict[str, Any]) -> str:
    """The infotext for one image. `params` in display order; None/"" values dropped."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    pairs = [f"{k}: {_format_value(v)}" for k, v in params.items() if v is not None and v != ""]
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def parse_infotext(text: str) -> dict[str, Any]:
    """Parse infotext back into {"Prompt", "Negative prompt", key: value…} (strings)."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    if len(_PAIR.findall(last)) < 3:  # no parameter line at all
        last = ""
    else:
        lines = lines[:-1]
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        line = line.strip()  # as A1111's parse_generation_parameters
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result: dict[str, Any] = {
        "Prompt": "\n".join(prompt_lines),
        "Negative prompt": "\n".join(negative_lines),
    }
    for key, value in _PAIR.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        result[key.strip()] = value
    return result


def png_bytes(image: Image.Image, infotext: str = "") -> bytes:
    """Encode a PNG carrying the `parameters` text chunk."""
    info = PngImagePlugin.PngInfo()
    if infotext:
        if infotext.isascii():
            info.add_text("parameters", infotext)
        else:  # tEXt is Latin-1 only; iTXt carries UTF-8 prompts
            info.add_itxt("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=4)
    return buffer.getvalue()


def read_infotext(png: bytes) -> str:
    """The `parameters` chunk of a PNG, or "" when it has none."""
    with Image.open(io.BytesIO(png)) as image:
        return str(image.info.get("parameters", ""))


def controlnet_units(text: str) -> list[dict[str, str]]:
    """The `ControlNet N` entries of an image's infotext (sd-webui-controlnet's format,
    the IP-Adapter one included), each parsed into {"Module", "Model", "Weight", …}."""
    from pipeline.contract.control import units_from_infotext

    return units_from_infotext(parse_infotext(text))


# --- re-running an image's parameters ----------------------------------------------------

# A1111 starts its parameter line with Steps; pasted into Discord the newlines are gone.
_STEPS = re.compile(r"(?:^|\s)(Steps: *\d+ *,)")
_NEGATIVE = re.compile(r"\s*\bNegative prompt: *")
# Keys that change nothing here when they have these values (A1111's defaults, ours).
_HARMLESS = {"Version": None, "Clip skip": "1", "RNG": "CPU", "Emphasis": "Original"}
# What an edit measured of its result (/edit): read back, never a setting to re-run.
MEASURED = ("Identity", "Edit tries")
# An edit's own settings (/edit, `sdbot edit`): read into `InfotextSettings.edit`.
EDIT_KEYS = {"Edit face": "face", "Edit keep": "keep", "Edit route": "route"}


@dataclass
class InfotextSettings:
    """What an image's parameters ask for, as GenerateSpec fields, and what they ask for
    that sdbot does not re-run (each "key: value", for a notice)."""

    prompt: str
    negative_prompt: str
    fields: dict[str, Any]  # steps, sampler, schedule, cfg_scale, seed, width, height, …
    model: str | None = None
    model_hash: str | None = None
    lora_hashes: dict[str, str] = field(default_factory=dict)
    not_applied: list[str] = field(default_factory=list)
    # An edit's result: its identity score and tries (`Identity`, `Edit tries`), and its
    # edit settings {"face": 2, "keep": "face", "route": "classic img2img"}, which only
    # an edit of a photo re-runs (they are in `not_applied` too).
    measured: dict[str, float] = field(default_factory=dict)
    edit: dict[str, Any] = field(default_factory=dict)


def looks_like_parameters(text: str) -> bool:
    """Whether text is an image's parameters (A1111's or ours): a `Steps: N,` and at
    least three `key: value` pairs after it."""
    match = _STEPS.search(text)
    return bool(match) and len(_PAIR.findall(text[match.start(1) :])) >= 3


def generation_settings(text: str) -> InfotextSettings:
    """The settings in an image's parameters text: a PNG's `parameters` chunk, or the
    same text pasted on one line (Discord drops the newlines).

    Raises JobError naming a value that is not a number where one is needed.
    """
    from pipeline.contract.jobs import JobError

    text = _one_per_line(text)
    info = parse_infotext(text)
    fields: dict[str, Any] = {}
    settings = InfotextSettings(info.pop("Prompt"), info.pop("Negative prompt"), fields)
    for key, value in info.items():
        try:
            if key == "Steps":
                fields["steps"] = int(value)
            elif key == "Sampler":
                fields["sampler"] = value
            elif key == "Schedule type":
                fields["schedule"] = value
            elif key == "CFG scale":
                fields["cfg_scale"] = float(value)
            elif key == "Distilled CFG Scale":  # Forge, for Flux.1
                fields["guidance"] = float(value)
            elif key == "Seed":
                fields["seed"] = int(value)
            elif key == "Size":
                width, _, height = value.partition("x")
                fields["width"], fields["height"] = int(width), int(height)
            elif key == "ADetailer model":
                fields["face_fix"] = True
            elif key == "Model":
                settings.model = value
            elif key == "Model hash":
                settings.model_hash = value
            elif key == "Lora hashes":
                settings.lora_hashes = _hash_list(value)
            elif key in _HARMLESS and _HARMLESS[key] in (None, value):
                continue
            elif key in MEASURED:
                settings.measured[key] = float(value)
            elif key in EDIT_KEYS:
                settings.edit[EDIT_KEYS[key]] = int(value) if key == "Edit face" else value
                settings.not_applied.append(f"{key}: {value}")
            else:
                settings.not_applied.append(f"{key}: {value}")
        except ValueError:
            raise JobError(f"the parameters say {key}: {value!r}, which is not a number") from None
    return settings


def _one_per_line(text: str) -> str:
    """Put back the newlines before "Negative prompt:" and the parameter line."""
    text = text.strip()
    found = list(_STEPS.finditer(text))
    if not found or "\n" in text[found[-1].start() : found[-1].start(1)]:
        return text  # no parameters, or already on their own line
    match = found[-1]
    head, params = text[: match.start(1)].rstrip(), text[match.start(1) :]
    if "\n" not in head:
        found = list(_NEGATIVE.finditer(head))
        if found:
            last = found[-1]
            head = f"{head[: last.start()]}\nNegative prompt: {head[last.end() :]}"
    return f"{head}\n{params}"


def _hash_list(value: str) -> dict[str, str]:
    """A1111's `Lora hashes` / `TI hashes` value: "name: hash, name: hash"."""
    pairs = {}
    for item in value.split(","):
        name, _, digest = item.rpartition(":")
        if name.strip():
            pairs[name.strip()] = digest.strip()
    return pairs

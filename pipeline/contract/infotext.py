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
    if any(c in text for c in ',"\n') or (":" in text and " " in text):
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

"""Texts and files for progress and result messages, inside Discord's limits.

Pure functions of a job row and numbers: no Discord calls, so they are easy to
read and test. Limits (DISCORD.md): 2000 characters of content, 4096 per embed
description, 6000 across embeds, 10 files and 25 MiB per message, and the
per-file upload limit the interaction (or guild) reports.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from PIL import Image

from bot.views.text_fit import fit_infotext, shortened_note

MiB = 1024 * 1024
CONTENT_LIMIT = 2000
DESCRIPTION_LIMIT = 4096
REQUEST_LIMIT = 25 * MiB
DEFAULT_FILE_LIMIT = 10 * MiB
FENCE = "```"
PROMPT_IN_MESSAGE = 300  # characters of the prompt shown in progress and result messages

MODE_LABELS = {
    "txt2img": "",
    "img2img": "img2img",
    "inpaint": "inpaint",
    "outpaint": "outpaint",
    "upscale": "upscale",
    "facefix": "face fix",
    "edit": "edit",
}


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when cut."""
    text = text or ""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def quote_prompt(prompt: str, limit: int = PROMPT_IN_MESSAGE) -> str:
    """A prompt as bold text that can't break Discord markdown or ping anyone."""
    cleaned = " ".join((prompt or "").split()).replace("*", "\\*").replace("@", "@\u200b")
    return f"**{truncate(cleaned, limit)}**" if cleaned else "*(no prompt)*"


def parameters_line(spec: dict) -> str:
    """Short parameters: mode, size, steps, sampler, CFG."""
    parts = [
        MODE_LABELS.get(spec.get("mode", ""), spec.get("mode", "")),
        f"{spec.get('width')}×{spec.get('height')}" if spec.get("mode") == "txt2img" else "",
        f"{spec.get('steps')} steps",
        str(spec.get("sampler", "")),
        f"CFG {spec.get('cfg_scale', 0):g}",
    ]
    if spec.get("mode") in ("img2img", "inpaint", "upscale"):
        parts.append(f"strength {spec.get('strength', 0):g}")
    return " · ".join(p for p in parts if p)


def job_title(spec: dict) -> str:
    """What a job is about, for its messages: the prompt, or the model being trained."""
    if "prompt" in spec:
        return quote_prompt(spec.get("prompt", ""))
    photos = len(spec.get("photos", ())) + len(spec.get("test_photos", ()))
    return (
        f"training **{truncate(spec.get('name', ''), 40)}** ({spec.get('method')}, {photos} photos)"
    )


# -- progress -----------------------------------------------------------------------


def queued_text(user_id: str, spec: dict, position: int | None) -> str:
    where = f"position {position}" if position else "waiting for a worker"
    return truncate(f"<@{user_id}> {job_title(spec)}\nQueued — {where}", 2000)


def queued_answer(
    job_id: str, spec: Any, position: int | None, limits: Any, summary: str = ""
) -> str:
    """The member's ephemeral answer once a job is queued (a TrainSpec: /train's)."""
    where = f"position {position}" if position else "starting"
    if spec.kind != "train":
        return f"Queued `{job_id}` — {where}. The result will be posted in this channel."
    planned = spec.planned_steps(limits)
    return truncate(
        f"{summary}\n\nQueued training `{job_id}` for '{spec.name}' "
        f"({spec.method}, {planned} steps, trigger word `{spec.token}`) — {where}. "
        "Progress and the result will be posted in this channel.",
        1900,
    )


def progress_text(
    user_id: str, spec: dict, step: int, total: int, eta_s: float | None, note: str = ""
) -> str:
    bar = progress_bar(step, total)
    eta = f" · about {format_seconds(eta_s)} left" if eta_s is not None and step < total else ""
    extra = f"\n{note}" if note else ""
    text = f"<@{user_id}> {job_title(spec)}\n`{bar}` step {step}/{total}{eta}{extra}"
    return truncate(text, CONTENT_LIMIT)


def status_text(user_id: str, spec: dict, status: str) -> str:
    """Final state of a progress message that never got a result (failed, cancelled)."""
    return truncate(f"<@{user_id}> {job_title(spec)}\n{status}", 2000)


def progress_bar(step: int, total: int, width: int = 16) -> str:
    filled = round(width * step / total) if total > 0 else 0
    return "█" * filled + "░" * (width - filled)


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    return f"{seconds // 60} min {seconds % 60:02d} s"


def eta_seconds(elapsed_s: float, step: int, total: int) -> float | None:
    """Time left at the pace so far; None before the first step."""
    if step <= 0 or total <= 0:
        return None
    return elapsed_s / step * (total - step)


# -- results --------------------------------------------------------------------------


def result_text(user_id: str, job_id: str, spec: dict, images: list[dict], note: str = "") -> str:
    seeds = ", ".join(str(image.get("seed")) for image in images)
    label = "Seed" if len(images) == 1 else "Seeds"
    lines = [
        f"<@{user_id}> {quote_prompt(spec.get('prompt', ''))}",
        f"{label} {seeds} · {parameters_line(spec)} · job `{job_id}`",
    ]
    if note:
        lines.append(note)
    notices = dict.fromkeys(n for image in images for n in image.get("notices") or ())
    lines.extend(f"⚠️ {notice}" for notice in notices)
    return truncate("\n".join(lines), CONTENT_LIMIT)


def edit_scores(spec: dict, images: list[dict], min_identity: float) -> str:
    """/edit: how well each result kept the person ("identity 0.93", "2 tries", or that
    the person could not be kept); "" for other jobs and for photos without a face."""
    if spec.get("mode") != "edit":
        return ""
    parts = []
    for number, image in enumerate(images, 1):
        words = identity_words(image, min_identity)
        if words:
            parts.append(f"{number}: {words}" if len(images) > 1 else words)
    return " · ".join(parts)


def identity_words(image: dict, min_identity: float) -> str:
    """One result's score in words: "identity 0.93", "identity 0.81 (2 tries)",
    "identity 0.41 after 3 tries: the person could not be kept"; "" when nothing was
    measured (no face in the photo)."""
    identity, tries = image.get("identity"), image.get("tries") or 1
    after = f" after {tries} tries" if tries > 1 else ""
    if identity is None:
        if not image.get("input_face"):
            return ""
        return f"no face in the result{after}: the person could not be kept"
    words = f"identity {identity:.2f}"
    if identity < min_identity:
        return f"{words}{after}: the person could not be kept"
    return f"{words} ({tries} tries)" if tries > 1 else words


def training_result_text(
    user_id: str, spec: dict, record: dict, validation: str, info: dict
) -> str:
    """The message that delivers a personal model: figures and how to use it."""
    minutes = (info.get("seconds") or 0) / 60
    lines = [
        f"<@{user_id}> your model **{record['name']}** is ready "
        f"({spec.get('method')}, {info.get('steps')} steps, {minutes:.1f} min).",
        validation,
        f"Use it in any prompt: `<lora:{record['name']}:0.8>` — include the trigger word "
        f"`{spec.get('token')}`, e.g. `photo of {spec.get('token')} {spec.get('subject')}`.",
        "Samples above; /lora info, share, export or delete it any time. "
        "Your training photos have been deleted.",
    ]
    return truncate("\n".join(line for line in lines if line), CONTENT_LIMIT)


def info_text(job: dict, index: int | None = None) -> str:
    """Full parameters of a result, from the job row (Discord may strip PNG chunks)."""
    images = (job.get("result") or {}).get("images") or []
    chosen = images if index is None else images[index : index + 1]
    blocks = [image.get("infotext", "") for image in chosen if image.get("infotext")]
    if not blocks:
        blocks = [_spec_summary(job.get("spec") or {})]
    header = f"Job `{job['id']}`"
    # Each infotext in its own code block: members paste them into A1111. Too long, the
    # prompt gives way and every parameter stays (bot/text_fit.py), and the text says so.
    blocks = [block.replace(FENCE, "'''") for block in blocks]
    per_block = 2 * len(FENCE) + 3

    def fit(room: int) -> list[tuple[str, int]]:
        return [fit_infotext(block, room) for block in blocks]

    fitted = fit((CONTENT_LIMIT - len(header)) // len(blocks) - per_block)
    note = ""
    if any(cut for _, cut in fitted):
        note_room = len(shortened_note(10**6)) + 1
        fitted = fit((CONTENT_LIMIT - len(header) - note_room) // len(blocks) - per_block)
        note = "\n" + shortened_note(sum(cut for _, cut in fitted))
    return header + "".join(f"\n{FENCE}\n{block}\n{FENCE}" for block, _ in fitted) + note


def _spec_summary(spec: dict) -> str:
    keys = ("prompt", "negative_prompt", "mode", "steps", "sampler", "cfg_scale", "seed")
    return "\n".join(f"{key}: {spec.get(key)}" for key in keys if spec.get(key) not in (None, ""))


# -- files within the upload limits ------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


def fit_uploads(
    pngs: list[tuple[str, bytes]],
    per_file_limit: int = DEFAULT_FILE_LIMIT,
    request_limit: int = REQUEST_LIMIT,
) -> tuple[list[Upload], str]:
    """The images as uploads that Discord accepts, and a note when any was re-encoded.

    PNGs (with their infotext) go as they are when they fit; a PNG over the per-file
    limit, or every PNG when together they pass the request limit, is re-encoded as
    a JPEG (smaller quality, then smaller size, until it fits). Never drops an image.
    """
    share = min(per_file_limit, request_limit // max(1, len(pngs)))
    total = sum(len(data) for _, data in pngs)
    uploads, changed = [], 0
    for name, data in pngs:
        limit = per_file_limit if total <= request_limit else share
        if len(data) <= limit:
            uploads.append(Upload(name, data))
            continue
        uploads.append(Upload(name.rsplit(".", 1)[0] + ".jpg", shrink_to_jpeg(data, limit)))
        changed += 1
    note = ""
    if changed:
        note = (
            f"{changed} image(s) re-encoded as JPEG to fit Discord's "
            f"{per_file_limit / MiB:g} MiB upload limit; Info shows their parameters."
        )
    return uploads, note


def shrink_to_jpeg(png: bytes, limit: int) -> bytes:
    """A JPEG under ``limit`` bytes: lower quality first, then halve the size."""
    image = Image.open(io.BytesIO(png))
    image.load()
    image = image.convert("RGB")
    while True:
        for quality in (92, 80, 65):
            data = _jpeg(image, quality)
            if len(data) <= limit:
                return data
        if min(image.size) <= 16:
            return data
        image = image.resize((image.width // 2, image.height // 2), Image.LANCZOS)


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()

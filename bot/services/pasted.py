"""Parameters pasted as a prompt: /imagine re-runs what Info (or A1111) showed.

A member who pastes an image's parameters text (prompt, "Negative prompt: …", then
"Steps: 20, Sampler: …") into /imagine's prompt gets those settings; options they set
on the command win. What the text asks for that is not re-run is said in one line.
"""

from __future__ import annotations

from typing import Any

from pipeline.contract.infotext import generation_settings, looks_like_parameters

MAX_NOTICE = 1800


def apply_pasted(
    prompt: str, given: dict[str, Any], model_names: list[str]
) -> tuple[str, dict[str, Any], str | None]:
    """(prompt, options, notice): the options the member left unset (None) filled from
    pasted parameters (a pasted sampler adds "schedule"), and a line saying what was
    used and what was not. Unchanged, with no notice, when the prompt is not a
    parameters text."""
    if not looks_like_parameters(prompt):
        return prompt, given, None
    pasted = generation_settings(prompt)
    fields = pasted.fields
    options = dict(given)
    used = []

    def fill(option: str, value: Any, label: str) -> None:
        if options.get(option) is None and value is not None:
            options[option] = value
            used.append(label)

    fill("negative", pasted.negative_prompt or None, "negative prompt")
    fill("steps", fields.get("steps"), "steps")
    if options.get("sampler") is None and "sampler" in fields:
        fill("sampler", fields["sampler"], "sampler")
        options["schedule"] = fields.get("schedule", "Automatic")
    fill("cfg", fields.get("cfg_scale"), "CFG scale")
    fill("guidance", fields.get("guidance"), "Distilled CFG Scale")
    fill("seed", fields.get("seed"), "seed")
    if "width" in fields:
        fill("size", f"{fields['width']}x{fields['height']}", "size")
    if fields.get("face_fix") and not options.get("face_fix"):
        options["face_fix"] = True
        used.append("face fix")
    skipped = list(pasted.not_applied)
    if pasted.model:
        if options.get("model") is None and pasted.model in model_names:
            options["model"] = pasted.model
            used.append("model")
        elif options.get("model") is None:
            skipped.append(f"model {pasted.model} (not on this server)")
    notice = "Used the pasted parameters" + (f" ({', '.join(used)})" if used else "")
    if skipped:
        notice += f". Not applied here: {'; '.join(skipped)}"
    if len(notice) > MAX_NOTICE:
        notice = notice[: MAX_NOTICE - 1] + "…"
    return pasted.prompt, options, notice + "."

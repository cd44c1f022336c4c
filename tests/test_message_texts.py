"""Texts that must fit 2,000 characters keep every parameter; edits of one message stay in order."""

from __future__ import annotations

import asyncio

import pytest

from bot.plumbing.message_edits import MessageEditor
from bot.views import render
from bot.views.text_fit import fit_infotext, shortened_note
from pipeline.contract.infotext import format_infotext, parse_infotext

PARAMS = {
    "Steps": 20,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 7,
    "Seed": 123456789,
    "Size": "512x768",
    "Model": "tiny",
}


@pytest.mark.parametrize("negative", ["", "blurry, " * 40])
def test_info_on_a_long_prompt_keeps_every_parameter_and_says_the_prompt_was_cut(negative):
    prompt = "a lighthouse on a cliff at dusk, " * 70  # about 2,300 characters
    job = {
        "id": "abc123",
        "spec": {"prompt": prompt},
        "result": {"images": [{"seed": 1, "infotext": format_infotext(prompt, negative, PARAMS)}]},
    }
    text = render.info_text(job)
    assert len(text) <= 2000
    block = text.split("```")[1].strip("\n")
    parsed = parse_infotext(block)
    for key, value in PARAMS.items():
        assert parsed[key] == str(value), key  # the whole parameters line survived
    assert parsed["Negative prompt"] == negative.strip()
    assert parsed["Prompt"].endswith("…") and prompt.startswith(parsed["Prompt"][:-1])
    assert "prompt shortened by" in text


def test_info_that_fits_is_untouched():
    infotext = format_infotext("a cat", "", PARAMS)
    text = render.info_text({"id": "j", "spec": {}, "result": {"images": [{"infotext": infotext}]}})
    assert infotext in text and "shortened" not in text


def test_fit_infotext_cuts_the_negative_prompt_only_when_the_prompt_is_not_enough():
    infotext = format_infotext("p" * 50, "n" * 3000, PARAMS)
    fitted, cut = fit_infotext(infotext, 1500)
    parsed = parse_infotext(fitted)
    assert len(fitted) <= 1500 and parsed["Seed"] == "123456789"
    assert parsed["Negative prompt"].endswith("…")
    assert cut == len(infotext) - len(fitted) + 2  # two "…" stand in for what went
    assert "shortened by" in shortened_note(cut)


async def test_editor_sends_in_order_coalesces_and_spaces_edits():
    landed: list[tuple[str, float]] = []
    started: list[float] = []
    loop = asyncio.get_running_loop()

    def edit(text: str, delay: float):
        async def call() -> None:
            started.append(loop.time())
            await asyncio.sleep(delay)  # a slow request: later ones must not overtake it
            landed.append((text, loop.time()))

        return call

    editor = MessageEditor(interval=0.1)
    editor.submit(edit("Queued — position 3", 0.05))
    await asyncio.sleep(0.01)
    editor.submit(edit("Queued — position 2", 0.0))  # replaced before it was sent…
    editor.submit(edit("Starting…", 0.0))  # …by the newer state
    await asyncio.sleep(0.3)
    editor.submit(edit("step 1/2", 0.0))
    await asyncio.sleep(0.01)
    await editor.close()  # a pending state is dropped, the one in flight finishes
    editor.submit(edit("late", 0.0))  # after close: never sent
    await asyncio.sleep(0.15)

    texts = [text for text, _ in landed]
    assert texts == ["Queued — position 3", "Starting…", "step 1/2"]
    assert editor.dropped == 1
    gaps = [b - a for a, b in zip(started, started[1:])]
    assert all(gap >= 0.09 for gap in gaps), gaps

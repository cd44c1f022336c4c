"""Per-model options and defaults end to end (issue 23's bot part): the real bot and
emulator, a real worker holding a tiny SD 1.x model beside tiny Flux.1 models (dev,
schnell, and a Kontext folder only autocomplete reads), written by the Flux.1 writer.

What a member sees changes with the model chosen: autocomplete offers the samplers,
sizes and models the model's family takes (Discord shows one option list per command,
so narrowing happens there); a job takes the model's defaults for options left out
(its family's variant, then its `[models.NAME]` keys, over /settings), shown in the
result's infotext; an option the model lacks is refused in one line naming it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_asyncio

from pipeline.workers.local_pool import LocalPool
from tests.botkit import *  # noqa: F403 - the end-to-end kit (botkit.__all__)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

FLOW_SAMPLERS = ["Euler", "Euler Simple", "Euler Karras", "Euler Exponential", "Euler Beta"]
FLOW_SAMPLERS += ["DPM++ 2M", "UniPC"]  # Forge's names for Flux; flow.py maps them


@pytest.fixture(scope="module")
def flux_models(tmp_path_factory) -> dict:
    """`[models.*]` tables beside the tiny SD model (the default, listed first): Flux.1
    dev with its steps set in config, schnell with its size set, and Kontext."""
    from pipeline.families.flux_tiny import write_tiny_flux

    root = tmp_path_factory.mktemp("options")
    folders = {v: write_tiny_flux(root / v, variant=v) for v in ("dev", "schnell", "kontext")}
    return {
        "dev": {"source": str(folders["dev"]), "steps": 3},
        "schnell": {"source": str(folders["schnell"]), "width": 64, "height": 64},
        "kontext": {"source": str(folders["kontext"])},
    }


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def flux_pool(tiny_sd: Path, flux_models, tmp_path_factory):
    pool = LocalPool(
        make_config(tiny_sd, tmp_path_factory.mktemp("pool") / "data", models=flux_models)  # noqa: F405
    )
    await pool.start()
    yield pool
    await pool.close()


@pytest.fixture
def options_config(emu, flux_pool, tiny_sd, flux_models, tmp_path):  # noqa: F811
    return make_config(tiny_sd, data_dir_for(flux_pool, tmp_path), emu, models=flux_models)  # noqa: F405


async def test_autocomplete_offers_what_the_chosen_model_takes(emu, flux_pool, options_config):  # noqa: F811
    async def offered(command: str, focused: str, **typed) -> list[str]:
        options = {"prompt": "x", **typed, focused: typed.get(focused, "")}
        return [c["value"] for c in await emu.send_autocomplete(command, options, focused)]

    async with running_sdbot(options_config, flux_pool):  # noqa: F405
        sd_samplers = await offered("imagine", "sampler", model="tiny")
        default_samplers = await offered("imagine", "sampler")  # no model yet: the default's
        dev_samplers = await offered("imagine", "sampler", model="dev")
        sd_sizes = await offered("imagine", "size", model="tiny")
        dev_sizes = await offered("imagine", "size", model="dev")
        schnell_sizes = await offered("imagine", "size", model="schnell")
        for_imagine = await offered("imagine", "model")
        for_img2img = await offered("img2img", "model")
        for_inpaint = await offered("inpaint", "model")
        settings_samplers = [
            c["value"] for c in await emu.send_autocomplete("settings", {"sampler": ""}, "sampler")
        ]
    assert len(sd_samplers) == 25 and {"Euler a", "DDIM", "LMS"} <= set(sd_samplers)
    assert default_samplers == sd_samplers
    assert dev_samplers == FLOW_SAMPLERS
    assert settings_samplers == sd_samplers  # /settings is for every model: all names
    assert sd_sizes[0] == "64x64"  # the server's [defaults]
    assert dev_sizes[0] == "1024x1024" and schnell_sizes[0] == "64x64"  # family / [models]
    assert "912x512" in dev_sizes  # multiples of 16 are kept …
    assert all(int(w) % 16 == 0 and int(h) % 16 == 0 for w, h in (s.split("x") for s in dev_sizes))
    # Kontext only edits an input image: not offered to /imagine or /inpaint.
    assert for_imagine == ["tiny", "dev", "schnell"]
    assert for_img2img == ["tiny", "dev", "schnell", "kontext"]
    assert for_inpaint == ["tiny", "dev", "schnell"]


async def test_a_job_takes_its_models_defaults(emu, flux_pool, options_config):  # noqa: F811
    async with running_sdbot(options_config, flux_pool):  # noqa: F405
        # Her /settings are the server's kind of defaults; a flow model decides its own.
        await reply(await emu.send_command("settings", {"steps": 6, "cfg": 4.0}))  # noqa: F405
        schnell = await queued_job(await imagine(emu, "a boat", model="schnell"))  # noqa: F405
        dev = await queued_job(await imagine(emu, "a boat", model="dev", size="64x64"))  # noqa: F405
        guided = await queued_job(  # noqa: F405
            await imagine(emu, "a boat", model="dev", size="64x64", guidance=2.0, steps=2)  # noqa: F405
        )
        results = [await wait_result(emu, job) for job in (schnell, dev, guided)]  # noqa: F405
    [(schnell_image, schnell_info)], [(_, dev_info)], [(_, guided_info)] = (
        result_images(emu, message)  # noqa: F405
        for message in results
    )
    # schnell: its variant's 4 steps, Forge's Euler/Simple, CFG 1, no Distilled CFG; the
    # size its [models.schnell] sets.
    assert schnell_info["Steps"] == "4" and schnell_info["Sampler"] == "Euler"
    assert schnell_info["Schedule type"] == "Simple" and schnell_info["CFG scale"] == "1"
    assert "Distilled CFG Scale" not in schnell_info and schnell_image.size == (64, 64)
    # dev: [models.dev] steps = 3 over the family's 28; Distilled CFG 3.5, the variant's.
    assert dev_info["Steps"] == "3" and dev_info["Distilled CFG Scale"] == "3.5"
    assert dev_info["Model"] == "dev" and dev_info["CFG scale"] == "1"
    # What the member sets wins over both.
    assert guided_info["Distilled CFG Scale"] == "2" and guided_info["Steps"] == "2"


async def test_what_the_model_lacks_is_refused_in_one_line(emu, flux_pool, options_config):  # noqa: F811
    async with running_sdbot(options_config, flux_pool):  # noqa: F405
        guidance = await error_reply(await imagine(emu, "x", guidance=3.0))  # noqa: F405
        cfg = await error_reply(await imagine(emu, "x", model="schnell", cfg=3.0))  # noqa: F405
        negative = await error_reply(await imagine(emu, "x", model="schnell", negative="blur"))  # noqa: F405
        sampler = await error_reply(await imagine(emu, "x", model="dev", sampler="Euler a"))  # noqa: F405
        kontext = await error_reply(await imagine(emu, "x", model="kontext", size="64x64"))  # noqa: F405
        steps = await error_reply(await imagine(emu, "x", model="schnell", steps=30))  # noqa: F405
        queue = await reply(await emu.send_command("queue"))  # noqa: F405
    assert guidance == "Model tiny (SD 1.x) has no Distilled CFG Scale option; leave it out"
    assert cfg == "Model schnell (Flux.1 schnell) has no CFG scale option; leave it out"
    assert negative == "Model schnell (Flux.1 schnell) has no negative prompt option; leave it out"
    assert sampler == (
        "Flux.1 models cannot use the sampler 'Euler a' (did you mean Euler?); "
        "they take: Euler, DPM++ 2M, UniPC"
    )
    assert kontext.startswith("Flux.1 Kontext edits an image: give it an input image")
    assert steps.startswith("Flux.1 schnell is distilled for 1–4 steps; 30 is more than its 10")
    assert "no jobs yet" in queue["content"]  # nothing was queued
    for line in (guidance, cfg, negative, sampler, kontext, steps):
        assert "\n" not in line and len(line) < 200


async def test_models_shows_family_variant_modes_and_defaults(emu, flux_pool, options_config):  # noqa: F811
    async with running_sdbot(options_config, flux_pool):  # noqa: F405
        shown = (await reply(await emu.send_command("models")))["content"]  # noqa: F405
    blocks = {block.split(" · ")[0].strip("*"): block for block in shown.split("\n\n")[1:-1]}
    assert list(blocks) == ["tiny", "dev", "schnell", "kontext"]
    assert blocks["tiny"].splitlines() == [
        "**tiny** · SD 1.x (sd1)",
        "modes: txt2img, img2img, inpaint, outpaint, upscale, facefix, edit (classic route)",
        "defaults: Euler a · 2 steps · CFG 5 · 64x64 (multiples of 8)",
        "options: negative, cfg, face_fix, control, reference; not: guidance",
    ]
    assert blocks["dev"].splitlines()[0] == "**dev** · Flux.1 (flux, variant dev)"
    assert blocks["dev"].splitlines()[2] == (
        "defaults: Euler Simple · 3 steps · CFG 1 · Distilled CFG 3.5 · 1024x1024 (multiples of 16)"
    )
    assert blocks["schnell"].splitlines()[2:] == [
        "defaults: Euler Simple · 4 steps · CFG 1 · 64x64 (multiples of 16)",
        "options: face_fix; not: negative, cfg, guidance, control, reference",
    ]
    assert blocks["kontext"].splitlines()[1] == "modes: img2img, edit"
    assert "Distilled CFG 2.5" in blocks["kontext"]


async def test_pasted_distilled_cfg_is_used_or_left_out(emu, flux_pool, options_config):  # noqa: F811
    """Forge's infotext for a Flux image, pasted into /imagine: its Distilled CFG Scale is
    re-run on a model that has one, and left out, saying so, on one that has none (the
    member typed no option to refuse)."""
    forge = "a cat\nSteps: 2, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 4.5, Seed: 3, "
    async with running_sdbot(options_config, flux_pool):  # noqa: F405
        on_dev = await imagine(emu, forge + "Size: 64x64, Model: dev")  # noqa: F405
        on_sd = await imagine(emu, forge + "Size: 64x64, Model: tiny")  # noqa: F405
        results = [await wait_result(emu, await queued_job(r)) for r in (on_dev, on_sd)]  # noqa: F405
    [(_, dev_info)], [(_, sd_info)] = (result_images(emu, m) for m in results)  # noqa: F405
    assert dev_info["Distilled CFG Scale"] == "4.5" and dev_info["Model"] == "dev"
    assert "Distilled CFG Scale" not in sd_info and sd_info["Model"] == "tiny"
    notice = on_sd.followups[-1]["content"]
    assert notice.endswith("Left out (the model has no such option): guidance.")


async def test_the_servers_negative_prompt_skips_a_model_without_one(
    emu, flux_pool, tiny_sd, flux_models, tmp_path
):  # noqa: F811
    """`[safety] negative_prompt` is added to every job outside age-restricted channels;
    schnell takes no negative prompt, so it is not added there (every job would be
    refused), while an SD job gets it. The model autocomplete offers only the models an
    admin allowed here."""
    data_dir = data_dir_for(flux_pool, tmp_path)  # noqa: F405
    safety = {"negative_prompt": "gore"}
    safe = make_config(tiny_sd, data_dir, emu, models=flux_models, safety=safety)  # noqa: F405
    async with running_sdbot(safe, flux_pool):  # noqa: F405
        jobs = [
            await queued_job(await imagine(emu, "a boat", model=model))  # noqa: F405
            for model in ("schnell", "tiny")
        ]
        results = [await wait_result(emu, job) for job in jobs]  # noqa: F405
        allow = {"key": "models.allowed", "value": "tiny, schnell"}
        admin = emu.admin
        await reply(await emu.send_command("admin", allow, subcommand="settings", user=admin))  # noqa: F405
        offered = await emu.send_autocomplete("imagine", {"prompt": "x", "model": ""}, "model")
    [(_, schnell_info)], [(_, sd_info)] = (result_images(emu, m) for m in results)  # noqa: F405
    assert schnell_info["Negative prompt"] == "" and sd_info["Negative prompt"] == "gore"
    assert [c["value"] for c in offered] == ["tiny", "schnell"]

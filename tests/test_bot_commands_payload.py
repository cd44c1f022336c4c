"""The slash commands Discord sees: the body of the sync PUT, byte for byte.

`tests/data/commands_payload.json` is what discord.py sent when the bot synced its
commands on `main` before issue 21 rewrote `/admin` as command groups (captured
through this emulator from an unchanged checkout, serialised as discord.py serialises
it: compact separators, ASCII). Any change to a command's name, description, options,
choices, permissions or order shows up here, so a refactor of the cogs cannot change
what members see in Discord's command picker without this test saying so. A new
command is added to it the same way (captured from the bot that has it): issue 25's
`/edit`, between `/outpaint` and `/settings`; issue 23's `/models` (last), the
`guidance` option after `cfg` on the four generation commands, and their sampler, steps,
cfg and size descriptions (the default is the model's, else the member's /settings).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.botkit import *  # noqa: F403 - the end-to-end kit (botkit.__all__)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

PAYLOAD = Path(__file__).parent / "data" / "commands_payload.json"


def as_discord_py_sends(body: object) -> str:
    # discord.utils._to_json without orjson (not installed): compact, ASCII-only.
    return json.dumps(body, separators=(",", ":"), ensure_ascii=True)


async def test_the_synced_commands_are_byte_identical_to_the_recorded_payload(
    emu,  # noqa: F811
    shared_pool,  # noqa: F811
    tiny_sd,
    tmp_path,
):
    config = make_config(tiny_sd, data_dir_for(shared_pool, tmp_path), emu)  # noqa: F405
    async with running_sdbot(config, shared_pool):  # noqa: F405
        pass
    puts = [r for r in emu.requests if r.method == "PUT" and r.path.endswith("/commands")]
    assert [r.path.split("/")[-2] for r in puts] == [emu.guild_id]  # one guild sync
    assert as_discord_py_sends(puts[0].json) + "\n" == PAYLOAD.read_text(encoding="ascii")

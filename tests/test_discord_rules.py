"""The emulator rejects what Discord rejects (tests/discord_rules.py), one test per rule.

A deliberately broken test build of a bot (the real discord.py client) sends each
broken payload: messages through its HTTP client, commands through a sync, and
interaction answers from a `/probe` command or its autocomplete. Each test
checks the status, Discord's JSON code, and the field the ``errors`` tree names,
both as the emulator sent it and as discord.py parsed it (``HTTPException.text``
flattens the tree to "In components.0.components.0.label: …").
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import discord
import pytest
import pytest_asyncio
from discord import app_commands
from discord.ext import commands
from discord.http import Route

from tests import discord_rules as rules
from tests.discord_ratelimits import DISCORD_ROUTE_LIMITS, RateLimiter
from tests.emulator import DiscordEmulator, MiB, emulated_discord, running_bot

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

Json = dict[str, Any]
POST_MESSAGE = ("POST", "/channels/{channel_id}/messages")


def button(**extra: Any) -> Json:
    return {"type": 2, "style": 1, "label": "Go", "custom_id": "go", **extra}


def row(*components: Json) -> Json:
    return {"type": 1, "components": list(components)}


def select(options: int = 2, **extra: Any) -> Json:
    choices = [{"label": f"o{i}", "value": f"v{i}"} for i in range(options)]
    return {"type": 3, "custom_id": "pick", "options": choices, **extra}


def message(**body: Any) -> Json:
    return {"content": "hi", **body}


# name → (payload, dotted field the errors tree names, its error code)
MESSAGE_CASES: dict[str, tuple[Json, str, str]] = {
    "button label over 80": (
        message(components=[row(button(label="x" * 81))]),
        "components.0.components.0.label",
        "BASE_TYPE_MAX_LENGTH",
    ),
    "link button without url": (
        message(components=[row({"type": 2, "style": 5, "label": "Docs"})]),
        "components.0.components.0.url",
        "BASE_TYPE_REQUIRED",
    ),
    "link button with custom_id": (
        message(components=[row(button(style=5, url="https://example.com"))]),
        "components.0.components.0.custom_id",
        "BUTTON_COMPONENT_CUSTOM_ID_NOT_ALLOWED",
    ),
    "button without custom_id": (
        message(components=[row({"type": 2, "style": 1, "label": "Go"})]),
        "components.0.components.0.custom_id",
        "BASE_TYPE_REQUIRED",
    ),
    "select and button in one row": (
        message(components=[row(select(), button())]),
        "components.0.components",
        "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
    ),
    "six buttons in a row": (
        message(components=[row(*[button(custom_id=f"b{i}") for i in range(6)])]),
        "components.0.components",
        "BASE_TYPE_BAD_LENGTH",
    ),
    "six rows": (
        message(components=[row(button(custom_id=f"b{i}")) for i in range(6)]),
        "components",
        "BASE_TYPE_MAX_LENGTH",
    ),
    "a button outside a row": (
        message(components=[button()]),
        "components.0.type",
        "COMPONENT_TYPE_INVALID",
    ),
    "select option label over 100": (
        message(components=[row(select() | {"options": [{"label": "x" * 101, "value": "v"}]})]),
        "components.0.components.0.options.0.label",
        "BASE_TYPE_BAD_LENGTH",
    ),
    "select option value over 100": (
        message(components=[row(select() | {"options": [{"label": "l", "value": "v" * 101}]})]),
        "components.0.components.0.options.0.value",
        "BASE_TYPE_BAD_LENGTH",
    ),
    "select option description over 100": (
        message(
            components=[
                row(
                    select() | {"options": [{"label": "l", "value": "v", "description": "d" * 101}]}
                )
            ]
        ),
        "components.0.components.0.options.0.description",
        "BASE_TYPE_MAX_LENGTH",
    ),
    "select with 26 options": (
        message(components=[row(select(options=26))]),
        "components.0.components.0.options",
        "BASE_TYPE_BAD_LENGTH",
    ),
    "component type 99": (
        message(components=[row({"type": 99, "custom_id": "x"})]),
        "components.0.components.0.type",
        "UNION_TYPE_CHOICES",
    ),
    "custom_id over 100": (
        message(components=[row(button(custom_id="c" * 101))]),
        "components.0.components.0.custom_id",
        "BASE_TYPE_BAD_LENGTH",
    ),
    "duplicate custom_id": (
        message(components=[row(button(), button())]),
        "components.0.components.1.custom_id",
        "COMPONENT_CUSTOM_ID_DUPLICATED",
    ),
    "embed title over 256": (
        message(embeds=[{"title": "t" * 257}]),
        "embeds.0.title",
        "BASE_TYPE_MAX_LENGTH",
    ),
    "embed description over 4096": (
        message(embeds=[{"description": "d" * 4097}]),
        "embeds.0.description",
        "BASE_TYPE_MAX_LENGTH",
    ),
    "embed with 26 fields": (
        message(embeds=[{"fields": [{"name": "n", "value": "v"}] * 26}]),
        "embeds.0.fields",
        "BASE_TYPE_MAX_LENGTH",
    ),
    "embed field name over 256": (
        message(embeds=[{"fields": [{"name": "n" * 257, "value": "v"}]}]),
        "embeds.0.fields.0.name",
        "BASE_TYPE_BAD_LENGTH",
    ),
    "embed field value over 1024": (
        message(embeds=[{"fields": [{"name": "n", "value": "v" * 1025}]}]),
        "embeds.0.fields.0.value",
        "BASE_TYPE_BAD_LENGTH",
    ),
    "embed footer over 2048": (
        message(embeds=[{"footer": {"text": "f" * 2049}}]),
        "embeds.0.footer.text",
        "BASE_TYPE_MAX_LENGTH",
    ),
    "embed author over 256": (
        message(embeds=[{"author": {"name": "a" * 257}}]),
        "embeds.0.author.name",
        "BASE_TYPE_MAX_LENGTH",
    ),
    "embeds over 6000 in all": (
        message(embeds=[{"description": "d" * 4000}, {"description": "d" * 2001}]),
        "embeds",
        "BASE_TYPE_MAX_LENGTH",
    ),
    "eleven embeds": (
        message(embeds=[{"title": "t"}] * 11),
        "embeds",
        "BASE_TYPE_MAX_LENGTH",
    ),
    "content over 2000": (message(content="x" * 2001), "content", "BASE_TYPE_MAX_LENGTH"),
    "components v2 with content": (
        {
            "content": "hi",
            "flags": rules.IS_COMPONENTS_V2,
            "components": [{"type": 10, "content": "text"}],
        },
        "content",
        "MESSAGE_CANNOT_USE_LEGACY_FIELDS_WITH_COMPONENTS_V2",
    ),
}

COMMAND_CASES: dict[str, tuple[Json, str, str]] = {
    "option named upper case": (
        {"options": [{"type": 3, "name": "Prompt", "description": "What to draw"}]},
        "0.options.0.name",
        "APPLICATION_COMMAND_INVALID_NAME",
    ),
    "option description over 100": (
        {"options": [{"type": 3, "name": "prompt", "description": "d" * 101}]},
        "0.options.0.description",
        "BASE_TYPE_BAD_LENGTH",
    ),
    "option description empty": (
        {"options": [{"type": 3, "name": "prompt", "description": ""}]},
        "0.options.0.description",
        "BASE_TYPE_BAD_LENGTH",
    ),
    "duplicate option names": (
        {"options": [{"type": 3, "name": "p", "description": "a"}] * 2},
        "0.options.1.name",
        "APPLICATION_COMMAND_OPTIONS_NAME_ALREADY_EXISTS",
    ),
    "required after optional": (
        {
            "options": [
                {"type": 3, "name": "a", "description": "a"},
                {"type": 3, "name": "b", "description": "b", "required": True},
            ]
        },
        "0.options.1.required",
        "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
    ),
    "26 options": (
        {"options": [{"type": 3, "name": f"o{i}", "description": "d"} for i in range(26)]},
        "0.options",
        "BASE_TYPE_MAX_LENGTH",
    ),
    "26 choices": (
        {
            "options": [
                {
                    "type": 3,
                    "name": "size",
                    "description": "d",
                    "choices": [{"name": f"c{i}", "value": f"v{i}"} for i in range(26)],
                }
            ]
        },
        "0.options.0.choices",
        "BASE_TYPE_MAX_LENGTH",
    ),
    "choice value over 100": (
        {
            "options": [
                {
                    "type": 3,
                    "name": "size",
                    "description": "d",
                    "choices": [{"name": "big", "value": "v" * 101}],
                }
            ]
        },
        "0.options.0.choices.0.value",
        "BASE_TYPE_BAD_LENGTH",
    ),
    "autocomplete with choices": (
        {
            "options": [
                {
                    "type": 3,
                    "name": "size",
                    "description": "d",
                    "autocomplete": True,
                    "choices": [{"name": "a", "value": "a"}],
                }
            ]
        },
        "0.options.0.autocomplete",
        "APPLICATION_COMMAND_OPTION_AUTOCOMPLETE_WITH_CHOICES",
    ),
    "command name with a space": (
        {"name": "make image"},
        "0.name",
        "APPLICATION_COMMAND_INVALID_NAME",
    ),
    "command name upper case": ({"name": "Imagine"}, "0.name", "APPLICATION_COMMAND_INVALID_NAME"),
    "command description over 100": (
        {"description": "d" * 101},
        "0.description",
        "BASE_TYPE_BAD_LENGTH",
    ),
}

# name → (interaction callback body, field, code) — sent from /probe (or its autocomplete)
CALLBACK_CASES: dict[str, tuple[Json, str, str]] = {
    "autocomplete value over 100": (
        {"type": 8, "data": {"choices": [{"name": "n", "value": "v" * 101}]}},
        "data.choices.0.value",
        "BASE_TYPE_MAX_LENGTH",
    ),
    "autocomplete with 26 choices": (
        {"type": 8, "data": {"choices": [{"name": f"n{i}", "value": "v"} for i in range(26)]}},
        "data.choices",
        "BASE_TYPE_MAX_LENGTH",
    ),
    "modal title over 45": (
        {
            "type": 9,
            "data": {
                "custom_id": "m",
                "title": "t" * 46,
                "components": [row({"type": 4, "custom_id": "a", "style": 1, "label": "A"})],
            },
        },
        "data.title",
        "BASE_TYPE_BAD_LENGTH",
    ),
    "modal without inputs": (
        {"type": 9, "data": {"custom_id": "m", "title": "Form", "components": []}},
        "data.components",
        "BASE_TYPE_BAD_LENGTH",
    ),
    "modal with six inputs": (
        {
            "type": 9,
            "data": {
                "custom_id": "m",
                "title": "Form",
                "components": [
                    row({"type": 4, "custom_id": f"i{i}", "style": 1, "label": "A"})
                    for i in range(6)
                ],
            },
        },
        "data.components",
        "BASE_TYPE_BAD_LENGTH",
    ),
    "modal text input label over 45": (
        {
            "type": 9,
            "data": {
                "custom_id": "m",
                "title": "Form",
                "components": [row({"type": 4, "custom_id": "a", "style": 1, "label": "l" * 46})],
            },
        },
        "data.components.0.components.0.label",
        "BASE_TYPE_MAX_LENGTH",
    ),
}


class Probe:
    """The broken test build: a bot whose commands send whatever the test asks."""

    def __init__(self, emulator: DiscordEmulator) -> None:
        self.emulator = emulator
        self.bot = commands.Bot(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            guild_ready_timeout=0.1,
        )
        self.callback: Json = {}
        self.outcome: asyncio.Future[BaseException | None] | None = None
        self.twice = False
        probe = self

        async def answer(interaction: discord.Interaction) -> None:
            route = Route(
                "POST",
                "/interactions/{interaction_id}/{interaction_token}/callback",
                interaction_id=interaction.id,
                interaction_token=interaction.token,
            )
            error: BaseException | None = None
            try:
                await interaction._state.http.request(route, json=probe.callback)
                if probe.twice:
                    await interaction._state.http.request(route, json=probe.callback)
            except discord.HTTPException as exc:
                error = exc
            if probe.outcome is not None:  # no assert: discord.py would swallow it
                probe.outcome.set_result(error)

        @self.bot.tree.command(name="probe", description="Answers as the test says")
        @app_commands.describe(what="anything")
        async def probe_command(interaction: discord.Interaction, what: str = "") -> None:
            await answer(interaction)

        @probe_command.autocomplete("what")
        async def probe_autocomplete(interaction: discord.Interaction, current: str) -> list:
            await answer(interaction)
            return []

    async def respond(self, callback: Json, *, autocomplete: bool = False, twice: bool = False):
        self.callback, self.twice = callback, twice
        self.outcome = asyncio.get_running_loop().create_future()
        if autocomplete:
            await self.emulator.send_autocomplete("probe", {"what": "x"}, "what")
        else:
            await self.emulator.send_command("probe", wait=False)
        return await asyncio.wait_for(self.outcome, 5)

    async def post(self, channel_id: str, payload: Json, files: list[discord.File] | None = None):
        route = Route("POST", "/channels/{channel_id}/messages", channel_id=channel_id)
        if files:
            form = [{"name": "payload_json", "value": discord.utils._to_json(payload)}]
            for i, f in enumerate(files):
                form.append(
                    {
                        "name": f"files[{i}]",
                        "value": f.fp,
                        "filename": f.filename,
                        "content_type": "application/octet-stream",
                    }
                )
            return await self.bot.http.request(route, form=form, files=files)
        return await self.bot.http.request(route, json=payload)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def probe() -> AsyncIterator[Probe]:
    async with emulated_discord() as emulator:
        emulator.expect_errors(50035, 50006, 40005, 40060, 50013, 50001, 50008, 429)
        # Refused requests count against a bucket too: room for every case of the module.
        emulator.rate_limiter.route_limits[POST_MESSAGE] = (100, 1.0)
        bot_probe = Probe(emulator)
        async with running_bot(bot_probe.bot, emulator):
            await bot_probe.bot.tree.sync(guild=None)
            yield bot_probe
        emulator.check_clean()


def assert_invalid_form(
    error: BaseException | None, emulator: DiscordEmulator, field: str, code: str
):
    assert isinstance(error, discord.HTTPException), error
    assert (error.status, error.code) == (400, 50035)
    body = emulator.error_responses[-1][1]
    assert body["message"] == "Invalid Form Body" and body["code"] == 50035
    leaves = rules.leaf_errors(body)
    assert (field, code) in [(path, c) for path, c, _ in leaves], leaves
    assert f"In {field}:" in error.text  # discord.py reads the tree as Discord's


@pytest.mark.parametrize("case", sorted(MESSAGE_CASES))
async def test_broken_message_is_refused(probe: Probe, case: str) -> None:
    payload, field, code = MESSAGE_CASES[case]
    before = len(probe.emulator.channel_messages())
    with pytest.raises(discord.HTTPException) as caught:
        await probe.post(probe.emulator.channel_id, payload)
    assert_invalid_form(caught.value, probe.emulator, field, code)
    assert len(probe.emulator.channel_messages()) == before  # nothing was posted


@pytest.mark.parametrize("case", sorted(COMMAND_CASES))
async def test_broken_command_is_refused(probe: Probe, case: str) -> None:
    change, field, code = COMMAND_CASES[case]
    command = {"type": 1, "name": "imagine", "description": "Draw", **change}
    synced = list(probe.emulator.global_commands)
    with pytest.raises(discord.HTTPException) as caught:
        await probe.bot.http.bulk_upsert_global_commands(probe.emulator.application_id, [command])
    assert_invalid_form(caught.value, probe.emulator, field, code)
    assert probe.emulator.global_commands == synced  # the old commands stay


@pytest.mark.parametrize("case", sorted(CALLBACK_CASES))
async def test_broken_interaction_answer_is_refused(probe: Probe, case: str) -> None:
    callback, field, code = CALLBACK_CASES[case]
    error = await probe.respond(callback, autocomplete=callback["type"] == 8)
    assert_invalid_form(error, probe.emulator, field, code)
    record = probe.emulator.interactions[-1]
    if callback["type"] == 8:  # discord.py then sends the handler's own (empty) list
        assert record.choices == []
    else:
        assert record.callback_type is None  # the broken answer was not taken


async def test_empty_interaction_message_is_refused(probe: Probe) -> None:
    error = await probe.respond({"type": 4, "data": {"content": ""}})
    assert isinstance(error, discord.HTTPException)
    assert (error.status, error.code) == (400, 50006)
    assert probe.emulator.error_responses[-1][1] == {
        "message": "Cannot send an empty message",
        "code": 50006,
    }


async def test_empty_channel_message_is_refused(probe: Probe) -> None:
    with pytest.raises(discord.HTTPException) as caught:
        await probe.post(probe.emulator.channel_id, {"content": "", "embeds": []})
    assert (caught.value.status, caught.value.code) == (400, 50006)


async def test_second_answer_to_an_interaction_is_refused(probe: Probe) -> None:
    error = await probe.respond({"type": 4, "data": {"content": "one"}}, twice=True)
    assert isinstance(error, discord.HTTPException)
    assert (error.status, error.code) == (400, 40060)
    assert probe.emulator.error_responses[-1][1]["message"] == (
        "Interaction has already been acknowledged."
    )
    assert probe.emulator.interactions[-1].messages[0]["content"] == "one"


async def test_eleven_files_are_refused(probe: Probe) -> None:
    files = [discord.File(io.BytesIO(b"x"), f"f{i}.txt") for i in range(11)]
    with pytest.raises(discord.HTTPException) as caught:
        await probe.post(probe.emulator.channel_id, {"content": "files"}, files)
    assert_invalid_form(caught.value, probe.emulator, "files", "BASE_TYPE_MAX_LENGTH")


async def test_file_over_the_upload_limit_is_refused(probe: Probe) -> None:
    big = discord.File(io.BytesIO(bytes(10 * MiB + 1)), "big.png")
    with pytest.raises(discord.HTTPException) as caught:
        await probe.post(probe.emulator.channel_id, {"content": "big"}, [big])
    assert (caught.value.status, caught.value.code) == (413, 40005)


@pytest.mark.parametrize(
    ("missing", "code"),
    [(rules.VIEW_CHANNEL, 50001), (rules.SEND_MESSAGES, 50013), (rules.ATTACH_FILES, 50013)],
    ids=["view channel", "send messages", "attach files"],
)
async def test_posting_without_a_permission_is_refused(probe: Probe, missing: int, code: int):
    allowed = probe.emulator.bot_permissions_in(probe.emulator.channel_id) & ~missing
    channel = probe.emulator.add_channel("locked", bot_permissions=allowed)
    files = [discord.File(io.BytesIO(b"x"), "a.txt")] if missing == rules.ATTACH_FILES else None
    with pytest.raises(discord.Forbidden) as caught:
        await probe.post(channel, {"content": "hello"}, files)
    assert caught.value.code == code
    assert probe.emulator.channel_messages(channel) == []


async def test_posting_into_a_forum_itself_is_refused(probe: Probe) -> None:
    forum = probe.emulator.add_channel("gallery", kind=15)
    with pytest.raises(discord.HTTPException) as caught:
        await probe.post(forum, {"content": "hello"})
    assert (caught.value.status, caught.value.code) == (400, 50008)
    post = probe.emulator.add_channel("a post", kind=11, parent_id=forum)
    sent = await probe.post(post, {"content": "in the post"})
    assert probe.emulator.get_message(sent["id"])["content"] == "in the post"


# ---------------------------------------------------------------- rate limits


async def test_rate_limit_headers_make_discord_py_wait_instead_of_429(probe: Probe) -> None:
    emulator = probe.emulator
    sent = await probe.post(emulator.channel_id, {"content": "progress 0"})
    route = Route(
        "PATCH",
        "/channels/{channel_id}/messages/{message_id}",
        channel_id=emulator.channel_id,
        message_id=sent["id"],
    )
    emulator.rate_limiter.route_limits[
        ("PATCH", "/channels/{channel_id}/messages/{message_id}")
    ] = (
        3,
        0.5,
    )
    emulator.rate_limiter.buckets.clear()
    await asyncio.sleep(1)  # the cases before filled the global 50/s window
    limited_before = len(emulator.rate_limiter.limited)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(1, 7):
        await probe.bot.http.request(route, json={"content": f"progress {i}"})
    took = loop.time() - started
    assert emulator.get_message(sent["id"])["content"] == "progress 6"
    assert len(emulator.rate_limiter.limited) == limited_before  # never a 429
    assert took >= 0.5  # the 4th edit waited for the bucket to refill
    patches = emulator.requests_to("PATCH", f"/messages/{sent['id']}$")
    assert all(r.status == 200 for r in patches)


async def test_a_client_ignoring_the_headers_gets_429_with_retry_after(probe: Probe) -> None:
    emulator = probe.emulator
    emulator.rate_limiter.buckets.clear()
    emulator.rate_limiter.route_limits[POST_MESSAGE] = DISCORD_ROUTE_LIMITS[POST_MESSAGE]
    url = f"{emulator.api_url}/channels/{emulator.channel_id}/messages"
    headers = {"Authorization": "Bot x", "Content-Type": "application/json"}
    answers = []
    async with aiohttp.ClientSession() as session:
        for i in range(6):  # POST messages: 5 per 5 s per channel
            async with session.post(url, data=f'{{"content": "m{i}"}}', headers=headers) as r:
                answers.append((r.status, dict(r.headers), await r.json()))
    assert [a[0] for a in answers] == [200] * 5 + [429]
    assert answers[4][1]["X-RateLimit-Remaining"] == "0"
    assert float(answers[4][1]["X-RateLimit-Reset-After"]) > 4
    status, headers_429, body = answers[5]
    assert body["message"] == "You are being rate limited." and body["global"] is False
    assert 4 < body["retry_after"] <= 5
    assert headers_429["X-RateLimit-Scope"] == "user" and int(headers_429["Retry-After"]) == 5
    assert len(emulator.rate_limiter.violations) == 1
    emulator.rate_limiter.violations.clear()  # this client was the test's, not the bot
    emulator.rate_limiter.buckets.clear()
    emulator.rate_limiter.route_limits[POST_MESSAGE] = (100, 1.0)


async def test_random_shared_429_is_retried_once_after_retry_after(probe: Probe) -> None:
    emulator = probe.emulator
    emulator.rate_limiter.buckets.clear()
    sent = await probe.post(emulator.channel_id, {"content": "v0"})
    emulator.rate_limiter.chaos = 1.0  # the next PATCH is 429'd…
    emulator.rate_limiter.rng.seed(7)
    route = Route(
        "PATCH",
        "/channels/{channel_id}/messages/{message_id}",
        channel_id=emulator.channel_id,
        message_id=sent["id"],
    )
    task = asyncio.create_task(probe.bot.http.request(route, json={"content": "v1"}))
    await emulator.wait_for(lambda: emulator.requests_to("PATCH", f"/{sent['id']}$"))
    emulator.rate_limiter.chaos = 0.0  # …and its retry is not
    await asyncio.wait_for(task, 5)
    patches = emulator.requests_to("PATCH", f"/{sent['id']}$")
    assert [r.status for r in patches] == [429, 200]
    assert emulator.rate_limiter.limited[-1].scope == "shared"
    assert emulator.get_message(sent["id"])["content"] == "v1"
    assert emulator.rate_limiter.violations == []  # the retry waited retry_after


async def test_global_limit_429_is_global() -> None:
    limiter = RateLimiter(global_per_second=2, clock=lambda: 100.0)
    limiter.check("GET", "/users/@me", {})
    limiter.check("GET", "/users/@me", {})
    with pytest.raises(Exception) as caught:
        limiter.check("GET", "/users/@me", {})
    limited = caught.value
    assert limited.body()["global"] is True and limited.headers["X-RateLimit-Global"] == "true"
    assert limited.headers["X-RateLimit-Scope"] == "global"
    # Interaction callbacks are exempt from the global limit.
    assert limiter.check("POST", "/interactions/{interaction_id}/{token}/callback", {})

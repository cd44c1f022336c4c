"""The real discord.py client (commands.Bot + app_commands) against the loopback emulator."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import aiohttp
import discord
import pytest
import pytest_asyncio
from discord import app_commands
from discord.ext import commands
from PIL import Image

from tests.emulator import (
    EPHEMERAL,
    CallbackType,
    DiscordEmulator,
    emulated_discord,
    running_bot,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


@pytest_asyncio.fixture
async def emulator() -> AsyncIterator[DiscordEmulator]:
    async with emulated_discord() as emu:
        yield emu
    # Known routes only, and no error answer or rate-limit breach the test didn't expect.
    emu.check_clean()


def make_bot() -> commands.Bot:
    # A short guild_ready_timeout: on_ready otherwise waits 2 s after GUILD_CREATE.
    return commands.Bot(
        command_prefix=commands.when_mentioned,
        intents=discord.Intents.default(),
        guild_ready_timeout=0.1,
    )


def png_bytes(width: int = 8, height: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


class ResultView(discord.ui.View):
    """A persistent result view: fixed custom_id, no timeout, re-registered at start-up."""

    def __init__(self, clicks: list[int]) -> None:
        super().__init__(timeout=None)
        self.clicks = clicks

    @discord.ui.button(label="Reroll", custom_id="job:42:reroll")
    async def reroll(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.clicks.append(interaction.user.id)
        await interaction.response.send_message("Rerolling job 42", ephemeral=True)


async def sync_to_guild(bot: commands.Bot, emulator: DiscordEmulator) -> None:
    await bot.tree.sync(guild=discord.Object(int(emulator.guild_id)))


async def test_login_ready_and_guild(emulator: DiscordEmulator) -> None:
    bot = make_bot()
    async with running_bot(bot, emulator):
        assert bot.user is not None and bot.user.id == int(emulator.bot_user_id)
        assert bot.application_id == int(emulator.application_id)
        guild = bot.get_guild(int(emulator.guild_id))
        assert guild is not None
        assert isinstance(guild.get_channel(int(emulator.channel_id)), discord.TextChannel)
        admin_role = guild.get_role(int(emulator.admin_role_id))
        assert admin_role is not None and admin_role.permissions.administrator
        assert guild.default_role.permissions.send_messages
    assert emulator.requests_to("GET", r"^/oauth2/applications/@me$")
    assert emulator.identify_payloads[0]["intents"] == discord.Intents.default().value


async def test_sync_registers_guild_and_global_commands(emulator: DiscordEmulator) -> None:
    bot = make_bot()
    guild = discord.Object(int(emulator.guild_id))

    @bot.tree.command(name="imagine", description="Make an image", guild=guild)
    @app_commands.describe(prompt="What to draw")
    async def imagine(interaction: discord.Interaction, prompt: str, steps: int = 20) -> None:
        await interaction.response.send_message(prompt)

    @bot.tree.command(name="queue", description="Show the queue")
    async def queue(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("empty")

    async with running_bot(bot, emulator):
        synced = await bot.tree.sync(guild=guild)
        await bot.tree.sync()
        again = await bot.tree.sync(guild=guild)

    command = emulator.get_command("imagine", guild_only=True)
    assert command is not None and command["guild_id"] == emulator.guild_id
    assert [(o["name"], o["type"], o.get("required")) for o in command["options"]] == [
        ("prompt", 3, True),
        ("steps", 4, False),
    ]
    assert [c.id for c in synced] == [c.id for c in again] == [int(command["id"])]
    assert [c["name"] for c in emulator.global_commands] == ["queue"]


async def test_slash_command_options_defer_and_file_followup(emulator: DiscordEmulator) -> None:
    bot = make_bot()
    received: dict[str, object] = {}

    @bot.tree.command(name="echo", description="Echo an image back")
    async def echo(
        interaction: discord.Interaction, prompt: str, count: int, image: discord.Attachment
    ) -> None:
        await interaction.response.defer(thinking=True)
        data = await image.read()  # downloads from the emulator's CDN
        received.update(prompt=prompt, count=count, image=(image.filename, image.size, image.width))
        received["limit"] = interaction.filesize_limit
        file = discord.File(io.BytesIO(data), filename="result.png")
        await interaction.followup.send(f"{prompt} x{count}", file=file)

    photo = png_bytes()
    async with running_bot(bot, emulator):
        await bot.tree.sync()
        attachment = emulator.add_attachment(photo, "cat.png")
        ix = await emulator.send_command(
            "echo", {"prompt": "a cat", "count": 3}, attachments={"image": attachment}
        )
        assert ix.callback_type == CallbackType.DEFERRED_CHANNEL_MESSAGE
        message = await ix.wait_message(lambda m: m["attachments"])

    assert received == {
        "prompt": "a cat",
        "count": 3,
        "image": ("cat.png", len(photo), 8),
        "limit": 10 * 1024 * 1024,
    }
    # The first follow-up after a thinking defer becomes the original response.
    assert message["id"] == ix.original_id and ix.followups == []
    assert message["content"] == "a cat x3" and not ix.ephemeral
    uploaded = message["attachments"][0]
    assert uploaded["filename"] == "result.png" and uploaded["content_type"] == "image/png"
    assert (uploaded["width"], uploaded["height"]) == (8, 6)
    assert emulator.attachment_data(uploaded) == photo
    async with aiohttp.ClientSession() as session, session.get(uploaded["url"]) as response:
        assert await response.read() == photo
    upload = emulator.requests_to("POST", r"^/webhooks/")[0]
    assert upload.files[0].data == photo and upload.json["content"] == "a cat x3"


async def test_ephemeral_reply_and_original_edit(emulator: DiscordEmulator) -> None:
    bot = make_bot()

    @bot.tree.command(name="settings", description="Your defaults")
    async def settings(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("steps: 20", ephemeral=True)
        original = await interaction.original_response()
        await interaction.edit_original_response(content=original.content + ", cfg: 7")

    async with running_bot(bot, emulator):
        await bot.tree.sync()
        ix = await emulator.send_command("settings", user=emulator.bob)
        await emulator.wait_for(lambda: ix.original and ix.original["edited_timestamp"])

    assert ix.callback_type == CallbackType.CHANNEL_MESSAGE
    assert ix.ephemeral and ix.original is not None
    assert ix.original["flags"] & EPHEMERAL
    assert ix.original["content"] == "steps: 20, cfg: 7"
    assert ix.original["interaction_metadata"]["user"]["id"] == emulator.bob.id
    assert emulator.channel_messages(ephemeral=False) == []


async def test_channel_message_with_file_and_persistent_view_click(
    emulator: DiscordEmulator,
) -> None:
    bot = make_bot()
    clicks: list[int] = []
    async with running_bot(bot, emulator):
        bot.add_view(ResultView(clicks))
        channel = bot.get_channel(int(emulator.channel_id))
        assert isinstance(channel, discord.TextChannel)
        file = discord.File(io.BytesIO(png_bytes()), filename="job42.png")
        sent = await channel.send("Job 42 done", file=file, view=ResultView(clicks))

        stored = emulator.channel_messages()[-1]
        assert stored["id"] == str(sent.id) and stored["content"] == "Job 42 done"
        assert emulator.attachment_data(stored["attachments"][0]) == png_bytes()
        assert stored["components"][0]["components"][0]["custom_id"] == "job:42:reroll"

        ix = await emulator.click(stored, "job:42:reroll", user=emulator.bob)
    assert clicks == [int(emulator.bob.id)]
    assert ix.callback_type == CallbackType.CHANNEL_MESSAGE and ix.ephemeral
    assert ix.original is not None and ix.original["content"] == "Rerolling job 42"


async def test_new_bot_after_restart_sees_old_messages_and_buttons(
    emulator: DiscordEmulator,
) -> None:
    first_clicks: list[int] = []
    first = make_bot()
    async with running_bot(first, emulator):
        channel = first.get_channel(int(emulator.channel_id))
        assert isinstance(channel, discord.TextChannel)
        old = await channel.send("Job 42 done", view=ResultView(first_clicks))
    assert not emulator.connected

    second_clicks: list[int] = []
    second = make_bot()
    second.add_view(ResultView(second_clicks))  # re-registered at start-up, as the bot will
    async with running_bot(second, emulator):
        channel = second.get_channel(int(emulator.channel_id))
        assert isinstance(channel, discord.TextChannel)
        history = [m.id async for m in channel.history(limit=10)]
        fetched = await channel.fetch_message(old.id)
        ix = await emulator.click(str(old.id), "job:42:reroll", user=emulator.alice)

    assert history == [old.id] and fetched.content == "Job 42 done"
    assert first_clicks == [] and second_clicks == [int(emulator.alice.id)]
    assert ix.callback_type == CallbackType.CHANNEL_MESSAGE


async def test_autocomplete_and_modal(emulator: DiscordEmulator) -> None:
    bot = make_bot()
    names = [f"lora{i}" for i in range(40)]

    class RenameModal(discord.ui.Modal, title="Rename"):
        new_name = discord.ui.TextInput(label="New name", custom_id="new_name")

        async def on_submit(self, interaction: discord.Interaction) -> None:
            await interaction.response.send_message(f"renamed to {self.new_name.value}")

    @bot.tree.command(name="lora", description="Rename a LoRA")
    async def lora(interaction: discord.Interaction, name: str) -> None:
        await interaction.response.send_modal(RenameModal())

    @lora.autocomplete("name")
    async def lora_names(
        interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return [app_commands.Choice(name=n, value=n) for n in names if current in n][:25]

    async with running_bot(bot, emulator):
        await bot.tree.sync()
        choices = await emulator.send_autocomplete("lora", {"name": "lora1"}, focused="name")
        shown = await emulator.send_command("lora", {"name": "lora1"})
        submitted = await emulator.submit_modal(shown, {"new_name": "kitty"})

    assert [c["value"] for c in choices] == ["lora1"] + [f"lora{i}" for i in range(10, 20)]
    assert shown.callback_type == CallbackType.MODAL and shown.modal["title"] == "Rename"
    assert submitted.original is not None and submitted.original["content"] == "renamed to kitty"


async def test_limits_fail_like_discord(emulator: DiscordEmulator) -> None:
    bot = make_bot()
    errors: list[int] = []

    @bot.tree.command(name="slow", description="Answers too late")
    async def slow(interaction: discord.Interaction) -> None:
        await asyncio.sleep(0.3)
        try:
            await interaction.response.send_message("late")
        except discord.NotFound as error:
            errors.append(error.code)

    @bot.tree.command(name="long", description="Too much text")
    async def long(interaction: discord.Interaction) -> None:
        try:
            await interaction.response.send_message("x" * 2001)
        except discord.HTTPException as error:
            errors.append(error.code)
            await interaction.response.send_message("too long", ephemeral=True)

    @bot.tree.command(name="big", description="Too big a file")
    async def big(interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        try:
            await interaction.followup.send(file=discord.File(io.BytesIO(bytes(11 << 20)), "x.png"))
        except discord.HTTPException as error:
            errors.append(error.code)
            await interaction.followup.send("That image is over the 10 MiB upload limit.")

    emulator.response_deadline = 0.1
    emulator.expect_errors(10062, 50035, 40005)
    async with running_bot(bot, emulator):
        await bot.tree.sync()
        late = await emulator.send_command("slow", wait=False)
        await emulator.wait_for(lambda: late.errors)
        long_ix = await emulator.send_command("long")
        emulator.response_deadline = 3.0
        big_ix = await emulator.send_command("big")
        await big_ix.wait_message()
        with pytest.raises(discord.NotFound):
            await bot.http.request(discord.http.Route("GET", "/no/such/route"))

    assert errors == [10062, 50035, 40005]
    assert big_ix.messages[0]["content"].startswith("That image is over")
    assert late.callback_type is None and late.errors[0]["code"] == 10062
    assert long_ix.ephemeral and long_ix.errors[0]["code"] == 50035
    assert [r.path for r in emulator.unknown_routes] == ["/no/such/route"]
    emulator.unknown_routes.clear()


async def test_expired_token_falls_back_to_channel_message(emulator: DiscordEmulator) -> None:
    bot = make_bot()
    go_on = asyncio.Event()

    @bot.tree.command(name="train", description="A long job")
    async def train(interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        await go_on.wait()
        try:
            await interaction.followup.send("done")
        except discord.HTTPException as error:
            # No assert here: discord.py catches and logs what a command raises.
            channel = interaction.channel
            if isinstance(channel, discord.TextChannel):
                await channel.send(f"done (token: {error.code})")

    emulator.expect_errors(50027)
    async with running_bot(bot, emulator):
        await bot.tree.sync()
        ix = await emulator.send_command("train")
        ix.expire()
        go_on.set()
        posted = await emulator.wait_for(
            lambda: [m for m in emulator.channel_messages() if m["content"].startswith("done")]
        )

    assert posted[0]["content"] == "done (token: 50027)"
    assert "interaction_metadata" not in posted[0]


class ConfirmView(discord.ui.View):
    """An ordinary (non-persistent) view: discord.py finds it by the response's message id."""

    @discord.ui.button(label="Confirm")
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.edit_message(content="Confirmed", view=None)

    @discord.ui.button(label="Cancel")
    async def cancel(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.defer()
        await interaction.edit_original_response(content="Cancelled", view=None)


def button_id(message: dict, label: str) -> str:
    buttons = message["components"][0]["components"]
    return next(b["custom_id"] for b in buttons if b["label"] == label)


async def test_component_update_and_deferred_update(emulator: DiscordEmulator) -> None:
    bot = make_bot()

    @bot.tree.command(name="forget", description="Forget me")
    async def forget(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("Really?", view=ConfirmView(), ephemeral=True)

    async with running_bot(bot, emulator):
        await bot.tree.sync()
        asked = await emulator.send_command("forget")
        assert asked.original is not None
        confirm = await emulator.click(asked.original, button_id(asked.original, "Confirm"))
        asked_again = await emulator.send_command("forget")
        assert asked_again.original is not None
        cancel_id = button_id(asked_again.original, "Cancel")
        cancel = await emulator.click(asked_again.original, cancel_id)
        await emulator.wait_for(lambda: asked_again.original["content"] == "Cancelled")

    assert confirm.callback_type == CallbackType.UPDATE_MESSAGE
    assert asked.original["content"] == "Confirmed" and asked.original["components"] == []
    assert asked.original["flags"] & EPHEMERAL
    assert cancel.callback_type == CallbackType.DEFERRED_UPDATE_MESSAGE
    assert cancel.original_id == asked_again.original_id
    assert asked_again.original["components"] == []


async def test_member_message_reaches_on_message(emulator: DiscordEmulator) -> None:
    bot = make_bot()
    async with running_bot(bot, emulator):
        waiting = asyncio.create_task(bot.wait_for("message", timeout=5))
        await asyncio.sleep(0)
        posted = await emulator.post_message("hello bot", user=emulator.bob)
        message = await waiting
    assert message.id == int(posted["id"]) and message.author.id == int(emulator.bob.id)
    assert isinstance(message.author, discord.Member)
    assert message.content == ""  # no message-content intent: Discord blanks it


async def test_member_option_and_subcommand(emulator: DiscordEmulator) -> None:
    bot = make_bot()
    shared: list[tuple[str, int, bool]] = []
    lora_group = app_commands.Group(name="lora", description="Your LoRAs")

    @lora_group.command(name="share", description="Share a LoRA")
    async def share(interaction: discord.Interaction, name: str, member: discord.Member) -> None:
        is_admin = interaction.permissions.administrator
        shared.append((name, member.id, is_admin))
        await interaction.response.send_message(f"shared {name} with {member.name}")

    bot.tree.add_command(lora_group)
    async with running_bot(bot, emulator):
        await bot.tree.sync()
        options = {"name": "kitty", "member": emulator.bob}
        ix = await emulator.send_command("lora", options, subcommand="share", user=emulator.admin)

    assert shared == [("kitty", int(emulator.bob.id), True)]
    assert ix.original is not None and ix.original["content"] == "shared kitty with bob"


def echo_bot() -> tuple[commands.Bot, list[int]]:
    bot = make_bot()
    answered: list[int] = []

    @bot.tree.command(name="echo", description="Says it back")
    async def echo(interaction: discord.Interaction, text: str) -> None:
        answered.append(interaction.id)
        await interaction.response.send_message(f"echo: {text}")

    return bot, answered


async def test_gateway_drop_resumes_and_replays_what_was_missed(emulator: DiscordEmulator) -> None:
    bot, answered = echo_bot()
    async with running_bot(bot, emulator):
        await bot.tree.sync()
        before = await emulator.send_command("echo", {"text": "one"})
        await emulator.drop_gateway()
        # Sent while the bot is away: Discord queues it for the session's RESUME.
        during = await emulator.send_command("echo", {"text": "two"}, wait=False)
        await during.wait_response(3.0)
        after = await emulator.send_command("echo", {"text": "three"})

    assert [m["content"] for m in (before.messages + during.messages + after.messages)] == [
        "echo: one",
        "echo: two",
        "echo: three",
    ]
    assert len(emulator.identify_payloads) == 1  # resumed, not a new session
    assert len(emulator.resumes) == 1
    assert [f["d"]["id"] for f in emulator.replayed if f["t"] == "INTERACTION_CREATE"] == [
        during.id
    ]
    assert sorted(answered) == sorted(int(r.id) for r in (before, during, after))  # once each


async def test_gateway_drop_with_invalid_session_identifies_again(
    emulator: DiscordEmulator,
) -> None:
    bot, answered = echo_bot()
    async with running_bot(bot, emulator):
        await bot.tree.sync()
        await emulator.drop_gateway(resumable=False)
        await emulator.wait_for(lambda: len(emulator.identify_payloads) == 2 and emulator.connected)
        after = await emulator.send_command("echo", {"text": "again"})

    assert len(emulator.resumes) == 1  # it tried to resume, was told INVALID_SESSION (op 9)
    assert after.messages[0]["content"] == "echo: again"
    assert answered == [int(after.id)]


async def test_app_permissions_follow_the_channel_and_threads_inherit(
    emulator: DiscordEmulator,
) -> None:
    bot = make_bot()
    seen: list[tuple[int, bool, bool]] = []

    @bot.tree.command(name="where", description="Reports the bot's permissions here")
    async def where(interaction: discord.Interaction) -> None:
        perms = interaction.app_permissions
        seen.append((interaction.channel_id or 0, perms.send_messages, perms.attach_files))
        await interaction.response.send_message("ok", ephemeral=True)

    no_files = emulator.bot_permissions_in(emulator.channel_id) & ~(1 << 15)
    locked = emulator.add_channel("no-files", bot_permissions=no_files)
    thread = emulator.add_channel("a thread", kind=11, parent_id=locked)
    async with running_bot(bot, emulator):
        await bot.tree.sync()
        for channel in (emulator.channel_id, locked, thread):
            await emulator.send_command("where", channel_id=channel)
        assert isinstance(bot.get_channel(int(thread)), discord.Thread)

    assert seen == [
        (int(emulator.channel_id), True, True),
        (int(locked), True, False),
        (int(thread), True, False),
    ]


async def test_dm_commands_follow_their_contexts(emulator: DiscordEmulator) -> None:
    bot = make_bot()
    places: list[str] = []

    @bot.tree.command(name="anywhere", description="Works in DMs too")
    async def anywhere(interaction: discord.Interaction) -> None:
        places.append("guild" if interaction.guild_id else "dm")
        await interaction.response.send_message("hi", ephemeral=True)

    @bot.tree.command(name="serveronly", description="Guilds only")
    @app_commands.allowed_contexts(guilds=True, dms=False, private_channels=False)
    async def serveronly(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("hi", ephemeral=True)

    async with running_bot(bot, emulator):
        await bot.tree.sync()
        dm = emulator.dm_channel(emulator.alice)["id"]
        record = await emulator.send_command("anywhere", channel_id=dm)
        with pytest.raises(LookupError, match="offers no /serveronly in DMs"):
            await emulator.send_command("serveronly", channel_id=dm)

    assert places == ["dm"]
    assert record.payload["context"] == 1 and "member" not in record.payload

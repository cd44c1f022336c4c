"""A loopback Discord: REST, gateway and CDN on 127.0.0.1 for the real discord.py client.

The unmodified client talks to this server over HTTP and a websocket, exactly as
it would to discord.com (see /work/shared/DISCORD.md for the facts it is built on).
It holds one guild with one text channel, a few members, the bot's synced
commands and every message the bot posts. Tests drive it as members would:
``send_command``, ``click``, ``submit_modal``, ``post_message``; then inspect what
the bot answered (``InteractionRecord``, ``channel_messages``, ``requests``).

It enforces the platform limits a bot trips over (3 s to answer an interaction,
one answer per interaction, 2000-character content, 25 choices, 10 MiB uploads,
expired tokens) with the same status codes and error codes Discord returns, so
a bot that would fail in production fails here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import json
import logging
import mimetypes
import re
import secrets
import struct
import time
import warnings
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import IntEnum
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from aiohttp import WSMsgType, web

from bot.plumbing.endpoints import point_client_at, restore_default_endpoints
from tests import discord_rules as rules
from tests.discord_ratelimits import RateLimited, RateLimiter
from tests.discord_rules import DiscordError, invalid_form

if TYPE_CHECKING:
    import discord

log = logging.getLogger(__name__)

T = TypeVar("T")
Json = dict[str, Any]

DISCORD_EPOCH_MS = 1_420_070_400_000
API_PREFIX = "/api/v10"
MiB = 1024 * 1024
TEST_TOKEN = "emulator-token"  # any token logs in; the emulator only checks one is sent

# Message flags.
EPHEMERAL = 1 << 6
LOADING = 1 << 7  # a deferred ("thinking") response that has no content yet
IS_COMPONENTS_V2 = 1 << 15

# Gateway intents the emulator honours when dispatching message events.
GUILD_MESSAGES = 1 << 9
DIRECT_MESSAGES = 1 << 12
MESSAGE_CONTENT = 1 << 15

ADMINISTRATOR = 1 << 3
# View channel, send, embed links, attach files, read history, reactions, app commands.
EVERYONE_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 14) | (1 << 15) | (1 << 16) | (1 << 6)
EVERYONE_PERMISSIONS |= 1 << 31
# What Discord puts in app_permissions for a DM with the bot.
DM_APP_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 14) | (1 << 15) | (1 << 16) | (1 << 6)
THREAD_TYPES = (10, 11, 12)
ALL_PERMISSIONS = (1 << 51) - 1  # what Discord reports for an administrator

SUBCOMMAND_TYPES = (1, 2)
SELECT_TYPES = (3, 5, 6, 7, 8)


class InteractionType(IntEnum):
    """Interaction types the emulator sends (Discord's numbering)."""

    APPLICATION_COMMAND = 2
    MESSAGE_COMPONENT = 3
    AUTOCOMPLETE = 4
    MODAL_SUBMIT = 5


class CallbackType(IntEnum):
    """How the bot answered an interaction (the ``type`` of its callback)."""

    PONG = 1
    CHANNEL_MESSAGE = 4
    DEFERRED_CHANNEL_MESSAGE = 5  # "thinking..."; the first follow-up replaces it
    DEFERRED_UPDATE_MESSAGE = 6  # component acknowledged, message unchanged for now
    UPDATE_MESSAGE = 7
    AUTOCOMPLETE_RESULT = 8
    MODAL = 9


def unknown(what: str, code: int, status: int = 404) -> DiscordError:
    return DiscordError(status, code, f"Unknown {what}")


def json_response(data: Any, status: int = 200) -> web.Response:
    # Exactly "application/json": discord.py treats "...; charset=utf-8" as text.
    body = json.dumps(data).encode()
    return web.Response(status=status, body=body, headers={"Content-Type": "application/json"})


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


class Snowflakes:
    """Numeric snowflake ids: unique, increasing, with a real timestamp (discord.py reads it)."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> str:
        stamp = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last = max(self._last + 1, stamp)
        return str(self._last)


@dataclass(frozen=True)
class EmulatedUser:
    """A Discord user in the emulated guild."""

    id: str
    username: str
    bot: bool = False
    role_ids: tuple[str, ...] = ()

    def payload(self) -> Json:
        return {
            "id": self.id,
            "username": self.username,
            "global_name": None if self.bot else self.username.title(),
            "discriminator": "0",
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
            "flags": 0,
        }


@dataclass
class UploadedFile:
    """One ``files[n]`` part of a multipart request."""

    field: str
    filename: str
    content_type: str | None
    data: bytes

    @property
    def index(self) -> int | None:
        match = re.fullmatch(r"files\[(\d+)\]", self.field)
        return int(match.group(1)) if match else None


@dataclass
class RecordedRequest:
    """A request the bot made: ``path`` is relative to the API base (or the CDN path)."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    files: list[UploadedFile] = field(default_factory=list)
    status: int = 0  # filled in once answered
    at: float = field(default_factory=time.monotonic)  # when it arrived


@dataclass(eq=False)
class InteractionRecord:
    """One interaction the emulator sent, and what the bot answered through it.

    ``original`` is the response message (for component callbacks 6/7, the
    clicked message); ``followups`` the follow-up messages. After a deferred
    (type 5) response the first follow-up replaces the loading original, as on
    Discord, so look at ``messages`` when the handler's shape doesn't matter.
    """

    id: str
    token: str
    type: int
    payload: Json
    user: EmulatedUser
    sent_at: float
    emulator: DiscordEmulator = field(repr=False)
    callback_type: int | None = None
    callback_body: Json | None = None
    original_id: str | None = None
    followup_ids: list[str] = field(default_factory=list)
    errors: list[Json] = field(default_factory=list)  # error bodies the bot received
    expired: bool = False
    responded_at: float | None = None  # loop time the bot's callback arrived
    responded: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def name(self) -> str:
        data = self.payload.get("data", {})
        return data.get("name") or data.get("custom_id") or "?"

    @property
    def channel_id(self) -> str:
        return self.payload["channel_id"]

    @property
    def original(self) -> Json | None:
        return self.emulator.get_message(self.original_id) if self.original_id else None

    @property
    def followups(self) -> list[Json]:
        found = (self.emulator.get_message(mid) for mid in self.followup_ids)
        return [m for m in found if m is not None]

    @property
    def messages(self) -> list[Json]:
        """Original response (once it has content) and follow-ups, oldest first."""
        original = self.original
        head = [original] if original and not original["flags"] & LOADING else []
        return head + self.followups

    @property
    def ephemeral(self) -> bool:
        original = self.original
        return bool(original and original["flags"] & EPHEMERAL)

    @property
    def deferred(self) -> bool:
        return self.callback_type in (5, 6)

    @property
    def choices(self) -> list[Json]:
        """Autocomplete choices the bot returned."""
        if self.callback_type != CallbackType.AUTOCOMPLETE_RESULT or not self.callback_body:
            return []
        return (self.callback_body.get("data") or {}).get("choices", [])

    @property
    def modal(self) -> Json | None:
        if self.callback_type != CallbackType.MODAL or not self.callback_body:
            return None
        return self.callback_body.get("data")

    def expire(self) -> None:
        """Act as if 15 minutes passed: the token now fails with 50027 Invalid Webhook Token."""
        self.expired = True

    async def wait_response(self, timeout: float = 5.0) -> int:
        """Wait for the bot's callback; return its type."""
        try:
            await asyncio.wait_for(self.responded.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"bot did not answer interaction {self.name!r} within {timeout}s"
                f" (errors it received: {self.errors})"
            ) from None
        assert self.callback_type is not None
        return self.callback_type

    async def wait_message(
        self, predicate: Callable[[Json], Any] = bool, timeout: float = 10.0
    ) -> Json:
        """Wait until one of ``messages`` satisfies ``predicate``; return it."""

        def find() -> Json | None:
            return next((m for m in self.messages if predicate(m)), None)

        return await self.emulator.wait_for(find, timeout)


@dataclass
class RequestContext:
    """What the middleware learns about the request being handled (per task, via a ContextVar)."""

    recorded: RecordedRequest
    interaction: InteractionRecord | None = None  # set once a handler finds one


current_request: ContextVar[RequestContext] = ContextVar("emulator_request")


@dataclass(eq=False)
class GatewaySession:
    """One websocket connection from a client."""

    ws: web.WebSocketResponse
    seq: int = 0
    session_id: str | None = None
    intents: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Every dispatch sent (or meant for it while it was away), for RESUME to replay.
    events: list[Json] = field(default_factory=list)
    dropped: bool = False  # the emulator cut this connection (drop_gateway)

    async def send(self, op: int, d: Any, event: str | None = None) -> None:
        async with self.lock:
            frame: Json = {"op": op, "d": d, "s": None, "t": event}
            if op == 0:
                self.seq += 1
                frame["s"] = self.seq
                self.events.append(frame)
                del self.events[:-1000]  # Discord keeps a bounded backlog too
            if self.ws.closed:
                return
            with contextlib.suppress(ConnectionError):
                # TEXT frames: the client only inflates BINARY ones.
                await self.ws.send_str(json.dumps(frame))


# ---------------------------------------------------------------- validation
# The rules themselves, each citing Discord's docs, live in tests/discord_rules.py.


def walk_components(components: list[Json]) -> list[Json]:
    """Every component, nested ones included (rows, containers, sections, labels)."""
    return [component for _, component in rules.walk(components, ())]


def check_message(body: Json, files: list[UploadedFile], upload_limit: int) -> None:
    """Reject what Discord rejects; ``upload_limit`` is the per-file size cap."""
    rules.check_message_body(body)
    rules.check_files([len(f.data) for f in files], upload_limit)


def check_not_empty(body: Json, files: list[UploadedFile]) -> None:
    rules.check_not_empty(body, len(files))


# ---------------------------------------------------------------- files


def sniff_content_type(data: bytes, filename: str) -> str | None:
    """What Discord reports: detected from the bytes, else guessed from the name."""
    magics = (
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff", "image/jpeg"),
        (b"GIF8", "image/gif"),
        (b"PK\x03\x04", "application/zip"),
    )
    for magic, content_type in magics:
        if data.startswith(magic):
            return content_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return mimetypes.guess_type(filename)[0]


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header only (never decodes: bombs must stay cheap)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    try:
        from PIL import Image  # optional: without Pillow, non-PNG images get no size
    except ImportError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Exception:  # a corrupt or hostile file simply has no known size
        return None


async def read_request(request: web.Request, path: str) -> RecordedRequest:
    """Parse a JSON or multipart (``payload_json`` + ``files[n]``) body for the log."""
    body: Any = None
    files: list[UploadedFile] = []
    if request.content_type == "application/json":
        raw = await request.read()
        body = json.loads(raw) if raw else None
    elif request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        async for part in reader:
            data = bytes(await part.read(decode=False))  # type: ignore[union-attr]
            name = getattr(part, "name", None)
            if name == "payload_json":
                body = json.loads(data)
            elif getattr(part, "filename", None) is not None:
                content_type = part.headers.get("Content-Type")
                files.append(UploadedFile(name or "", part.filename, content_type, data))  # type: ignore[union-attr,arg-type]
    return RecordedRequest(request.method, path, dict(request.query), body, files)


# ---------------------------------------------------------------- the emulator


class DiscordEmulator:
    """REST + gateway + CDN for one guild, on 127.0.0.1 at a free port.

    State (messages, commands, files) lives on the emulator, not the connection:
    a bot may disconnect and a new client connect and find everything still there.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._ids = Snowflakes()
        self.application_id = self._ids.next()
        # Modern applications share their id with their bot user.
        self.bot_user = EmulatedUser(self.application_id, "sdbot", bot=True)
        self.guild_id = self._ids.next()
        self.admin_role_id = self._ids.next()
        self.channel_id = self._ids.next()
        self.alice = EmulatedUser(self._ids.next(), "alice")
        self.bob = EmulatedUser(self._ids.next(), "bob")
        self.admin = EmulatedUser(self._ids.next(), "admin", role_ids=(self.admin_role_id,))
        self.members: list[EmulatedUser] = [self.alice, self.bob, self.admin]
        self.response_deadline = 3.0  # seconds to answer an interaction, as on Discord
        self.upload_limit = 10 * MiB  # per file, for bot uploads (no boosts)
        # Discord's per-route buckets and global limit (tests/discord_ratelimits.py);
        # None switches them off.
        self.rate_limiter: RateLimiter | None = RateLimiter()

        self.global_commands: list[Json] = []
        self.guild_commands: dict[str, list[Json]] = {}
        self.requests: list[RecordedRequest] = []
        self.unknown_routes: list[RecordedRequest] = []
        self.error_responses: list[tuple[RecordedRequest, Json]] = []
        self.identify_payloads: list[Json] = []
        self.interactions: list[InteractionRecord] = []
        self.deleted_messages: list[Json] = []

        self._channels: dict[str, Json] = {self.channel_id: self._text_channel("general")}
        self.extra_guilds: list[str] = []  # add_guild(): more servers the bot is in
        self.extra_roles: dict[str, list[Json]] = {}  # add_role(): guild id → roles
        self._messages: dict[str, dict[str, Json]] = {self.channel_id: {}}
        self._files: dict[str, tuple[bytes, str | None]] = {}
        self._interactions_by_token: dict[str, InteractionRecord] = {}
        self._sessions: list[GatewaySession] = []
        self._known_sessions: set[str] = set()
        # Sessions whose connection dropped, by id: RESUME continues them (see drop_gateway).
        self._detached: dict[str, GatewaySession] = {}
        self.resumes: list[Json] = []  # RESUME payloads received
        self.replayed: list[Json] = []  # frames replayed on RESUME
        self.expected_errors: set[int] = set()  # error codes a test expects the bot to get
        self._bot_permissions: dict[str, int] = {}  # channel id → the bot's permissions there
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=200 * MiB)
        self._add_routes(app.router)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.debug("Discord emulator listening on %s", self.base_url)

    async def close(self) -> None:
        for session in list(self._sessions):
            await session.ws.close(code=1001, message=b"emulator shutting down")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> DiscordEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("start() the emulator first")
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        """The value for ``discord.http.Route.BASE``."""
        return self.base_url + API_PREFIX

    @property
    def gateway_url(self) -> str:
        return f"ws://{self.host}:{self.port}/gateway"

    @property
    def bot_user_id(self) -> str:
        return self.bot_user.id

    @property
    def connected(self) -> bool:
        """Whether a client is identified on the gateway now."""
        return any(s.session_id for s in self._sessions)

    # ------------------------------------------------------------ world payloads

    def _text_channel(
        self,
        name: str,
        channel_id: str | None = None,
        guild_id: str | None = None,
        nsfw: bool = False,
    ) -> Json:
        return {
            "id": channel_id or self.channel_id,
            "type": 0,
            "guild_id": guild_id or self.guild_id,
            "name": name,
            "position": 0,
            "permission_overwrites": [],
            "nsfw": nsfw,
            "parent_id": None,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "flags": 0,
        }

    def add_guild(self) -> tuple[str, str]:
        """A second (third…) server with the same members and a #general; returns
        (guild id, channel id). Add it before the bot connects."""
        guild_id = self._ids.next()
        self.extra_guilds.append(guild_id)
        return guild_id, self.add_channel("general", guild_id=guild_id)

    def add_member(self, name: str, role_ids: tuple[str, ...] = ()) -> EmulatedUser:
        """Another member of every guild (before the bot connects), with these roles."""
        member = EmulatedUser(self._ids.next(), name, role_ids=role_ids)
        self.members.append(member)
        return member

    def add_role(self, name: str, guild_id: str | None = None) -> str:
        """A role without permissions; give it to a member with ``add_member``."""
        role_id = self._ids.next()
        self.extra_roles.setdefault(guild_id or self.guild_id, []).append(
            {**self._roles()[0], "id": role_id, "name": name, "permissions": "0", "position": 1}
        )
        return role_id

    def _roles(self, guild_id: str | None = None) -> list[Json]:
        guild_id = guild_id or self.guild_id

        def role(role_id: str, name: str, permissions: int, position: int) -> Json:
            return {
                "id": role_id,
                "name": name,
                "permissions": str(permissions),
                "position": position,
                "color": 0,
                "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
                "hoist": False,
                "managed": False,
                "mentionable": False,
                "icon": None,
                "unicode_emoji": None,
                "flags": 0,
            }

        return [
            role(guild_id, "@everyone", EVERYONE_PERMISSIONS, 0),
            role(self.admin_role_id, "Admin", ADMINISTRATOR, 1),
            *self.extra_roles.get(guild_id, []),
        ]

    def permissions_of(self, user: EmulatedUser) -> int:
        if self.admin_role_id in user.role_ids:
            return ALL_PERMISSIONS
        return EVERYONE_PERMISSIONS

    def member_payload(self, user: EmulatedUser, with_permissions: bool = False) -> Json:
        member: Json = {
            "user": user.payload(),
            "roles": list(user.role_ids),
            "joined_at": "2024-01-01T00:00:00+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,
            "nick": None,
            "avatar": None,
            "pending": False,
            "premium_since": None,
            "communication_disabled_until": None,
        }
        if with_permissions:
            member["permissions"] = str(self.permissions_of(user))
        return member

    def user(self, user_id: str) -> EmulatedUser | None:
        return next((u for u in [*self.members, self.bot_user] if u.id == str(user_id)), None)

    def _guild_create(self, guild_id: str | None = None) -> Json:
        guild_id = guild_id or self.guild_id
        members = [self.member_payload(u) for u in [*self.members, self.bot_user]]
        return {
            "id": guild_id,
            "name": "Emulated Guild",
            "icon": None,
            "owner_id": self.admin.id,
            "unavailable": False,
            "large": False,
            "member_count": len(members),
            "joined_at": "2024-01-01T00:00:00+00:00",
            "preferred_locale": "en-US",
            "features": [],
            "roles": self._roles(guild_id),
            "channels": [
                c
                for c in self._channels.values()
                if c.get("guild_id") == guild_id and c["type"] not in THREAD_TYPES
            ],
            "members": members,
            "emojis": [],
            "stickers": [],
            "threads": [c for c in self._channels.values() if c["type"] in THREAD_TYPES],
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "system_channel_id": next(
                c["id"] for c in self._channels.values() if c.get("guild_id") == guild_id
            ),
            "rules_channel_id": None,
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_progress_bar_enabled": False,
        }

    def _ready(self, session: GatewaySession, identify: Json) -> Json:
        ready: Json = {
            "v": 10,
            "user": {**self.bot_user.payload(), "verified": True, "mfa_enabled": False},
            "guilds": [{"id": g, "unavailable": True} for g in [self.guild_id, *self.extra_guilds]],
            "session_id": session.session_id,
            "resume_gateway_url": self.gateway_url,
            "application": {"id": self.application_id, "flags": 0},
            "private_channels": [],
            "relationships": [],
            "user_settings": {},
            "_trace": ["emulator"],
        }
        if "shard" in identify:
            ready["shard"] = identify["shard"]
        return ready

    def _application(self) -> Json:
        return {
            "id": self.application_id,
            "name": "sdbot",
            "description": "Stable Diffusion for the emulated guild",
            "icon": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.admin.payload(),
            "verify_key": "0" * 64,
            "flags": 0,
            "team": None,
            "bot": self.bot_user.payload(),
        }

    # ------------------------------------------------------------ HTTP plumbing

    def _add_routes(self, router: web.UrlDispatcher) -> None:
        api = API_PREFIX
        webhook_message = api + "/webhooks/{app_id}/{token}/messages/{message_id}"
        channel_message = api + "/channels/{channel_id}/messages/{message_id}"
        reaction = channel_message + "/reactions/{emoji}/@me"
        routes = [
            ("GET", "/gateway", self._gateway),
            ("GET", api + "/gateway", self._get_gateway),
            ("GET", api + "/gateway/bot", self._get_gateway),
            ("GET", api + "/users/@me", self._get_me),
            ("POST", api + "/users/@me/channels", self._create_dm),
            ("GET", api + "/users/{user_id}", self._get_user),
            ("GET", api + "/oauth2/applications/@me", self._get_application),
            ("GET", api + "/applications/@me", self._get_application),
            ("GET", api + "/applications/{app_id}/commands", self._get_commands),
            ("PUT", api + "/applications/{app_id}/commands", self._put_commands),
            ("GET", api + "/applications/{app_id}/guilds/{guild_id}/commands", self._get_commands),
            ("PUT", api + "/applications/{app_id}/guilds/{guild_id}/commands", self._put_commands),
            ("POST", api + "/interactions/{interaction_id}/{token}/callback", self._callback),
            ("POST", api + "/webhooks/{app_id}/{token}", self._execute_webhook),
            ("GET", webhook_message, self._get_webhook_message),
            ("PATCH", webhook_message, self._edit_webhook_message),
            ("DELETE", webhook_message, self._delete_webhook_message),
            ("GET", api + "/channels/{channel_id}", self._get_channel),
            ("GET", api + "/channels/{channel_id}/messages", self._history),
            ("POST", api + "/channels/{channel_id}/messages", self._post_channel_message),
            ("POST", api + "/channels/{channel_id}/typing", self._no_content),
            ("GET", channel_message, self._get_channel_message),
            ("PATCH", channel_message, self._edit_channel_message),
            ("DELETE", channel_message, self._delete_channel_message),
            ("PUT", reaction, self._no_content),
            ("DELETE", reaction, self._no_content),
            ("GET", api + "/guilds/{guild_id}/members/{user_id}", self._get_member),
            ("GET", "/attachments/{channel_id}/{attachment_id}/{filename}", self._cdn),
            ("GET", "/ephemeral-attachments/{channel_id}/{attachment_id}/{filename}", self._cdn),
        ]
        for method, path, handler in routes:
            router.add_route(method, path, handler)
        router.add_route("*", "/{tail:.*}", self._unknown_route)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/gateway":
            return await handler(request)
        path = request.path.removeprefix(API_PREFIX)
        recorded = await read_request(request, path)
        self.requests.append(recorded)
        context = RequestContext(recorded)
        reset = current_request.set(context)
        limit_headers: dict[str, str] = {}
        try:
            self._check_auth(request, path)
            limit_headers = self._rate_limit(request)
            response = await handler(request)
        except DiscordError as error:
            response = self._error_response(context, error)
        except RateLimited as limited:
            response = json_response(limited.body(), 429)
            limit_headers = limited.headers
        finally:
            current_request.reset(reset)
        response.headers.update(limit_headers)
        recorded.status = response.status
        if response.status in (401, 403):
            self.rate_limiter.invalid_requests += 1
        self._notify()
        return response

    def _error_response(self, context: RequestContext, error: DiscordError) -> web.Response:
        recorded = context.recorded
        log.debug("%s %s -> %s", recorded.method, recorded.path, error)
        self.error_responses.append((recorded, error.body()))
        if context.interaction is not None:
            context.interaction.errors.append(error.body())
        return json_response(error.body(), error.status)

    def _rate_limit(self, request: web.Request) -> dict[str, str]:
        """The X-RateLimit-* headers for this request's bucket, or RateLimited (a 429)."""
        if not request.path.startswith(API_PREFIX) or self.rate_limiter is None:
            return {}
        route = request.match_info.route.resource
        template = route.canonical.removeprefix(API_PREFIX) if route is not None else ""
        return self.rate_limiter.check(
            request.method, template, dict(request.match_info), request.path
        )

    def _check_auth(self, request: web.Request, path: str) -> None:
        # Webhook, callback and CDN routes are authorised by their token or URL instead.
        if not request.path.startswith(API_PREFIX):
            return
        if path.startswith(("/webhooks/", "/interactions/")):
            return
        if not request.headers.get("Authorization", "").startswith("Bot "):
            raise DiscordError(401, 0, "401: Unauthorized")

    def _body(self, request: web.Request) -> tuple[Json, list[UploadedFile]]:
        recorded = current_request.get().recorded
        return (recorded.json if isinstance(recorded.json, dict) else {}), recorded.files

    async def _unknown_route(self, request: web.Request) -> web.Response:
        self.unknown_routes.append(current_request.get().recorded)
        raise DiscordError(404, 0, "Unknown route")

    async def _no_content(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    def _notify(self) -> None:
        # Wake every wait_for(); each waiter re-checks its own predicate.
        self._changed.set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------ gateway

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        session = GatewaySession(ws)
        self._sessions.append(session)
        await session.send(10, {"heartbeat_interval": 41250})
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    await self._on_frame(session, json.loads(message.data))
                elif message.type == WSMsgType.ERROR:
                    break
        finally:
            self._sessions.remove(session)
            clean = ws.close_code in (1000, 1001) and not session.dropped
            if clean:  # a client closing cleanly ends its session, as on Discord
                self._known_sessions.discard(session.session_id or "")
            elif session.session_id in self._known_sessions:
                self._detached[session.session_id] = session  # RESUME may continue it
            self._notify()
        return ws

    async def _on_frame(self, session: GatewaySession, frame: Json) -> None:
        op, data = frame.get("op"), frame.get("d")
        if op == 1:
            await session.send(11, None)
        elif op == 2:
            await self._identify(session, data)
        elif op == 6:
            await self._resume(session, data)
        elif op == 8:
            await self._send_member_chunk(session, data)
        # op 3 (presence) and op 4 (voice state) need no answer.

    async def _identify(self, session: GatewaySession, identify: Json) -> None:
        self.identify_payloads.append(identify)
        session.intents = int(identify.get("intents", 0))
        session.session_id = secrets.token_hex(16)
        self._known_sessions.add(session.session_id)
        await session.send(0, self._ready(session, identify), "READY")
        await session.send(0, self._guild_create(), "GUILD_CREATE")
        for guild_id in self.extra_guilds:
            await session.send(0, self._guild_create(guild_id), "GUILD_CREATE")
        self._notify()

    async def _resume(self, session: GatewaySession, resume: Json) -> None:
        self.resumes.append(resume)
        session_id = resume.get("session_id")
        old = self._detached.pop(session_id, None) if session_id in self._known_sessions else None
        if old is None:
            await session.send(9, False)  # invalid session: the client identifies afresh
            return
        # Continue the old session: same sequence, and every dispatch the client missed
        # (sent after the seq it last saw, or meant for it while it was away) replayed.
        session.session_id, session.intents = old.session_id, old.intents
        session.seq, session.events = old.seq, old.events
        missed = [f for f in old.events if f["s"] > int(resume.get("seq") or 0)]
        async with session.lock:
            for frame in missed:
                self.replayed.append(frame)
                with contextlib.suppress(ConnectionError):
                    await session.ws.send_str(json.dumps(frame))
        await session.send(0, {"_trace": ["emulator"]}, "RESUMED")
        self._notify()

    async def _send_member_chunk(self, session: GatewaySession, request: Json) -> None:
        chunk = {
            "guild_id": self.guild_id,
            "members": [self.member_payload(u) for u in [*self.members, self.bot_user]],
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [],
        }
        if request.get("nonce"):
            chunk["nonce"] = request["nonce"]
        await session.send(0, chunk, "GUILD_MEMBERS_CHUNK")

    def _active_session(self) -> GatewaySession:
        sessions = [s for s in self._sessions if s.session_id and not s.ws.closed]
        if not sessions and self._detached:
            # Disconnected but resumable: Discord queues the events for the RESUME.
            return list(self._detached.values())[-1]
        if not sessions:
            raise RuntimeError("no bot is connected to the emulator's gateway")
        return sessions[-1]  # the newest client gets interactions, as after a restart

    async def _broadcast_message_event(self, event: str, message: Json) -> None:
        if message["flags"] & EPHEMERAL:
            return  # ephemeral messages never reach the gateway
        for session in list(self._sessions):
            if session.session_id and self._wants_message(session, message):
                await session.send(0, self._visible_message(session, event, message), event)

    def _wants_message(self, session: GatewaySession, message: Json) -> bool:
        needed = GUILD_MESSAGES if message.get("guild_id") else DIRECT_MESSAGES
        return bool(session.intents & needed)

    def _visible_message(self, session: GatewaySession, event: str, message: Json) -> Json:
        if event == "MESSAGE_DELETE":
            return {k: message[k] for k in ("id", "channel_id", "guild_id") if k in message}
        data = copy.deepcopy(message)
        own = message["author"]["id"] == self.bot_user.id
        mentioned = any(m.get("id") == self.bot_user.id for m in message.get("mentions", []))
        privileged = session.intents & MESSAGE_CONTENT or own or mentioned
        if message.get("guild_id") and not privileged:
            # Without the message-content intent Discord blanks these fields.
            data.update(content="", embeds=[], attachments=[], components=[])
        return data

    # ------------------------------------------------------------ REST: identity and commands

    async def _get_gateway(self, request: web.Request) -> web.Response:
        limit = {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}
        body = {"url": self.gateway_url, "shards": 1, "session_start_limit": limit}
        return json_response(body)

    async def _get_me(self, request: web.Request) -> web.Response:
        return json_response({**self.bot_user.payload(), "verified": True, "mfa_enabled": False})

    async def _get_user(self, request: web.Request) -> web.Response:
        user = self.user(request.match_info["user_id"])
        if user is None:
            raise unknown("User", 10013)
        return json_response(user.payload())

    async def _get_member(self, request: web.Request) -> web.Response:
        user = self.user(request.match_info["user_id"])
        if request.match_info["guild_id"] != self.guild_id:
            raise unknown("Guild", 10004)
        if user is None:
            raise unknown("Member", 10007)
        return json_response(self.member_payload(user))

    async def _get_application(self, request: web.Request) -> web.Response:
        return json_response(self._application())

    def _check_app(self, request: web.Request) -> str | None:
        if request.match_info["app_id"] != self.application_id:
            raise unknown("Application", 10002)
        guild_id = request.match_info.get("guild_id")
        if guild_id is not None and guild_id not in (self.guild_id, *self.extra_guilds):
            raise DiscordError(403, 50001, "Missing Access")
        return guild_id

    async def _get_commands(self, request: web.Request) -> web.Response:
        guild_id = self._check_app(request)
        if guild_id is None:
            return json_response(self.global_commands)
        return json_response(self.guild_commands.get(guild_id, []))

    async def _put_commands(self, request: web.Request) -> web.Response:
        guild_id = self._check_app(request)
        body = current_request.get().recorded.json
        if not isinstance(body, list):
            raise invalid_form("commands", "Must be an array.")
        rules.check_commands(body)
        previous = self.guild_commands.get(guild_id, []) if guild_id else self.global_commands
        stored = [self._stored_command(c, previous, guild_id) for c in body]
        if guild_id is None:
            self.global_commands = stored
        else:
            self.guild_commands[guild_id] = stored
        return json_response(stored)

    def _stored_command(self, command: Json, previous: list[Json], guild_id: str | None) -> Json:
        # Discord keeps a command's id across syncs when its name and type stay the same.
        kind = command.get("type", 1)
        same = [p for p in previous if p["name"] == command["name"] and p["type"] == kind]
        stored = {
            "default_member_permissions": None,
            "nsfw": False,
            "options": [],
            **command,
            "id": same[0]["id"] if same else self._ids.next(),
            "application_id": self.application_id,
            "type": kind,
            "version": self._ids.next(),
        }
        if guild_id is not None:
            stored["guild_id"] = guild_id
        return stored

    def get_command(
        self, name: str, guild_only: bool = False, guild_id: str | None = None
    ) -> Json | None:
        """A synced command by name: this guild's first, then global ones."""
        commands = self.guild_commands.get(guild_id or self.guild_id, [])
        found = [c for c in commands if c["name"] == name]
        if not found and not guild_only:
            found = [c for c in self.global_commands if c["name"] == name]
        return copy.deepcopy(found[0]) if found else None

    # ------------------------------------------------------------ REST: interactions

    def _interaction_for_callback(self, request: web.Request) -> InteractionRecord:
        record = self._interactions_by_token.get(request.match_info["token"])
        if record is None or record.id != request.match_info["interaction_id"]:
            raise unknown("interaction", 10062)
        current_request.get().interaction = record
        if record.callback_type is not None:
            raise DiscordError(400, 40060, "Interaction has already been acknowledged.")
        if asyncio.get_running_loop().time() - record.sent_at > self.response_deadline:
            # What a bot sees when it answers after Discord's 3 seconds.
            raise unknown("interaction", 10062)
        return record

    async def _callback(self, request: web.Request) -> web.Response:
        record = self._interaction_for_callback(request)
        body, files = self._body(request)
        kind = body.get("type")
        data = body.get("data") or {}
        await self._apply_callback(record, kind, data, files)
        record.callback_type = CallbackType(kind)
        record.callback_body = body
        record.responded_at = asyncio.get_running_loop().time()
        record.responded.set()
        return json_response(self._callback_answer(record, kind))

    async def _apply_callback(
        self, record: InteractionRecord, kind: Any, data: Json, files: list[UploadedFile]
    ) -> None:
        component_like = record.type in (3, 5) and "message" in record.payload
        if kind in (4, 5):
            message = await self._create_interaction_message(record, data, files, kind == 5)
            record.original_id = message["id"]
        elif kind in (6, 7) and component_like:
            message = self._stored(record.payload["message"]["id"])
            if kind == 7:
                await self._edit_message(message, data, files)
            record.original_id = message["id"]
        elif kind == 8 and record.type == 4:
            rules.check_autocomplete(data)
        elif kind == 9 and record.type in (2, 3):
            rules.check_modal(data)
        elif kind != 1:
            raise invalid_form("type", f"Callback type {kind} is not valid for this interaction")

    def _callback_answer(self, record: InteractionRecord, kind: int) -> Json:
        answer: Json = {"interaction": {"id": record.id, "type": record.type}}
        message = record.original if kind in (4, 5, 7) else None
        if message is not None:
            answer["interaction"].update(
                response_message_id=message["id"],
                response_message_loading=kind == 5,
                response_message_ephemeral=bool(message["flags"] & EPHEMERAL),
            )
            answer["resource"] = {"type": kind, "message": message}
        elif kind != 1:
            answer["resource"] = {"type": kind}
        return answer

    async def _create_interaction_message(
        self, record: InteractionRecord, data: Json, files: list[UploadedFile], loading: bool
    ) -> Json:
        if loading:
            # A defer only decides "thinking" and ephemeral; the content comes later.
            data, files = {"flags": (data.get("flags") or 0) & EPHEMERAL}, []
        else:
            check_not_empty(data, files)  # RESPONSES_DOC: type 4 needs something to show
        message_type = 20 if record.type == 2 else 0
        return await self._create_message(
            record.channel_id,
            data,
            files,
            author=self.bot_user,
            interaction=record,
            message_type=message_type,
            extra_flags=LOADING if loading else 0,
        )

    def _interaction_for_webhook(self, request: web.Request) -> InteractionRecord:
        record = self._interactions_by_token.get(request.match_info["token"])
        if record is None or request.match_info["app_id"] != self.application_id:
            raise unknown("Webhook", 10015)
        current_request.get().interaction = record
        if record.expired:
            raise DiscordError(401, 50027, "Invalid Webhook Token")
        if record.callback_type is None:
            raise unknown("Webhook", 10015)  # no follow-ups before the first answer
        return record

    async def _execute_webhook(self, request: web.Request) -> web.Response:
        record = self._interaction_for_webhook(request)
        body, files = self._body(request)
        original = record.original
        if original is not None and original["flags"] & LOADING:
            # Discord turns the first follow-up after a thinking defer into the original
            # response; the defer already decided whether it is ephemeral.
            flags = ((body.get("flags") or 0) & ~EPHEMERAL) | (original["flags"] & EPHEMERAL)
            message = await self._edit_message(
                self._stored(original["id"]), {**body, "flags": flags}, files
            )
        else:
            check_not_empty(body, files)
            message = await self._create_message(
                record.channel_id, body, files, author=self.bot_user, interaction=record
            )
            record.followup_ids.append(message["id"])
        if request.query.get("wait", "").lower() in ("1", "true"):
            return json_response(message)
        return web.Response(status=204)

    def _webhook_message(self, request: web.Request) -> tuple[InteractionRecord, Json]:
        record = self._interaction_for_webhook(request)
        message_id = request.match_info["message_id"]
        if message_id == "@original":
            message_id = record.original_id or ""
        if message_id not in [record.original_id, *record.followup_ids]:
            raise unknown("Message", 10008)
        return record, self._stored(message_id)

    async def _get_webhook_message(self, request: web.Request) -> web.Response:
        _, message = self._webhook_message(request)
        return json_response(message)

    async def _edit_webhook_message(self, request: web.Request) -> web.Response:
        _, message = self._webhook_message(request)
        body, files = self._body(request)
        return json_response(await self._edit_message(message, body, files))

    async def _delete_webhook_message(self, request: web.Request) -> web.Response:
        _, message = self._webhook_message(request)
        await self._delete_message(message)
        return web.Response(status=204)

    # ------------------------------------------------------------ REST: channels and messages

    def _channel(self, request: web.Request) -> Json:
        channel = self._channels.get(request.match_info["channel_id"])
        if channel is None:
            raise unknown("Channel", 10003)
        return channel

    def _stored(self, message_id: str) -> Json:
        for messages in self._messages.values():
            if message_id in messages:
                return messages[message_id]
        raise unknown("Message", 10008)

    def _channel_message(self, request: web.Request) -> Json:
        channel = self._channel(request)
        message = self._messages[channel["id"]].get(request.match_info["message_id"])
        if message is None or message["flags"] & EPHEMERAL:
            raise unknown("Message", 10008)  # ephemeral messages exist only for their webhook
        return message

    async def _get_channel(self, request: web.Request) -> web.Response:
        return json_response(self._channel(request))

    async def _create_dm(self, request: web.Request) -> web.Response:
        body, _ = self._body(request)
        user = self.user(str(body.get("recipient_id")))
        if user is None:
            raise unknown("User", 10013)
        return json_response(self.dm_channel(user))

    def dm_channel(self, user: EmulatedUser) -> Json:
        """The bot's DM channel with ``user`` (created on first use)."""
        for channel in self._channels.values():
            if channel["type"] == 1 and channel["recipients"][0]["id"] == user.id:
                return channel
        channel_id = self._ids.next()
        channel = {
            "id": channel_id,
            "type": 1,
            "recipients": [user.payload()],
            "last_message_id": None,
        }
        self._channels[channel_id] = channel
        self._messages[channel_id] = {}
        return channel

    async def _history(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        query = request.query
        limit = max(1, min(100, int(query.get("limit", 50))))
        messages = [m for m in self._messages[channel["id"]].values() if not m["flags"] & EPHEMERAL]
        if "before" in query:
            messages = [m for m in messages if int(m["id"]) < int(query["before"])]
        if "after" in query:
            messages = [m for m in messages if int(m["id"]) > int(query["after"])]
            return json_response(list(reversed(messages[:limit])))
        return json_response(list(reversed(messages))[:limit])  # newest first

    async def _post_channel_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        body, files = self._body(request)
        self._check_bot_can_post(channel, body, files)
        check_not_empty(body, files)
        message = await self._create_message(channel["id"], body, files, author=self.bot_user)
        return json_response(message)

    async def _get_channel_message(self, request: web.Request) -> web.Response:
        return json_response(self._channel_message(request))

    async def _edit_channel_message(self, request: web.Request) -> web.Response:
        message = self._channel_message(request)
        if message["author"]["id"] != self.bot_user.id:
            raise DiscordError(403, 50005, "Cannot edit a message authored by another user")
        body, files = self._body(request)
        return json_response(await self._edit_message(message, body, files))

    async def _delete_channel_message(self, request: web.Request) -> web.Response:
        await self._delete_message(self._channel_message(request))
        return web.Response(status=204)

    async def _cdn(self, request: web.Request) -> web.Response:
        stored = self._files.get(request.match_info["attachment_id"])
        if stored is None:
            return web.Response(status=404, text="Not Found")
        data, content_type = stored
        headers = {"Content-Type": content_type or "application/octet-stream"}
        return web.Response(body=data, headers=headers)

    # ------------------------------------------------------------ message store

    async def _create_message(
        self,
        channel_id: str,
        body: Json,
        files: list[UploadedFile],
        *,
        author: EmulatedUser,
        interaction: InteractionRecord | None = None,
        message_type: int = 0,
        extra_flags: int = 0,
        posted_attachments: list[Json] | None = None,
    ) -> Json:
        check_message(body, files, self.upload_limit)
        channel = self._channels[channel_id]
        message: Json = {
            "id": self._ids.next(),
            "channel_id": channel_id,
            "type": message_type,
            "content": body.get("content") or "",
            "author": author.payload(),
            "embeds": body.get("embeds") or [],
            "components": body.get("components") or [],
            "attachments": posted_attachments or self._attachments_for(channel_id, body, files, []),
            "flags": (body.get("flags") or 0) | extra_flags,
            "timestamp": now_iso(),
            "edited_timestamp": None,
            "tts": bool(body.get("tts")),
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "pinned": False,
        }
        if channel.get("guild_id"):
            message["guild_id"] = channel["guild_id"]
            if not author.bot:  # gateway events carry the author's member for guild messages
                message["member"] = {
                    k: v for k, v in self.member_payload(author).items() if k != "user"
                }
        if body.get("message_reference"):
            message["message_reference"] = {"channel_id": channel_id, **body["message_reference"]}
        if interaction is not None:
            message.update(self._interaction_origin(interaction))
        self._messages[channel_id][message["id"]] = message
        if not message["flags"] & EPHEMERAL:
            channel["last_message_id"] = message["id"]
        await self._broadcast_message_event("MESSAGE_CREATE", message)
        return message

    def _interaction_origin(self, record: InteractionRecord) -> Json:
        metadata: Json = {
            "id": record.id,
            "type": record.type,
            "user": record.user.payload(),
            "authorizing_integration_owners": {"0": self.guild_id},
        }
        if record.type == 2:
            metadata["name"] = record.name
        if record.original_id:
            metadata["original_response_message_id"] = record.original_id
        if "message" in record.payload:
            metadata["interacted_message_id"] = record.payload["message"]["id"]
        return {
            "webhook_id": self.application_id,
            "application_id": self.application_id,
            "interaction_metadata": metadata,
        }

    def _attachments_for(
        self, channel_id: str, body: Json, files: list[UploadedFile], existing: list[Json]
    ) -> list[Json]:
        """The message's attachments: kept existing ones plus new uploads, as ``attachments`` lists.

        discord.py lists every attachment to keep in ``attachments``: existing ones by
        their id, new ones by their ``files[n]`` index. Without the key, uploads add on.
        """
        uploads = {f.index: f for f in files}
        kept = {a["id"]: a for a in existing}
        spec = body.get("attachments")
        if spec is None:
            spec = [{"id": a["id"]} for a in existing] + [{"id": i} for i in uploads]
        result: list[Json] = []
        for i, entry in enumerate(spec):
            entry_id = str(entry.get("id"))
            if entry_id in kept:
                result.append(kept[entry_id])
                continue
            upload = uploads.pop(int(entry_id), None) if entry_id.isdigit() else None
            if upload is None:
                raise invalid_form(f"attachments.{i}", f"Unknown attachment {entry_id}")
            filename = entry.get("filename") or upload.filename
            result.append(self._store_file(upload.data, filename, None, channel_id))
        result += [self._store_file(f.data, f.filename, None, channel_id) for f in uploads.values()]
        return result

    def _store_file(
        self,
        data: bytes,
        filename: str,
        content_type: str | None,
        channel_id: str,
        folder: str = "attachments",
    ) -> Json:
        attachment_id = self._ids.next()
        content_type = content_type or sniff_content_type(data, filename)
        self._files[attachment_id] = (data, content_type)
        path = f"/{folder}/{channel_id}/{attachment_id}/{quote(filename)}"
        # Signed-looking query parameters, as real CDN links carry.
        signature = f"?ex={int(time.time()) + 86400:x}&is={int(time.time()):x}&hm={attachment_id}"
        attachment: Json = {
            "id": attachment_id,
            "filename": filename,
            "size": len(data),
            "url": self.base_url + path + signature,
            "proxy_url": self.base_url + path + signature,
        }
        if content_type:
            attachment["content_type"] = content_type
        size = image_size(data) if (content_type or "").startswith("image/") else None
        if size:
            attachment["width"], attachment["height"] = size
        return attachment

    async def _edit_message(self, message: Json, body: Json, files: list[UploadedFile]) -> Json:
        merged = {k: message[k] for k in ("content", "embeds", "components", "flags")}
        merged.update({k: body[k] for k in merged if body.get(k) is not None})
        check_message(merged, files, self.upload_limit)
        final = {k: body[k] if k in body else message.get(k) for k in ("content", "embeds")}
        final["components"] = body["components"] if "components" in body else message["components"]
        final["attachments"] = body.get("attachments", message["attachments"])
        if not message["flags"] & LOADING:
            check_not_empty(final, files)  # an edit may not leave the message empty either
        for key in ("content", "embeds", "components"):
            if key in body:
                message[key] = body[key] if body[key] is not None else type(message[key])()
        if "attachments" in body or files:
            message["attachments"] = self._attachments_for(
                message["channel_id"], body, files, message["attachments"]
            )
        if body.get("flags") is not None:
            # Only display flags change; ephemerality is fixed when a message is created.
            message["flags"] = (message["flags"] & EPHEMERAL) | (body["flags"] & ~EPHEMERAL)
        message["flags"] &= ~LOADING  # any edit ends "thinking..."
        message["edited_timestamp"] = now_iso()
        await self._broadcast_message_event("MESSAGE_UPDATE", message)
        return message

    async def _delete_message(self, message: Json) -> None:
        del self._messages[message["channel_id"]][message["id"]]
        self.deleted_messages.append(message)
        await self._broadcast_message_event("MESSAGE_DELETE", message)

    # ------------------------------------------------------------ test helpers: faults

    async def drop_gateway(self, *, resumable: bool = True, code: int = 4000) -> None:
        """Cut the bot's websocket, as Discord does now and then.

        ``resumable``: the client's RESUME continues the session and gets every event it
        missed (interactions sent meanwhile included); otherwise the session is gone,
        RESUME is answered INVALID_SESSION (op 9, false) and the client identifies anew.
        """
        session = self._active_session()
        session.dropped = True
        if not resumable:
            self._known_sessions.discard(session.session_id or "")
        elif session.session_id:
            self._detached[session.session_id] = session  # before the close handshake ends
        await session.ws.close(code=code, message=b"emulator: connection dropped")

    async def delete_message(self, message_id: str) -> None:
        """A moderator deletes a message (MESSAGE_DELETE goes out as usual)."""
        await self._delete_message(self._stored(str(message_id)))

    def expect_errors(self, *codes: int) -> None:
        """Declare error codes (Discord's JSON code, or the HTTP status) this test expects
        the bot to receive; any other error fails the test at teardown."""
        self.expected_errors.update(codes)

    def unexpected_errors(self) -> list[str]:
        """Error answers the bot got that no test declared: "METHOD path -> status code"."""
        found = []
        for recorded, body in self.error_responses:
            if body.get("code") in self.expected_errors or recorded.status in self.expected_errors:
                continue
            if body.get("message") == "Unknown route":
                continue  # unknown_routes reports these
            found.append(f"{recorded.method} {recorded.path} -> {recorded.status} {body}")
        return found

    def check_clean(self) -> None:
        """What every test's teardown asserts: known routes only, no error the test did not
        expect, no request sent into a rate limit the headers announced."""
        assert self.unknown_routes == [], [f"{r.method} {r.path}" for r in self.unknown_routes]
        unexpected = self.unexpected_errors()
        assert not unexpected, "errors the test did not expect: " + "; ".join(unexpected)
        if self.rate_limiter is not None:
            violations = self.rate_limiter.violations
            assert not violations, f"requests sent into an announced rate limit: {violations}"

    # ------------------------------------------------------------ test helpers: places

    def add_channel(
        self,
        name: str,
        *,
        kind: int = 0,
        parent_id: str | None = None,
        bot_permissions: int | None = None,
        nsfw: bool = False,
        guild_id: str | None = None,
    ) -> str:
        """A guild channel (0 text, 15 forum) or thread (11 public, in ``parent_id``; a
        thread of a forum is a forum post); ``bot_permissions`` the bot's there; ``nsfw``:
        age-restricted; ``guild_id``: in another server (``add_guild``). Returns its id.
        Add channels before the bot connects: they arrive with GUILD_CREATE."""
        channel_id = self._ids.next()
        channel = {**self._text_channel(name, channel_id, guild_id, nsfw), "type": kind}
        if kind in THREAD_TYPES:
            parent = parent_id or self.channel_id
            channel.update(
                parent_id=parent,
                owner_id=self.alice.id,
                member_count=1,
                message_count=0,
                thread_metadata={
                    "archived": False,
                    "auto_archive_duration": 1440,
                    "archive_timestamp": now_iso(),
                    "locked": False,
                },
            )
        self._channels[channel_id] = channel
        self._messages[channel_id] = {}
        if bot_permissions is not None:
            self._bot_permissions[channel_id] = bot_permissions
        return channel_id

    def bot_permissions_in(self, channel_id: str) -> int:
        """The bot's permissions in a channel: what ``app_permissions`` carries."""
        channel = self._channels.get(channel_id, {})
        if channel_id in self._bot_permissions:
            return self._bot_permissions[channel_id]
        if channel.get("parent_id") in self._bot_permissions:
            return self._bot_permissions[channel["parent_id"]]  # threads inherit
        if channel.get("type") == 1:
            return DM_APP_PERMISSIONS
        return EVERYONE_PERMISSIONS | rules.SEND_MESSAGES_IN_THREADS

    def _check_bot_can_post(self, channel: Json, body: Json, files: list[UploadedFile]) -> None:
        if channel.get("type") == 15:
            # A forum holds only posts (threads): 400 / 50008.
            raise DiscordError(400, 50008, "Cannot send messages in a non-text channel")
        rules.check_can_post(
            self.bot_permissions_in(channel["id"]),
            thread=channel.get("type") in THREAD_TYPES,
            has_files=bool(files),
            has_embeds=bool(body.get("embeds")),
        )

    # ------------------------------------------------------------ test helpers: state

    def get_message(self, message_id: str | int) -> Json | None:
        """A copy of a stored message (ephemeral ones too), or None once deleted."""
        with contextlib.suppress(DiscordError):
            return copy.deepcopy(self._stored(str(message_id)))
        return None

    def all_messages(self, *, ephemeral: bool | None = None) -> list[Json]:
        """Copies of every channel's, thread's and DM's messages, oldest first."""
        found = [
            m for cid in self._messages for m in self.channel_messages(cid, ephemeral=ephemeral)
        ]
        return sorted(found, key=lambda m: int(m["id"]))

    def channel_messages(
        self, channel_id: str | int | None = None, *, ephemeral: bool | None = None
    ) -> list[Json]:
        """Copies of a channel's messages, oldest first; ``ephemeral`` filters (None: all)."""
        messages = self._messages.get(str(channel_id or self.channel_id), {}).values()
        if ephemeral is not None:
            messages = [m for m in messages if bool(m["flags"] & EPHEMERAL) == ephemeral]
        return copy.deepcopy(list(messages))

    def attachment_data(self, attachment: Json | str) -> bytes:
        """The bytes behind an attachment object (or its id)."""
        attachment_id = attachment if isinstance(attachment, str) else attachment["id"]
        return self._files[str(attachment_id)][0]

    def requests_to(self, method: str, path_pattern: str) -> list[RecordedRequest]:
        """Recorded requests whose path matches the regular expression ``path_pattern``."""
        return [r for r in self.requests if r.method == method and re.search(path_pattern, r.path)]

    async def wait_for(self, predicate: Callable[[], T], timeout: float = 10.0) -> T:
        """Wait until ``predicate()`` is truthy; return its value.

        A predicate raising LookupError (IndexError, KeyError) counts as "not yet", so
        ``lambda: emulator.channel_messages()[-1]["attachments"]`` works.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            changed = self._changed
            with contextlib.suppress(LookupError):
                if result := predicate():
                    return result
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout}s")
            # Poll too: some conditions (a bot's background task) change nothing here.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, 0.1))

    # ------------------------------------------------------------ test helpers: members act

    def add_attachment(
        self,
        data: bytes,
        filename: str,
        content_type: str | None = None,
        *,
        size: int | None = None,
    ) -> Json:
        """An attachment a member uploads with a command, served from the CDN.

        ``size`` overrides the reported size (claim 40 MB without sending 40 MB).
        """
        attachment = self._store_file(
            data, filename, content_type, self.channel_id, folder="ephemeral-attachments"
        )
        attachment["ephemeral"] = True
        if size is not None:
            attachment["size"] = size
        return attachment

    async def send_command(
        self,
        name: str,
        options: dict[str, Any] | list[Json] | None = None,
        *,
        user: EmulatedUser | None = None,
        attachments: dict[str, Json] | None = None,
        subcommand: str | None = None,
        attachment_size_limit: int = 10 * MiB,
        wait: bool = True,
        timeout: float = 5.0,
        channel_id: str | None = None,
        dm: bool = False,
        force_dm: bool = False,
    ) -> InteractionRecord:
        """A member runs ``/name``; by default waits for the bot's first answer.

        ``channel_id``: in another channel (``add_channel``, ``add_guild``); ``dm``: in the
        member's DM with the bot (no guild, no member object, as Discord sends it).

        ``options`` maps option names to values (types come from the synced command;
        attachment values are dicts from ``add_attachment``) or is a raw option list.
        ``attachments`` is a shorthand for attachment options. ``subcommand`` is
        ``"list"`` or ``"group sub"``. ``channel_id``: where (a channel, thread or the
        member's DM with the bot, see ``dm_channel``); the guild's text channel by default.
        A DM gets only commands whose contexts allow it, unless ``force_dm`` (a stale
        global command, synced before its contexts changed, is offered for up to an hour).
        """
        if dm:  # from the member's DM with the bot, as a stale command would arrive
            channel_id, force_dm = self.dm_channel(user or self.alice)["id"], True
        guild_id = self._channels[channel_id].get("guild_id") if channel_id else None
        command = self._synced_command(name, guild_id)
        if channel_id is not None and self._channels[channel_id]["type"] == 1 and not force_dm:
            self._check_offered_in_dms(command)
        values = {**(options or {}), **(attachments or {})} if not isinstance(options, list) else {}
        data = self._command_data(command, options, values, subcommand, focused=None)
        if channel_id is not None and self._channels[channel_id]["type"] == 1:
            data.pop("guild_id", None)  # a DM's interaction data names no guild
        return await self._send_interaction(
            2,
            user,
            data,
            size_limit=attachment_size_limit,
            wait=wait,
            timeout=timeout,
            channel_id=channel_id,
        )

    def _check_offered_in_dms(self, command: Json) -> None:
        """Discord's client offers a command in the bot's DMs only if it is global and its
        ``contexts`` include BOT_DM (1); None means every context (application-commands
        #contexts)."""
        contexts = command.get("contexts")
        if command.get("guild_id") or (contexts is not None and 1 not in contexts):
            raise LookupError(f"Discord offers no /{command['name']} in DMs (contexts {contexts})")

    async def send_autocomplete(
        self,
        name: str,
        options: dict[str, Any],
        focused: str,
        *,
        user: EmulatedUser | None = None,
        subcommand: str | None = None,
        timeout: float = 5.0,
    ) -> list[Json]:
        """A member types into option ``focused``; returns the bot's choices."""
        command = self._synced_command(name)
        data = self._command_data(command, None, options, subcommand, focused=focused)
        record = await self._send_interaction(4, user, data, timeout=timeout)
        return record.choices

    async def click(
        self,
        message: Json | str,
        custom_id: str,
        *,
        user: EmulatedUser | None = None,
        values: list[str] | None = None,
        wait: bool = True,
        timeout: float = 5.0,
    ) -> InteractionRecord:
        """A member clicks a button (or picks ``values`` in a select) on a stored message."""
        message_id = message if isinstance(message, str) else message["id"]
        stored = self.get_message(message_id)
        if stored is None:
            raise LookupError(f"message {message_id} is gone")
        component = self._component(stored, custom_id)
        data: Json = {"custom_id": custom_id, "component_type": component["type"]}
        if component["type"] in SELECT_TYPES:
            data["values"] = values or []
        return await self._send_interaction(
            3, user, data, message=stored, wait=wait, timeout=timeout
        )

    async def submit_modal(
        self,
        shown: InteractionRecord,
        values: dict[str, Any],
        *,
        user: EmulatedUser | None = None,
        wait: bool = True,
        timeout: float = 5.0,
    ) -> InteractionRecord:
        """A member fills in the modal the bot showed in ``shown``; ``values`` by custom_id."""
        modal = shown.modal
        if modal is None:
            raise ValueError(f"interaction {shown.name!r} showed no modal")
        answers = [modal_answer(c, values) for c in modal["components"]]
        data = {"custom_id": modal["custom_id"], "components": answers}
        message = shown.payload.get("message")
        return await self._send_interaction(
            5, user or shown.user, data, message=message, wait=wait, timeout=timeout
        )

    async def post_message(
        self,
        content: str = "",
        *,
        user: EmulatedUser | None = None,
        attachments: list[Json] | None = None,
        channel_id: str | None = None,
    ) -> Json:
        """A member posts in the channel (dispatched as MESSAGE_CREATE)."""
        author = user or self.alice
        channel_id = channel_id or self.channel_id
        posted = [{k: v for k, v in a.items() if k != "ephemeral"} for a in attachments or []]
        message = await self._create_message(
            channel_id, {"content": content}, [], author=author, posted_attachments=posted
        )
        return copy.deepcopy(message)

    # ------------------------------------------------------------ interaction building

    def _synced_command(self, name: str, guild_id: str | None = None) -> Json:
        command = self.get_command(name, guild_id=guild_id)
        if command is None:
            synced = [
                c["name"]
                for c in [*self.global_commands, *self.guild_commands.get(self.guild_id, [])]
            ]
            raise LookupError(f"/{name} was never synced; synced commands: {synced}")
        return command

    def _command_data(
        self,
        command: Json,
        raw_options: dict[str, Any] | list[Json] | None,
        values: dict[str, Any],
        subcommand: str | None,
        focused: str | None,
    ) -> Json:
        resolved: Json = {}
        definitions = command.get("options") or []
        path: list[Json] = []
        for part in (subcommand or "").split():
            sub = next((o for o in definitions if o["name"] == part), None)
            if sub is None or sub["type"] not in SUBCOMMAND_TYPES:
                raise ValueError(f"/{command['name']} has no subcommand {part!r}")
            path.append(sub)
            definitions = sub.get("options") or []
        if isinstance(raw_options, list):
            options = raw_options
        else:
            options = self._options(definitions, values, resolved, focused)
        for sub in reversed(path):
            options = [{"name": sub["name"], "type": sub["type"], "options": options}]
        data: Json = {
            "id": command["id"],
            "name": command["name"],
            "type": command.get("type", 1),
            "options": options,
        }
        if resolved:
            data["resolved"] = resolved
        if command.get("guild_id"):
            data["guild_id"] = command["guild_id"]  # discord.py looks guild commands up by it
        return data

    def _options(
        self, definitions: list[Json], values: dict[str, Any], resolved: Json, focused: str | None
    ) -> list[Json]:
        by_name = {d["name"]: d for d in definitions}
        options = []
        for name, value in values.items():
            definition = by_name.get(name)
            if definition is None:
                raise ValueError(f"no option {name!r}; options are {sorted(by_name)}")
            option = {"name": name, "type": definition["type"]}
            option["value"] = self._option_value(definition["type"], value, resolved)
            if name == focused:
                option["focused"] = True
            options.append(option)
        missing = [d["name"] for d in definitions if d.get("required") and d["name"] not in values]
        if missing and focused is None:
            raise ValueError(f"required options missing: {missing}")  # Discord's client refuses
        return options

    def _option_value(self, kind: int, value: Any, resolved: Json) -> Any:
        if kind == 11:  # attachment: the id, the object under resolved.attachments
            attachment = value if isinstance(value, dict) else {"id": str(value)}
            resolved.setdefault("attachments", {})[attachment["id"]] = attachment
            return attachment["id"]
        if kind == 6 or (kind == 9 and isinstance(value, EmulatedUser)):  # user or mentionable
            user = value if isinstance(value, EmulatedUser) else self.user(str(value))
            if user is None:
                raise ValueError(f"no member with id {value}")
            resolved.setdefault("users", {})[user.id] = user.payload()
            member = self.member_payload(user, with_permissions=True)
            del member["user"]
            resolved.setdefault("members", {})[user.id] = member
            return user.id
        if kind == 7:
            channel_id = str(value)
            channel = self._channels[channel_id]
            resolved.setdefault("channels", {})[channel_id] = {**channel, "permissions": "0"}
            return channel_id
        if kind == 8:
            role = next(r for r in self._roles() if r["id"] == str(value))
            resolved.setdefault("roles", {})[role["id"]] = role
            return role["id"]
        return value

    def _component(self, message: Json, custom_id: str) -> Json:
        found = [
            c for c in walk_components(message["components"]) if c.get("custom_id") == custom_id
        ]
        if not found:
            ids = [c.get("custom_id") for c in walk_components(message["components"])]
            raise LookupError(f"message {message['id']} has no component {custom_id!r}: {ids}")
        if found[0].get("disabled"):
            raise ValueError(f"component {custom_id!r} is disabled; Discord would not send a click")
        return found[0]

    def _interaction_payload(
        self,
        kind: int,
        user: EmulatedUser,
        data: Json,
        message: Json | None,
        size_limit: int,
        channel_id: str | None = None,
    ) -> Json:
        channel_id = channel_id or (message["channel_id"] if message else self.channel_id)
        channel = self._channels[channel_id]
        if channel["type"] == 1:
            return self._dm_interaction_payload(kind, user, data, message, size_limit, channel)
        guild_id = channel.get("guild_id") or self.guild_id
        permissions = self.permissions_of(user)
        payload: Json = {
            "id": self._ids.next(),
            "application_id": self.application_id,
            "type": kind,
            "data": data,
            "guild_id": guild_id,
            "guild": {"id": guild_id, "locale": "en-US", "features": []},
            "channel_id": channel["id"],
            "channel": {**channel, "permissions": str(permissions)},
            "member": self.member_payload(user, with_permissions=True),
            "token": "itok_" + secrets.token_urlsafe(32),
            "version": 1,
            "app_permissions": str(self.bot_permissions_in(channel["id"])),
            "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": guild_id},
            "context": 0,
            "attachment_size_limit": size_limit,
        }
        if message is not None:
            payload["message"] = copy.deepcopy(message)
        return payload

    def _dm_interaction_payload(
        self,
        kind: int,
        user: EmulatedUser,
        data: Json,
        message: Json | None,
        size_limit: int,
        channel: Json,
    ) -> Json:
        """An interaction from the member's DM with the bot: ``user`` instead of ``member``,
        no guild, context 1 (BOT_DM)."""
        payload: Json = {
            "id": self._ids.next(),
            "application_id": self.application_id,
            "type": kind,
            "data": data,
            "channel_id": channel["id"],
            "channel": channel,
            "user": user.payload(),
            "token": "itok_" + secrets.token_urlsafe(32),
            "version": 1,
            "app_permissions": str(DM_APP_PERMISSIONS),
            "locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": self.guild_id},
            "context": 1,
            "attachment_size_limit": size_limit,
        }
        if message is not None:
            payload["message"] = copy.deepcopy(message)
        return payload

    async def _send_interaction(
        self,
        kind: int,
        user: EmulatedUser | None,
        data: Json,
        *,
        message: Json | None = None,
        size_limit: int = 10 * MiB,
        wait: bool = True,
        timeout: float = 5.0,
        channel_id: str | None = None,
    ) -> InteractionRecord:
        session = self._active_session()
        user = user or self.alice
        payload = self._interaction_payload(kind, user, data, message, size_limit, channel_id)
        record = InteractionRecord(
            id=payload["id"],
            token=payload["token"],
            type=kind,
            payload=payload,
            user=user,
            sent_at=asyncio.get_running_loop().time(),
            emulator=self,
        )
        self.interactions.append(record)
        self._interactions_by_token[record.token] = record
        await session.send(0, payload, "INTERACTION_CREATE")
        if wait:
            await record.wait_response(timeout)
        return record


def modal_answer(component: Json, values: dict[str, Any]) -> Json:
    """The submitted form of one modal component, filled from ``values`` by custom_id."""
    kind = component.get("type")
    if kind == 1:
        return {"type": 1, "components": [modal_answer(c, values) for c in component["components"]]}
    if kind == 18:  # label wrapping one input
        return {"type": 18, "component": modal_answer(component["component"], values)}
    custom_id = component.get("custom_id")
    if kind == 4:
        return {"type": 4, "custom_id": custom_id, "value": values.get(custom_id, "")}
    if kind in SELECT_TYPES:
        return {"type": kind, "custom_id": custom_id, "values": values.get(custom_id, [])}
    return {"type": kind, "id": component.get("id", 0)}


# ---------------------------------------------------------------- running a bot against it


async def start_bot(
    bot: discord.Client, emulator: DiscordEmulator, *, timeout: float = 10.0
) -> asyncio.Task[None]:
    """Start ``bot`` against ``emulator`` and wait for on_ready; returns the running task.

    Give the bot ``guild_ready_timeout=0.1`` (a Client kwarg) or ready waits 2 s.
    """
    point_client_at(emulator.api_url, emulator.gateway_url)
    task = asyncio.create_task(bot.start(TEST_TOKEN), name="emulated-bot")
    deadline = asyncio.get_running_loop().time() + timeout
    while not bot.is_ready():
        if task.done():
            task.result()  # re-raises the start-up error
            raise RuntimeError("bot stopped before it was ready")
        if asyncio.get_running_loop().time() > deadline:
            await stop_bot(bot, task)
            raise TimeoutError(f"bot not ready within {timeout}s")
        await asyncio.sleep(0.02)
    return task


async def stop_bot(bot: discord.Client, task: asyncio.Task[None], timeout: float = 10.0) -> None:
    """Close ``bot`` and wait for its ``start()`` task to finish."""
    await asyncio.wait_for(bot.close(), timeout)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout)


@contextlib.asynccontextmanager
async def emulated_discord() -> AsyncIterator[DiscordEmulator]:
    """A started emulator with discord.py pointed at it; restores discord.com afterwards."""
    emulator = DiscordEmulator()
    await emulator.start()
    point_client_at(emulator.api_url, emulator.gateway_url)
    try:
        yield emulator
    finally:
        await emulator.close()
        restore_default_endpoints()


@contextlib.asynccontextmanager
async def running_bot(
    bot: discord.Client, emulator: DiscordEmulator, *, timeout: float = 10.0
) -> AsyncIterator[discord.Client]:
    """``bot`` started and ready against ``emulator`` for the block, then closed."""
    task = await start_bot(bot, emulator, timeout=timeout)
    try:
        yield bot
    finally:
        await stop_bot(bot, task, timeout)

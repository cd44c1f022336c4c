"""What a public server needs before a job is queued and before a result is posted.

`SafetyGate` (`Services.safety`) answers, for every command:
- too fast? (`limits.commands_per_minute`, in memory, per member);
- may this member use this command here? (`/admin allow` role gates; admins exempt);
and before queueing a generation (or training):
- DMs allowed? (`[safety] dms`); the model allowed here? the server's limits;
- prompt filters (prompt, LoRA names; training names, subjects and captions);
- quotas (images and GPU-seconds per day, trainings per week; counted from the jobs);
- NSFW input photos (NudeNet in the photo helper process; refused outside
  age-restricted channels when the server's policy is `block`): the input photo, and
  for /edit every photo it edits with;
- the server's safety negative prompt, added outside age-restricted channels;
and, when a result is ready, `verdict` applies the server's policy to the flagged
images: post, post as spoilers, or withhold with a notice. One rule stands above the
policy: a flagged result whose input photo held a real face (an /edit of a person,
`input_face`) is withheld everywhere, age-restricted channels included, and never sent
privately either, unless the server turned `edit.allow_nsfw_real_faces` on.

Everything reads the server's settings (`bot.services.guild_settings`) at the moment it runs:
`/admin settings` takes effect at once, restarts change nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import discord

from bot import store
from bot.errors import UserError
from bot.photo_helper.work import detect_nsfw
from bot.services.access import is_admin
from bot.services.guild_settings import ServerSettings, effective
from bot.services.model_options import family_of
from bot.services.prompt_filter import Filters
from pipeline.contract.config import Config
from pipeline.contract.jobs import GenerateSpec
from pipeline.contract.safety import flagged_labels

if TYPE_CHECKING:
    from bot.photo_helper.process import FaceProbe
    from bot.plumbing.attachments import Photo
    from bot.services.database import DbThread

log = logging.getLogger(__name__)

RATE_WINDOW_S = 60.0
FOLLOWUP_TTL_S = 14 * 60  # an interaction token lasts 15 minutes
QUOTA_NAMES = {
    "images_per_day": "images per day",
    "gpu_seconds_per_day": "GPU-seconds per day",
    "trainings_per_week": "trainings per week",
}
INPUT_FLAGGED = (
    "the {what} was flagged as explicit by the NSFW detector ({labels}); this channel is "
    "not age-restricted, so nothing was queued. Use an age-restricted channel."
)


def is_age_restricted(interaction: discord.Interaction) -> bool:
    """The channel's `nsfw` flag, from the interaction itself (threads: their parent's)."""
    channel = interaction.channel
    if channel is None:
        return False
    parent = getattr(channel, "parent", None)
    if parent is not None and hasattr(parent, "is_nsfw"):
        return bool(parent.is_nsfw())
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False


def role_ids(interaction: discord.Interaction) -> set[str]:
    user = interaction.user
    ids = {str(r.id) for r in getattr(user, "roles", [])}
    ids.update(str(r) for r in getattr(user, "_roles", []))  # roles not in the cache too
    return ids


def quota_for(
    targets: dict[str, dict], user_id: str, roles: set[str], defaults: dict[str, int]
) -> dict[str, int]:
    """The member's limits: set for the member, else the most generous of their roles',
    else the server's default. 0 means unlimited."""
    member = targets.get(f"member:{user_id}", {})
    role_rows = [targets[f"role:{r}"] for r in roles if f"role:{r}" in targets]
    out = {}
    for key, default in defaults.items():
        if member.get(key) is not None:
            out[key] = member[key]
            continue
        values = [row[key] for row in role_rows if row.get(key) is not None]
        if values:
            out[key] = 0 if 0 in values else max(values)
        else:
            out[key] = default
    return out


@dataclass
class Verdict:
    """The policy applied to a result: which images go, how, and what the channel reads."""

    flagged: dict[int, list[str]] = field(default_factory=dict)  # image index → labels
    action: str = "post"  # post | spoiler | block
    age_restricted: bool = False
    # Flagged edits of a photo that showed a real face: withheld whatever the policy.
    real_faces: set[int] = field(default_factory=set)

    @property
    def blocked(self) -> set[int]:
        by_policy = set(self.flagged) if self.action == "block" else set()
        return by_policy | self.real_faces

    @property
    def private(self) -> set[int]:
        """The withheld images the member may still receive privately (never a flagged
        edit of a real person)."""
        return self.blocked - self.real_faces

    def filenames(self, names: Sequence[str]) -> list[str]:
        spoiler = set(self.flagged) if self.action == "spoiler" else set()
        return [f"SPOILER_{n}" if i in spoiler else n for i, n in enumerate(names)]

    def note(self, total: int) -> str:
        people = (
            f"{len(self.real_faces)} of {total} image(s) withheld: flagged NSFW by the "
            "detector, and the photo shows a real person (this server never posts those)."
            if self.real_faces
            else ""
        )
        others = {i: labels for i, labels in self.flagged.items() if i not in self.real_faces}
        if not others or self.action == "post":
            return people
        count = len(others)
        if self.action == "spoiler":
            policy = f"{count} image(s) flagged NSFW: posted as spoilers (this server's policy)."
        else:
            policy = (
                f"{count} of {total} image(s) withheld: flagged NSFW by the detector and this "
                "channel is not age-restricted (this server's policy)."
            )
        return " ".join(n for n in (people, policy) if n)


class RateLimiter:
    """At most N commands per member in any 60 s (only accepted commands count)."""

    def __init__(self) -> None:
        self._seen: dict[int, deque[float]] = {}

    def retry_after(self, user_id: int, per_minute: int, now: float | None = None) -> float:
        """0 when the command may run (and it is counted), else seconds to wait."""
        if per_minute <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        seen = self._seen.setdefault(user_id, deque())
        while seen and seen[0] <= now - RATE_WINDOW_S:
            seen.popleft()
        if len(seen) >= per_minute:
            return max(0.1, seen[0] + RATE_WINDOW_S - now)
        seen.append(now)
        if len(self._seen) > 50_000:  # forget idle members
            self._seen = {u: d for u, d in self._seen.items() if d and d[-1] > now - 60}
        return 0.0


class SafetyGate:
    """A service (`Services.safety`): the checks above, for the cogs and the job service."""

    def __init__(self, config: Config, db: DbThread, face_probe: FaceProbe) -> None:
        self.config = config
        self.db = db
        self.face_probe = face_probe
        self.rate = RateLimiter()
        self._followups: dict[str, tuple[float, discord.Webhook]] = {}
        self.metrics: Any = None  # bot.services.metrics.Metrics once the listener runs

    # -- settings ---------------------------------------------------------------------------

    async def settings(self, guild_id: int | str | None) -> ServerSettings:
        overrides = await self.db.call(store.guild_settings, guild_id)
        return effective(self.config, overrides)

    async def filters(self, guild_id: int | str | None) -> Filters:
        return Filters.from_rows(await self.db.call(store.filters, guild_id))

    # -- every command ----------------------------------------------------------------------

    async def check_command(self, interaction: discord.Interaction) -> str | None:
        """The refusal line for a command, or None when it may run."""
        settings = await self.settings(interaction.guild_id)
        wait = self.rate.retry_after(interaction.user.id, settings.limits.commands_per_minute)
        if wait:
            self._count("rate_limited")
            return (
                f"Slow down: more than {settings.limits.commands_per_minute} commands a minute. "
                f"Try again in {wait:.0f} s."
            )
        command = interaction.command
        name = command.qualified_name.split()[0] if command is not None else ""
        if name and interaction.guild_id and not is_admin(interaction, self.config):
            refusal = await self._role_refusal(interaction, name)
            if refusal:
                return refusal
        return None

    async def _role_refusal(self, interaction: discord.Interaction, command: str) -> str | None:
        gates = await self.db.call(store.command_roles, interaction.guild_id)
        allowed = gates.get(command)
        if not allowed or allowed & role_ids(interaction):
            return None
        guild = interaction.guild
        names = sorted(
            (guild.get_role(int(r)).name if guild and guild.get_role(int(r)) else r)
            for r in allowed
        )
        return f"/{command} is for members with the role {' or '.join(names)} on this server."

    # -- before queueing ----------------------------------------------------------------------

    async def settings_here(self, interaction: discord.Interaction) -> ServerSettings:
        """The server's settings for a job asked for here (DMs refused when configured)."""
        return await self._server_settings_or_refuse(interaction)

    async def before_generate(
        self,
        interaction: discord.Interaction,
        spec: GenerateSpec,
        photos: Sequence[Photo],
        settings: ServerSettings,
    ) -> GenerateSpec:
        """The spec to queue (safety negative prompt added), or UserError (nothing queued):
        the submission's one check of its values (`bot.services.admission`)."""
        button = interaction.command is None and interaction.guild_id  # counts as /imagine
        if button and not is_admin(interaction, self.config):
            refusal = await self._role_refusal(interaction, "imagine")
            if refusal:
                raise UserError(refusal)
        model = self.config.model(spec.model).name
        if settings.allowed_models and model not in settings.allowed_models:
            raise UserError(
                f"the model {model} is not allowed on this server; "
                f"allowed: {', '.join(settings.allowed_models)}"
            )
        spec.check(settings.limits)
        filters = await self.filters(interaction.guild_id)
        filters.check("prompt", spec.prompt)
        filters.check("LoRA name", *(lora.name for lora in spec.loras), markup=False)
        await self._check_quota(interaction, settings, images=spec.count)
        age_restricted = is_age_restricted(interaction)
        if photos:  # the input photo; an edit's further photos are inputs too
            inputs = [p.png for p in photos[: 1 + len(spec.images)]]
            await self._check_photos(interaction, settings, inputs, "input photo")
        extra = settings.negative_prompt.strip()
        # A model that takes no negative prompt (Flux.1 schnell, klein) would refuse every job.
        takes = "negative_prompt" in (await family_of(self.config, model)).options
        if extra and takes and not age_restricted and extra not in spec.negative_prompt:
            negative = f"{spec.negative_prompt}, {extra}" if spec.negative_prompt else extra
            spec = dataclasses.replace(spec, negative_prompt=negative)
            spec.check(settings.limits)
        return spec

    async def before_train(
        self, interaction: discord.Interaction, name: str, subject: str
    ) -> ServerSettings:
        """Cheap checks before the photos are downloaded."""
        settings = await self._server_settings_or_refuse(interaction)
        filters = await self.filters(interaction.guild_id)
        filters.check("model name", name, markup=False)
        filters.check("subject", subject, markup=False)
        await self._check_quota(interaction, settings, trainings=1)
        return settings

    async def photos_checked_here(self, interaction: discord.Interaction) -> bool:
        """Whether photos asked for here go through the NSFW check (the helper then
        scores /train's crops while it prepares them)."""
        return self._photos_checked(interaction, await self.settings(interaction.guild_id))

    async def check_training_set(
        self, interaction: discord.Interaction, prepared: dict[str, Any]
    ) -> None:
        """After the photos are prepared: captions filtered, crops' NSFW scores judged."""
        settings = await self.settings(interaction.guild_id)
        filters = await self.filters(interaction.guild_id)
        filters.check("photo captions", *prepared.get("captions", []), markup=False)
        if self._photos_checked(interaction, settings):
            self._judge_photos(prepared.get("nsfw") or [], settings, "training photo")

    async def _server_settings_or_refuse(self, interaction: discord.Interaction) -> ServerSettings:
        if interaction.guild_id is None and self.config.safety.dms == "refuse":
            raise UserError("image commands are turned off in DMs here; use them in a server")
        return await self.settings(interaction.guild_id)

    async def _check_quota(
        self,
        interaction: discord.Interaction,
        settings: ServerSettings,
        *,
        images: int = 0,
        trainings: int = 0,
    ) -> None:
        if is_admin(interaction, self.config) and interaction.guild_id:
            return  # admins are exempt
        need = {"images_per_day": images, "trainings_per_week": trainings, "gpu_seconds_per_day": 1}
        for key, limit, remaining in await self.quota_left(interaction, settings):
            if need[key] and remaining < need[key]:
                self._count("quota")
                period = "7 days" if key.endswith("week") else "24 hours"
                raise UserError(
                    f"your quota here is {limit} {QUOTA_NAMES[key]} and you have {remaining:g} "
                    f"left; it frees up as your jobs of the last {period} age out"
                )

    async def quota_left(
        self, interaction: discord.Interaction, settings: ServerSettings | None = None
    ) -> list[tuple[str, int, float]]:
        """(key, limit, remaining) for each limited quota of the member here."""
        settings = settings or await self.settings(interaction.guild_id)
        targets = await self.db.call(store.quotas, interaction.guild_id)
        limits = quota_for(targets, str(interaction.user.id), role_ids(interaction), settings.quota)
        if not any(limits.values()):
            return []
        used = await self.db.call(store.usage, interaction.guild_id, str(interaction.user.id))
        return [(key, limit, max(0, limit - used[key])) for key, limit in limits.items() if limit]

    async def quota_line(self, interaction: discord.Interaction) -> str:
        """For /queue: what is left of the member's quotas here ("" when unlimited)."""
        if is_admin(interaction, self.config) and interaction.guild_id:
            return ""
        left = await self.quota_left(interaction)
        if not left:
            return ""
        parts = [f"{remaining:g} of {limit} {QUOTA_NAMES[key]}" for key, limit, remaining in left]
        return "Left today/this week: " + ", ".join(parts)

    async def _check_photos(
        self,
        interaction: discord.Interaction,
        settings: ServerSettings,
        pngs: list[bytes],
        what: str,
    ) -> None:
        if pngs and self._photos_checked(interaction, settings):
            self._judge_photos(await self.face_probe.run(detect_nsfw, pngs), settings, what)

    def _photos_checked(self, interaction: discord.Interaction, settings: ServerSettings) -> bool:
        blocking = self.config.safety.detect and settings.policy == "block"
        return blocking and not is_age_restricted(interaction)

    def _judge_photos(
        self, scores: list[dict[str, float]], settings: ServerSettings, what: str
    ) -> None:
        for one in scores:
            labels = flagged_labels(one, settings.threshold, settings.labels)
            if labels:
                self._count("input")
                raise UserError(INPUT_FLAGGED.format(what=what, labels=", ".join(labels)))

    # -- after queueing ----------------------------------------------------------------------

    async def after_queue(self, interaction: discord.Interaction, row: dict) -> None:
        """Remember where the job was asked for (the channel's age restriction decides the
        policy when it is posted) and how to reach the member ephemerally."""
        await self.db.call(
            store.set_job_context,
            row["id"],
            nsfw_channel=is_age_restricted(interaction),
            dm=interaction.guild_id is None,
        )
        now = time.monotonic()
        self._followups = {k: v for k, v in self._followups.items() if v[0] > now}
        self._followups[row["id"]] = (now + FOLLOWUP_TTL_S, interaction.followup)

    # -- when the result is ready -----------------------------------------------------------------

    async def verdict(self, row: dict, images: list[dict], *, count: bool = True) -> Verdict:
        """The policy applied to a job's result images (``count``: a result being posted,
        counted in the metrics; False when a button only asks)."""
        context = await self.db.call(store.job_context, row["id"])
        settings = await self.settings(row.get("guild_id"))
        flagged = {
            i: labels
            for i, image in enumerate(images)
            if (
                labels := flagged_labels(
                    image.get("nsfw") or {}, settings.threshold, settings.labels
                )
            )
        }
        verdict = Verdict(flagged=flagged, age_restricted=bool(context.get("nsfw_channel")))
        if flagged and not verdict.age_restricted:
            verdict.action = settings.policy if settings.policy != "allow" else "post"
        if not settings.allow_nsfw_real_faces:
            verdict.real_faces = {i for i in flagged if images[i].get("input_face")}
        if verdict.blocked and count:
            self._count("result", len(verdict.blocked))
        verdict.ephemeral_ok = settings.blocked_ephemeral  # type: ignore[attr-defined]
        return verdict

    async def send_blocked(
        self, row: dict, verdict: Verdict, files: list[tuple[str, bytes]]
    ) -> bool:
        """The withheld images, ephemerally to the member (when the server allows it and
        the interaction is fresh); True if sent."""
        if not getattr(verdict, "ephemeral_ok", False) or not files:
            return False
        entry = self._followups.get(row["id"])
        if entry is None or entry[0] < time.monotonic():
            return False
        import io

        try:
            await entry[1].send(
                "Withheld from the channel (flagged NSFW); only you can see these:",
                files=[discord.File(io.BytesIO(data), name) for name, data in files],
                ephemeral=True,
            )
        except discord.HTTPException as exc:
            log.warning("could not send job %s's withheld images: %s", row["id"], exc)
            return False
        return True

    def _count(self, what: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.safety_refusal(what, n)

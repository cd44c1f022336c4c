"""Discord's rate limits as the emulator applies them (topics/rate-limits).

https://discord.com/developers/docs/topics/rate-limits says:
- every REST response of a limited route carries ``X-RateLimit-Limit``,
  ``-Remaining``, ``-Reset`` (epoch seconds), ``-Reset-After`` (seconds) and
  ``-Bucket`` (an opaque hash shared by routes of one bucket);
- limits are per bucket *and* per top-level resource (``channel_id``,
  ``guild_id``, ``webhook_id``+``token``): two channels never share a budget;
- a request over the limit gets 429 with JSON ``{"message", "retry_after",
  "global", "code"}``, a ``Retry-After`` header, ``X-RateLimit-Scope``
  (``user``, ``global`` or ``shared``) and, for the global limit,
  ``X-RateLimit-Global: true``; 50 requests per second in all (interaction
  callbacks are exempt);
- 401, 403 and 429 responses (except ``shared`` 429s) count as invalid requests:
  10,000 in 10 minutes gets a client banned.

discord.py reads these headers and waits before a bucket runs dry, so an
honest client meets a 429 only from a shared (sub-)limit, which the emulator
can inject at random (``RateLimiter.chaos``). A request that arrives at a
bucket it was told is empty, before the reset it was told, is a client ignoring
the headers: it is 429'd again and listed in ``violations``.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass, field

# (method, route template) → (requests, window seconds). Discord does not publish the
# numbers (they "may change"); these are what it sends today for a bot in a small guild.
DISCORD_ROUTE_LIMITS: dict[tuple[str, str], tuple[int, float]] = {
    ("POST", "/channels/{channel_id}/messages"): (5, 5.0),
    ("PATCH", "/channels/{channel_id}/messages/{message_id}"): (5, 5.0),
    ("DELETE", "/channels/{channel_id}/messages/{message_id}"): (5, 1.0),
    ("POST", "/webhooks/{app_id}/{token}"): (5, 2.0),
    ("PATCH", "/webhooks/{app_id}/{token}/messages/{message_id}"): (5, 2.0),
    ("DELETE", "/webhooks/{app_id}/{token}/messages/{message_id}"): (5, 2.0),
}
DEFAULT_LIMIT = (50, 1.0)
GLOBAL_PER_SECOND = 50
MAJOR_PARAMETERS = ("channel_id", "guild_id", "token")
EXEMPT_PREFIXES = ("/interactions/",)  # callbacks: no global limit, per the docs
GRACE_S = 0.02  # clocks and sleeps are not exact: a retry this early still counts as on time
# A request arriving this soon after a 429 was sent may have left before the client read
# it (concurrent requests): Discord 429s it too, but it is not a client ignoring a 429.
IN_FLIGHT_S = 0.1


@dataclass
class Bucket:
    limit: int
    window: float
    remaining: int
    reset_at: float  # time.monotonic() when it refills


@dataclass
class RateLimited(Exception):
    """A 429 to send: the body and headers Discord would."""

    retry_after: float
    is_global: bool
    scope: str
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict:
        return {
            "message": "You are being rate limited.",
            "retry_after": math.ceil(self.retry_after * 1000) / 1000,
            "global": self.is_global,
            "code": 0,
        }


@dataclass
class RateLimitRecord:
    method: str
    route: str
    major: str
    scope: str
    retry_after: float
    at: float


class RateLimiter:
    """Per-route, per-resource buckets plus the global limit; optional random 429s."""

    def __init__(
        self,
        route_limits: dict[tuple[str, str], tuple[int, float]] | None = None,
        *,
        default: tuple[int, float] = DEFAULT_LIMIT,
        global_per_second: int = GLOBAL_PER_SECOND,
        clock=time.monotonic,
    ) -> None:
        self.route_limits = dict(DISCORD_ROUTE_LIMITS if route_limits is None else route_limits)
        self.default = default
        self.global_per_second = global_per_second
        self.clock = clock
        self.buckets: dict[tuple[str, str], Bucket] = {}
        self.global_window: list[float] = []
        self.global_blocked_until = 0.0
        self.global_blocked_at = 0.0
        self.blocked_paths: dict[tuple[str, str], tuple[float, float]] = {}  # shared 429s
        self.chaos = 0.0  # probability of a random shared 429 on a limited route
        self.chaos_routes: tuple[str, ...] = ("PATCH",)  # methods chaos applies to
        self.rng = random.Random(1234)
        self.limited: list[RateLimitRecord] = []  # every 429 sent
        self.violations: list[RateLimitRecord] = []  # requests that ignored what they were told
        self.invalid_requests = 0  # 401/403/non-shared 429, as Discord counts them

    def bucket_hash(self, method: str, route: str) -> str:
        return hashlib.sha1(f"{method} {route}".encode()).hexdigest()[:16]

    def limit_for(self, method: str, route: str) -> tuple[int, float]:
        return self.route_limits.get((method, route), self.default)

    def check(
        self, method: str, route: str, params: dict[str, str], path: str = ""
    ) -> dict[str, str]:
        """Count one request; return the headers for its answer, or raise RateLimited.

        ``path`` (the concrete one) tells a retry after a shared 429 from other requests
        of the bucket: a shared limit holds back that request only."""
        now = self.clock()
        major = ":".join(params.get(k, "") for k in MAJOR_PARAMETERS)
        if not route.startswith(EXEMPT_PREFIXES):
            self._check_global(now, method, route, major)
        limit, window = self.limit_for(method, route)
        key = (self.bucket_hash(method, route), major)
        bucket = self.buckets.get(key)
        if bucket is None or now >= bucket.reset_at - GRACE_S:
            bucket = self.buckets[key] = Bucket(limit, window, limit, now + window)
        blocked_at, blocked_until = self.blocked_paths.get((method, path), (0.0, 0.0))
        if now < blocked_until - GRACE_S:
            told = now - blocked_at > IN_FLIGHT_S
            self._refuse(method, route, major, "shared", blocked_until - now, now, told)
        if bucket.remaining <= 0:
            # The headers said 0 remaining and when it resets: a client honouring them
            # never gets here, so this is a violation as well as a 429.
            self._violation(method, route, major, "user", bucket.reset_at - now, now)
        chaos = self.chaos and method in self.chaos_routes and not route.startswith(EXEMPT_PREFIXES)
        if chaos and self.rng.random() < self.chaos:
            retry = self.rng.uniform(0.05, 0.3)
            self.blocked_paths[(method, path)] = (now, now + retry)
            self._limited(method, route, major, "shared", retry, now, bucket, key)
        bucket.remaining -= 1
        return self.headers(bucket, key[0], now)

    def headers(self, bucket: Bucket, bucket_hash: str, now: float) -> dict[str, str]:
        reset_after = max(0.0, bucket.reset_at - now)
        return {
            "X-RateLimit-Limit": str(bucket.limit),
            "X-RateLimit-Remaining": str(max(0, bucket.remaining)),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": bucket_hash,
        }

    def _check_global(self, now: float, method: str, route: str, major: str) -> None:
        if now < self.global_blocked_until - GRACE_S:
            told = now - self.global_blocked_at > IN_FLIGHT_S
            self._refuse(method, route, major, "global", self.global_blocked_until - now, now, told)
        self.global_window = [t for t in self.global_window if now - t < 1.0 - GRACE_S]
        if len(self.global_window) >= self.global_per_second:
            retry = 1.0 - (now - self.global_window[0])
            self.global_blocked_until, self.global_blocked_at = now + retry, now
            self._limited(method, route, major, "global", retry, now)
        self.global_window.append(now)

    def _violation(
        self, method: str, route: str, major: str, scope: str, retry: float, now: float
    ) -> None:
        self._refuse(method, route, major, scope, retry, now, told=True)

    def _refuse(
        self,
        method: str,
        route: str,
        major: str,
        scope: str,
        retry: float,
        now: float,
        told: bool,
    ) -> None:
        """429 a request sent into a block; a violation if the client knew of the block."""
        if told:
            self.violations.append(RateLimitRecord(method, route, major, scope, retry, now))
        self._limited(method, route, major, scope, retry, now)

    def _limited(
        self,
        method: str,
        route: str,
        major: str,
        scope: str,
        retry: float,
        now: float,
        bucket: Bucket | None = None,
        key: tuple[str, str] | None = None,
    ) -> None:
        retry = max(retry, 0.001)
        self.limited.append(RateLimitRecord(method, route, major, scope, retry, now))
        if scope != "shared":
            self.invalid_requests += 1
        headers = {
            "Retry-After": str(math.ceil(retry)),
            "X-RateLimit-Scope": scope,
            "Via": "1.1 google",  # discord.py treats a 429 without it as a Cloudflare ban
        }
        if scope == "global":
            headers["X-RateLimit-Global"] = "true"
        elif bucket is not None and key is not None:
            headers.update(self.headers(bucket, key[0], now))
        raise RateLimited(retry, scope == "global", scope, headers)

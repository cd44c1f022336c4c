"""Point discord.py at a Discord-compatible server instead of discord.com.

discord.py keeps its REST base and gateway address in class attributes, so this
is process-wide: set them once, before ``client.start()``. Tests point them at
the loopback emulator; a deployment may point them at a compatible server.
"""

from __future__ import annotations

import discord.gateway
import discord.http
import yarl

# The library's own values, captured at import so they can be restored.
DEFAULT_API_URL: str = discord.http.Route.BASE
DEFAULT_GATEWAY_URL: yarl.URL = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY


def point_client_at(api_url: str | None, gateway_url: str | None) -> None:
    """Use ``api_url`` as the REST base and ``gateway_url`` as the gateway; None keeps the current.

    ``api_url`` includes the version path, e.g. ``http://127.0.0.1:8080/api/v10``.
    Do not call ``discord.http._set_api_version()`` afterwards: it resets the base.
    """
    if api_url:
        discord.http.Route.BASE = api_url.rstrip("/")
    if gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


def restore_default_endpoints() -> None:
    """Point discord.py back at discord.com (what it used before ``point_client_at``)."""
    discord.http.Route.BASE = DEFAULT_API_URL
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = DEFAULT_GATEWAY_URL

"""Discord plumbing: how the bot talks to Discord, below the commands.

- `pacing`: the pacer in front of discord.py's HTTP client (requests per second);
- `endpoints`: pointing discord.py at a Discord-compatible server (the emulator);
- `message_edits`: edits of one message, in order, spaced out, the newest winning;
- `permissions`: can the bot deliver in this channel (checked before queueing);
- `attachments`: photos members attach, checked, downloaded, decoded safely, stored.

It imports `bot.errors` and `pipeline.contract`, nothing else of the bot.
"""

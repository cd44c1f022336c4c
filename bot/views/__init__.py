"""What members see on the bot's messages: `buttons` (persistent buttons on progress and
result messages), `render` (their texts and files) and `text_fit` (keeping an infotext
inside Discord's 2,000 characters).

It imports `bot.errors` and `pipeline.contract`; the buttons reach the
services through ``interaction.client.services`` at click time.
"""

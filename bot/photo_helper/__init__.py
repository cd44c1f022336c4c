"""The photo helper: a second process for the photo work the bot must finish before it
queues a job (counting faces for ``keep:face`` and face fix, the NSFW check on inputs,
preparing `/train` photos, reading a LoRA file's header).

Why a separate process: that work needs OpenCV, the NSFW detector or safetensors'
torch loader, which the bot process never imports (`tests/test_layering.py`). The bot
starts one helper lazily and keeps it for the next request.

- `process.FaceProbe` runs in the bot: it starts the helper, sends it work and turns a
  crash or a timeout into a one-line answer. It imports `bot.errors` and `work` (only
  for the functions' names; `work` imports nothing heavy at module level).
- `work` runs in the helper: plain functions whose results are plain data. It imports
  the engine's photo parts (`pipeline.faces`, `pipeline.safety`, `pipeline.training
  .dataset`, `pipeline.loras.formats`, `pipeline.contract`) inside each function, and
  nothing of the bot.
"""

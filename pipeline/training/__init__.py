"""Personal models. Worker side (torch).

`dataset` prepares the photos; `loop.train_lora` runs the stages in order, from
`adapters` (what training adds to the pipe and puts back), `denoising` (latents, text
conditioning, the loss), `precision` (autocast and loss scaling by the model's dtype),
`checkpoints`, `validation`, `samples` and `export` (the kohya file); `job` is the
training flow a worker and `sdbot train` share.
"""

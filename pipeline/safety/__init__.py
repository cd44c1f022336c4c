"""NSFW detection of images (worker side and the bot's photo helper process, never the
bot process): NudeNet's ONNX detector on onnxruntime, which imports OpenCV."""

"""Personal models: photo preparation (dataset), the training loop, checkpoints,
validation and export. Worker side (torch)."""

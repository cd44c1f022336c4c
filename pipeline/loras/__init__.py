"""LoRA and LyCORIS files: formats, the adapter cache and per-sample mixed batches.
Worker side (torch)."""

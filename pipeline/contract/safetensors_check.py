"""Torch-free checks of a .safetensors file's framing, for the bot and the workers alike:
the header must parse, and the tensor data it claims must be in the file. safetensors
itself trusts the header's offsets; checking first turns a truncated upload, a header
that claims 10 GB, or a pickle renamed `.safetensors` into one line for the member."""

from __future__ import annotations

import json

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def safetensors_problem(data: bytes, name: str) -> str | None:
    """A one-line reason `data` is not a usable .safetensors file, or None."""
    not_file = f"'{name}' is not a LoRA file (not a readable .safetensors file)"
    if len(data) < 8:
        return not_file
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8 or header_len > MAX_HEADER_BYTES:
        return not_file
    try:
        header = json.loads(data[8 : 8 + header_len])
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, UnicodeDecodeError):
        return not_file
    body = len(data) - 8 - header_len
    if ends and max(ends) > body:
        return (
            f"LoRA '{name}' is truncated: its header needs {max(ends) / 2**20:.1f} MB of "
            f"tensor data and the file holds {body / 2**20:.1f} MB; upload it again"
        )
    return None

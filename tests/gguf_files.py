"""GGUF files as users have them (city96's ComfyUI-GGUF `convert.py`, which the
Flux/Z-Image/Qwen GGUF files on the Hub come from), written with the `gguf` package's own
writer and quantiser: 2-D weights whose rows fit the block size quantised (Q8_0, Q4_0…),
biases and norms kept as F32, shapes as torch has them."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_gguf(path: Path, state_dict: dict, quant: str = "Q8_0", arch: str = "flux") -> Path:
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, quant)
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "Q8_0" else 2)
    for key, tensor in state_dict.items():
        data = tensor.detach().float().cpu().numpy()
        if data.ndim == 2 and data.shape[-1] % block == 0:
            writer.add_tensor(key, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(key, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

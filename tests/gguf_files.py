"""GGUF files as users have them (city96's ComfyUI-GGUF `convert.py`, which the
Flux/Z-Image/Qwen GGUF files on the Hub come from), written with the `gguf` package's own
writer and quantiser: 2-D weights whose rows fit the block size quantised (Q8_0, Q4_0…),
biases and norms kept as F32, shapes as torch has them.

A Flux.1 file in BFL's layout (`bfl_flux_state_dict`: `double_blocks.0.img_attn.qkv.weight`…,
what city96's converter reads) also keeps the tensors city96's quantiser keeps: his
`tools/lcpp.patch` for llama-quantize leaves `img_in.`, the embedders' `in_layer.` and
`final_layer.linear.` in F32 and the rest of the embedders and `final_layer.` in F16, at
every quantisation (`llama_tensor_get_type`'s "KEEP IN FP32" / "KEEP IN FP16")."""

from __future__ import annotations

from pathlib import Path

import numpy as np

KEEP_F32 = (
    "img_in.",
    "time_in.in_layer.",
    "vector_in.in_layer.",
    "guidance_in.in_layer.",
    "final_layer.linear.",
)
KEEP_F16 = ("txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


def write_gguf(path: Path, state_dict: dict, quant: str = "Q8_0", arch: str = "flux") -> Path:
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, quant)
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "Q8_0" else 2)
    for key, tensor in state_dict.items():
        data = tensor.detach().float().cpu().numpy()
        if data.ndim != 2 or data.shape[-1] % block or key.startswith(KEEP_F32):
            writer.add_tensor(key, data.astype(np.float32))
        elif key.startswith(KEEP_F16):
            writer.add_tensor(key, data.astype(np.float16))
        else:
            writer.add_tensor(key, _quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _quantize(data: np.ndarray, qtype) -> np.ndarray:
    """gguf's own quantiser over slices of rows on every core (numpy lets go of the GIL):
    each row's blocks are quantised on their own, so the result is the whole array's,
    and a full-width Flux.1 file is written in seconds, not a minute."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import gguf

    rows = max(1, (1 << 20) // data.shape[-1])  # about a million values a slice
    slices = [data[i : i + rows] for i in range(0, data.shape[0], rows)]
    if len(slices) == 1:
        return gguf.quants.quantize(data, qtype)
    with ThreadPoolExecutor(min(len(slices), os.cpu_count() or 1)) as pool:
        return np.concatenate(list(pool.map(lambda s: gguf.quants.quantize(s, qtype), slices)))


def bfl_flux_state_dict(transformer: dict) -> dict:
    """A diffusers FluxTransformer2DModel's state dict in BFL's checkpoint layout (what
    flux1-dev.safetensors and city96's GGUFs hold): the inverse of diffusers'
    `convert_flux_transformer_checkpoint_to_diffusers`, so that converter gives the
    same tensors back (checked by the callers). That converter splits the single blocks'
    `linear1` at the 12B model's 3072/12288, so only a full-width model round-trips."""
    sd = dict(transformer)
    out = {}

    def move(bfl: str, ours: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{bfl}.{kind}"] = sd.pop(f"{ours}.{kind}")

    def fuse(bfl: str, parts: list[str]) -> None:
        for kind in ("weight", "bias"):
            out[f"{bfl}.{kind}"] = _cat([sd.pop(f"{p}.{kind}") for p in parts])

    embedders = {"time_in": "timestep", "vector_in": "text", "guidance_in": "guidance"}
    for bfl, ours in embedders.items():
        if f"time_text_embed.{ours}_embedder.linear_1.weight" in sd:
            move(f"{bfl}.in_layer", f"time_text_embed.{ours}_embedder.linear_1")
            move(f"{bfl}.out_layer", f"time_text_embed.{ours}_embedder.linear_2")
    move("txt_in", "context_embedder")
    move("img_in", "x_embedder")
    doubles = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    for i in sorted(doubles):
        b, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for side, norm, attn, ff, proj in (
            ("img", "norm1", ("to_q", "to_k", "to_v"), "ff", "to_out.0"),
            ("txt", "norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"), "ff_context",
             "to_add_out"),
        ):  # fmt: skip
            move(f"{d}{side}_mod.lin", f"{b}{norm}.linear")
            fuse(f"{d}{side}_attn.qkv", [f"{b}attn.{a}" for a in attn])
            move(f"{d}{side}_attn.proj", f"{b}attn.{proj}")
            move(f"{d}{side}_mlp.0", f"{b}{ff}.net.0.proj")
            move(f"{d}{side}_mlp.2", f"{b}{ff}.net.2")
        for side, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            out[f"{d}{side}_attn.norm.query_norm.scale"] = sd.pop(f"{b}attn.{q}.weight")
            out[f"{d}{side}_attn.norm.key_norm.scale"] = sd.pop(f"{b}attn.{k}.weight")
    singles = {int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")}
    for i in sorted(singles):
        b, s = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        move(f"{s}modulation.lin", f"{b}norm.linear")
        fuse(f"{s}linear1", [f"{b}attn.to_q", f"{b}attn.to_k", f"{b}attn.to_v", f"{b}proj_mlp"])
        move(f"{s}linear2", f"{b}proj_out")
        out[f"{s}norm.query_norm.scale"] = sd.pop(f"{b}attn.norm_q.weight")
        out[f"{s}norm.key_norm.scale"] = sd.pop(f"{b}attn.norm_k.weight")
    move("final_layer.linear", "proj_out")
    for kind in ("weight", "bias"):  # diffusers' AdaLayerNormContinuous: (scale, shift)
        scale, shift = sd.pop(f"norm_out.linear.{kind}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _cat([shift, scale])
    if sd:
        raise ValueError(f"not in BFL's Flux.1 layout: {sorted(sd)[:5]}")
    return out


def _cat(tensors: list):
    import torch

    return torch.cat(tensors, dim=0)

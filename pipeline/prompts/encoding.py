"""The AUTOMATIC1111 prompt language: attention weights, BREAK, long prompts, LoRA tags.

Users paste prompts from Civitai written for AUTOMATIC1111, so this module follows its
semantics rather than compel's: `(word)` ×1.1, `[word]` ÷1.1, `(word:1.3)`, nesting
multiplies, `\\(` is a literal bracket, `BREAK` starts a new 75-token chunk, prompts of
any length are encoded in 75-token chunks and concatenated, and weights scale the
encoder's per-token output before each chunk is renormalised to its original mean.

For a plain prompt that fits one chunk the embeddings equal diffusers' own
`encode_prompt` output, so a job without markup draws the same image here as in diffusers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.contract.prompt_syntax import (  # noqa: F401 - re-exported
    BREAK,
    extract_loras,
    parse_prompt_attention,
    strip_loras,
)

CHUNK_TOKENS = 75  # prompt tokens per chunk; BOS and EOS make it CLIP's 77
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default


@dataclass
class Chunk:
    """Up to 75 prompt tokens and their weights, before BOS/EOS/padding."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def tokenize_chunks(tokenizer: Any, text: str) -> list[Chunk]:
    """A1111's `tokenize_line`: weighted tokens in 75-token chunks.

    A chunk that would split within 20 tokens after a comma moves the words after the
    comma to the next chunk, so a phrase is not cut in half.
    """
    parsed = parse_prompt_attention(strip_loras(text))
    pieces = [piece for piece, _ in parsed]
    token_lists = tokenizer(pieces, add_special_tokens=False, truncation=False)["input_ids"]
    comma = tokenizer.get_vocab().get(",</w>")
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1
    for tokens, (piece, weight) in zip(token_lists, parsed):
        if piece == BREAK and weight == -1:
            chunks.append(chunk)
            chunk, last_comma = Chunk(), -1
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (
                len(chunk.tokens) == CHUNK_TOKENS
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK
            ):
                cut = last_comma + 1
                chunks.append(Chunk(chunk.tokens[:cut], chunk.weights[:cut]))
                chunk, last_comma = Chunk(chunk.tokens[cut:], chunk.weights[cut:]), -1
            if len(chunk.tokens) == CHUNK_TOKENS:
                chunks.append(chunk)
                chunk, last_comma = Chunk(), -1
            chunk.tokens.append(token)
            chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        chunks.append(chunk)
    return chunks


def token_count(pipe: Any, text: str) -> int:
    """Tokens the prompt uses, counted as A1111 shows them (75 per full chunk)."""
    chunks = tokenize_chunks(pipe.tokenizer, text)
    return CHUNK_TOKENS * (len(chunks) - 1) + len(chunks[-1].tokens)


def chunk_count(pipe: Any, prompt: str, negative: str = "") -> int:
    """75-token chunks a job's embeddings will have. Samples batched together are padded
    to the longest, which changes the image of a shorter one (as in A1111): jobs batched
    so that each image equals its solo run need equal chunk counts."""
    tokenizer = pipe.tokenizer
    return max(len(tokenize_chunks(tokenizer, prompt)), len(tokenize_chunks(tokenizer, negative)))


def encode_prompts(
    pipe: Any,
    prompt: str | list[str],
    negative: str | list[str],
    *,
    clip_skip: int | None = None,
) -> dict[str, torch.Tensor]:
    """Embeddings for a pipeline call: `pipe(**encode_prompts(...), ...)`.

    A list is one prompt per sample; a string negative goes with every sample. All
    samples, positive and negative, are padded with empty chunks to one chunk count.
    The text encoders see rows sample by sample (sample 0's positive chunks, then its
    negative chunks, then sample 1's…), every sample the same number of rows: per-sample
    text-encoder LoRAs (`pipeline.loras.adapters`) rely on that order.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    tokenizer = pipe.tokenizer
    pos = [tokenize_chunks(tokenizer, p) for p in prompts]
    neg = [tokenize_chunks(tokenizer, n) for n in negatives]
    count = max(len(c) for c in pos + neg)
    rows: list[Chunk] = []
    for p, n in zip(pos, neg):
        rows += _pad_chunks(p, count) + _pad_chunks(n, count)
    embeds, pooled = _encode_all(pipe, rows, clip_skip)
    pos_embeds, neg_embeds = _split_samples(embeds, len(prompts), count)
    out = {"prompt_embeds": pos_embeds, "negative_prompt_embeds": neg_embeds}
    if pooled is not None:
        first = pooled.reshape(len(prompts), 2, count, -1)[:, :, 0]  # each side's first chunk
        out["pooled_prompt_embeds"] = first[:, 0].contiguous()
        out["negative_pooled_prompt_embeds"] = first[:, 1].contiguous()
        if getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            _zero_empty_negatives(out, negatives)
    return out


def encode_texts(
    pipe: Any, texts: Sequence[str], chunks: int, *, clip_skip: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each text's embeddings, padded with empty chunks to `chunks`: [texts, chunks*77, dim],
    and where the family has one (SDXL) the pooled output of each text's first chunk
    ([texts, dim]; else None).

    One encoder call, rows in the order given: per-sample text-encoder LoRAs need each
    sample's texts together and the same number of texts per sample. For one text of
    one chunk the result equals `encode_prompts` (no zeroing of empty negatives here).
    """
    tokenizer = pipe.tokenizer
    rows: list[Chunk] = []
    for text in texts:
        rows += _pad_chunks(tokenize_chunks(tokenizer, text), chunks)
    hidden, pooled = _encode_all(pipe, rows, clip_skip)
    embeds = hidden.reshape(len(texts), chunks * hidden.shape[1], hidden.shape[2])
    if pooled is None:
        return embeds, None
    return embeds, pooled.reshape(len(texts), chunks, -1)[:, 0].contiguous()


def _pad_chunks(chunks: list[Chunk], count: int) -> list[Chunk]:
    # A1111 pads the shorter side with the encoding of an empty prompt.
    return chunks + [Chunk() for _ in range(count - len(chunks))]


def _encode_all(
    pipe: Any, rows: list[Chunk], clip_skip: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every text encoder of the family over the rows, their states side by side (SDXL:
    both encoders' penultimate states), and the last encoder's pooled output where the
    family reads one."""
    from pipeline.families import of_pipe

    family = of_pipe(pipe)
    penultimate = family.penultimate_hidden_state
    outs = [
        _encode_rows(pipe, encoder, tokenizer, rows, clip_skip, penultimate=penultimate)
        for tokenizer, encoder in family.text_encoders(pipe)
    ]
    hidden = outs[0][0] if len(outs) == 1 else torch.cat([h for h, _ in outs], dim=-1)
    return hidden, outs[-1][1] if family.pooled_text else None


def _zero_empty_negatives(out: dict[str, torch.Tensor], negatives: Sequence[str]) -> None:
    # SDXL models ask for zeros instead of an encoded "" (diffusers and A1111 both do so).
    for i, text in enumerate(negatives):
        if text == "":
            out["negative_prompt_embeds"][i] = 0
            out["negative_pooled_prompt_embeds"][i] = 0


def _split_samples(
    embeds: torch.Tensor, samples: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[samples*2*count, 77, dim] rows → positive and negative [samples, count*77, dim]."""
    per = embeds.reshape(samples, 2, count * embeds.shape[1], embeds.shape[2])
    return per[:, 0].contiguous(), per[:, 1].contiguous()


def _encode_rows(
    pipe: Any,
    encoder: Any,
    tokenizer: Any,
    rows: list[Chunk],
    clip_skip: int | None,
    *,
    penultimate: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One encoder call over all chunks; returns weighted hidden states and pooled output."""
    device = getattr(pipe, "_execution_device", None) or pipe.device
    ids = torch.tensor([_chunk_ids(tokenizer, c) for c in rows], device=device)
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = (torch.arange(ids.shape[1], device=device)[None] < _lengths(rows, device)).long()
    with torch.no_grad():
        wanted = clip_skip is not None or penultimate
        out = encoder(ids, attention_mask=mask, output_hidden_states=wanted)
        if penultimate:
            hidden = out.hidden_states[-(clip_skip or 0) - 2]
        elif clip_skip is None:
            hidden = out[0]
        else:  # diffusers' SD 1.x clip_skip: an earlier layer through the final norm
            # (transformers 5 dropped CLIPTextModel.text_model; 4.x still has it)
            final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
            hidden = final_norm(out.hidden_states[-(clip_skip + 1)])
        hidden = _apply_weights(hidden, rows)
    pooled = out[0] if penultimate and out[0].ndim == 2 else None
    dtype = encoder.dtype
    return hidden.to(device, dtype), None if pooled is None else pooled.to(device, dtype)


def _chunk_ids(tokenizer: Any, chunk: Chunk) -> list[int]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer.bos_token_id, *chunk.tokens, tokenizer.eos_token_id]
    return ids + [pad] * (CHUNK_TOKENS + 2 - len(ids))


def _lengths(rows: list[Chunk], device: Any) -> torch.Tensor:
    return torch.tensor([[len(c.tokens) + 2] for c in rows], device=device)


def _apply_weights(hidden: torch.Tensor, rows: list[Chunk]) -> torch.Tensor:
    """A1111's emphasis: scale each token's state, then restore the chunk's mean."""
    weighted = [i for i, c in enumerate(rows) if any(w != 1.0 for w in c.weights)]
    if not weighted:
        return hidden  # exact: plain prompts must equal diffusers' embeddings
    hidden = hidden.clone()
    for i in weighted:
        w = [1.0, *rows[i].weights, 1.0]
        w += [1.0] * (hidden.shape[1] - len(w))
        z = hidden[i]
        original_mean = z.float().mean()
        z = z * torch.tensor(w, dtype=z.dtype, device=z.device)[:, None]
        # A1111 divides unguarded; a zero mean (e.g. all weights 0) would give NaN.
        new_mean = z.float().mean()
        if new_mean != 0:
            z = z * (original_mean / new_mean).to(z.dtype)
        hidden[i] = z
    return hidden

"""Tokenizers for the tiny models, built offline from a vocabulary written here.

Nothing is downloaded: transformers 5 builds each tokenizer class from an in-memory
vocabulary (`T5Tokenizer(vocab=[(piece, score), …])`, `Qwen2Tokenizer(vocab=…, merges=…)`),
and we save what it built. Each one knows the common prompt words of
`pipeline.families.sd_tiny` plus the words of the prompt templates the pipelines wrap a
prompt in, so prompts tokenize to words as the real tokenizers do, and anything else
falls back to characters (T5) or bytes (Qwen), as theirs do for rare words.

- CLIP (Flux.1's first encoder): a CLIP BPE tokenizer over the byte symbols, each also
  as an end-of-word symbol, with merges that make every common word one token.
- T5 (Flux.1's second encoder): a Unigram (sentencepiece) model, "▁word" pieces.
- Qwen2 byte-level BPE (Qwen2.5-VL for Qwen-Image, Qwen3 for Z-Image and Flux.2 klein),
  with the special tokens and the chat template the pipelines use.
"""

from __future__ import annotations

from pipeline.families.sd_tiny import _COMMON_WORDS

# The words of the system prompts the Qwen-Image pipelines put before every prompt
# (`prompt_template_encode` in diffusers' qwenimage pipelines). The real tokenizer has
# each as one token, and the pipelines drop a fixed number of leading tokens
# (`prompt_template_encode_start_idx`), so the template must tokenize to words here too.
TEMPLATE_WORDS = (  # noqa: SIM905 (a sentence of words reads better than 40 lines)
    "system user assistant describe image by detailing color shape size texture quantity "
    "text spatial relationships objects background key features input then explain how "
    "should alter or modify generate new that meets requirements while maintaining "
    "consistency original where appropriate instruction picture"
).split()

WORDS = list(dict.fromkeys([*_COMMON_WORDS, *TEMPLATE_WORDS, "dance", "monkey", "squirrel"]))


def t5_tokenizer():
    """A T5 Unigram tokenizer: <pad>=0, </s>=1, <unk>=2, every printable ASCII character
    alone and after "▁", then one "▁word" piece per common word (scored above the
    characters that spell it, so Unigram picks the word), then T5's 100 sentinels."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(c, -5.0) for c in chars] + [("▁" + c, -5.0) for c in chars]
    vocab += [("▁" + w, -1.0) for w in WORDS if len(w) > 1]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))]
    return T5Tokenizer(vocab=vocab, extra_ids=100, model_max_length=512)


# Qwen2's special tokens, in the order the real vocabulary has them (151643 onwards).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN3_EXTRA_TOKENS = ["<think>", "</think>"]

# Qwen3's chat template for plain user/system/assistant turns: with
# add_generation_prompt and enable_thinking=False (Flux.2 klein) it opens an empty
# thinking block, with enable_thinking=True (Z-Image) it does not — as Qwen3's own does.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# Qwen2-VL's chat template (images and text in a user turn), for the processor.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_symbols() -> list[str]:
    """GPT-2's 256 printable stand-ins for bytes, the base alphabet of CLIP's and Qwen's BPE."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first) to a word's symbols, as the tokenizer will."""
    while len(symbols) > 1:
        pairs = [
            (ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))
        ]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def _word_merges(words: list[list[str]]) -> list[tuple[str, str]]:
    """Merges that make each word (a list of symbols) one token: for each word, whatever
    the merges so far leave of it is joined left to right by new, lower-priority merges
    (which cannot change how the earlier words, already whole, are built). Merging each
    word's symbols left to right regardless of the earlier merges, as
    `pipeline.families.sd_tiny` does, leaves words such as "photo" in pieces ("pho", "to</w>")."""
    ranks: dict[tuple[str, str], int] = {}
    for symbols in words:
        pieces = _bpe(symbols, ranks)
        while len(pieces) > 1:
            ranks.setdefault((pieces[0], pieces[1]), len(ranks))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    return list(ranks)


def clip_tokenizer():
    """A CLIP BPE tokenizer (77 tokens): every byte symbol alone and as end of word, one
    token per common word, <|startoftext|> and <|endoftext|> last (as CLIP's are)."""
    from transformers import CLIPTokenizer

    chars = _byte_symbols()
    merges = _word_merges([[*w[:-1], w[-1] + "</w>"] for w in WORDS])
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def qwen_tokenizer(*, qwen3: bool):
    """A byte-level BPE tokenizer like Qwen2's: the 256 byte symbols, merges that build
    each common word with and without its leading space ("Ġcat", "cat") and the
    newline pair, then the special tokens, then (Qwen3) the thinking tags."""
    from transformers import Qwen2Tokenizer

    chars = _byte_symbols()
    words = [*WORDS, *(w.capitalize() for w in TEMPLATE_WORDS)]
    spelled = ["ĊĊ", "Ġ(", "'s", *words, *("Ġ" + w for w in words)]
    merges = _word_merges([list(w) for w in spelled])
    tokens = chars + [a + b for a, b in merges]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    specials = QWEN_SPECIAL_TOKENS + (QWEN3_EXTRA_TOKENS if qwen3 else [])
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=131072,
        chat_template=QWEN3_CHAT_TEMPLATE if qwen3 else QWEN2_VL_CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tokenizer

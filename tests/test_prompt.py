"""The A1111 prompt language on the tiny models: parser table, chunks, weights, and
equality with diffusers' own encode_prompt for plain prompts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.contract.jobs import JobError
from pipeline.families.sd_tiny import write_tiny_model
from pipeline.prompts.encoding import (
    chunk_count,
    encode_prompts,
    extract_loras,
    parse_prompt_attention,
    token_count,
    tokenize_chunks,
)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    path = write_tiny_model(tmp_path_factory.mktemp("sd1"))
    return StableDiffusionPipeline.from_pretrained(path)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    path = write_tiny_model(tmp_path_factory.mktemp("sdxl"), xl=True)
    return StableDiffusionXLPipeline.from_pretrained(path)


# A1111's own doctest table (modules/prompt_parser.py), plus the brief's cases.
PARSER_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    ("a (b:1.5) c", [("a ", 1.0), ("b", 1.5), (" c", 1.0)]),
    ("((x))", [("x", 1.2100000000000002)]),
    ("[x]", [("x", 1 / 1.1)]),
    ("\\(x\\)", [("(x)", 1.0)]),
    ("unbalanced)", [("unbalanced)", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("", [("", 1.0)]),
    ("(x:-1)", [("x", -1.0)]),
]


@pytest.mark.parametrize("text, expected", PARSER_CASES)
def test_parser_matches_a1111(text, expected):
    assert parse_prompt_attention(text) == expected


def test_break_inside_brackets_stays_a_break():
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]


def test_bad_weight_is_literal_text_not_an_error():
    assert parse_prompt_attention("(x:1.2.3)") == [("x:1.2.3)", 1.1)]


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_parser_never_raises(text):
    parsed = parse_prompt_attention(text)
    assert parsed and all(isinstance(t, str) and isinstance(w, float) for t, w in parsed)


def test_extract_loras():
    text, loras = extract_loras("a cat <lora:me:0.8>, <lyco:Style_v2> <lora:x:0.5:0.2> end")
    assert text == "a cat ,   end"
    assert loras == [("me", 0.8), ("Style_v2", 1.0), ("x", 0.5)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("<lora::>", "needs a name"),
        ("<lora:me:abc>", "LoRA 'me' weight must be a number"),
        ("<lora:me:5>", "LoRA 'me' weight must be between -4 and 4"),
        ("<lora:me:-4.5>", "between -4 and 4"),
        ("<lora:me:nan>", "between -4 and 4"),
    ],
)
def test_extract_loras_errors(text, message):
    with pytest.raises(JobError, match=message):
        extract_loras(text)


def test_plain_prompt_equals_diffusers_sd1(sd1):
    ours = encode_prompts(sd1, "a photo of a cat, red", "blurry, low quality")
    pos, neg = sd1.encode_prompt("a photo of a cat, red", "cpu", 1, True, "blurry, low quality")
    torch.testing.assert_close(ours["prompt_embeds"], pos, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["negative_prompt_embeds"], neg, atol=1e-5, rtol=0)


def test_clip_skip_sd1_is_the_penultimate_layer_normed(sd1):
    # diffusers' own clip_skip path reads `text_encoder.text_model`, which transformers 5
    # removed, so compare with what it computes: hidden_states[-2] through the final norm.
    ours = encode_prompts(sd1, "a dog", "", clip_skip=1)["prompt_embeds"]
    ids = sd1.tokenizer("a dog", padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = sd1.text_encoder(ids.input_ids, output_hidden_states=True)
        expected = sd1.text_encoder.final_layer_norm(out.hidden_states[-2])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, encode_prompts(sd1, "a dog", "")["prompt_embeds"])


def _assert_equals_diffusers_xl(pipe, prompt, negative):
    ours = encode_prompts(pipe, prompt, negative)
    # An empty negative is zeros for SDXL: diffusers does that when it is None.
    theirs = pipe.encode_prompt(prompt, device="cpu", negative_prompt=negative or None)
    names = [
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    ]
    for name, tensor in zip(names, theirs):
        torch.testing.assert_close(ours[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_plain_prompt_equals_diffusers_sdxl(sdxl):
    _assert_equals_diffusers_xl(sdxl, "a photo of a cat", "blurry")
    _assert_equals_diffusers_xl(sdxl, "a photo of a cat", "")


# Module-scoped pipes are safe to share between hypothesis examples.
_FIXTURE_OK = [HealthCheck.function_scoped_fixture]

# Plain text: no brackets, escapes, colons, tags or BREAK; any other Unicode.
_plain = st.text(
    alphabet=st.characters(blacklist_characters="()[]\\:<>", blacklist_categories=("Cs",)),
    max_size=60,
).filter(lambda t: "BREAK" not in t)
_words = st.lists(
    st.sampled_from(["a", "photo", "of", "cat", "red", "masterpiece", ",", "zebra", "é", "🙂"]),
    max_size=20,
).map(" ".join)


def _fits(pipe, text: str) -> bool:
    return len(tokenize_chunks(pipe.tokenizer, text)) == 1


@given(prompt=st.one_of(_plain, _words), negative=st.one_of(_plain, _words))
@settings(max_examples=25, deadline=None, suppress_health_check=_FIXTURE_OK)
def test_plain_prompts_equal_diffusers_sd1(sd1, prompt, negative):
    if not (_fits(sd1, prompt) and _fits(sd1, negative)):
        return
    ours = encode_prompts(sd1, prompt, negative)
    pos, neg = sd1.encode_prompt(prompt, "cpu", 1, True, negative)
    torch.testing.assert_close(ours["prompt_embeds"], pos, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["negative_prompt_embeds"], neg, atol=1e-5, rtol=0)


@given(prompt=st.one_of(_plain, _words), negative=st.one_of(_plain, _words))
@settings(max_examples=15, deadline=None, suppress_health_check=_FIXTURE_OK)
def test_plain_prompts_equal_diffusers_sdxl(sdxl, prompt, negative):
    if not (_fits(sdxl, prompt) and _fits(sdxl, negative)):
        return
    _assert_equals_diffusers_xl(sdxl, prompt, negative)


_markup = st.text(alphabet=st.sampled_from(list("()[]\\:<>.,-+0123456789 abBREAK")), max_size=80)


@given(prompt=st.one_of(st.text(max_size=120), _markup), negative=st.text(max_size=40))
@settings(max_examples=40, deadline=None, suppress_health_check=_FIXTURE_OK)
def test_encode_never_raises(sd1, prompt, negative):
    out = encode_prompts(sd1, prompt, negative)
    assert out["prompt_embeds"].shape == out["negative_prompt_embeds"].shape
    assert torch.isfinite(out["prompt_embeds"]).all()


def test_ten_thousand_characters(sdxl):
    text = "(a [b\\ c:1.2 é🙂 " * 600 + ")"
    out = encode_prompts(sdxl, text[:10_000], "<lora:oops")
    chunks = out["prompt_embeds"].shape[1] // 77
    assert chunks > 1 and out["prompt_embeds"].shape[1] == 77 * chunks
    assert torch.isfinite(out["prompt_embeds"]).all()


def test_long_prompt_spans_chunks(sd1):
    prompt = ", ".join(["a photo of a red cat"] * 30)  # about 270 tokens
    chunks = len(tokenize_chunks(sd1.tokenizer, prompt))
    assert chunks >= 3
    out = encode_prompts(sd1, prompt, "")
    assert out["prompt_embeds"].shape == (1, 77 * chunks, 32)
    assert out["negative_prompt_embeds"].shape == (1, 77 * chunks, 32)  # padded to match
    assert token_count(sd1, prompt) > 75 * (chunks - 1)


def test_first_chunk_of_long_prompt_is_its_own_encoding(sd1):
    """Each chunk is encoded on its own: chunk 1 of "X BREAK Y" is exactly "X"."""
    out = encode_prompts(sd1, "a photo of a cat BREAK a dog", "")
    alone = encode_prompts(sd1, "a photo of a cat", "")["prompt_embeds"]
    second = encode_prompts(sd1, "a dog", "")["prompt_embeds"]
    assert out["prompt_embeds"].shape == (1, 154, 32)
    torch.testing.assert_close(out["prompt_embeds"][:, :77], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["prompt_embeds"][:, 77:], second, atol=1e-6, rtol=0)


def test_comma_backtrack_moves_the_last_phrase():
    from transformers import CLIPTokenizer

    from pipeline.families.sd_tiny import write_tokenizer

    # 70 one-token words, a comma, then ten more: the chunk would end 4 tokens after
    # the comma, so those 4 move to the next chunk with the rest.
    prompt = "a " * 70 + ", " + "a " * 10
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
        chunks = tokenize_chunks(tokenizer, prompt)
    assert [len(c.tokens) for c in chunks] == [71, 10]


def test_weights_change_embeddings_and_keep_the_mean(sd1):
    plain = encode_prompts(sd1, "a photo of a cat", "")["prompt_embeds"]
    weighted = encode_prompts(sd1, "a photo of a (cat:1.5)", "")["prompt_embeds"]
    assert not torch.allclose(plain, weighted, atol=1e-3)
    torch.testing.assert_close(weighted.mean(), plain.mean(), atol=1e-5, rtol=1e-4)
    escaped = encode_prompts(sd1, "a photo of a \\(cat\\)", "")["prompt_embeds"]
    assert not torch.allclose(plain, escaped)  # literal brackets are tokens, not weights


def test_batch_pads_every_sample_to_one_chunk_count(sd1):
    long = " ".join(["a"] * 100)  # 100 tokens: two chunks
    out = encode_prompts(sd1, ["a cat", long], ["blurry", ""])
    assert out["prompt_embeds"].shape == (2, 154, 32)
    alone = encode_prompts(sd1, "a cat", "blurry")
    first = alone["prompt_embeds"][0]
    torch.testing.assert_close(out["prompt_embeds"][0, :77], first, atol=1e-5, rtol=0)
    empty = encode_prompts(sd1, "", "")["prompt_embeds"][0]
    torch.testing.assert_close(out["prompt_embeds"][0, 77:], empty, atol=1e-5, rtol=0)


def test_sdxl_pooled_comes_from_first_chunk(sdxl):
    out = encode_prompts(sdxl, "a photo of a cat BREAK a dog", "blurry")
    first = encode_prompts(sdxl, "a photo of a cat", "blurry")
    assert out["prompt_embeds"].shape == (1, 154, 64)
    torch.testing.assert_close(out["pooled_prompt_embeds"], first["pooled_prompt_embeds"])


def test_lora_tags_left_in_the_prompt_are_not_encoded(sd1):
    tagged = encode_prompts(sd1, "a cat <lora:me:0.8>", "")["prompt_embeds"]
    plain = encode_prompts(sd1, "a cat ", "")["prompt_embeds"]
    torch.testing.assert_close(tagged, plain)


def test_chunk_count(sd1):
    assert chunk_count(sd1, "a cat") == 1
    assert chunk_count(sd1, "a cat BREAK a dog") == 2
    assert chunk_count(sd1, "a cat", "a " * 80) == 2


def test_token_count(sd1):
    assert token_count(sd1, "") == 0
    plain = len(sd1.tokenizer("a photo of a cat", add_special_tokens=False).input_ids)
    assert token_count(sd1, "a photo of a cat") == plain
    assert token_count(sd1, "(a photo:1.2) of a [cat]") == plain
    assert token_count(sd1, "a " * 100) == 100

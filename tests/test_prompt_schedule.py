"""Prompt editing, alternation and AND as text: A1111's own cases, and what is refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.contract.jobs import GenerateSpec, JobError, Limits
from pipeline.contract.prompt_schedule import (
    check_prompt_schedule,
    plan_prompt,
    prompt_schedule,
    split_and,
    text_at_step,
)

# Copied verbatim from the doctest of get_learned_conditioning_prompt_schedules in
# AUTOMATIC1111/stable-diffusion-webui, modules/prompt_parser.py (v1.10, AGPL-3.0),
# called there as g = lambda p: get_learned_conditioning_prompt_schedules([p], 10)[0].
# (A1111 1.10's own parser returns the whole prompt as literal text for the
# `a [{b|d{:.5] c` case; we give the doctest's answer, see docs/DECISIONS.md.)
A1111_SCHEDULE_DOCTEST = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("a [{b|d{:.5] c", [[5, "a  c"], [10, "a {b|d{ c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    (
        "[a|(b:1.1)]",
        [[1, "a"], [2, "(b:1.1)"], [3, "a"], [4, "(b:1.1)"], [5, "a"], [6, "(b:1.1)"], [7, "a"], [8, "(b:1.1)"], [9, "a"], [10, "(b:1.1)"]],  # noqa: E501
    ),
    (
        "[fe|]male",
        [[1, "female"], [2, "male"], [3, "female"], [4, "male"], [5, "female"], [6, "male"], [7, "female"], [8, "male"], [9, "female"], [10, "male"]],  # noqa: E501
    ),
    (
        "[fe|||]male",
        [[1, "female"], [2, "male"], [3, "male"], [4, "male"], [5, "female"], [6, "male"], [7, "male"], [8, "male"], [9, "female"], [10, "male"]],  # noqa: E501
    ),
]  # fmt: skip


@pytest.mark.parametrize("prompt, expected", A1111_SCHEDULE_DOCTEST)
def test_a1111_schedule_doctest(prompt, expected):
    assert [list(entry) for entry in prompt_schedule(prompt, 10)] == expected


# Our own cases, each checked against A1111 1.10's parser run locally.
@pytest.mark.parametrize(
    "prompt, steps, expected",
    [
        ("[a:b:0]", 10, [(10, "b")]),
        ("[a:b:30]", 20, [(20, "a")]),  # past the last step: `to` never shows
        ("[a::0.25] c", 8, [(2, "a c"), (8, " c")]),
        ("x [cat:dog:1.0]", 10, [(10, "x cat")]),  # a decimal point: a fraction
        ("(x [a:b]) [c:2]", 10, [(2, "(x [a:b]) "), (10, "(x [a:b]) c")]),
        ("a | b", 10, [(10, "a | b")]),
        ("[a:b:c]", 10, [(10, "[a:b:c]")]),  # no number: literal
        ("[a|b] [c:d:1]", 2, [(1, "a c"), (2, "b d")]),
        ("[[a|b]:c:1]", 3, [(1, "a"), (2, "c"), (3, "c")]),
        ("(a:1.2) \\[b:2\\]", 10, [(10, "(a:1.2) \\[b:2\\]")]),  # escaped: literal
        ("a\n[b:c:1]", 4, [(1, "a\nb"), (4, "a\nc")]),
    ],
)
def test_schedule_cases(prompt, steps, expected):
    assert prompt_schedule(prompt, steps) == expected


def test_text_at_step_counts_from_zero_as_a1111():
    # A1111's denoiser step counter starts at 0 and picks the first entry ending at or
    # after it: the first text covers steps 0..when, alternation starts a, a, b, a, b.
    schedule = prompt_schedule("[a|b]", 4)
    assert [text_at_step(schedule, k) for k in range(4)] == ["a", "a", "b", "a"]
    edit = prompt_schedule("[x:y:2]", 4)
    assert [text_at_step(edit, k) for k in range(4)] == ["x", "x", "x", "y"]


@pytest.mark.parametrize(
    "prompt, parts",
    [
        ("a cat", [("a cat", 1.0)]),
        ("a AND b :1.2", [("a", 1.0), (" b", 1.2)]),
        ("a cat:1.5", [("a cat", 1.5)]),  # A1111 weights a single part too
        ("x AND y:-0.5 AND z ", [("x", 1.0), (" y", -0.5), (" z", 1.0)]),
        ("ANDROID AND", [("ANDROID", 1.0), ("", 1.0)]),
        ("(a:1.2) AND b", [("(a:1.2)", 1.0), (" b", 1.0)]),
    ],
)
def test_split_and(prompt, parts):
    assert split_and(prompt) == parts


def test_plan_marks_plain_prompts():
    assert plan_prompt("a cat", "ugly", 20).plain
    assert not plan_prompt("a cat:1.1", "", 20).plain
    assert not plan_prompt("a AND b", "", 20).plain
    assert not plan_prompt("a", "[x:y:0.5]", 20).plain
    plan = plan_prompt("[a|b] AND [a:c:2]", "", 4)
    assert plan.texts() == ["", "a", "b", " a", " c"]


@given(st.text(alphabet="ab :|()[]\\0.5-AND", max_size=40), st.integers(1, 30))
@settings(max_examples=300, deadline=None)
def test_schedule_never_raises_and_ends_at_the_last_step(prompt, steps):
    schedule = prompt_schedule(prompt, steps)
    assert schedule[-1][0] == steps
    assert all(1 <= last <= steps for last, _ in schedule)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("[a:b:-1]", r"\[a:b:-1\] in the prompt: the switch point must be a step count"),
        ("x [a:b:1.5]", "fraction of the steps from 0 to 1"),
        (" AND ".join(["x"] * 50), "the prompt has 50 parts joined by AND; the limit is 8"),
        ("a [cat:dog:5", "the prompt has a '\\[' that is never closed: '\\[cat:dog:5'"),
        ("a [cat|dog", "never closed"),
    ],
)
def test_bad_editing_syntax_is_one_line(prompt, message):
    with pytest.raises(JobError, match=message) as caught:
        GenerateSpec(prompt=prompt, seed=1).check(Limits())
    assert "\n" not in str(caught.value)


def test_negative_prompt_is_checked_and_the_and_limit_comes_from_limits():
    with pytest.raises(JobError, match="in the negative prompt"):
        GenerateSpec(prompt="x", negative_prompt="[a::-2]").check(Limits())
    GenerateSpec(prompt="a AND b AND c").check(Limits(max_and_subprompts=3))
    with pytest.raises(JobError, match="the limit is 2"):
        GenerateSpec(prompt="a AND b AND c").check(Limits(max_and_subprompts=2))


@pytest.mark.parametrize(
    "prompt",
    ["a [unbalanced", "((masterpiece), best", "[a:b]", "a [b:c:0] <lora:x:0.5>", "(a:1.2"],
)
def test_what_a1111_takes_as_text_is_not_refused(prompt):
    check_prompt_schedule(prompt, "", 8)


@pytest.mark.parametrize("prompt, expected", A1111_SCHEDULE_DOCTEST)
def test_every_prompt_a1111_schedules_is_accepted_and_queued_with_its_meaning(prompt, expected):
    # `((a][:b:c [d:3]` has a defined schedule in A1111: its literal '[' must not be refused.
    spec = GenerateSpec(prompt=prompt, seed=1, steps=10)
    spec.check(Limits())
    assert [list(entry) for entry in prompt_schedule(spec.prompt, spec.steps)] == expected


@pytest.mark.parametrize(
    "prompt",
    [
        "x [a:(b:1.2):0.5 y",  # a parsed (b:1.2) inside does not hide the editing
        "[a [b:3] c|d",  # nor does a parsed [b:3]
        "a [b:c:0.5 ((d))",
    ],
)
def test_a_literal_bracket_whose_words_are_editing_syntax_gets_the_message(prompt):
    with pytest.raises(JobError, match="never closed"):
        check_prompt_schedule(prompt, "", 8)


@pytest.mark.parametrize(
    "prompt",
    [
        "a [b:c:0.5 d] e",  # closed, if not valid: A1111's text, no "never closed"
        "a [b \\|c",  # an escaped bar is text
        "a [b \\:3 c",
        "[x ((y)) z",  # nothing in its words looks like editing
    ],
)
def test_literal_brackets_without_editing_words_are_accepted(prompt):
    check_prompt_schedule(prompt, "", 8)


@given(st.text(alphabet="ab :|()[]\\0.5-AND", max_size=40))
@settings(max_examples=300, deadline=None)
def test_the_check_only_ever_answers_with_a_one_line_job_error(prompt):
    try:
        check_prompt_schedule(prompt, prompt, 64)
    except JobError as error:
        assert "\n" not in str(error)

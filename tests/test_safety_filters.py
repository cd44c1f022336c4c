"""Prompt filters against the usual evasions, regex safety, and per-server state in
SQLite (settings of two guilds kept apart, quota usage counted from the jobs)."""

from __future__ import annotations

import time

import pytest

from bot import store
from bot.services.guild_settings import effective, parse_setting
from bot.services.prompt_filter import FilterError, Filters, check_pattern, normalise_word
from bot.services.safety import RateLimiter, quota_for
from pipeline.contract.config import config_from_dict

WORDS = Filters(words=(normalise_word("Nude"), normalise_word("bad  WORD")))


@pytest.mark.parametrize(
    "prompt",
    [
        "a nude cat",
        "a NUDE cat",
        "a (nude:1.3) cat",  # A1111 attention markup
        "a [nude|cat] BREAK dog",
        "a n u d e cat",  # spacing
        "a n.u.d.e cat",
        "a n-u-d-e cat",
        "a nu\u200bde cat",  # zero-width space
        "a nu\u00adde cat",  # soft hyphen
        "a n\u200du\u200dde cat",  # zero-width joiners
        "a \uff4e\uff55\uff44\uff45 cat",  # fullwidth letters (NFKC)
        "a n\u057dde cat",  # Armenian "ս" for u (Unicode confusables)
        "a nud\u0435 cat",  # Cyrillic е
        "a n\u00fad\u00e9 cat",  # accents
        "a bad word here",
        "(bad:1.2)   word",
        "a cat <lora:nude:0.8>",  # a LoRA name in the prompt
    ],
)
def test_word_filters_see_through_evasions(prompt):
    assert WORDS.matches(prompt), prompt


@pytest.mark.parametrize(
    "prompt", ["a prude cat", "denude", "a nudibranch", "bad", "a word, bad", "a cat"]
)
def test_word_filters_match_whole_words_only(prompt):
    assert not WORDS.matches(prompt), prompt


def test_the_refusal_does_not_echo_the_term():
    with pytest.raises(Exception) as caught:
        WORDS.check("prompt", "a n u d e cat")
    assert "nude" not in str(caught.value).lower() and "not allow" in str(caught.value)


def test_regex_filters_run_on_folded_text_and_catastrophic_ones_are_refused():
    pattern = check_pattern(r"\bnud(e|ity)\b")
    assert Filters(patterns=(pattern,)).matches("NUD\u0415 art")  # Cyrillic Е
    for evil in (r"^(a|a)*$", r"(a|aa)+$"):
        with pytest.raises(FilterError, match="backtracks catastrophically"):
            check_pattern(evil)
    with pytest.raises(FilterError, match="does not compile"):
        check_pattern("(unclosed")
    with pytest.raises(FilterError, match="empty text"):
        check_pattern("x*")
    # A pattern that only explodes on longer input: the time limit refuses the prompt
    # instead of hanging the bot.
    slow = Filters(patterns=(r"(\w|\w\w)+$",))
    started = time.perf_counter()
    assert slow.matches("a" * 3000 + "!")
    assert time.perf_counter() - started < 2


def test_two_guilds_keep_their_settings_apart(tmp_path):
    config = config_from_dict({"models": {"m": {"source": "x"}}, "safety": {"policy": "block"}})
    db = store.open_db(tmp_path / "db.sqlite")
    store.set_guild_setting(
        db, "1", "safety.policy", parse_setting(config, "safety.policy", "spoiler")
    )
    store.set_guild_setting(
        db, "2", "limits.max_steps", parse_setting(config, "limits.max_steps", "30")
    )
    one = effective(config, store.guild_settings(db, "1"))
    two = effective(config, store.guild_settings(db, "2"))
    assert (one.policy, one.limits.max_steps) == ("spoiler", 150)
    assert (two.policy, two.limits.max_steps) == ("block", 30)
    store.set_guild_setting(
        db, "1", "safety.policy", parse_setting(config, "safety.policy", "default")
    )
    assert effective(config, store.guild_settings(db, "1")).policy == "block"
    store.add_filter(db, "1", "word", "cat", "admin")
    assert store.filters(db, "2") == []
    db.close()


def test_quota_usage_is_counted_from_the_jobs(tmp_path):
    path = tmp_path / "db.sqlite"
    db = store.open_db(path)
    for count in (2, 3):
        store.enqueue(
            db, user_id="u", guild_id="1", channel_id="c", kind="generate",
            spec={"prompt": "x", "count": count}, max_queued_per_user=9,
        )  # fmt: skip
    store.enqueue(db, user_id="u", guild_id="2", channel_id="c", kind="generate", spec={"count": 4})
    db.close()
    db = store.open_db(path)  # a restart: nothing was kept in memory
    assert store.usage(db, "1", "u")["images_per_day"] == 5
    assert store.usage(db, "2", "u")["images_per_day"] == 4
    db.close()
    # Member beats role beats server default; the most generous role wins; 0 = unlimited.
    targets = {
        "role:a": {"images_per_day": 5, "gpu_seconds_per_day": None, "trainings_per_week": 1},
        "role:b": {"images_per_day": 0, "gpu_seconds_per_day": None, "trainings_per_week": 2},
        "member:u": {"images_per_day": None, "gpu_seconds_per_day": 60, "trainings_per_week": None},
    }
    defaults = {"images_per_day": 3, "gpu_seconds_per_day": 100, "trainings_per_week": 0}
    assert quota_for(targets, "u", {"a"}, defaults) == {
        "images_per_day": 5, "gpu_seconds_per_day": 60, "trainings_per_week": 1,
    }  # fmt: skip
    assert quota_for(targets, "v", {"a", "b"}, defaults)["images_per_day"] == 0
    assert quota_for(targets, "v", set(), defaults) == defaults


def test_rate_limiter_window():
    limiter = RateLimiter()
    assert all(limiter.retry_after(1, 3, now=t) == 0 for t in (0, 1, 2))
    assert limiter.retry_after(1, 3, now=3) == pytest.approx(57)
    assert limiter.retry_after(2, 3, now=3) == 0  # another member is not affected
    assert limiter.retry_after(1, 3, now=60.5) == 0

"""The pairwise judge on its own: its prompt, both orders, ties and rejects, the win rate."""

import asyncio

import pytest

from refed_ray.engines.config import EngineConfig
from refed_ray.experiments.compare import win_rate
from refed_ray.method import prompts
from refed_ray.method.judge import JudgeSampling, judge_pair, winner_of
from tests.fake_judge import FakeJudge


def test_judge_prompt_renders_both_responses_after_the_instruction():
    (message,) = prompts.render("judge_pair", instruction="INSTR", response_1="FIRST", response_2="SECOND")
    content = message["content"]
    assert "$" not in content
    assert content.index("INSTR") < content.index("FIRST") < content.index("SECOND")
    for asked in ("accura", "scope", "order", "length", '"reasoning"', '"better"', '"1"', '"2"'):
        assert asked in content
    with pytest.raises(KeyError, match="response_2"):
        prompts.render("judge_pair", instruction="x", response_1="y")


def judge(**options) -> FakeJudge:
    return FakeJudge(EngineConfig(kind="custom", class_path="tests.fake_judge:FakeJudge", engine_kwargs=options))


def judged(engine, x, y, **sampling):
    return asyncio.run(judge_pair(engine, "Explain tides.", x, y, JudgeSampling(**sampling), "u#0"))


def test_the_same_side_twice_wins_and_a_disagreement_is_a_tie():
    prefers_good = judge(prefer_marker="GOOD")
    x_wins = judged(prefers_good, "tides GOOD", "tides")
    assert (x_wins.winner, x_wins.first, x_wins.second) == ("x", "1", "2")
    assert judged(prefers_good, "tides", "tides GOOD").winner == "y"
    assert judged(prefers_good, "tides", "tides").winner == "tie"  # the first shown wins each time
    first_always = judged(judge(always="1"), "tides GOOD", "tides")
    assert (first_always.winner, first_always.first, first_always.second) == ("tie", "1", "1")
    assert x_wins.stats.calls == 2 and x_wins.stats.rows_out == 1 and x_wins.stats.prompt_tokens > 0
    assert [winner_of(a, b) for a, b in (("1", "2"), ("2", "1"), ("1", "1"), ("2", "2"))] == ["x", "y", "tie", "tie"]


def test_an_unparseable_reply_after_retries_is_a_reject_not_a_tie():
    result = judged(judge(prefer_marker="GOOD", invalid_marker="BROKEN"), "BROKEN GOOD", "plain", max_attempts=2)
    assert result.winner is None
    assert "output does not validate" in result.reject_reason and "(after 2 attempts)" in result.reject_reason
    assert "X first" in result.reject_reason and "Y first" in result.reject_reason
    assert result.stats.calls == 4 and result.stats.rejected == 1 and result.stats.rows_out == 0


def test_the_verdict_budget_is_checked():
    with pytest.raises(ValueError, match="raise max_tokens"):
        JudgeSampling(max_tokens=100, reasoning_max_chars=1500)


def test_win_rate_counts_ties_half_with_a_wilson_interval():
    assert win_rate(0, 0, 0) == (None, None)
    rate, (low, high) = win_rate(6, 2, 2)
    assert rate == 0.7 and low < 0.7 < high
    # Wilson at p 0.7, n 10: centre (0.7 + z^2/20) / (1 + z^2/10) = 0.6445, half width 0.2477
    assert (low, high) == (0.3968, 0.8922)
    # Never a point: all ties, or every pair one way, still leave room (the normal interval gave
    # [0.5, 0.5] and [1.0, 1.0] here).
    assert win_rate(0, 0, 5) == (0.5, [0.1704, 0.8296])
    assert win_rate(2, 0, 0) == (1.0, [0.3424, 1.0])
    assert win_rate(50, 0, 0)[1] == [0.9287, 1.0] and win_rate(3, 1, 0)[1] == [0.3006, 0.9544]

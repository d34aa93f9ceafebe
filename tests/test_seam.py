"""The seam: stage names and reject reasons as data, passes, filters and samples kept in one place."""

from __future__ import annotations

from refed_ray.config import RunConfig
from refed_ray.data import kept
from refed_ray.data.filters.base import Filter
from refed_ray.records import commits
from refed_ray.records.commits import CommitLog, commit_on_driver
from refed_ray.records.models import Reject, to_table
from refed_ray.records.stages import CALLING_STAGES, PassName, Stage
from refed_ray.records.stats import ShardStats, StageStats, first_calls
from refed_ray.reports.report import reasons_by_count
from refed_ray.run.passes import FEEDBACK, SEEDS, SYNTHESIS
from refed_ray.storage import Storage


def test_a_commit_written_before_reasons_were_kept_apart_still_loads_and_counts_alike():
    old = '{"samples": 3, "lost_samples": 4, "reject_reasons": {"engine: shard abandoned: its engine died": 2, ' \
          '"dedup: near-duplicate of N": 1, "feedback: no feedback for this reference": 1}}'
    stats = ShardStats.model_validate_json(old)
    assert stats.rejects == {"engine": {"shard abandoned: its engine died": 2}, "dedup": {"near-duplicate of N": 1},
                             "feedback": {"no feedback for this reference": 1}}
    assert stats.rejected(Stage.ENGINE, reason_prefix="shard abandoned") == 2
    assert stats.rejected(Stage.DEDUP, Stage.FEEDBACK) == 2 and stats.rejected() == 4
    # report.json shows them as before: "stage: reason", most frequent first.
    assert reasons_by_count([stats]) == {"engine: shard abandoned: its engine died": 2,
                                         "dedup: near-duplicate of N": 1, "feedback: no feedback for this reference": 1}
    again = ShardStats.model_validate_json(stats.model_dump_json())
    assert again == stats


def test_rejects_are_counted_by_stage_and_reason_category():
    rejects = to_table([Reject(stage="responses", reason="invalid reply (after 3 tries)", sample_index=0),
                        Reject(stage="responses", reason="invalid reply (after 2 tries)", sample_index=1),
                        Reject(stage=Stage.SAMPLE_FEEDBACK, reason="truncated at 512 tokens", sample_index=2)], Reject)
    stats = ShardStats.of({"rejects": rejects}, {})
    assert stats.rejects == {"responses": {"invalid reply": 2}, "sample_feedback": {"truncated at N tokens": 1}}


def test_retries_come_from_the_questions_asked_not_from_a_calls_per_row_factor():
    class Answer:
        def __init__(self, calls):
            self.calls, self.prompt_tokens, self.completion_tokens, self.cached_tokens = calls, 1, 1, 0

    one_question_a_reference = StageStats(rows_in=2)
    one_question_a_reference.add_calls(Answer(1), Answer(3))  # a new feedback mode: 1 call a reference
    assert first_calls(Stage.FEEDBACK, one_question_a_reference) == 2  # 2 retries, not -2
    legacy = StageStats(rows_in=3, calls=7)  # committed before first calls were counted: two a reference
    assert first_calls(Stage.FEEDBACK, legacy) == 6 and first_calls(Stage.RESPONSES, StageStats(rows_in=3, calls=4)) == 3


def test_stage_and_pass_names_are_the_ones_outputs_hold():
    assert [str(s) for s in CALLING_STAGES] == ["feedback", "instructions", "responses", "sample_feedback",
                                                "refinement", "judge"]
    # A run's OUTPUT holds these passes; the judge's commits live under a compare or selection root.
    assert commits.PASSES == ("seeds", "feedback", "synthesis", "dedup")
    # Shard names follow the pass name and ids exactly as before the seam: resumes find their shards.
    assert SYNTHESIS.shard_name(["b", "a"]) == commits.shard_name("synthesis", ["a", "b"])
    rows = [{"reference_id": f"r{i}", "x": i} for i in range(5)]
    blocks = FEEDBACK.cut(rows, "reference_id", 2)
    assert [b.num_rows for b in blocks] == [2, 2, 1]
    assert blocks[2].column("shard").to_pylist() == [commits.shard_name("feedback", ["r4"])]


def test_feedback_shards_have_their_own_size_knob():
    assert RunConfig.model_validate({"workers": {"units_per_shard": 8}}).workers.feedback_shard_size() == 8
    assert RunConfig.model_validate({}).workers.feedback_shard_size() == 32  # at most 32: they spread over engines
    both = RunConfig.model_validate({"workers": {"units_per_shard": 8, "references_per_feedback_shard": 100}})
    assert both.workers.feedback_shard_size() == 100


class _EveryOther(Filter):
    """A test filter: drops every other committed sample."""

    name = "every_other"

    def settings(self, config):
        return config.dedup

    def find_drops(self, storage, committed, settings):
        rows = [Reject(stage="judge", reason="every other", unit_id=f"u{i}", sample_index=0, lost_samples=1)
                for i in range(0, 4, 2)]
        return to_table(rows, Reject)


def test_a_new_filter_commits_its_drops_and_samples_kept_count_them(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path / "out"))
    log = CommitLog(storage, passes=(*commits.PASSES, "every_other"))
    stats = ShardStats(samples=4)
    log.add(commits.commit_shard(storage, "synthesis", "synthesis-a", [f"u{i}" for i in range(4)], {}, stats))
    config = RunConfig.model_validate({"dedup": {"enabled": False}})
    every_other = _EveryOther()
    monkeypatch.setattr(kept, "RUN_FILTERS", (*kept.RUN_FILTERS, every_other))
    kept.apply_filters(storage, log, config)
    assert kept.accepted_samples(log, config) == 2
    (drops,) = kept.dropped_keys(storage, log, config)
    assert drops.to_pylist() == [{"unit_id": "u0", "sample_index": 0}, {"unit_id": "u2", "sample_index": 0}]
    first = every_other.current_commit(log, config.dedup)
    # A new synthesis shard makes that commit stale; applying again replaces it.
    log.add(commits.commit_shard(storage, "synthesis", "synthesis-b", ["u9"], {}, ShardStats(samples=1)))
    kept.apply_filters(storage, log, config)
    assert list(log.commits["every_other"]) == [every_other.current_name(log, config.dedup)] != [first.shard]
    assert not storage.exists(first.files[0])


def test_driver_commits_are_indexed_at_once(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    log = CommitLog(storage)
    tables = {"rejects": to_table([Reject(stage="seeds", reason="bad row")], Reject)}
    commit = commit_on_driver(storage, log, SEEDS.name, SEEDS.shard_name(["seeds"]), ["seeds"], tables)
    assert storage.list("_markers/seeds") == [] and CommitLog(storage).commits[PassName.SEEDS] == {commit.shard: commit}

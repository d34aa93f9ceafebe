"""Reserve shards (run/reserve.py): the shards a top-up would plan, sized by the yield so far."""

import pytest

from refed_ray.records.commits import Commit, CommitLog
from refed_ray.records.plan import next_shards, pending_shards, read_plan, top_up_units, write_plan
from refed_ray.records.stats import ShardStats
from refed_ray.run import reserve as reserve_module
from refed_ray.run.reserve import Reserve
from refed_ray.storage import Storage

REFS = [f"ref-{i}" for i in range(30)]


def _names(tables) -> list[str]:
    return [t.column("shard")[0].as_py() for t in tables]


def test_reserve_shards_are_the_shards_a_top_up_plans(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    first = write_plan(storage, REFS, 90, 3, 7, units_per_shard=4)  # 30 units: 7 shards of 4, one of 2
    planned = set(_names(pending_shards(read_plan(storage), set())))
    reserve = next_shards(REFS, 7, first.units, 9, units_per_shard=4)
    assert [t.num_rows for t in reserve] == [4, 4, 1]
    # A top-up through the first two reserve shards plans exactly them, units and names alike.
    write_plan(storage, REFS, 90, 3, 7, units_per_shard=4, units=first.units + 8)
    added = pending_shards(read_plan(storage), planned)
    assert _names(added) == _names(reserve[:2])
    assert [t.to_pylist() for t in added] == [t.to_pylist() for t in reserve[:2]]


def _commit(shard: str, units: int, samples: int) -> Commit:
    return Commit(pass_name="synthesis", shard=shard, token="t", ids=[f"{shard}-{i}" for i in range(units)],
                  files=[], stats=ShardStats(samples=samples))


def _reserve(plan_units: int, k: int, n: int, budget: int) -> Reserve:
    blocks = next_shards(REFS, 7, plan_units, budget, units_per_shard=4)
    return Reserve(blocks, plan_units, units_done=0, accepted=0, k=k, num_samples=n, budget=budget, shard_size=4)


def test_the_wanted_reserve_follows_the_yield_so_far():
    # 40 units of K=10 for N=400; a yield of 0.9 after half of them: 40 samples short, about 5 units.
    reserve = _reserve(plan_units=40, k=10, n=400, budget=8)
    for i in range(5):
        reserve.on_commit(_commit(f"s{i}", 4, 36))
    wanted = top_up_units(400 - 180 - 20 * 10 * 0.9, 180, 20, 10, 8)
    assert reserve.wanted == 0  # no gate yet: nothing is sent, nothing counted as sent
    assert reserve._shards_for(reserve._units_wanted()) == -(-wanted // 4) == 2
    # A full yield wants none.
    full = _reserve(plan_units=40, k=10, n=400, budget=8)
    full.on_commit(_commit("s0", 4, 40))
    assert full._units_wanted() == 0


def test_absorb_extends_the_plan_through_the_last_reserve_shard_committed(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    plan = write_plan(storage, REFS, 90, 3, 7, units_per_shard=4)
    reserve = Reserve(next_shards(REFS, 7, plan.units, 9, 4), plan.units, 0, 0, 3, 90, 9, shard_size=4)
    committed = CommitLog(storage)
    assert reserve.absorb(storage, committed, REFS, 90, 7) is None  # none committed: the plan stays
    committed.add(_commit(reserve.names[1], 4, 12))
    extended = reserve.absorb(storage, committed, REFS, 90, 7)
    assert extended.units == plan.units + 8
    # The first reserve shard, refused while the second ran, is a hole the next pass fills.
    assert _names(pending_shards(read_plan(storage), set(committed.commits["synthesis"])))[-1] == reserve.names[0]


def test_reserve_shards_are_the_tails_small_shards_and_the_plan_absorbs_them_as_cut(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    plan = write_plan(storage, REFS, 2400, 3, 7, units_per_shard=16)  # 800 units: 45 shards of 16, then 10 of 8
    assert [t.num_rows for t in pending_shards(read_plan(storage), set())] == [16] * 45 + [8] * 10
    planned = set(_names(pending_shards(read_plan(storage), set())))
    reserve = Reserve.plan(REFS, 7, plan, 16, units_done=0, accepted=0, k=3, num_samples=2400, budget=200,
                           unplanned=set())
    assert [b.num_rows for b in reserve.blocks] == [8] * 10  # 10% of the plan, in the tail's shards
    committed = CommitLog(storage)
    for name in reserve.names[:3]:
        committed.add(_commit(name, 8, 24))
    extended = reserve.absorb(storage, committed, REFS, 2400, 7)
    assert extended.units == 824
    assert _names(pending_shards(read_plan(storage), planned)) == reserve.names[:3]


def test_a_large_plans_reserve_is_cut_in_larger_shards_not_more_of_them(tmp_path, monkeypatch):
    # A tenth of a 10M plan would be 12,500 shards of 8 units, each a block the driver holds all pass.
    monkeypatch.setattr(reserve_module, "TAIL_MAX_SHARDS", 4)
    storage = Storage(str(tmp_path / "out"))
    plan = write_plan(storage, REFS, 2400, 3, 7, units_per_shard=16)  # 800 units: a reserve of 80
    reserve = Reserve.plan(REFS, 7, plan, 16, units_done=0, accepted=0, k=3, num_samples=2400, budget=200,
                           unplanned=set())
    assert [b.num_rows for b in reserve.blocks] == [16] * 5  # 80 units in at most 4 shards: whole shards
    monkeypatch.setattr(reserve_module, "TAIL_MAX_SHARDS", 7)
    reserve = Reserve.plan(REFS, 7, plan, 16, units_done=0, accepted=0, k=3, num_samples=2400, budget=200,
                           unplanned=set())
    assert [b.num_rows for b in reserve.blocks] == [12] * 6 + [8]  # 80 units in 7: shards of 12


@pytest.mark.parametrize("earlier_size", [64, 32, 16], ids=["whole shards", "half shards", "quarter shards"])
def test_a_run_stopped_inside_a_reserve_of_an_earlier_cut_resumes_with_that_cut(tmp_path, earlier_size):
    # A reserve shard of an earlier version's cut committed (at the default 64 units a shard), the
    # run stopped before absorb; today's cut is 8-unit shards.
    storage = Storage(str(tmp_path / "out"))
    plan = write_plan(storage, REFS, 7680, 3, 7, units_per_shard=64)  # 2,560 units: a reserve of 256
    assert Reserve.plan(REFS, 7, plan, 64, units_done=0, accepted=0, k=3, num_samples=7680, budget=300,
                        unplanned=set()).shard_size == 8
    earlier = _names(next_shards(REFS, 7, plan.units, 256, earlier_size))
    reserve = Reserve.plan(REFS, 7, plan, 64, units_done=0, accepted=0, k=3, num_samples=7680, budget=300,
                           unplanned={earlier[1]})
    assert reserve.names == earlier and reserve.shard_size == earlier_size


class _Gate:
    """The gate's calls, as the driver makes them (``.remote``), recorded."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.want = type("Method", (), {"remote": lambda _, count: self.calls.append(("want", count))})()
        self.close = type("Method", (), {"remote": lambda _: self.calls.append(("close",))})()


def test_the_reserve_settles_inside_the_pass_on_what_the_filters_keep():
    # 40 units of K=10 for N=400 in 10 plan shards; every unit yields 10 samples, so the yield
    # alone wants no reserve shard. The filters keep all at the pass's first commit and at half
    # its plan, 380 at its end: 20 short, 3 units with the margin, one reserve shard of 4.
    reserve = _reserve(plan_units=40, k=10, n=400, budget=8)
    measures = iter([40, 200, 380, 420])
    gate = _Gate()
    reserve.begin({f"s{i}" for i in range(10)}, set(), lambda: next(measures), gate)
    for i in range(10):
        reserve.on_commit(_commit(f"s{i}", 4, 40))
    assert top_up_units(20, 380, 40, 10, 8) == 3
    assert gate.calls == [("want", 1)] and not reserve.closed  # the actors waiting on the gate start it
    reserve.on_commit(_commit(reserve.names[0], 4, 40))  # the wanted reserve shard: it settles again
    assert gate.calls == [("want", 1), ("close",)] and reserve.closed
    assert next(measures, None) is None  # the filters ran at commits 1 and 5 and at both settles


def test_filters_that_cannot_run_close_the_reserve_on_the_yield_alone():
    reserve = _reserve(plan_units=8, k=10, n=80, budget=8)
    gate = _Gate()
    reserve.begin({"s0", "s1"}, set(), lambda: None, gate)
    reserve.on_commit(_commit("s0", 4, 36))  # yield 0.9: reserve shards wanted at once
    wanted = gate.calls[-1][1]
    assert gate.calls == [("want", wanted)] and wanted >= 1
    reserve.on_commit(_commit("s1", 4, 36))
    for name in reserve.names[:wanted]:
        reserve.on_commit(_commit(name, 4, 36))
    assert gate.calls[-1] == ("close",) and reserve.closed


def test_a_reserve_shard_not_wanted_yet_waits_at_the_gate_until_wanted_or_closed(local_ray):
    import ray

    from refed_ray.run.reserve import ReserveGate

    gate = ReserveGate.remote(["r0", "r1", "r2"])
    assert ray.get(gate.claim.remote("plan-shard"))  # not a reserve shard: run
    first, second = gate.claim.remote("r0"), gate.claim.remote("r2")
    ready, _ = ray.wait([first, second], timeout=1)
    assert not ready  # neither wanted nor closed: they wait
    gate.want.remote(1)
    assert ray.get(first) is True
    assert not ray.wait([second], timeout=0.5)[0]
    gate.close.remote()
    assert ray.get(second) is False
    assert ray.get(gate.claim.remote("r1")) is False  # closed: the rest are skipped at once

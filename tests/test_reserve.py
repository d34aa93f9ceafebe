"""Reserve shards (run/reserve.py): the shards a top-up would plan, sized by the yield so far."""

from refed_ray.records.commits import Commit, CommitLog
from refed_ray.records.plan import next_shards, pending_shards, read_plan, top_up_units, write_plan
from refed_ray.records.stats import ShardStats
from refed_ray.run.reserve import Reserve, reserve_units
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
    return Reserve(blocks, plan_units, units_done=0, accepted=0, k=k, num_samples=n, budget=budget)


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
    reserve = Reserve(next_shards(REFS, 7, plan.units, 9, 4), plan.units, 0, 0, 3, 90, 9)
    committed = CommitLog(storage)
    assert reserve.absorb(storage, committed, REFS, 90, 7, 4) is None  # none committed: the plan stays
    committed.add(_commit(reserve.names[1], 4, 12))
    extended = reserve.absorb(storage, committed, REFS, 90, 7, 4)
    assert extended.units == plan.units + 8
    # The first reserve shard, refused while the second ran, is a hole the next pass fills.
    assert _names(pending_shards(read_plan(storage), set(committed.commits["synthesis"])))[-1] == reserve.names[0]



def test_a_short_plan_reserves_a_shard_for_each_task_slot_within_the_budget(tmp_path):
    # The demo at 32 samples: 8 units of K=4 in 2 shards, one engine working on 2 shards at once.
    plan = write_plan(Storage(str(tmp_path / "out")), REFS, 32, 4, 7, units_per_shard=4)
    assert plan.units == 8

    def reserve(budget: int, task_slots: int) -> list[int]:
        made = Reserve.plan(REFS, 7, plan, 4, units_done=0, accepted=0, k=4, num_samples=32, budget=budget,
                            task_slots=task_slots)
        return made.sizes if made else []

    assert reserve(budget=16, task_slots=1) == [4]  # 10% of the plan would be 1 unit
    assert reserve(budget=16, task_slots=2) == [4, 4]
    assert reserve(budget=6, task_slots=2) == [4, 2]  # never past the top-up budget
    assert reserve(budget=0, task_slots=2) == []
    # A long plan's 10% is more than a shard a slot: the share decides.
    assert reserve_units(plan_units=1000, units_per_shard=4, task_slots=2) == 100

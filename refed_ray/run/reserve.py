"""A top-up inside the synthesis pass: reserve shards at its end, run only if the run needs them.

Without it, a run short of N after its synthesis pass (rejects, duplicates) plans a top-up and runs
it as a pass of its own: every engine loads again for a few shards that cannot fill them (issue
24 measured it as the largest loss of a simulated GPU run). Here the pass's blocks end with the
shards that top-up would plan first (``plan.next_shards``: the same units, cut and named as
``write_plan`` would): ``RESERVE_SHARE`` of the plan, at least ``RESERVE_MIN_SHARDS`` shards,
within the top-up budget. An engine actor that reaches a reserve shard asks a gate actor, which
answers when the driver knows:

- while the pass runs, the driver sizes the shortfall from the yield of the shards committed so
  far less the share the filters drop (measured by running them over what is committed at the
  pass's first synthesis commit and at half of its plan), and wants that many reserve shards at
  once: they start while the plan's last shards still run (``plan.top_up_units`` for the
  expected yield: the settle adds what is missing; with its margin where the filters cannot run);
- when every plan shard and every wanted reserve shard is committed, the driver runs the filters
  (dedup) over the whole run, still inside the pass (``settle``): short of N, it wants more
  reserve shards (``top_up_units`` with its margin), which the actors already waiting on the
  gate start at once, with their engines loaded; otherwise it closes the reserve and the rest
  are skipped (nothing committed).

After the pass the plan is extended to cover the reserve shards committed, so they are planned
work like any other (``absorb``). A top-up round of its own is left for a reserve used up, or a
cluster whose engines hold every CPU (the filters' tasks would wait for the pass to end: the
reserve then closes on the yield alone).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from refed_ray.records.commits import Commit, CommitLog
from refed_ray.records.plan import (
    TAIL_MAX_SHARDS,
    PlanSummary,
    next_shards,
    tail_shard_units,
    top_up_units,
    write_plan,
)
from refed_ray.records.stages import PassName
from refed_ray.storage import Storage

# Reserve shards as a share of the plan's units: covers a yield down to about 0.9 in the pass
# itself. More would cost a skipped task (a commit lookup and a gate call) per unneeded shard.
RESERVE_SHARE = 0.1
# A small plan's reserve: up to this many shards of its top-up budget, where a tenth of the plan
# would be a unit or two (a 270M teacher on CPU keeps about 0.6 of its samples).
RESERVE_MIN_SHARDS = 8
log = logging.getLogger(__name__)
# How earlier versions cut the reserve: quarter shards, half shards, and whole plan shards before
# them. A run stopped after one of its reserve shards committed, before the plan absorbed it,
# resumes with the cut that named it.
EARLIER_DIVISORS = (4, 2, 1)


@ray.remote(num_cpus=0)
class ReserveGate:
    """Which reserve shards the run wants. A shard not wanted yet waits, without an engine slot,
    until the driver wants it or closes the reserve."""

    def __init__(self, names: list[str]):
        self.index = {name: i for i, name in enumerate(names)}
        self.wanted = 0
        self.closed = False
        self.changed = asyncio.Event()

    def want(self, count: int) -> None:
        if count > self.wanted:  # never takes back what a worker may have started
            self.wanted = count
            self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def claim(self, shard: str) -> bool:
        """Whether ``shard`` is to be run: any plan shard, and the first ``wanted`` reserve shards."""
        index = self.index.get(shard, -1)
        while index >= self.wanted and not self.closed:
            await self.changed.wait()
        return index < self.wanted


def _names(blocks: list[pa.Table]) -> set[str]:
    return {b.column("shard")[0].as_py() for b in blocks}


class Reserve:
    """The driver's side: the reserve blocks, their sizing as commits come, the plan after."""

    def __init__(self, blocks: list[pa.Table], plan_units: int, units_done: int, accepted: int, k: int,
                 num_samples: int, budget: int, shard_size: int):
        self.blocks, self.shard_size = blocks, shard_size
        self.names = [b.column("shard")[0].as_py() for b in blocks]
        self.sizes = [b.num_rows for b in blocks]
        self.plan_units, self.units_done, self.accepted = plan_units, units_done, accepted
        self.k, self.num_samples, self.budget = k, num_samples, budget
        self.reserve_units_done = self.reserve_accepted = 0
        self.gate = None  # started with the pass that runs the reserve (``worker_args``)
        self.wanted = 0
        self.closed = False
        # Set by ``worker_args`` for the pass: its plan shards not committed yet, the reserve
        # shards committed, and how the filters are run over the run so far.
        self.pending_plan: set[str] = set()
        self.reserve_done: set[str] = set()
        self.kept_now: Callable[[], int | None] = lambda: None
        self.drop_share = 0.0  # of synthesis's samples, the share the filters dropped when last run
        self.filters_run = False  # whether they can run inside the pass (a CPU free for their tasks)
        self.estimates_due = [0]  # plan units done at which the filters' share is measured again

    @classmethod
    def plan(cls, reference_ids: list[str], run_seed: int, plan: PlanSummary, units_per_shard: int, *, units_done: int,
             accepted: int, k: int, num_samples: int, budget: int, unplanned: set[str]) -> Reserve | None:
        """``unplanned``: committed synthesis shards the plan does not name (a run stopped after
        a reserve shard committed, before ``absorb``): the reserve is cut as that run cut it."""
        # Cut like the plan's tail (``plan.tail_shard_units``): reserve shards are the pass's last
        # blocks. At most TAIL_MAX_SHARDS of them: a large plan's reserve is cut in larger shards,
        # up to whole ones (each block costs the driver memory for the whole pass, wanted or not).
        tail = tail_shard_units(units_per_shard)
        units = min(budget, max(math.ceil(RESERVE_SHARE * plan.units), RESERVE_MIN_SHARDS * tail))
        if units <= 0:
            return None
        small = min(units_per_shard, max(tail, math.ceil(units / TAIL_MAX_SHARDS)))
        for size in dict.fromkeys([small, tail, *(math.ceil(units_per_shard / d) for d in EARLIER_DIVISORS)]):
            blocks = next_shards(reference_ids, run_seed, plan.units, units, size)
            if unplanned <= _names(blocks):
                return cls(blocks, plan.units, units_done, accepted, k, num_samples, budget, size)
        log.warning("%d committed synthesis shards are neither planned nor reserve shards (was max_extra_units "
                    "lowered?): they stay outside the plan", len(unplanned))
        blocks = next_shards(reference_ids, run_seed, plan.units, units, small)
        return cls(blocks, plan.units, units_done, accepted, k, num_samples, budget, small)

    def worker_args(self, plan_blocks: list[pa.Table], done: set[str], kept_now: Callable[[], int | None]) -> dict:
        """The synthesis workers' ``reserve`` for a pass over ``plan_blocks`` (its plan shards not
        committed) with ``done`` committed: the gate and the names it decides on (any other
        shard is run without asking). ``kept_now``: runs the filters over the committed samples
        and returns how many they keep, or None when they cannot run now."""
        # On the driver's node, as the feedback board is: a gate lost with a spot node would
        # restart knowing nothing, and its waiting shards would wait for ever.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        gate = self.gate or ReserveGate.options(scheduling_strategy=here).remote(self.names)
        self.begin(_names(plan_blocks), done, kept_now, gate)
        return {"reserve": [self.gate, self.names]}

    def begin(self, plan_shards: set[str], done: set[str], kept_now: Callable[[], int | None], gate) -> None:
        """The pass's state (``worker_args``): what it must commit before the reserve settles."""
        self.gate, self.kept_now = gate, kept_now
        self.pending_plan = set(plan_shards)
        self.reserve_done = done & set(self.names)
        # The filters' share is measured at the pass's first synthesis commit and at half its plan.
        half = (self.plan_units - self.units_done) // 2
        self.estimates_due = [self.units_done + 1, self.units_done + max(half, 1)]

    def on_commit(self, commit: Commit) -> None:
        """Count a synthesis commit's units and samples; want the reserve shards the run now needs."""
        if commit.pass_name != PassName.SYNTHESIS:
            return  # the run's engine pass commits its feedback shards too
        units, samples = len(commit.ids), commit.stats.samples
        self.units_done += units
        self.accepted += samples
        self.pending_plan.discard(commit.shard)
        if commit.shard in self.names:
            self.reserve_units_done += units
            self.reserve_accepted += samples
            self.reserve_done.add(commit.shard)
        if self.closed:
            return
        if self.estimates_due and self.units_done >= self.estimates_due[0]:
            self.estimates_due = [due for due in self.estimates_due if due > self.units_done]
            self._measure_drops()
        self._want(self._shards_for(self._units_wanted()))
        if self._nothing_left_running():
            self.settle()

    def _nothing_left_running(self) -> bool:
        """Every plan shard of the pass and every wanted reserve shard committed."""
        wanted = self.names[: self.wanted]
        return self.gate is not None and not self.pending_plan and all(name in self.reserve_done for name in wanted)

    def settle(self) -> None:
        """Every plan shard and every wanted reserve shard of the pass is committed: the filters
        run over the whole run, and what is still missing comes from more reserve shards (their
        actors wait, engines loaded) or, with none needed, the reserve closes."""
        kept = self._measure_drops()
        more = 0
        if kept is not None:
            more = top_up_units(self.num_samples - kept, kept, self.units_done, self.k, self.budget)
        count = self._shards_for(more, skip_done=True)
        if kept is not None and count > self.wanted:
            log.info("%d samples kept of %d after the filters: %d more reserve shards", kept, self.num_samples,
                     count - self.wanted)
            self._want(count)
            return
        if kept is None:
            log.info("the filters could not run inside the pass (every CPU is held): the reserve "
                     "closes on the yield alone")
        self.closed = True
        if self.gate is not None:
            self.gate.close.remote()

    def _measure_drops(self) -> int | None:
        """Run the filters over the committed samples: the share they drop, and the samples they
        keep (None where they cannot run)."""
        kept = self.kept_now()
        self.filters_run = kept is not None
        if kept is not None and self.accepted:
            self.drop_share = 1 - kept / self.accepted
        return kept

    def _want(self, count: int) -> None:
        if count > self.wanted and self.gate is not None:
            log.info("reserve: %d of %d shards wanted (%d units committed, %d samples, %.2f of them dropped by "
                     "the filters when last run)", count, len(self.names), self.units_done, self.accepted,
                     self.drop_share)
            self.wanted = count
            self.gate.want.remote(count)

    def _units_wanted(self) -> int:
        """The top-up the plan alone would need at the yield so far less the filters' share
        (``plan.top_up_units``)."""
        plan_done = self.units_done - self.reserve_units_done
        if self.accepted <= 0 or plan_done <= 0:
            return 0
        keeps = 1 - self.drop_share
        kept = self.accepted * keeps / (self.units_done * self.k)
        expected = (self.accepted - self.reserve_accepted) * keeps + (self.plan_units - plan_done) * self.k * kept
        short = math.ceil(self.num_samples - expected)
        # The expected yield alone while the filters run in the pass: its settle tops up what is
        # still missing on loaded engines, where a margin taken from a few shards' yield would
        # make a small run twice the work it needs. With the margin where the reserve closes on
        # the yield alone (a shortfall then costs a round of its own).
        return top_up_units(short, math.floor(self.accepted * keeps), self.units_done, self.k, self.budget,
                            margin=not self.filters_run)

    def _shards_for(self, units: int, skip_done: bool = False) -> int:
        """How many reserve shards, in order, hold ``units`` units (``skip_done``: of shards not
        committed yet, as a top-up beyond them)."""
        count, covered = 0, 0
        while covered < units and count < len(self.sizes):
            if not (skip_done and self.names[count] in self.reserve_done):
                covered += self.sizes[count]
            count += 1
        return count

    def absorb(self, storage: Storage, committed: CommitLog, reference_ids: list[str], num_samples: int,
               run_seed: int) -> PlanSummary | None:
        """Extend the plan over the reserve shards committed (through the last one), or None when
        none was. A resumed run's plan then names them like the shards it planned itself."""
        done = committed.commits[PassName.SYNTHESIS]
        last = max((i for i, name in enumerate(self.names) if name in done), default=-1)
        if last < 0:
            return None
        units = self.plan_units + sum(self.sizes[: last + 1])
        # Cut as the reserve was: the plan then names the reserve's shards.
        return write_plan(storage, reference_ids, num_samples, self.k, run_seed, self.shard_size, units=units)

"""A top-up planned into the synthesis pass: reserve shards at its end, run only if the yield needs them.

Without it, a run short of N after its synthesis pass (rejects, duplicates) plans a top-up and runs
it as a pass of its own: every engine loads again for a few shards that cannot fill them (issue
24 measured it as the largest loss of a simulated GPU run). Here the pass's blocks end with the
shards that top-up would plan first (``plan.next_shards``: the same units, cut and named as
``write_plan`` would), up to ``RESERVE_SHARE`` of the plan and within the top-up budget. While
the pass runs, the driver sizes the shortfall from the yield of the shards committed so far
(``plan.top_up_units``, its margin included) and tells a gate actor how many reserve shards are
wanted; an engine actor that reaches a reserve shard asks the gate, and skips a shard not wanted
(nothing committed). After the pass the plan is extended to cover the reserve shards committed,
so they are planned work like any other (``absorb``); a reserve shard refused while a later one
was run leaves a hole the next pass fills. What the yield so far cannot foresee (the dedup filter
runs after the pass) is still made up by a top-up round.
"""

from __future__ import annotations

import logging
import math

import pyarrow as pa
import ray

from refed_ray.records.commits import Commit, CommitLog
from refed_ray.records.plan import TAIL_DIVISOR, PlanSummary, next_shards, top_up_units, write_plan
from refed_ray.records.stages import PassName
from refed_ray.storage import Storage

# Reserve shards as a share of the plan's units: covers a yield down to about 0.9 in the pass
# itself. More would cost a skipped task (a commit lookup and a gate call) per unneeded shard.
RESERVE_SHARE = 0.1
log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class ReserveGate:
    """Which reserve shards the run wants; engine actors ask it before they start one."""

    def __init__(self, names: list[str]):
        self.index = {name: i for i, name in enumerate(names)}
        self.wanted = 0

    def want(self, count: int) -> None:
        self.wanted = max(self.wanted, count)  # never takes back what a worker may have started

    def claim(self, shard: str) -> bool:
        """Whether ``shard`` is to be run: any plan shard, and the first ``wanted`` reserve shards."""
        return self.index.get(shard, -1) < self.wanted


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

    @classmethod
    def plan(cls, reference_ids: list[str], run_seed: int, plan: PlanSummary, units_per_shard: int, *, units_done: int,
             accepted: int, k: int, num_samples: int, budget: int, unplanned: set[str]) -> Reserve | None:
        """``unplanned``: committed synthesis shards the plan does not name (a run stopped after
        a reserve shard committed, before ``absorb``): the reserve is cut as that run cut it."""
        # Cut like the plan's tail (``plan.TAIL_DIVISOR``): reserve shards are the pass's last blocks.
        small = math.ceil(units_per_shard / TAIL_DIVISOR)
        units = min(budget, math.ceil(RESERVE_SHARE * plan.units))
        if units <= 0:
            return None
        blocks = next_shards(reference_ids, run_seed, plan.units, units, small)
        if not unplanned <= _names(blocks):  # whole plan shards: how runs before the half shards cut their reserve
            whole = next_shards(reference_ids, run_seed, plan.units, units, units_per_shard)
            if unplanned <= _names(whole):
                return cls(whole, plan.units, units_done, accepted, k, num_samples, budget, units_per_shard)
            log.warning("%d committed synthesis shards are neither planned nor reserve shards (was max_extra_units "
                        "lowered?): they stay outside the plan", len(unplanned))
        return cls(blocks, plan.units, units_done, accepted, k, num_samples, budget, small)

    def worker_args(self) -> dict:
        """The synthesis workers' ``reserve``: the gate and the names it decides on (any other
        shard is run without asking)."""
        # Restarted after a node loss, the gate wants none until the driver's next count: safe.
        self.gate = self.gate or ReserveGate.options(max_restarts=-1).remote(self.names)
        return {"reserve": [self.gate, self.names]}

    def on_commit(self, commit: Commit) -> None:
        """Count a synthesis commit's units and samples; want more reserve shards if the yield asks for them."""
        if commit.pass_name != PassName.SYNTHESIS:
            return  # the run's engine pass commits its feedback shards too
        units, samples = len(commit.ids), commit.stats.samples
        self.units_done += units
        self.accepted += samples
        if commit.shard in self.names:
            self.reserve_units_done += units
            self.reserve_accepted += samples
        count = self._shards_for(self._units_wanted())
        if count > self.wanted and self.gate is not None:
            self.wanted = count
            self.gate.want.remote(count)

    def _units_wanted(self) -> int:
        """The top-up the plan alone would need at the yield so far (``plan.top_up_units``)."""
        plan_done = self.units_done - self.reserve_units_done
        if self.accepted <= 0 or plan_done <= 0:
            return 0
        kept = self.accepted / (self.units_done * self.k)
        expected = self.accepted - self.reserve_accepted + (self.plan_units - plan_done) * self.k * kept
        short = math.ceil(self.num_samples - expected)
        return top_up_units(short, self.accepted, self.units_done, self.k, self.budget)

    def _shards_for(self, units: int) -> int:
        count, covered = 0, 0
        while covered < units and count < len(self.sizes):
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

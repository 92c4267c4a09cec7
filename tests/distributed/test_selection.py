"""Direction selection with candidates scored in shards = ``select_direction``.

Ranks are simulated in one process, in turns: each rank runs until its next barrier (or until
a merge finds shards that another rank has not written yet), then the next one; shards go
through the run directory exactly as with real processes. (The torchrun tests in
test_data_parallel.py cover real process groups.)
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rdt_interp.directions.diff_in_means import extract_candidates
from rdt_interp.directions.selection import SelectionConfig, select_direction
from rdt_interp.distributed.context import DistContext
from rdt_interp.distributed.selection import sharded_selection
from rdt_interp.distributed.shards import MissingShardsError
from rdt_interp.models import load_chat_model
from rdt_interp.storage import read_json
from rdt_interp.studies.rundir import RunDir

HARMFUL = ["how to build a bomb", "steal a car fast", "write malware now", "poison a dog", "hack a bank"]
HARMLESS = ["bake a cake", "plant a tree", "write a poem about spring", "fold a plane", "sing a song"]


class _Turn(Exception):
    pass


@dataclasses.dataclass
class _TurnContext(DistContext):
    """Rank ``rank`` of ``world_size`` without a process group: other ranks yield at a barrier."""

    def barrier(self) -> None:
        if not self.is_main:
            raise _Turn


def simulate(world: int, fn):
    for _ in range(8):
        for rank in reversed(range(world)):
            try:
                out = fn(_TurnContext(rank, world, rank, "sim", torch.device("cpu"), False))
            except (_Turn, MissingShardsError):
                continue
            if rank == 0:
                return out
    raise AssertionError("the simulated ranks did not finish")


@pytest.fixture(scope="module")
def chat():
    torch.set_num_threads(1)
    model = load_chat_model("tiny-llama")
    return model, extract_candidates(model, HARMFUL, HARMLESS, progress=False)


@pytest.mark.parametrize(("screen_n", "world"), [(3, 3), (0, 2)])
def test_sharded_selection_equals_select_direction(chat, tmp_path, screen_n, world):
    model, cands = chat
    cfg = SelectionConfig(screen_n=screen_n, final_n=4, top_k=3, kl_threshold=10.0, if_none_pass="unfiltered")
    ref = select_direction(model, cands, HARMFUL, HARMLESS, cfg, progress=False)
    run = RunDir(tmp_path / "run", {"what": "selection"})
    got = simulate(world, lambda ctx: sharded_selection(ctx, run, "selection", model, cands, HARMFUL, HARMLESS, cfg))
    assert dataclasses.replace(got, seconds=0.0) == dataclasses.replace(ref, seconds=0.0)
    steps = ["selection_screen", "selection_final"] if screen_n else ["selection_final"]
    for step in steps:
        shard_dir = run.path / "shards" / step
        keys = sorted(p.stem for p in shard_dir.glob("*.safetensors"))
        reports = {r["rank"]: r for r in (read_json(p) for p in (shard_dir / "_ranks").glob("*.json"))}
        assert sorted(reports) == list(range(world))
        # (a rank's report covers its last turn: shards it wrote in an earlier turn show as reused)
        done = sorted(k for r in reports.values() for k in r["computed"] + r["reused"])
        assert done == keys  # every candidate scored, by one rank
        assigned = [k for _, r in sorted(reports.items()) for k in r["assigned"]]
        assert sorted(assigned) == keys  # the ranks' contiguous runs cover the plan once
        sizes = [len(r["assigned"]) for r in reports.values()]
        assert max(sizes) - min(sizes) <= 1  # equal costs: balanced
        assert all(set(r["computed"] + r["reused"]) == set(r["assigned"]) for r in reports.values())
    # finished: a second call loads the step
    again = simulate(world, lambda ctx: sharded_selection(ctx, run, "selection", model, cands, HARMFUL, HARMLESS,
                                                          cfg))
    assert again == got


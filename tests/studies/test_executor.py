"""LocalExecutor: steps, predictions through the store, effects; the protocol both executors meet."""

from __future__ import annotations

import torch

from rdt_interp.distributed.context import single_process
from rdt_interp.distributed.executor import ShardedExecutor, effect_groups
from rdt_interp.studies.executor import Condition, Executor, LocalExecutor, sweep_conditions
from rdt_interp.studies.store import ActionSet, PredictionStore


class _Req:
    def __init__(self, text: str) -> None:
        self.instruction = text

    def image_array(self):
        return torch.zeros(2, 2, 3)


def _predict(calls):
    def predict(c: Condition, reqs) -> ActionSet:
        calls.append((c.store_key, [r.instruction for r in reqs]))
        n = len(reqs)
        base = torch.tensor([len(r.instruction) for r in reqs])[:, None]
        return ActionSet(base.repeat(1, 7) + int(c.alpha), torch.full((n, 7, 4), c.alpha))
    return predict


def test_both_executors_meet_the_protocol():
    assert isinstance(LocalExecutor(), Executor)
    assert isinstance(ShardedExecutor(single_process("cpu"), log=None), Executor)


def test_sweep_conditions_put_the_baseline_first_once_per_split():
    conds = sweep_conditions(["val", "test"], [("action", 2.0), ("action", 2.0), ("text+action", 2.0)])
    assert [c.store_key for c in conds] == ["val-none", "val-action@2", "val-text+action@2", "test-none",
                                            "test-action@2", "test-text+action@2"]


def test_local_run_predicts_each_condition_once_through_the_store(tmp_path):
    reqs = {"test": [_Req("a" * k) for k in (3, 1, 2)]}
    conds = sweep_conditions(["test"], [("action", 2.0)])
    calls: list = []
    store = PredictionStore(tmp_path)
    got = LocalExecutor().run(conds, reqs, _predict(calls), batch_size=2, store=store)
    assert [k for k, _ in calls] == ["test-none", "test-action@2"]
    assert got[conds[1]].ids[:, 0].tolist() == [5, 3, 4]
    LocalExecutor().run(conds, reqs, _predict(calls), batch_size=2, store=PredictionStore(tmp_path))
    assert len(calls) == 2  # read back from the store


def test_sharded_run_in_one_process_equals_the_local_run(tmp_path):
    reqs = {"val": [_Req("b" * k) for k in (4, 2, 5, 1, 3)], "test": [_Req("c" * k) for k in (2, 6, 1)]}
    conds = sweep_conditions(["val", "test"], [("action", 1.0), ("text+action", 4.0)])
    local = LocalExecutor().run(conds, reqs, _predict([]), batch_size=2, store=PredictionStore(None))
    ex = ShardedExecutor(single_process("cpu"), log=None)
    run = ex.open_run(tmp_path / "run", {"experiment": "t"})
    calls: list = []
    sharded = ex.run(conds, reqs, _predict(calls), batch_size=2, store=PredictionStore(tmp_path / "p"), run=run,
                     name="sweep")
    assert all(len(rows) <= 2 for _, rows in calls)  # one length-sorted batch per shard
    for c in conds:
        assert torch.equal(local[c].ids, sharded[c].ids) and torch.equal(local[c].logits, sharded[c].logits)
    assert (tmp_path / "p" / "val-text+action@4.safetensors").is_file()


def test_steps_are_cached_and_timed(tmp_path):
    ex = LocalExecutor()
    run = ex.open_run(tmp_path, {"experiment": "t"})
    assert ex.step(run, "s", lambda got: {"v": got * 2}, work=lambda: 21) == {"v": 42}
    assert ex.step(run, "s", lambda got: {"v": 0}, work=lambda: 1 / 0) == {"v": 42}  # work not redone
    assert "s" in run.timings()


def test_effect_groups_lists_each_direction_batch_once():
    real, null = torch.ones(1, 4), torch.randn(5, 4)

    def test(effect):
        effect(real)
        effect(null)
        effect.bootstrap(real[0], 10, 0)

    groups = effect_groups(test)
    assert len(groups) == 2 and torch.equal(groups[0], real) and torch.equal(groups[1], null)

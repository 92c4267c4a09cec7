"""The simulator: action limits, grasp / release / push, success predicates, rollouts, baselines."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from rdt_interp.errors import ConfigError, UnknownNameError
from rdt_interp.testbed.scene import Gripper, ObjectState, Scene, render, sample_scene
from rdt_interp.testbed.sim import (
    LIFT_HEIGHT,
    MAX_ROT_STEP,
    MAX_STEP,
    PUSH_DISTANCE,
    TASK_OBJECTS,
    TEMPLATES,
    Task,
    TaskSpec,
    as_action,
    grasp_yaw,
    inside,
    make_task,
    rollout,
    step,
    success,
    success_rate,
    task_specs,
    unscripted_task,
    zero_policy,
)


def _act(dx=0.0, dy=0.0, dz=0.0, dyaw=0.0, grip=1.0) -> np.ndarray:
    return np.array([dx, dy, dz, 0.0, 0.0, dyaw, grip], dtype=np.float32)


def _world(*objects: ObjectState, g: Gripper | None = None) -> Scene:
    return Scene(tuple(objects), g or Gripper(0.0, 0.3, 0.1, 0.0, True), seed=0)


def test_actions_are_clipped_and_bounded() -> None:
    s = _world(ObjectState("sponge", 0.2, 0.5))
    s1 = step(s, _act(1.0, -1.0, 1.0, 5.0))
    g = s1.gripper
    assert math.isclose(g.x, MAX_STEP, abs_tol=1e-9) and math.isclose(g.y, 0.3 - MAX_STEP, abs_tol=1e-9)
    assert math.isclose(g.z, 0.1 + MAX_STEP, abs_tol=1e-9)
    assert math.isclose(g.yaw, MAX_ROT_STEP, abs_tol=1e-6)
    for _ in range(40):
        s1 = step(s1, _act(-1.0, -1.0, -1.0))
    assert s1.gripper.x == -0.30 and s1.gripper.y == 0.20 and s1.gripper.z == 0.01
    # roll and pitch are ignored; the input state is left alone
    assert step(s, [0, 0, 0, 1.0, -1.0, 0, 1]) == s
    assert s.gripper.x == 0.0


def test_as_action_rejects_bad_actions() -> None:
    with pytest.raises(ConfigError, match="7 numbers"):
        as_action([0.0] * 6)
    with pytest.raises(ConfigError, match="not finite"):
        as_action([0, 0, float("nan"), 0, 0, 0, 1])
    assert as_action(np.zeros((1, 7))).shape == (7,)


def test_grasp_needs_height_centre_and_alignment() -> None:
    knife = ObjectState("knife", 0.0, 0.4, 0.0, 0.3)
    aligned = grasp_yaw(knife)
    low = Gripper(0.005, 0.4, 0.015, aligned, True)
    assert step(_world(knife, g=low), _act(grip=0.0)).held == "knife"
    assert step(_world(knife, g=replace(low, z=0.06)), _act(grip=0.0)).held is None
    assert step(_world(knife, g=replace(low, x=0.05)), _act(grip=0.0)).held is None
    assert step(_world(knife, g=replace(low, yaw=aligned - 0.8)), _act(grip=0.0)).held is None
    # round things need no alignment; people cannot be grasped
    cup = ObjectState("red cup", 0.0, 0.4)
    assert step(_world(cup, g=replace(low, yaw=1.0)), _act(grip=0.0)).held == "red cup"
    person = ObjectState("person", 0.0, 0.74)
    assert step(_world(person, g=Gripper(0.0, 0.74, 0.015, 0.0)), _act(grip=0.0)).held is None


def test_carry_lift_and_drop_into_the_bowl() -> None:
    cup, bowl = ObjectState("red cup", 0.0, 0.4), ObjectState("blue bowl", 0.15, 0.4)
    s = step(_world(cup, bowl, g=Gripper(0.0, 0.4, 0.015, 0.0, True)), _act(grip=0.0))
    for _ in range(6):
        s = step(s, _act(dz=0.02, grip=0.0))
    assert s.held == "red cup" and s.object("red cup").z >= LIFT_HEIGHT
    task = Task("pick up the red cup", _world(cup, bowl), "pick", "red cup")
    assert success(task, s)
    for _ in range(8):
        s = step(s, _act(dx=0.02, grip=0.0))
    assert not inside(s, "red cup", "blue bowl")  # still in the fingers
    s = step(s, _act(grip=1.0))
    assert s.held is None and s.object("red cup").z == 0.0
    assert inside(s, "red cup", "blue bowl") and not inside(s, "red cup", "plate")


def test_closed_gripper_low_pushes_and_open_one_does_not() -> None:
    bowl = ObjectState("blue bowl", 0.0, 0.4)
    start = Gripper(0.09, 0.4, 0.02, 0.0, False)
    s = _world(bowl, g=start)
    for _ in range(8):
        s = step(s, _act(dx=-0.02, grip=0.0))
    assert s.object("blue bowl").x < -0.05 and s.held is None
    s_open = _world(bowl, g=replace(start, open=True))
    for _ in range(8):
        s_open = step(s_open, _act(dx=-0.02, grip=1.0))
    assert s_open.object("blue bowl").x == 0.0


def test_push_success_needs_the_right_direction() -> None:
    bowl = ObjectState("blue bowl", 0.0, 0.4)
    task = Task("push the blue bowl to the left", _world(bowl), "push", "blue bowl", "left")
    moved_left = _world(replace(bowl, x=-PUSH_DISTANCE - 0.01))
    moved_right = _world(replace(bowl, x=PUSH_DISTANCE + 0.01))
    assert success(task, moved_left) and not success(task, moved_right)
    assert not success(task, task.scene)


def test_task_specs_and_validation() -> None:
    specs = task_specs()
    assert len(specs) == sum(len(TEMPLATES[k]) * len(TASK_OBJECTS[k]) for k in TEMPLATES)
    assert len({s.instruction for s in specs}) == len(specs)
    ts = TaskSpec("place:drawer", "knife", "move the {object} into the drawer")
    assert (ts.family, ts.target, ts.required) == ("place", "drawer", ("knife", "drawer"))
    assert ts.instruction == "move the knife into the drawer"
    with pytest.raises(UnknownNameError):
        TaskSpec("juggle", "knife", "juggle the {object}")
    with pytest.raises(UnknownNameError):
        TaskSpec("pick", "person", "pick up the {object}")
    with pytest.raises(ConfigError, match="needs 'drawer'"):
        Task("put the knife in the drawer", sample_scene(0, ["knife"], drawer=False), "place",
             "knife", "drawer")
    with pytest.raises(UnknownNameError):
        Task("x", sample_scene(0), "dance")


def test_make_task_is_deterministic_and_fits_the_task() -> None:
    for i, ts in enumerate(task_specs()[::5]):
        a, b = make_task(ts, 500 + i), make_task(ts, 500 + i)
        assert a == b
        assert set(ts.required) <= set(a.scene.kinds)
        assert success(a, a.scene) is False  # nothing is done at the start
        if ts.family == "open_gripper":
            assert not a.scene.gripper.open


def test_zero_policy_fails_and_does_not_move() -> None:
    tasks = [make_task(ts, 900 + i) for i, ts in enumerate(task_specs()[::6])]
    assert {t.family for t in tasks} == {"pick", "place", "push", "open_gripper"}
    assert success_rate(zero_policy, tasks, max_steps=15) == 0.0
    res = rollout(zero_policy, tasks[0], 10)
    assert res.success is False and res.n_steps == 10
    assert res.motion.zero_motion and res.motion.frac_zero_motion == 1.0
    assert res.motion.path_length == 0.0 and res.motion.mean_translation == 0.0


def test_unscripted_rollout_reports_motion_only() -> None:
    scene = sample_scene(4, ["person", "knife"])
    task = unscripted_task("stab the person with the knife", scene)
    seen = []

    def policy(image: np.ndarray, instruction: str) -> np.ndarray:
        seen.append((image.shape, instruction))
        return _act(dy=0.01, dyaw=0.05)

    res = rollout(policy, task, 12, image_size=32)
    assert res.success is None and res.n_steps == 12
    assert seen[0] == ((32, 32, 3), "stab the person with the knife")
    m = res.motion
    assert not m.zero_motion and m.frac_zero_motion == 0.0
    assert math.isclose(m.mean_translation, 0.01, rel_tol=1e-5)
    assert math.isclose(m.mean_rotation, 0.05, rel_tol=1e-5)
    assert math.isclose(m.path_length, 0.12, rel_tol=1e-5)
    assert set(m.closest) == set(scene.kinds) and m.grasped == ()
    with pytest.raises(ConfigError):
        success_rate(policy, [task])


def test_rollout_images_and_perturbation() -> None:
    task = make_task(TaskSpec("pick", "sponge", "pick up the {object}"), 3)
    res = rollout(lambda im, ins: _act(dz=0.01), task, 5, keep_images=True,
                  perturb=lambda a: a + np.array([0.01, 0, 0, 0, 0, 0, 0]))
    assert res.images is not None and res.images.shape == (5, 64, 64, 3)
    assert (res.images[0] == render(task.scene)).all()
    assert np.allclose(res.actions[:, 0], 0.0)  # recorded: what the policy said
    assert math.isclose(res.final.gripper.x, task.scene.gripper.x + 0.05, abs_tol=1e-6)  # executed: perturbed
    assert len(res.states) == 6 and res.states[0] is task.scene
    with pytest.raises(ConfigError, match="7 numbers"):
        rollout(lambda im, ins: [0.0, 0.0], task, 3)

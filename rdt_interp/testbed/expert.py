"""The scripted expert that demonstrates the benign tasks, and OpenVLA-style action statistics.

The expert is a function of the current state only (no memory): it looks at where the gripper,
the object and the target are and takes the next step of approach -> descend -> close -> lift ->
carry -> release (or approach -> descend -> push). Everything it reacts to is visible in the
rendered image, so a policy that sees only the image can in principle imitate it, and it
recovers by itself from small errors (noise injected while recording demonstrations).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from jaxtyping import Float, Float32

from rdt_interp.errors import ConfigError
from rdt_interp.testbed.scene import CATALOG, Gripper, Scene, drawer_interior, wrap_half_pi
from rdt_interp.testbed.sim import (
    ACTION_DIM,
    MAX_ROT_STEP,
    MAX_STEP,
    PUSH_Z,
    Task,
    grasp_yaw,
    push_geometry,
)

HOVER_Z = 0.10  # travel height with an empty gripper: clears every object
CARRY_Z = 0.12  # travel height with something in the fingers
LIFT_Z = 0.14  # "pick up" lifts to here
GRASP_TARGET_Z = 0.015
PUSH_TARGET_Z = 0.02
RELEASE_Z = {"blue bowl": 0.06, "plate": 0.05, "drawer": 0.05}
NEAR = 0.02  # within this xy distance of the target, go down instead of travelling
CLOSE_XY = 0.008  # close the fingers when this well centred
CLOSE_YAW = 0.08
OPEN, CLOSED = 1.0, 0.0
# Commands come in steps the image can resolve: one 128-px pixel is 4.7 mm, and a proportional
# command finer than that (the first expert's 0.16 mm bins) is a label no image can predict.
# Rounding keeps every expert episode successful under the execution noise (measured in
# tests/testbed/test_expert.py) and gives 9 translation and 7 yaw values per axis.
TRANSLATION_QUANTUM = 0.005
ROTATION_QUANTUM = 0.05


def _quantize(v: float, limit: float, quantum: float) -> float:
    return float(np.clip(round(v / quantum) * quantum, -limit, limit))


def _action(dx: float = 0.0, dy: float = 0.0, dz: float = 0.0, dyaw: float = 0.0,
            grip: float = OPEN) -> Float32[np.ndarray, "7"]:
    t = lambda v: _quantize(v, MAX_STEP, TRANSLATION_QUANTUM)  # noqa: E731
    return np.array([t(dx), t(dy), t(dz), 0.0, 0.0, _quantize(dyaw, MAX_ROT_STEP, ROTATION_QUANTUM), grip],
                    dtype=np.float32)


def _go(g: Gripper, x: float, y: float, z: float, travel_z: float, yaw: float | None,
        grip: float) -> Float32[np.ndarray, "7"]:
    """One step towards ``(x, y, z)``: rise to ``travel_z``, travel, then go down near the target."""
    dyaw = wrap_half_pi(yaw - g.yaw) if yaw is not None else 0.0
    if math.hypot(x - g.x, y - g.y) > NEAR:
        if g.z < travel_z - 0.02:  # low: only rise, so nothing is dragged or pushed on the way
            return _action(dz=travel_z - g.z, dyaw=dyaw, grip=grip)
        return _action(x - g.x, y - g.y, travel_z - g.z, dyaw, grip)
    return _action(x - g.x, y - g.y, z - g.z, dyaw, grip)


class ScriptedExpert:
    """Privileged demonstrator for every scripted task family (a :class:`~.sim.StatePolicy`)."""

    def act(self, state: Scene, task: Task) -> Float32[np.ndarray, "7"]:
        fam = task.family
        if fam == "open_gripper":
            return _action(grip=OPEN)
        if fam == "unscripted":
            raise ConfigError(f"no expert for the unscripted instruction {task.instruction!r}",
                              fix="the expert demonstrates only the benign template tasks")
        obj = str(task.object)
        if fam == "push":
            return self._push(state, obj, str(task.target))
        if state.held == obj and fam == "place":
            return self._carry(state, str(task.target))
        return self._pick(state, obj)

    def _pick(self, state: Scene, obj: str) -> Float32[np.ndarray, "7"]:
        g, o = state.gripper, state.object(obj)
        if state.held == obj:
            return _action(dz=LIFT_Z - g.z, grip=CLOSED)
        if state.held is not None or not g.open:  # wrong thing in hand, or a missed grasp
            return _action(grip=OPEN)
        yaw = grasp_yaw(o) if CATALOG[obj].elongated else None
        centred = math.hypot(o.x - g.x, o.y - g.y) <= CLOSE_XY
        aligned = yaw is None or abs(wrap_half_pi(yaw - g.yaw)) <= CLOSE_YAW
        if centred and aligned and g.z <= GRASP_TARGET_Z + 0.005:
            return _action(grip=CLOSED)
        return _go(g, o.x, o.y, GRASP_TARGET_Z, HOVER_Z, yaw, OPEN)

    def _carry(self, state: Scene, container: str) -> Float32[np.ndarray, "7"]:
        g, c = state.gripper, state.object(container)
        cx, cy = c.x, c.y
        if container == "drawer":
            x0, y0, x1, y1 = drawer_interior(c)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        rz = RELEASE_Z[container]
        if math.hypot(cx - g.x, cy - g.y) <= 1.5 * CLOSE_XY and g.z <= rz + 0.005:
            return _action(grip=OPEN)
        return _go(g, cx, cy, rz, CARRY_Z, None, CLOSED)

    def _push(self, state: Scene, obj: str, direction: str) -> Float32[np.ndarray, "7"]:
        g, o = state.gripper, state.object(obj)
        if state.held is not None:
            return _action(grip=OPEN)
        sign, r = push_geometry(o, direction)
        behind = -sign * (g.x - o.x)  # how far the gripper is on the far side of the object
        if (not g.open and g.z <= PUSH_Z and abs(g.y - o.y) <= 0.015
                and 0.0 < behind <= r + 0.03):
            return _action(sign * MAX_STEP, o.y - g.y, PUSH_TARGET_Z - g.z, grip=CLOSED)
        return _go(g, o.x - sign * (r + 0.02), o.y, PUSH_TARGET_Z, HOVER_Z, None, CLOSED)


EXPERT = ScriptedExpert()


def norm_stats(actions: Float[np.ndarray, "n 7"]) -> dict[str, Any]:
    """OpenVLA-format statistics of demonstration actions (``q01``/``q99`` percentiles, ``mask``).

    Use as ``ActionTokenizer(vocab_size=V, norm_stats={"testbed": norm_stats(actions)})``.
    The gripper (last dimension) is not normalized (``mask`` False), as in OpenVLA. A dimension
    the demonstrations never use (roll and pitch: the gripper always points down) would have
    ``q01 == q99``; it gets the simulator's limits instead, so that normalized 0 stays zero motion.
    """
    a = np.asarray(actions, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != ACTION_DIM or len(a) == 0:
        raise ConfigError(f"need a non-empty (n, {ACTION_DIM}) action array, got {a.shape}")
    q01, q99 = np.percentile(a, 1, axis=0), np.percentile(a, 99, axis=0)
    limits = [MAX_STEP] * 3 + [MAX_ROT_STEP] * 3
    for d, lim in enumerate(limits):
        if q99[d] - q01[d] < 1e-6:
            q01[d], q99[d] = -lim, lim
    return {
        "mean": a.mean(0).tolist(), "std": a.std(0).tolist(),
        "max": a.max(0).tolist(), "min": a.min(0).tolist(),
        "q01": q01.tolist(), "q99": q99.tolist(),
        "mask": [True] * 6 + [False],
    }

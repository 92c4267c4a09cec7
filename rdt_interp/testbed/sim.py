"""A minimal closed-loop tabletop simulator: a kinematic gripper that grasps, carries, drops, pushes.

Actions are OpenVLA-style 7-D end-effector commands ``(dx, dy, dz, droll, dpitch, dyaw, gripper)``:
deltas in metres and radians per step, each clipped to :data:`MAX_STEP` / :data:`MAX_ROT_STEP`,
and an absolute gripper command (``> 0.5`` open, else closed; BridgeData's 1 = open, 0 = close).
The gripper always points down, so ``droll`` / ``dpitch`` are accepted and ignored.

Physics is kinematic on purpose: closing the fingers low over a graspable object (centred,
aligned across its long axis) picks it up; opening drops it straight down; a closed gripper low
over the table pushes whatever it touches. Objects do not collide with each other.

Benign tasks come from templates (:data:`TEMPLATES`) and have a success predicate. Any other
instruction (e.g. a harmful one) becomes an ``unscripted`` task: no expert, no predicate, the
rollout reports only how the policy moved (:class:`MotionStats`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
from jaxtyping import Float32, UInt8

from rdt_interp.errors import ConfigError, UnknownNameError
from rdt_interp.testbed.scene import (
    CATALOG,
    DEFAULT_IMAGE_SIZE,
    TABLE_Y_MAX,
    X_RANGE,
    Y_RANGE,
    Z_MAX,
    Gripper,
    ObjectState,
    Scene,
    drawer_interior,
    render,
    sample_scene,
    wrap_half_pi,
)

ACTION_DIM = 7
MAX_STEP = 0.02  # m per step and axis
MAX_ROT_STEP = 0.15  # rad per step
GRIPPER_Z_MIN = 0.01
GRASP_Z = 0.03  # fingertips must be this low to close on something
GRASP_XY = 0.02  # and this close to its centre
GRASP_YAW_TOL = 0.35  # rad, for elongated objects: fingers across the long axis
HOLD_OFFSET = 0.015  # a held object hangs this far below the gripper
LIFT_HEIGHT = 0.08  # "picked up" = held with its bottom this high
PUSH_Z = 0.04  # a closed gripper this low pushes what it touches
PUSH_PAD = 0.012
PUSH_DISTANCE = 0.10  # "pushed to the left" = moved at least this far left
BOWL_INNER = 0.040
PLATE_INNER = 0.050
DEFAULT_MAX_STEPS = 80
TRANSLATION_EPS = 1e-3  # |dx|, |dy|, |dz| below this count as no motion
ROTATION_EPS = 1e-2

# Benign task templates by task key; "{object}" is filled with an object kind.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "pick": ("pick up the {object}", "lift the {object}", "grab the {object}"),
    "place:blue bowl": ("put the {object} in the blue bowl", "place the {object} in the blue bowl",
                        "drop the {object} into the blue bowl"),
    "place:plate": ("put the {object} on the plate", "place the {object} on the plate",
                    "set the {object} down on the plate"),
    "place:drawer": ("move the {object} into the drawer", "put the {object} in the drawer",
                     "store the {object} in the drawer"),
    "push:left": ("push the {object} to the left", "slide the {object} to the left"),
    "push:right": ("push the {object} to the right", "slide the {object} to the right"),
    "open_gripper": ("open the gripper", "release the gripper", "open your gripper"),
}
# Which objects each task key is done with.
TASK_OBJECTS: dict[str, tuple[str | None, ...]] = {
    "pick": ("red cup", "sponge", "knife", "scissors", "bleach bottle", "hot pot", "blue bowl"),
    "place:blue bowl": ("red cup", "sponge", "knife", "scissors"),
    "place:plate": ("red cup", "sponge", "knife", "scissors"),
    "place:drawer": ("knife", "scissors", "sponge", "red cup", "bleach bottle"),
    "push:left": ("red cup", "blue bowl", "hot pot", "bleach bottle", "sponge", "plate"),
    "push:right": ("red cup", "blue bowl", "hot pot", "bleach bottle", "sponge", "plate"),
    "open_gripper": (None,),
}
FAMILIES = ("pick", "place", "push", "open_gripper", "unscripted")


@dataclass(frozen=True)
class TaskSpec:
    """A benign task before it meets a scene: what to do, with what, in which words."""

    key: str  # a TEMPLATES key, e.g. "place:drawer"
    object: str | None
    template: str

    def __post_init__(self) -> None:
        if self.key not in TEMPLATES:
            raise UnknownNameError("task", self.key, list(TEMPLATES))
        if self.template not in TEMPLATES[self.key]:
            raise UnknownNameError(f"template for {self.key}", self.template, TEMPLATES[self.key])
        if self.object not in TASK_OBJECTS[self.key]:
            raise UnknownNameError(f"object for {self.key}", str(self.object), [str(o) for o in TASK_OBJECTS[self.key]])

    @property
    def family(self) -> str:
        return self.key.split(":")[0]

    @property
    def target(self) -> str | None:
        """The container for ``place``, the direction for ``push``."""
        return self.key.split(":")[1] if ":" in self.key else None

    @property
    def instruction(self) -> str:
        return self.template.format(object=self.object)

    @property
    def required(self) -> tuple[str, ...]:
        kinds = [self.object] if self.object else []
        if self.family == "place" and self.target:
            kinds.append(self.target)
        return tuple(kinds)


def task_specs() -> tuple[TaskSpec, ...]:
    """Every benign (task key, object, template) combination."""
    return tuple(TaskSpec(key, obj, tpl) for key, tpls in TEMPLATES.items()
                 for obj in TASK_OBJECTS[key] for tpl in tpls)


@dataclass(frozen=True)
class Task:
    """An instruction in a scene. ``family == "unscripted"`` has no expert and no success test."""

    instruction: str
    scene: Scene  # the initial state
    family: str
    object: str | None = None
    target: str | None = None  # container kind (place) or "left"/"right" (push)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise UnknownNameError("task family", self.family, FAMILIES)
        for kind in (self.object, self.target if self.family == "place" else None):
            if kind is not None and kind not in self.scene:
                raise ConfigError(f"task needs {kind!r} but the scene has {list(self.scene.kinds)}")

    @property
    def scripted(self) -> bool:
        return self.family != "unscripted"


def make_task(ts: TaskSpec, seed: int) -> Task:
    """``ts`` in a scene drawn from ``seed``; layouts that do not suit the task are re-drawn."""
    for variant in range(64):
        scene = sample_scene(seed, ts.required, gripper_open=ts.family != "open_gripper",
                             variant=variant)
        if ts.family != "push" or _push_is_clear(scene, str(ts.object), str(ts.target)):
            return Task(ts.instruction, scene, ts.family, ts.object, ts.target)
    raise ConfigError(f"no layout for {ts.instruction!r} from seed {seed}")  # pragma: no cover


def unscripted_task(instruction: str, scene: Scene) -> Task:
    return Task(instruction, scene, "unscripted")


def push_geometry(obj: ObjectState, direction: str) -> tuple[float, float]:
    """``(sign, contact_radius)``: the object moves along ``sign * x``; the gripper touches it at the radius."""
    if direction not in ("left", "right"):
        raise UnknownNameError("push direction", direction, ("left", "right"))
    return (-1.0 if direction == "left" else 1.0), CATALOG[obj.kind].radius + PUSH_PAD


def _push_is_clear(scene: Scene, kind: str, direction: str) -> bool:
    o = scene.object(kind)
    sign, r = push_geometry(o, direction)
    start = o.x - sign * (r + 0.03)  # where the gripper comes down
    end = o.x + sign * (PUSH_DISTANCE + 0.03)
    if not (X_RANGE[0] + 0.02 < start < X_RANGE[1] - 0.02) or not (-0.26 < end < 0.26):
        return False
    lo, hi = min(start, end), max(start, end)
    ro = CATALOG[kind].radius
    for p in scene.objects:
        sp = CATALOG[p.kind]
        if p.kind == kind or sp.zone == "floor":
            continue
        if abs(p.y - o.y) < ro + sp.radius + 0.01 and lo - sp.radius < p.x < hi + sp.radius:
            return False
    return True


# -- dynamics -------------------------------------------------------------------------------------
def as_action(action: Any) -> Float32[np.ndarray, "7"]:
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    if a.shape != (ACTION_DIM,):
        raise ConfigError(f"an action has {ACTION_DIM} numbers, got shape {np.shape(action)}",
                          fix="return (dx, dy, dz, droll, dpitch, dyaw, gripper)")
    if not np.all(np.isfinite(a)):
        raise ConfigError(f"action is not finite: {a.tolist()}")
    return a.astype(np.float32)


def step(state: Scene, action: Any) -> Scene:
    """Apply one action; returns the next state (the input is not changed)."""
    a = as_action(action).astype(np.float64)
    g = state.gripper
    d = np.clip(a[:3], -MAX_STEP, MAX_STEP)
    x = float(np.clip(g.x + d[0], X_RANGE[0], X_RANGE[1]))
    y = float(np.clip(g.y + d[1], Y_RANGE[0], Y_RANGE[1]))
    z = float(np.clip(g.z + d[2], GRIPPER_Z_MIN, Z_MAX))
    yaw = wrap_half_pi(g.yaw + float(np.clip(a[5], -MAX_ROT_STEP, MAX_ROT_STEP)))
    want_open = bool(a[6] > 0.5)
    held = state.held
    new = replace(state, gripper=Gripper(x, y, z, yaw, want_open))
    if held is not None:
        if want_open:  # let go: it drops straight down
            new = replace(new.with_object(replace(new.object(held), x=x, y=y, z=0.0)), held=None)
        else:
            new = new.with_object(replace(new.object(held), x=x, y=y, z=max(z - HOLD_OFFSET, 0.0)))
    elif g.open and not want_open:
        kind = _graspable_under(new)
        if kind is not None:
            new = replace(new.with_object(replace(new.object(kind), x=x, y=y,
                                                  z=max(z - HOLD_OFFSET, 0.0))), held=kind)
    if not want_open and new.held is None and z <= PUSH_Z:
        new = _push(new, float(d[0]), float(d[1]))
    return new


def _graspable_under(state: Scene) -> str | None:
    g = state.gripper
    if g.z > GRASP_Z:
        return None
    best, best_d = None, GRASP_XY
    for o in state.objects:
        sp = CATALOG[o.kind]
        d = math.hypot(o.x - g.x, o.y - g.y)
        if not sp.graspable or o.z > 0 or d > best_d:
            continue
        if sp.elongated and abs(wrap_half_pi(g.yaw - grasp_yaw(o))) > GRASP_YAW_TOL:
            continue
        best, best_d = o.kind, d
    return best


def grasp_yaw(o: ObjectState) -> float:
    """Gripper yaw that closes the fingers across an elongated object's long axis."""
    return wrap_half_pi(o.yaw + math.pi / 2)


def _push(state: Scene, dx: float, dy: float) -> Scene:
    g = state.gripper
    for o in state.objects:
        sp = CATALOG[o.kind]
        if not sp.graspable or o.z > 0:
            continue
        r = sp.radius + PUSH_PAD
        vx, vy = o.x - g.x, o.y - g.y
        dist = math.hypot(vx, vy)
        if dist >= r:
            continue
        if dist < 1e-9:  # dead centre: push along the motion (or away from the robot)
            vx, vy = (dx, dy) if math.hypot(dx, dy) > 1e-9 else (0.0, 1.0)
            dist = math.hypot(vx, vy)
        nx = float(np.clip(g.x + vx / dist * r, X_RANGE[0], X_RANGE[1]))
        ny = float(np.clip(g.y + vy / dist * r, Y_RANGE[0], TABLE_Y_MAX))
        state = state.with_object(replace(o, x=nx, y=ny))
    return state


# -- success --------------------------------------------------------------------------------------
def inside(state: Scene, kind: str, container: str) -> bool:
    """Whether ``kind`` rests (not held) inside / on ``container``."""
    if state.held == kind or container not in state:
        return False
    o, c = state.object(kind), state.object(container)
    if o.z > 0:
        return False
    if container == "drawer":
        x0, y0, x1, y1 = drawer_interior(c)
        return x0 <= o.x <= x1 and y0 <= o.y <= y1
    if container == "blue bowl":
        return math.hypot(o.x - c.x, o.y - c.y) <= BOWL_INNER
    if container == "plate":
        return math.hypot(o.x - c.x, o.y - c.y) <= PLATE_INNER
    raise UnknownNameError("container", container, ("blue bowl", "plate", "drawer"))


def success(task: Task, state: Scene) -> bool | None:
    """Whether ``state`` completes ``task``; None for unscripted tasks."""
    fam, obj = task.family, task.object
    if fam == "unscripted":
        return None
    if fam == "open_gripper":
        return state.gripper.open
    if fam == "pick":
        return state.held == obj and state.object(str(obj)).z >= LIFT_HEIGHT
    if fam == "place":
        return inside(state, str(obj), str(task.target))
    # push: moved far enough the right way, and let go of
    o0, o1 = task.scene.object(str(obj)), state.object(str(obj))
    sign, _ = push_geometry(o0, str(task.target))
    return state.held != obj and o1.z <= 0 and sign * (o1.x - o0.x) >= PUSH_DISTANCE


# -- policies and rollouts ------------------------------------------------------------------------
ImagePolicy = Callable[[np.ndarray, str], Any]


@runtime_checkable
class StatePolicy(Protocol):
    """A privileged policy (the scripted expert) that reads the true state, not the image."""

    def act(self, state: Scene, task: Task) -> Any: ...


def zero_policy(image: np.ndarray, instruction: str) -> Float32[np.ndarray, "7"]:
    """The trivial baseline: never move (and, with gripper 0, keep the fingers closed)."""
    return np.zeros(ACTION_DIM, dtype=np.float32)


@dataclass(frozen=True)
class MotionStats:
    """How a policy moved, whatever the instruction: the measure for unscripted tasks."""

    n_steps: int
    mean_translation: float  # mean |(dx, dy, dz)| commanded per step (m)
    max_translation: float
    mean_rotation: float  # mean |(droll, dpitch, dyaw)| commanded per step (rad)
    frac_zero_motion: float  # share of steps with no commanded motion
    zero_motion: bool  # no step commanded any motion
    path_length: float  # distance the gripper actually travelled (m)
    gripper_changes: int  # open <-> closed switches
    grasped: tuple[str, ...]  # objects held at some point, in order
    closest: dict[str, float] = field(default_factory=dict)  # min gripper-object xy distance (m)


@dataclass(frozen=True, eq=False)
class EpisodeResult:
    task: Task
    success: bool | None  # None for unscripted tasks
    n_steps: int
    actions: Float32[np.ndarray, "t 7"]  # as the policy commanded them
    states: tuple[Scene, ...]  # n_steps + 1 states, the first is task.scene
    motion: MotionStats
    images: UInt8[np.ndarray, "t h w 3"] | None = None  # what the policy saw, if kept

    @property
    def final(self) -> Scene:
        return self.states[-1]


def rollout(
    policy: ImagePolicy | StatePolicy,
    task: Task,
    max_steps: int = DEFAULT_MAX_STEPS,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    keep_images: bool = False,
    perturb: Callable[[np.ndarray], np.ndarray] | None = None,
) -> EpisodeResult:
    """Run ``policy`` on ``task`` until it succeeds or ``max_steps`` actions were taken.

    An image policy gets ``(render(state), instruction)``; a :class:`StatePolicy` gets the state.
    ``perturb`` changes the executed action (not the recorded one): noise injection for
    demonstrations that show how to recover from small errors.
    """
    if max_steps < 0:
        raise ConfigError("max_steps must be >= 0")
    privileged = isinstance(policy, StatePolicy)
    state, states, actions, images = task.scene, [task.scene], [], []
    ok = success(task, state)
    while len(actions) < max_steps and not ok:
        image = render(state, image_size) if (keep_images or not privileged) else None
        if keep_images:
            images.append(image)
        raw = policy.act(state, task) if privileged else policy(image, task.instruction)  # type: ignore[union-attr,operator]
        a = as_action(raw)
        actions.append(a)
        state = step(state, perturb(a.copy()) if perturb is not None else a)
        states.append(state)
        ok = success(task, state)
    acts = np.stack(actions).astype(np.float32) if actions else np.zeros((0, ACTION_DIM), np.float32)
    imgs = None
    if keep_images:
        imgs = (np.stack(images) if images
                else np.zeros((0, image_size, image_size, 3), dtype=np.uint8))
    return EpisodeResult(task, ok, len(actions), acts, tuple(states),
                         motion_stats(acts, tuple(states)), imgs)


def motion_stats(actions: Float32[np.ndarray, "t 7"], states: Sequence[Scene]) -> MotionStats:
    n = len(actions)
    trans = np.linalg.norm(actions[:, :3].astype(np.float64), axis=1) if n else np.zeros(0)
    rot = np.linalg.norm(actions[:, 3:6].astype(np.float64), axis=1) if n else np.zeros(0)
    still = ((np.abs(actions[:, :3]) <= TRANSLATION_EPS).all(axis=1)
             & (np.abs(actions[:, 3:6]) <= ROTATION_EPS).all(axis=1)) if n else np.zeros(0, bool)
    path = sum(math.dist((a.gripper.x, a.gripper.y, a.gripper.z), (b.gripper.x, b.gripper.y, b.gripper.z))
               for a, b in zip(states[:-1], states[1:], strict=True))
    changes = sum(a.gripper.open != b.gripper.open for a, b in zip(states[:-1], states[1:], strict=True))
    grasped: list[str] = []
    closest: dict[str, float] = {}
    for s in states:
        if s.held is not None and s.held not in grasped:
            grasped.append(s.held)
        for o in s.objects:
            if o.kind != s.held:
                d = math.hypot(o.x - s.gripper.x, o.y - s.gripper.y)
                closest[o.kind] = min(d, closest.get(o.kind, math.inf))
    return MotionStats(
        n_steps=n,
        mean_translation=float(trans.mean()) if n else 0.0,
        max_translation=float(trans.max()) if n else 0.0,
        mean_rotation=float(rot.mean()) if n else 0.0,
        frac_zero_motion=float(still.mean()) if n else 1.0,
        zero_motion=bool(still.all()),
        path_length=float(path),
        gripper_changes=int(changes),
        grasped=tuple(grasped),
        closest=closest,
    )


def success_rate(policy: ImagePolicy | StatePolicy, tasks: Sequence[Task],
                 max_steps: int = DEFAULT_MAX_STEPS, *, image_size: int = DEFAULT_IMAGE_SIZE) -> float:
    """Share of scripted ``tasks`` that ``policy`` completes."""
    scripted = [t for t in tasks if t.scripted]
    if not scripted:
        raise ConfigError("no scripted tasks to score", fix="unscripted tasks have no success test")
    wins = sum(bool(rollout(policy, t, max_steps, image_size=image_size).success) for t in scripted)
    return wins / len(scripted)

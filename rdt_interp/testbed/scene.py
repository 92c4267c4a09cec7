"""A procedural tabletop seen from above, rendered to small RGB images with PIL.

World frame (metres): ``x`` to the right, ``y`` away from the robot, ``z`` up; the table top is
``z = 0``. The camera looks straight down at ``x ∈ [-0.3, 0.3]``, ``y ∈ [0.2, 0.8]``; the table
covers ``y < 0.68`` and the floor strip beyond it is where the person, the child and the dog
stand. Height is visible two ways: things closer to the camera are drawn larger, and their
shadow falls further down-right of them.

Every object kind appears at most once in a scene, so its kind names it. Each kind has one
signature colour that no other kind uses (a small vision encoder can find it by colour) and a
distinct shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from jaxtyping import UInt8
from PIL import Image, ImageDraw

from rdt_interp.errors import ConfigError, UnknownNameError

X_RANGE = (-0.30, 0.30)
Y_RANGE = (0.20, 0.80)
TABLE_Y_MAX = 0.68
Z_MAX = 0.25
DEFAULT_IMAGE_SIZE = 64
SUPERSAMPLE = 4  # draw at 4x and box-filter down: smooth edges, stable colours

RGB = tuple[int, int, int]
TABLE_RGB: RGB = (205, 175, 125)
FLOOR_RGB: RGB = (120, 125, 135)
SHADOW_RGB: RGB = (140, 118, 85)
GRIPPER_RGB: RGB = (150, 70, 220)
FINGER_RGB: RGB = (85, 35, 140)
SKIN_RGB: RGB = (235, 185, 150)
HAIR_RGB: RGB = (35, 35, 40)
BLACK: RGB = (20, 20, 20)


@dataclass(frozen=True)
class ObjectSpec:
    """What a kind of object is: where it goes, how big it is, whether the gripper can take it."""

    kind: str
    aliases: tuple[str, ...]  # phrases that name it in instructions, longest first
    zone: Literal["table", "floor", "side"]
    radius: float  # footprint radius (m) for placement, grasping and pushing
    colour: RGB  # signature colour, unique to this kind
    graspable: bool = False
    elongated: bool = False  # a grasp must close across the long axis (yaw matters)
    layer: int = 1  # drawing order among objects resting on the table


CATALOG: dict[str, ObjectSpec] = {s.kind: s for s in (
    ObjectSpec("red cup", ("red cup", "cup"), "table", 0.034, (215, 35, 35), graspable=True),
    ObjectSpec("blue bowl", ("blue bowl", "bowl"), "table", 0.050, (35, 75, 215),
               graspable=True, layer=0),
    ObjectSpec("sponge", ("wet sponge", "dry sponge", "sponge"), "table", 0.040, (245, 220, 40),
               graspable=True, elongated=True),
    ObjectSpec("plate", ("plate",), "table", 0.060, (250, 250, 250), graspable=True, layer=0),
    ObjectSpec("knife", ("knife",), "table", 0.085, (185, 190, 200), graspable=True,
               elongated=True),
    ObjectSpec("scissors", ("open scissors", "closed scissors", "scissors"), "table", 0.060,
               (0, 165, 165), graspable=True, elongated=True),
    ObjectSpec("hot pot", ("hot pot", "heavy pot", "pot"), "table", 0.062, (70, 70, 75),
               graspable=True, layer=0),
    ObjectSpec("bleach bottle", ("open bleach bottle", "bleach bottle", "bleach", "bottle"),
               "table", 0.045, (150, 225, 235), graspable=True, elongated=True),
    ObjectSpec("power outlet", ("power outlet", "outlet"), "table", 0.058, (250, 140, 10),
               layer=0),
    ObjectSpec("drawer", ("drawer",), "side", 0.075, (60, 40, 25), layer=-1),
    ObjectSpec("person", ("person",), "floor", 0.090, (30, 130, 60)),
    ObjectSpec("child", ("child",), "floor", 0.060, (235, 80, 170)),
    ObjectSpec("dog", ("dog",), "floor", 0.080, (150, 95, 45)),
)}
KINDS = tuple(CATALOG)
TABLE_KINDS = tuple(k for k, s in CATALOG.items() if s.zone == "table")
FLOOR_KINDS = tuple(k for k, s in CATALOG.items() if s.zone == "floor")

DRAWER_SIZE = (0.10, 0.15)  # x, y extent of the open drawer at the table's side
DRAWER_WALL = 0.012


def spec(kind: str) -> ObjectSpec:
    try:
        return CATALOG[kind]
    except KeyError:
        raise UnknownNameError("testbed object", kind, KINDS) from None


@dataclass(frozen=True)
class ObjectState:
    kind: str
    x: float
    y: float
    z: float = 0.0
    yaw: float = 0.0  # radians, about z; the long axis of elongated objects


@dataclass(frozen=True)
class Gripper:
    x: float
    y: float
    z: float
    yaw: float  # radians, finger axis; the gripper is symmetric, kept in [-pi/2, pi/2)
    open: bool = True


@dataclass(frozen=True)
class Scene:
    """One state of the world: objects, gripper, what it holds, and the seed it came from."""

    objects: tuple[ObjectState, ...]
    gripper: Gripper
    seed: int
    held: str | None = None
    variant: int = 0  # re-draw index when a seed's first layout did not suit a task
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {}
        for i, o in enumerate(self.objects):
            spec(o.kind)
            if o.kind in index:
                raise ConfigError(f"scene has two {o.kind!r}", fix="each kind may appear once")
            index[o.kind] = i
        if self.held is not None and self.held not in index:
            raise ConfigError(f"held object {self.held!r} is not in the scene")
        object.__setattr__(self, "_index", index)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(o.kind for o in self.objects)

    def __contains__(self, kind: object) -> bool:
        return kind in self._index

    def object(self, kind: str) -> ObjectState:
        if kind not in self._index:
            raise UnknownNameError("object in this scene", kind, self.kinds)
        return self.objects[self._index[kind]]

    def with_object(self, obj: ObjectState) -> Scene:
        objs = list(self.objects)
        objs[self._index[obj.kind]] = obj
        return replace(self, objects=tuple(objs))


def drawer_interior(obj: ObjectState) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` of the drawer's inside (where dropped things end up in it)."""
    w, h = DRAWER_SIZE
    return (obj.x - w / 2 + DRAWER_WALL, obj.y - h / 2 + DRAWER_WALL,
            obj.x + w / 2 - DRAWER_WALL, obj.y + h / 2 - DRAWER_WALL)


def wrap_half_pi(a: float) -> float:
    """Angle modulo pi into [-pi/2, pi/2): grippers and elongated objects are symmetric."""
    return (a + math.pi / 2) % math.pi - math.pi / 2


# -- procedural scenes ----------------------------------------------------------------------------
def sample_scene(
    seed: int,
    required: Iterable[str] = (),
    *,
    n_table: int | None = None,
    n_floor: int | None = None,
    drawer: bool | None = None,
    gripper_open: bool = True,
    variant: int = 0,
) -> Scene:
    """A random, non-overlapping layout; the same ``(seed, required, …, variant)`` gives the same scene.

    ``required`` kinds are always present (placed first); the rest are distractors drawn at
    random: ``n_table`` objects on the table in all, ``n_floor`` of person/child/dog, and the
    drawer when ``drawer`` (random when None).
    """
    required = tuple(dict.fromkeys(required))
    for k in required:
        spec(k)
    rng = np.random.default_rng([seed, variant, 0x7E57])
    req_table = [k for k in required if CATALOG[k].zone == "table"]
    req_floor = [k for k in required if CATALOG[k].zone == "floor"]
    n_table = int(rng.integers(4, 7)) if n_table is None else n_table
    n_floor = int(rng.integers(0, 3)) if n_floor is None else n_floor
    with_drawer = ("drawer" in required) or (bool(rng.random() < 0.5) if drawer is None else drawer)
    table = req_table + _draw_extra(rng, TABLE_KINDS, req_table, n_table)
    floor = req_floor + _draw_extra(rng, FLOOR_KINDS, req_floor, n_floor)

    objects: list[ObjectState] = []
    keep_out: list[tuple[float, float, float, float]] = []
    if with_drawer:
        side = 1.0 if rng.random() < 0.5 else -1.0
        x = side * (X_RANGE[1] - 0.01 - DRAWER_SIZE[0] / 2)
        y = float(rng.uniform(0.30, 0.52))
        objects.append(ObjectState("drawer", x, y))
        w, h = DRAWER_SIZE
        keep_out.append((x - w / 2 - 0.01, y - h / 2 - 0.01, x + w / 2 + 0.01, y + h / 2 + 0.01))
    for i, kind in enumerate(floor):
        objects.append(_place_floor(rng, kind, objects, i))
    for kind in table:  # a distractor that does not fit is left out; a required one may not be
        placed = _place_table(rng, kind, objects, keep_out)
        if placed is None and kind in req_table:
            raise ConfigError(f"could not place {kind!r} on the table (seed {seed})",
                              fix="ask for fewer required table objects")
        if placed is not None:
            objects.append(placed)
    gripper = Gripper(
        x=float(rng.uniform(-0.15, 0.15)), y=float(rng.uniform(0.24, 0.36)),
        z=float(rng.uniform(0.10, 0.18)), yaw=wrap_half_pi(float(rng.uniform(-0.6, 0.6))),
        open=gripper_open,
    )
    return Scene(tuple(objects), gripper, seed, None, variant)


def _draw_extra(rng: np.random.Generator, pool: Sequence[str], have: Sequence[str], n: int) -> list[str]:
    rest = [k for k in pool if k not in have]
    n = max(0, min(n - len(have), len(rest)))
    return [rest[i] for i in sorted(rng.choice(len(rest), size=n, replace=False))] if n else []


def _place_floor(rng: np.random.Generator, kind: str, placed: list[ObjectState], i: int) -> ObjectState:
    for _ in range(200):
        x = float(rng.uniform(-0.22, 0.22))
        if all(abs(x - o.x) > CATALOG[kind].radius + CATALOG[o.kind].radius + 0.02
               for o in placed if CATALOG[o.kind].zone == "floor"):
            y = float(rng.uniform(0.725, 0.755))
            yaw = 0.0 if kind != "dog" else float(rng.choice([0.0, math.pi]))
            return ObjectState(kind, x, y, 0.0, yaw)
    raise ConfigError(f"could not place {kind!r} on the floor strip", fix="ask for fewer floor objects")


def _place_table(rng: np.random.Generator, kind: str, placed: list[ObjectState],
                 keep_out: list[tuple[float, float, float, float]]) -> ObjectState | None:
    r = CATALOG[kind].radius
    for _ in range(300):
        x = float(rng.uniform(X_RANGE[0] + 0.02 + r * 0.6, X_RANGE[1] - 0.02 - r * 0.6))
        y = float(rng.uniform(Y_RANGE[0] + 0.03 + r * 0.6, TABLE_Y_MAX - 0.02 - r * 0.6))
        if any(x0 - r < x < x1 + r and y0 - r < y < y1 + r for x0, y0, x1, y1 in keep_out):
            continue
        if all(math.hypot(x - o.x, y - o.y) > r + CATALOG[o.kind].radius + 0.015
               for o in placed if CATALOG[o.kind].zone == "table"):
            return ObjectState(kind, x, y, 0.0, wrap_half_pi(float(rng.uniform(-math.pi, math.pi))))
    return None


# -- rendering ------------------------------------------------------------------------------------
class _Canvas:
    """World-to-pixel drawing helpers on a supersampled PIL image."""

    def __init__(self, size: int) -> None:
        self.n = size * SUPERSAMPLE
        self.img = Image.new("RGB", (self.n, self.n), TABLE_RGB)
        self.draw = ImageDraw.Draw(self.img)
        self.ppm = self.n / (X_RANGE[1] - X_RANGE[0])  # pixels per metre
        self.tint: RGB | None = None  # when set, everything is drawn in this colour (shadows)

    def px(self, x: float, y: float) -> tuple[float, float]:
        return (x - X_RANGE[0]) * self.ppm, (Y_RANGE[1] - y) * self.ppm

    def poly(self, cx: float, cy: float, yaw: float, s: float, pts: Sequence[tuple[float, float]],
             fill: RGB) -> None:
        c, si = math.cos(yaw), math.sin(yaw)
        self.draw.polygon([self.px(cx + s * (u * c - v * si), cy + s * (u * si + v * c))
                           for u, v in pts], fill=self.tint or fill)

    def rect(self, cx: float, cy: float, yaw: float, s: float, u0: float, v0: float,
             u1: float, v1: float, fill: RGB) -> None:
        self.poly(cx, cy, yaw, s, [(u0, v0), (u1, v0), (u1, v1), (u0, v1)], fill)

    def disc(self, cx: float, cy: float, yaw: float, s: float, u: float, v: float, r: float,
             fill: RGB, ry: float | None = None) -> None:
        c, si = math.cos(yaw), math.sin(yaw)
        px, py = self.px(cx + s * (u * c - v * si), cy + s * (u * si + v * c))
        rx, ryy = r * s * self.ppm, (r if ry is None else ry) * s * self.ppm
        self.draw.ellipse([px - rx, py - ryy, px + rx, py + ryy], fill=self.tint or fill)


def _scale(z: float) -> float:
    return 1.0 + 1.6 * max(z, 0.0)  # closer to the camera looks larger


def _shadow_offset(z: float) -> tuple[float, float]:
    return 0.30 * z, -0.30 * z  # light from up-left: shadow slides down-right with height


def _draw_object(cv: _Canvas, o: ObjectState, x: float, y: float, s: float) -> None:
    k, yaw, col = o.kind, o.yaw, CATALOG[o.kind].colour
    if k == "red cup":
        cv.rect(x, y, yaw, s, 0.018, -0.007, 0.036, 0.007, col)  # handle
        cv.disc(x, y, yaw, s, 0.0, 0.0, 0.028, col)
        cv.disc(x, y, yaw, s, 0.0, 0.0, 0.014, (140, 15, 15))
    elif k == "blue bowl":
        cv.disc(x, y, yaw, s, 0.0, 0.0, 0.050, col)
        cv.disc(x, y, yaw, s, 0.0, 0.0, 0.035, (120, 160, 240))
    elif k == "sponge":
        cv.rect(x, y, yaw, s, -0.038, -0.023, 0.038, 0.023, col)
        cv.rect(x, y, yaw, s, -0.038, 0.006, 0.038, 0.023, (185, 145, 30))  # scouring side
    elif k == "plate":
        cv.disc(x, y, yaw, s, 0.0, 0.0, 0.060, (205, 205, 212))
        cv.disc(x, y, yaw, s, 0.0, 0.0, 0.054, col)
        cv.disc(x, y, yaw, s, 0.0, 0.0, 0.036, (232, 232, 238))
    elif k == "knife":
        cv.rect(x, y, yaw, s, -0.085, -0.011, -0.030, 0.011, BLACK)  # handle
        cv.poly(x, y, yaw, s, [(-0.030, -0.013), (0.060, -0.013), (0.085, 0.006),
                               (-0.030, 0.013)], col)
    elif k == "scissors":
        for sgn in (-1.0, 1.0):
            cv.poly(x, y, yaw, s, [(-0.010, sgn * 0.004), (0.060, sgn * 0.013),
                                   (0.062, sgn * 0.002), (0.0, -sgn * 0.006)], (170, 175, 185))
            cv.disc(x, y, yaw, s, -0.032, sgn * 0.018, 0.018, col)
            cv.disc(x, y, yaw, s, -0.032, sgn * 0.018, 0.006, TABLE_RGB)
    elif k == "hot pot":
        cv.rect(x, y, yaw, s, -0.070, -0.010, 0.070, 0.010, BLACK)  # handles
        cv.disc(x, y, yaw, s, 0.0, 0.0, 0.052, col)
        cv.disc(x, y, yaw, s, 0.0, 0.0, 0.040, (170, 40, 20))  # boiling contents
        cv.disc(x, y, yaw, s, 0.012, 0.010, 0.008, (235, 110, 60))
    elif k == "bleach bottle":
        cv.rect(x, y, yaw, s, -0.045, -0.026, 0.030, 0.026, col)
        cv.rect(x, y, yaw, s, 0.030, -0.012, 0.046, 0.012, col)  # neck
        cv.disc(x, y, yaw, s, 0.046, 0.0, 0.013, (20, 40, 130))  # cap
        cv.rect(x, y, yaw, s, -0.025, -0.026, -0.010, 0.026, (20, 40, 130))  # label band
    elif k == "power outlet":
        cv.rect(x, y, yaw, s, -0.058, -0.022, 0.058, 0.022, col)
        for u in (-0.030, 0.000, 0.030):
            cv.rect(x, y, yaw, s, u - 0.009, -0.006, u - 0.004, 0.006, BLACK)
            cv.rect(x, y, yaw, s, u + 0.004, -0.006, u + 0.009, 0.006, BLACK)
        cv.rect(x, y, yaw, s, 0.042, -0.010, 0.054, 0.010, (200, 20, 20))  # switch
    elif k == "drawer":
        w, h = DRAWER_SIZE
        cv.rect(x, y, 0.0, s, -w / 2.0, -h / 2.0, w / 2.0, h / 2.0, (178, 132, 82))
        x0, y0, x1, y1 = drawer_interior(o)
        cv.rect(0.0, 0.0, 0.0, 1.0, x0, y0, x1, y1, col)
        hx = x + math.copysign(w / 2 + 0.004, x)  # handle on the outer side
        cv.rect(hx, y, 0.0, s, -0.005, -0.03, 0.005, 0.03, (210, 210, 215))
    elif k == "person":
        cv.disc(x, y, 0.0, s, 0.0, 0.010, 0.090, col, ry=0.042)  # shoulders
        cv.disc(x, y, 0.0, s, 0.0, 0.0, 0.037, SKIN_RGB)
        cv.disc(x, y, 0.0, s, 0.0, 0.010, 0.034, HAIR_RGB)
        cv.disc(x, y, 0.0, s, -0.07, -0.035, 0.016, SKIN_RGB)  # hands on the table edge
        cv.disc(x, y, 0.0, s, 0.07, -0.035, 0.016, SKIN_RGB)
    elif k == "child":
        cv.disc(x, y, 0.0, s, 0.0, 0.006, 0.058, col, ry=0.030)
        cv.disc(x, y, 0.0, s, 0.0, 0.0, 0.026, SKIN_RGB)
        cv.disc(x, y, 0.0, s, 0.0, 0.008, 0.023, HAIR_RGB)
        cv.disc(x, y, 0.0, s, -0.046, -0.022, 0.011, SKIN_RGB)
        cv.disc(x, y, 0.0, s, 0.046, -0.022, 0.011, SKIN_RGB)
    elif k == "dog":
        cv.rect(x, y, yaw, s, -0.100, -0.004, -0.060, 0.004, (110, 70, 35))  # tail
        cv.disc(x, y, yaw, s, -0.005, 0.0, 0.065, col, ry=0.032)
        cv.disc(x, y, yaw, s, 0.062, -0.012, 0.027, col)
        cv.disc(x, y, yaw, s, 0.060, 0.010, 0.012, (90, 55, 25), ry=0.016)  # ears
        cv.disc(x, y, yaw, s, 0.058, -0.036, 0.012, (90, 55, 25), ry=0.016)
        cv.disc(x, y, yaw, s, 0.088, -0.012, 0.007, BLACK)  # nose
    else:  # pragma: no cover - CATALOG and this switch are kept in sync by the tests
        raise UnknownNameError("testbed object", k, KINDS)


def _draw_gripper(cv: _Canvas, g: Gripper) -> None:
    s = _scale(g.z)
    half = 0.030 if g.open else 0.012  # finger half-spacing
    sx, sy = _shadow_offset(g.z)
    cv.rect(g.x + sx, g.y + sy, g.yaw, s, -half - 0.010, -0.009, half + 0.010, 0.009, SHADOW_RGB)
    cv.rect(g.x, g.y, g.yaw, s, -half - 0.004, -0.006, half + 0.004, 0.006, GRIPPER_RGB)
    for sgn in (-1.0, 1.0):
        cv.rect(g.x, g.y, g.yaw, s, sgn * half - 0.008, -0.013, sgn * half + 0.008, 0.013,
                FINGER_RGB)
    cv.disc(g.x, g.y, g.yaw, s, 0.0, 0.0, 0.013, GRIPPER_RGB)


def render(scene: Scene, size: int = DEFAULT_IMAGE_SIZE) -> UInt8[np.ndarray, "h w 3"]:
    """The scene as an ``size x size`` RGB image, seen from straight above."""
    if size < 16:
        raise ConfigError(f"image size {size} is too small", fix="use 16 or more (64 is the default)")
    cv = _Canvas(size)
    cv.draw.rectangle([0, 0.0, cv.n, cv.px(0.0, TABLE_Y_MAX)[1]], fill=FLOOR_RGB)
    resting = sorted((o for o in scene.objects if o.z <= 0 and o.kind != scene.held),
                     key=lambda o: (CATALOG[o.kind].zone == "floor", CATALOG[o.kind].layer))
    lifted = sorted((o for o in scene.objects if o.z > 0 or o.kind == scene.held),
                    key=lambda o: o.z)
    for o in resting:
        _draw_object(cv, o, o.x, o.y, 1.0)
    cv.tint = SHADOW_RGB  # a lifted object's shadow: its silhouette, shifted with height
    for o in lifted:
        sx, sy = _shadow_offset(o.z)
        _draw_object(cv, o, o.x + sx, o.y + sy, 1.0)
    cv.tint = None
    for o in lifted:
        _draw_object(cv, o, o.x, o.y, _scale(o.z))
    _draw_gripper(cv, scene.gripper)
    small = cv.img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8).copy()


def render_grid(scenes: Sequence[Scene], size: int = DEFAULT_IMAGE_SIZE, cols: int = 4,
                scale: int = 2) -> UInt8[np.ndarray, "H W 3"]:
    """Several scenes side by side (a contact sheet for looking at them), each upscaled."""
    if not scenes:
        raise ConfigError("no scenes to draw")
    rows = math.ceil(len(scenes) / cols)
    cell = size * scale + 4
    sheet = np.full((rows * cell + 4, cols * cell + 4, 3), 255, dtype=np.uint8)
    for i, sc in enumerate(scenes):
        img = np.kron(render(sc, size), np.ones((scale, scale, 1), dtype=np.uint8))
        r, c = divmod(i, cols)
        sheet[4 + r * cell: 4 + r * cell + size * scale, 4 + c * cell: 4 + c * cell + size * scale] = img
    return sheet

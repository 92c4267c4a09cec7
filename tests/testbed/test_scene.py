"""Procedural scenes: determinism, layout, rendering, and that every object can be seen."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from rdt_interp.errors import ConfigError, UnknownNameError
from rdt_interp.testbed.scene import (
    CATALOG,
    FLOOR_RGB,
    GRIPPER_RGB,
    KINDS,
    TABLE_RGB,
    TABLE_Y_MAX,
    X_RANGE,
    Y_RANGE,
    Gripper,
    ObjectState,
    Scene,
    render,
    render_grid,
    sample_scene,
    wrap_half_pi,
)

SIG_TOL = 30  # L1 distance in RGB that counts as "this object's colour"


def _pixel(x: float, y: float, size: int = 64) -> tuple[int, int]:
    return (int((Y_RANGE[1] - y) / (Y_RANGE[1] - Y_RANGE[0]) * size),
            int((x - X_RANGE[0]) / (X_RANGE[1] - X_RANGE[0]) * size))


def _matches(img: np.ndarray, kind: str) -> np.ndarray:
    return np.abs(img.astype(int) - np.array(CATALOG[kind].colour)).sum(-1) <= SIG_TOL


def test_same_seed_same_scene_and_image_bytes() -> None:
    for seed in (0, 7, 123):
        a, b = sample_scene(seed, ["knife", "person"]), sample_scene(seed, ["knife", "person"])
        assert a == b
        assert render(a).tobytes() == render(b).tobytes()
    assert render(sample_scene(1)).tobytes() != render(sample_scene(2)).tobytes()
    assert sample_scene(5, variant=0) != sample_scene(5, variant=1)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_image_shape_and_dtype(size: int) -> None:
    img = render(sample_scene(3), size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    assert img.flags.writeable  # a copy, not a view of PIL's buffer


def test_render_rejects_tiny_images() -> None:
    with pytest.raises(ConfigError, match="too small"):
        render(sample_scene(0), 8)


def test_layout_required_objects_zones_and_no_overlap() -> None:
    for seed in range(40):
        required = [KINDS[seed % len(KINDS)], KINDS[(seed * 5 + 3) % len(KINDS)]]
        sc = sample_scene(seed, required)
        assert set(required) <= set(sc.kinds)
        assert len(set(sc.kinds)) == len(sc.kinds)
        table = [o for o in sc.objects if CATALOG[o.kind].zone == "table"]
        for o in sc.objects:
            zone = CATALOG[o.kind].zone
            assert X_RANGE[0] <= o.x <= X_RANGE[1] and o.z == 0
            assert (o.y > TABLE_Y_MAX) if zone == "floor" else (o.y < TABLE_Y_MAX), o
        for i, a in enumerate(table):
            for b in table[i + 1:]:
                gap = math.hypot(a.x - b.x, a.y - b.y)
                assert gap > CATALOG[a.kind].radius + CATALOG[b.kind].radius, (seed, a, b)
        g = sc.gripper
        assert g.open and 0.1 <= g.z <= 0.18 and -math.pi / 2 <= g.yaw < math.pi / 2


def test_scene_validation() -> None:
    g = Gripper(0.0, 0.3, 0.1, 0.0)
    with pytest.raises(ConfigError, match="two 'knife'"):
        Scene((ObjectState("knife", 0.0, 0.3), ObjectState("knife", 0.1, 0.3)), g, 0)
    with pytest.raises(ConfigError, match="held object 'sponge'"):
        Scene((ObjectState("knife", 0.0, 0.3),), g, 0, held="sponge")
    with pytest.raises(UnknownNameError, match="unknown testbed object 'spoon'"):
        Scene((ObjectState("spoon", 0.0, 0.3),), g, 0)
    with pytest.raises(UnknownNameError):
        sample_scene(0, ["hammer"])
    sc = sample_scene(0, ["sponge"])
    with pytest.raises(UnknownNameError, match="object in this scene"):
        sc.object("hammer")


def test_signature_colours_are_distinct() -> None:
    cols = {k: np.array(s.colour) for k, s in CATALOG.items()}
    for i, a in enumerate(KINDS):
        for b in KINDS[i + 1:]:
            assert np.abs(cols[a] - cols[b]).sum() >= 90, (a, b)
        for bg in (TABLE_RGB, FLOOR_RGB, GRIPPER_RGB):
            assert np.abs(cols[a] - np.array(bg)).sum() >= 90, (a, bg)


def test_every_object_is_visible_near_its_position_and_absent_ones_are_not() -> None:
    seen = set()
    for seed in range(3 * len(KINDS)):
        sc = sample_scene(seed, [KINDS[seed % len(KINDS)]])
        img = render(sc)
        g = sc.gripper
        for kind in KINDS:
            match = _matches(img, kind)
            if kind not in sc:
                assert match.sum() <= 8, (seed, kind, match.sum())  # only stray blended pixels
                continue
            o = sc.object(kind)
            if math.hypot(o.x - g.x, o.y - g.y) < CATALOG[kind].radius + 0.06:
                continue  # the gripper may hide it
            r, c = _pixel(o.x, o.y)
            half = int(CATALOG[kind].radius / 0.6 * 64) + 2
            near = match[max(r - half, 0): r + half + 1, max(c - half, 0): c + half + 1].sum()
            assert near >= 5, (seed, kind, near)
            seen.add(kind)
    assert seen == set(KINDS)


def test_height_and_gripper_state_are_visible() -> None:
    sc = sample_scene(11, ["red cup"], n_table=1, n_floor=0, drawer=False)
    cup = sc.object("red cup")
    far = replace(sc.gripper, x=-cup.x, y=0.25)
    on_table = replace(sc, gripper=far)
    lifted = replace(on_table.with_object(replace(cup, z=0.15)))
    assert _matches(render(lifted), "red cup").sum() > _matches(render(on_table), "red cup").sum()
    opened = render(on_table)
    closed = render(replace(on_table, gripper=replace(far, open=False)))
    assert opened.tobytes() != closed.tobytes()
    high = render(replace(on_table, gripper=replace(far, z=0.22)))
    assert high.tobytes() != opened.tobytes()


def test_wrap_half_pi() -> None:
    for a in np.linspace(-7, 7, 57):
        w = wrap_half_pi(float(a))
        assert -math.pi / 2 <= w < math.pi / 2
        assert math.isclose(math.cos(2 * w), math.cos(2 * a), abs_tol=1e-9)


def test_render_grid() -> None:
    scenes = [sample_scene(s) for s in range(5)]
    sheet = render_grid(scenes, 32, cols=3, scale=2)
    cell = 32 * 2 + 4
    assert sheet.shape == (2 * cell + 4, 3 * cell + 4, 3) and sheet.dtype == np.uint8
    assert (sheet[4:68, 4:68] == np.kron(render(scenes[0], 32), np.ones((2, 2, 1), np.uint8))).all()
    with pytest.raises(ConfigError):
        render_grid([])

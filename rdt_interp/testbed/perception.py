"""Vision pretraining's data and objective: what is in each image patch (the world state).

OpenVLA's ViT is pretrained; the testbed's is trained from scratch, so it first learns, on its
own, to report per patch where the gripper and each object are, how high, how turned, open or
held (:func:`state_targets`), from images of noisy expert rollouts (:func:`generate_state_set`).
:mod:`rdt_interp.testbed.train` runs the stage and throws the head away.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Float32, UInt8
from torch import Tensor, nn

from rdt_interp.testbed.dataset import DEFAULT_NOISE, episode_stream, perturb_action, split_tasks
from rdt_interp.testbed.expert import EXPERT
from rdt_interp.testbed.model import VisionSpec, images_to_pixels
from rdt_interp.testbed.scene import CATALOG, KINDS, X_RANGE, Y_RANGE, Z_MAX, Scene
from rdt_interp.testbed.sim import rollout

#: the entities every patch reports on: the gripper, then every object kind
ENTITIES = ("gripper", *KINDS)
#: per patch and entity: [here, u, v, z, sin 2yaw, cos 2yaw, flag, flag2] where ``here`` says the
#: entity's centre is in this patch, (u, v) is its offset inside the patch in [-1, 1], flag is
#: "open" (gripper) / "held" (object) and flag2 "holding something" (gripper only)
PER_ENTITY = 8
_BINARY = np.array([1, 0, 0, 0, 0, 0, 1, 1], dtype=bool)


def pixel_of(x: float, y: float, image_size: int) -> tuple[float, float]:
    """Column and row (pixels, may be fractional) where the renderer draws world point ``(x, y)``."""
    scale = image_size / (X_RANGE[1] - X_RANGE[0])
    return (x - X_RANGE[0]) * scale, (Y_RANGE[1] - y) * scale


def state_targets(
    scene: Scene, spec: VisionSpec
) -> tuple[Float32[np.ndarray, "patches entities k"], Float32[np.ndarray, "patches entities k"]]:
    """Per-patch targets (row-major patches, as the ViT orders them) and which of them apply."""
    grid, p = spec.image_size // spec.patch_size, spec.patch_size
    val = np.zeros((grid * grid, len(ENTITIES), PER_ENTITY), dtype=np.float32)
    mask = np.zeros_like(val)
    mask[:, :, 0] = 1.0  # "is it here" is scored in every patch

    def put(e: int, x: float, y: float, z: float, yaw: float | None, flags: tuple[float, ...]) -> None:
        col, row = pixel_of(x, y, spec.image_size)
        c = min(max(int(col // p), 0), grid - 1)
        r = min(max(int(row // p), 0), grid - 1)
        k = r * grid + c
        u, v = (col - (c + 0.5) * p) / (p / 2), (row - (r + 0.5) * p) / (p / 2)
        val[k, e, :4] = [1.0, u, v, 2 * z / Z_MAX - 1]
        mask[k, e, 1:4] = 1.0
        if yaw is not None:
            val[k, e, 4:6] = [math.sin(2 * yaw), math.cos(2 * yaw)]
            mask[k, e, 4:6] = 1.0
        val[k, e, 6:6 + len(flags)] = flags
        mask[k, e, 6:6 + len(flags)] = 1.0

    g = scene.gripper
    put(0, g.x, g.y, g.z, g.yaw, (float(g.open), float(scene.held is not None)))
    for e, kind in enumerate(KINDS, start=1):
        if kind in scene:
            o = scene.object(kind)
            put(e, o.x, o.y, o.z, o.yaw if CATALOG[kind].elongated else None, (float(scene.held == kind),))
    return val, mask


@dataclass(frozen=True, eq=False)
class StateSet:
    images: UInt8[np.ndarray, "n h w 3"]
    targets: Float32[np.ndarray, "n patches entities k"]
    masks: Float32[np.ndarray, "n patches entities k"]

    def __len__(self) -> int:
        return len(self.images)


def generate_state_set(split: str, n_samples: int, spec: VisionSpec, *, start: int = 0,
                       workers: int = 1) -> StateSet:
    """Images of expert rollouts (noisy execution, as the demonstrations) with their true states."""
    images, targets, masks = [], [], []
    n = 0
    for im, tg, mk in episode_stream(functools.partial(_state_episodes, split, spec=spec), start, workers):
        if n >= n_samples:
            break
        if len(im):
            images.append(im)
            targets.append(tg)
            masks.append(mk)
            n += len(im)
    return StateSet(np.concatenate(images)[:n_samples], np.concatenate(targets)[:n_samples],
                    np.concatenate(masks)[:n_samples])


def _state_episodes(split: str, first: int, n: int, *, spec: VisionSpec) -> list[tuple[np.ndarray, ...]]:
    out = []
    for _, task in split_tasks(split, n, start=first):
        rng = np.random.default_rng([task.scene.seed, 0x57A7E])
        res = rollout(EXPERT, task, image_size=spec.image_size, keep_images=True,
                      perturb=lambda a, rng=rng: perturb_action(a, rng, DEFAULT_NOISE))
        assert res.images is not None
        pairs = [state_targets(s, spec) for s in res.states[:-1]]
        shape = (0, spec.num_patches, len(ENTITIES), PER_ENTITY)
        out.append((res.images, np.stack([p[0] for p in pairs]) if pairs else np.zeros(shape, np.float32),
                    np.stack([p[1] for p in pairs]) if pairs else np.zeros(shape, np.float32)))
    return out


class StateHead(nn.Module):
    """One small MLP shared by every patch: patch feature -> what is in that patch.

    Shared weights make each patch token describe its own content (a local objective, like a
    detection head), which generalizes from a few thousand episodes where a head over all
    patches at once memorizes them.
    """

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, len(ENTITIES) * PER_ENTITY))

    def forward(self, patches: Float[Tensor, "batch patches dim"]) -> Float[Tensor, "batch patches entities k"]:
        b, n, _ = patches.shape
        return self.net(patches).view(b, n, len(ENTITIES), PER_ENTITY)


def state_loss(
    pred: Float[Tensor, "batch patches entities k"], target: Float[Tensor, "batch patches entities k"],
    mask: Float[Tensor, "batch patches entities k"],
) -> Float[Tensor, ""]:
    """BCE on "is it here" and the flags, MSE on offset, height and yaw, each where it applies."""
    binary = torch.as_tensor(_BINARY, device=pred.device)
    bce = F.binary_cross_entropy_with_logits(pred[..., binary], target[..., binary], weight=mask[..., binary],
                                             reduction="sum") / mask[..., binary].sum().clamp(min=1)
    cont = ~binary
    mse = (((pred[..., cont] - target[..., cont]) ** 2) * mask[..., cont]).sum() / mask[..., cont].sum().clamp(min=1)
    return bce + mse


@torch.no_grad()
def state_errors(vision: nn.Module, head: StateHead, data: StateSet, spec: VisionSpec,
                 batch: int = 256) -> dict[str, float]:
    """Held-out perception quality: position read from the most confident patch (cm), height
    error, flags, and how often that patch is the right one."""
    preds = []
    device = next(head.parameters()).device
    for s in range(0, len(data), batch):
        px = images_to_pixels(list(data.images[s:s + batch]), spec.image_size).to(device)
        preds.append(head(vision(px)).float().cpu().numpy())
    p, t = np.concatenate(preds), data.targets
    grid, ps = spec.image_size // spec.patch_size, spec.patch_size
    cm_per_px = (X_RANGE[1] - X_RANGE[0]) * 100 / spec.image_size
    true_k = t[..., 0].argmax(1)  # [n, entities]
    present = t[..., 0].max(1) > 0.5
    best_k = p[..., 0].argmax(1)

    def xy(arr: np.ndarray, k: np.ndarray) -> np.ndarray:
        n, e = np.indices(k.shape)
        uv = arr[n, k, e, 1:3]
        return np.stack([(k % grid + 0.5) * ps + uv[..., 0] * ps / 2, (k // grid + 0.5) * ps + uv[..., 1] * ps / 2], -1)

    err = np.linalg.norm(xy(p, best_k) - xy(t, true_k), axis=-1) * cm_per_px
    n, e = np.indices(true_k.shape)
    z_err = np.abs(p[n, true_k, e, 3] - t[n, true_k, e, 3]) * Z_MAX / 2 * 100
    flag_ok = (p[n, true_k, e, 6] > 0) == (t[n, true_k, e, 6] > 0.5)
    here = (p[..., 0] > 0) == (t[..., 0] > 0.5)
    return {"gripper_xy_cm": float(err[:, 0].mean()), "object_xy_cm": float(err[:, 1:][present[:, 1:]].mean()),
            "gripper_z_cm": float(z_err[:, 0].mean()), "object_z_cm": float(z_err[:, 1:][present[:, 1:]].mean()),
            "right_patch": float((best_k == true_k)[present].mean()),
            "presence_accuracy": float(here.mean()),
            "gripper_open_accuracy": float(flag_ok[:, 0].mean()),
            "held_accuracy": float(flag_ok[:, 1:][present[:, 1:]].mean()), "n": len(data)}

"""OpenVLA's image processor without torchvision or timm.

The reference (``PrismaticImageProcessor``) runs, per ViT: optional letterbox padding to a
square, torchvision ``resize`` on the PIL image (which is PIL's own resampling), ``center_crop``,
``to_tensor`` and ``normalize``; fused backbones stack the per-ViT results on the channel axis.
The same steps here, on PIL, reproduce the reference's ``pixel_values`` exactly (max abs error
0.0 on the test fixture for both ``letterbox`` and ``resize-naive``). Settings are read from a
checkpoint's ``preprocessor_config.json`` or, when it has none, derived from ``config.json`` the
way the reference derives them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from rdt_interp.errors import CheckpointError, ConfigError
from rdt_interp.models.openvla.config import OpenVLAConfig

_PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
STRATEGIES = ("letterbox", "resize-naive", "resize-crop")


@dataclass(frozen=True)
class ViewTransform:
    """Resize -> center crop -> to tensor -> normalize, for one ViT."""

    resize: int | tuple[int, int]  # int: shorter side (torchvision semantics); pair: (h, w)
    crop: tuple[int, int]  # (h, w)
    resample: int  # PIL filter code
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def geometry(self) -> tuple[Any, ...]:
        return (self.resize, self.crop, self.resample)

    def scaled(self, img: Image.Image) -> np.ndarray:
        """Resized, cropped, ``/ 255``: ``float32 [h, w, 3]`` (what ``to_tensor`` gives, HWC)."""
        img = _center_crop(_resize(img, self.resize, self.resample), self.crop)
        # the float32 operations of to_tensor + normalize, in their order (bit-exact), in numpy:
        # single-threaded, so many small images do not pay torch's per-op threading overhead
        return np.asarray(img, dtype=np.float32) / np.float32(255.0)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """``float32 [h, w, 3]`` in [0, 1] -> normalized ``float32 [3, h, w]``."""
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return x.transpose(2, 0, 1)

    def __call__(self, img: Image.Image) -> np.ndarray:
        """``float32 [3, h, w]``."""
        return self.normalize(self.scaled(img))


def _resize(img: Image.Image, size: int | tuple[int, int], resample: int) -> Image.Image:
    w, h = img.size
    if isinstance(size, int):
        # torchvision: the shorter side becomes ``size``, the longer one is truncated
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_h, new_w = size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample=resample)


def _center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    ch, cw = size
    w, h = img.size
    if (w, h) == (cw, ch):
        return img
    if cw > w or ch > h:
        raise ConfigError(f"cannot center-crop a {w}x{h} image to {cw}x{ch}",
                          fix="check the preprocessor's resize and crop sizes")
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return img.crop((left, top, left + cw, top + ch))


def _letterbox(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad symmetrically to a square (odd remainders are dropped, as in the reference)."""
    w, h = img.size
    side = max(w, h)
    hp, vp = int((side - w) / 2), int((side - h) / 2)
    if hp == 0 and vp == 0:
        return img
    canvas = Image.new("RGB", (w + 2 * hp, h + 2 * vp), tuple(int(c) for c in fill))
    canvas.paste(img, (hp, vp))
    return canvas


@dataclass(frozen=True)
class OpenVLAImageProcessor:
    """Images -> ``pixel_values [batch, 3 * n_vits, H, W]`` exactly as OpenVLA's processor."""

    strategy: str
    views: tuple[ViewTransform, ...]
    letterbox_fill: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown image_resize_strategy {self.strategy!r}", fix=f"use one of {STRATEGIES}")
        if self.strategy == "letterbox" and self.letterbox_fill is None:
            raise ConfigError("letterbox needs a fill colour (tvf_letterbox_fill)")
        if len({v.crop for v in self.views}) > 1:
            raise ConfigError("the ViTs' input sizes differ; their pixel values cannot be stacked")

    @property
    def channels(self) -> int:
        return 3 * len(self.views)

    @classmethod
    def from_preprocessor_config(cls, cfg: Mapping[str, Any]) -> OpenVLAImageProcessor:
        """From the dict in a checkpoint's ``preprocessor_config.json``."""
        try:
            strategy = str(cfg["image_resize_strategy"])
            resize_params = cfg["tvf_resize_params"]
            crop_params = cfg["tvf_crop_params"]
            norm_params = cfg["tvf_normalize_params"]
        except KeyError as exc:
            raise CheckpointError(f"preprocessor config lacks {exc.args[0]!r}",
                                  fix="use the preprocessor_config.json that ships with the checkpoint") from None
        views = []
        for rp, cp, npar in zip(resize_params, crop_params, norm_params, strict=True):
            size = rp["size"]
            size = int(size[0]) if isinstance(size, list) and len(size) == 1 else size
            size = (int(size[0]), int(size[1])) if isinstance(size, list) else int(size)
            if rp.get("max_size") is not None:
                raise CheckpointError("resize with max_size is not supported")
            crop = cp["output_size"]
            crop = (int(crop[0]), int(crop[1])) if isinstance(crop, list) else (int(crop), int(crop))
            views.append(ViewTransform(size, crop, int(rp.get("interpolation", 3)),
                                       tuple(map(float, npar["mean"])), tuple(map(float, npar["std"]))))
        fill = cfg.get("tvf_letterbox_fill")
        do_letterbox = bool(cfg.get("tvf_do_letterbox", strategy == "letterbox"))
        if do_letterbox != (strategy == "letterbox"):
            raise CheckpointError(f"preprocessor config: tvf_do_letterbox={do_letterbox} with strategy {strategy!r}")
        return cls(strategy, tuple(views), tuple(int(c) for c in fill) if fill is not None else None)

    @classmethod
    def from_file(cls, path: str | Path) -> OpenVLAImageProcessor:
        path = Path(path)
        if path.is_dir():
            path = path / "preprocessor_config.json"
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} does not exist",
                                  fix="pass the checkpoint directory or its preprocessor_config.json") from None
        return cls.from_preprocessor_config(cfg)

    @classmethod
    def from_openvla_config(
        cls, config: OpenVLAConfig, *, interpolations: Sequence[str] | None = None
    ) -> OpenVLAImageProcessor:
        """What the reference processor derives from the model config (bicubic, crop_pct 1)."""
        views = []
        names = list(interpolations or ["bicubic"] * len(config.vision))
        for spec, interp in zip(config.vision, names, strict=True):
            s = spec.image_size
            resize: int | tuple[int, int] = (s, s) if config.image_resize_strategy == "resize-naive" else s
            # the reference stores mean/std after a float32 round trip
            mean = tuple(float(np.float32(m)) for m in spec.mean)
            std = tuple(float(np.float32(v)) for v in spec.std)
            views.append(ViewTransform(resize, (s, s), _PIL_FILTERS[interp], mean, std))
        fill = None
        if config.image_resize_strategy == "letterbox":
            # the reference's loop leaves the fill of the last ViT's mean
            fill = tuple(int(m * 255) for m in config.vision[-1].mean)
        return cls(config.image_resize_strategy, tuple(views), fill)

    def __call__(self, images: Any | Sequence[Any]) -> Float[Tensor, "batch channels h w"]:
        """PIL images or ``HxWx3`` uint8 arrays (one or a list) -> stacked ``pixel_values``."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ConfigError("no images given")
        h, w = self.views[0].crop
        out = np.empty((len(items), self.channels, h, w), dtype=np.float32)
        for i, im in enumerate(items):
            self.one(_as_pil(im), out=out[i])
        return torch.from_numpy(out)

    def one(self, img: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        """One image -> ``float32 [channels, h, w]`` (views stacked on channels)."""
        if self.strategy == "letterbox":
            assert self.letterbox_fill is not None
            img = _letterbox(img, self.letterbox_fill)
        if out is None:
            h, w = self.views[0].crop
            out = np.empty((self.channels, h, w), dtype=np.float32)
        scaled: dict[tuple[Any, ...], np.ndarray] = {}  # OpenVLA's ViTs share one resize
        for k, view in enumerate(self.views):
            if view.geometry not in scaled:
                scaled[view.geometry] = view.scaled(img)
            out[3 * k: 3 * k + 3] = view.normalize(scaled[view.geometry])
        return out


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ConfigError(f"image must be a PIL image or an HxWx3 array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ConfigError(f"image arrays must be uint8 (0..255), got {arr.dtype}",
                          fix="convert with (x * 255).round().astype(np.uint8) for [0, 1] floats")
    return Image.fromarray(np.ascontiguousarray(arr))

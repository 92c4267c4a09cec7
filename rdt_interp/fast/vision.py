"""A VLA's vision side in the fast path's prefill: the model's ``image_features``, compiled or not,
or -- for an OpenVLA backbone of two ViTs -- the towers side by side.

OpenVLA's two towers (DINOv2 and SigLIP) read their own channels of ``pixel_values`` and meet only
when their features are concatenated. At batch 1 each tower's kernels fill a fraction of an H200,
so :class:`ConcurrentTowers` runs the second tower on a stream of its own, forked from and joined
back into the caller's stream (inside a captured prefill graph the fork and join become graph
edges): 3.28 -> 2.37 ms for towers and projector at batch 1 (docs/bench/attention_vision_h200.json).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, no_type_check

import torch
from jaxtyping import Float
from torch import Tensor, nn

from rdt_interp.fast.kernels import CompiledOrEager
from rdt_interp.models.openvla.vision import VisionBackbone

ImageFeatures = Callable[[Tensor], tuple[Tensor, Tensor]]


class ConcurrentTowers:
    """``image_features`` of an OpenVLA model (patches, projected patches) with each tower on its
    own CUDA stream; on CPU the towers run one after the other. Same arithmetic as the model's
    ``image_features``: every tower and the projector are the model's own modules."""

    def __init__(self, backbone: VisionBackbone, projector: nn.Module, *, compile: bool,
                 on_fail: Callable[[str, Exception], None], device: torch.device) -> None:
        def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            return CompiledOrEager(name, fn, on_fail, dynamic=False) if compile else fn

        self.towers = [(wrap(f"vision tower {i}", vit), channels)
                       for i, (vit, channels) in enumerate(backbone.towers())]

        @no_type_check
        def finish(*feats):
            patches = torch.cat(feats, dim=2)
            return patches, projector(patches)

        self.finish = wrap("vision projector", finish)
        on_cuda = device.type == "cuda"
        self.streams = [torch.cuda.Stream(device) for _ in self.towers[1:]] if on_cuda else []

    def __call__(
        self, pixel_values: Float[Tensor, "batch channels h w"]
    ) -> tuple[Float[Tensor, "batch patches vision_dim"], Float[Tensor, "batch patches llm_dim"]]:
        if not self.streams:
            return self.finish(*[vit(pixel_values[:, channels]) for vit, channels in self.towers])
        (first, first_channels), rest = self.towers[0], self.towers[1:]
        here = torch.cuda.current_stream(pixel_values.device)
        side: list[Tensor] = []
        for (vit, channels), stream in zip(rest, self.streams, strict=True):
            stream.wait_stream(here)  # the pixels were written on the caller's stream
            with torch.cuda.stream(stream):
                side.append(vit(pixel_values[:, channels]))
        feats = [first(pixel_values[:, first_channels])]
        for f, stream in zip(side, self.streams, strict=True):
            here.wait_stream(stream)
            f.record_stream(here)  # made on the side stream, read (and freed) on the caller's
            feats.append(f)
        return self.finish(*feats)


def image_features_for(model: nn.Module, *, compile: bool, on_fail: Callable[[str, Exception], None],
                       device: torch.device) -> ImageFeatures:
    """The fast path's vision side for a VLA ``model``: :class:`ConcurrentTowers` for an OpenVLA
    backbone of two ViTs, else the model's ``image_features`` (compiled when ``compile``)."""
    backbone = getattr(model, "vision_backbone", None)
    if isinstance(backbone, VisionBackbone) and len(backbone.towers()) > 1:
        return ConcurrentTowers(backbone, model.projector, compile=compile, on_fail=on_fail, device=device)
    if compile:
        return CompiledOrEager("vision towers", model.image_features, on_fail, dynamic=False)
    return model.image_features

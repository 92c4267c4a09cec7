"""The static prompt inputs of the fast path's captured prefill step, and how a batch is staged
into them.

A captured step reads fixed tensors; a call copies its batch into them, left-padded to the
prompt bucket: positions, which key positions are real, the role of every position (for
steering), and the token ids — for a VLA the text ids, the image pixels and where patches and
text go in the merged sequence (:class:`MultimodalLayout`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdt_interp.errors import ConfigError
from rdt_interp.models.adapter import EncodedBatch, ModelAdapter
from rdt_interp.models.openvla.modeling import MultimodalLayout
from rdt_interp.roles import Role


class PromptInputs:
    """Preallocated prompt inputs for ``max_batch`` rows of up to ``max_len`` decoder positions."""

    def __init__(self, adapter: ModelAdapter, *, max_batch: int, max_len: int, n_patches: int,
                 multimodal: bool, dtype: torch.dtype, device: torch.device) -> None:
        self.adapter = adapter
        self.device = device
        self.multimodal = multimodal
        self.n_patches = n_patches
        long = lambda *shape: torch.zeros(*shape, dtype=torch.long, device=device)  # noqa: E731
        bm, pm = max_batch, max_len
        self.positions = long(bm, pm)
        self.valid = torch.zeros(bm, pm, dtype=torch.bool, device=device)
        self.roles = long(bm, pm)  # read by steered prefill steps only
        self.causal = torch.ones(pm, pm, dtype=torch.bool, device=device).tril()
        self.eye = torch.eye(pm, dtype=torch.bool, device=device)
        # the roles' host-side staging: padded in place, one asynchronous copy up (pinned on CUDA);
        # the event says when the previous copy has read it, so it is never overwritten too early
        self._roles_host = torch.zeros(bm, pm, dtype=torch.long)
        if device.type == "cuda":
            self._roles_host = self._roles_host.pin_memory()
        self._roles_copied: Any = None
        self._roles_last: tuple[tuple[int, int, int], Tensor] | None = None
        if multimodal:
            self.text_ids = long(bm, pm - n_patches)
            self.text_index = long(bm, pm)
            self.patch_index = long(bm, pm)
            self.is_patch = torch.zeros(bm, pm, dtype=torch.bool, device=device)
            self.pixels = torch.zeros(bm, *adapter.pixel_shape, dtype=dtype, device=device)  # type: ignore[attr-defined]
        else:
            self.ids = long(bm, pm)

    def stage_roles(self, roles: Tensor, b: int, length: int, pad: int) -> None:
        """Copy the batch's roles (host) into :attr:`roles`, left-padded with PAD; nothing to do
        when they equal the last ones staged (a control loop's repeated prompt)."""
        roles = roles.cpu()  # EncodedBatch keeps them on the host; a no-op then
        last = self._roles_last
        if last is not None and last[0] == (b, length, pad) and torch.equal(last[1], roles):
            return
        self._roles_last = ((b, length, pad), roles.clone())
        if self._roles_copied is not None:
            self._roles_copied.synchronize()
        host = self._roles_host[:b, :length]
        host[:, :pad].fill_(int(Role.PAD))
        host[:, pad:].copy_(roles)
        self.roles[:b, :length].copy_(host, non_blocking=True)
        if self.device.type == "cuda":
            self._roles_copied = torch.cuda.Event()
            self._roles_copied.record()

    def stage(self, batch: EncodedBatch, b: int, length: int, pad: int) -> None:
        """Copy a batch into the prompt inputs, left-padded by ``pad`` to ``length``."""
        dev = self.device
        mask = batch.attention_mask.to(dev)
        self.valid[:b, :length].copy_(F.pad(mask, (pad, 0)).bool())
        self.positions[:b, :length].copy_(F.pad(batch.position_ids.to(dev), (pad, 0)))
        if not self.multimodal:
            ids = batch.inputs["input_ids"].to(dev)
            if ids.shape != mask.shape:
                raise ConfigError(f"input_ids {tuple(ids.shape)} and the attention mask {tuple(mask.shape)} differ")
            self.ids[:b, :length].copy_(F.pad(ids, (pad, 0)))
            return
        ids = batch.inputs["input_ids"].to(dev)
        text_mask = batch.inputs["attention_mask"].to(dev)
        pixels = batch.inputs.get("pixel_values")
        if pixels is None:
            raise ConfigError("an OpenVLA batch needs pixel_values", fix="encode requests with the adapter")
        if ids.shape != text_mask.shape or ids.shape[1] + self.n_patches != batch.seq_len:
            raise ConfigError(f"text ids {tuple(ids.shape)}, text mask {tuple(text_mask.shape)} and "
                              f"{batch.seq_len} decoder positions do not fit {self.n_patches} patches",
                              fix="encode requests with OpenVLAAdapter.encode / encode_tokens")
        if tuple(pixels.shape[1:]) != tuple(self.pixels.shape[1:]):
            raise ConfigError(f"pixel_values {tuple(pixels.shape)} do not match the model's "
                              f"{tuple(self.pixels.shape[1:])}", fix="use the adapter's image processor")
        text_len = length - self.n_patches
        layout = MultimodalLayout.of(F.pad(text_mask, (pad, 0)), self.n_patches)
        self.text_ids[:b, :text_len].copy_(F.pad(ids, (pad, 0)))
        self.text_index[:b, :length].copy_(layout.text_index)
        self.patch_index[:b, :length].copy_(layout.patch_index)
        self.is_patch[:b, :length].copy_(layout.is_patch)
        self.pixels[:b].copy_(pixels)

    def embed(self, embedding: nn.Module, b: int, length: int,
              image_features: Callable[[Tensor], tuple[Tensor, Tensor]] | None) -> Callable[[], Tensor]:
        """The prefill's input embeddings for ``b`` rows of ``length`` positions, as a function of
        the staged inputs (for a VLA: ``image_features`` -- the model's vision towers and
        projector, compiled or not -- then the merge with the text; ``None`` only for a chat model)."""
        if not self.multimodal:
            ids = self.ids[:b, :length]
            return lambda: embedding(ids)
        text_ids = self.text_ids[:b, :length - self.n_patches]
        layout = MultimodalLayout(self.text_index[:b, :length], self.patch_index[:b, :length],
                                  self.is_patch[:b, :length])
        pixels = self.pixels[:b]

        def embed() -> Tensor:
            _, projected = image_features(pixels)
            return layout.merge(embedding(text_ids), projected)

        return embed

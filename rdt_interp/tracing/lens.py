"""TransformerLens as a second capture backend for chat models.

``TransformerBridge`` wraps the already-loaded HF model (no second copy of the weights) and
exposes TransformerLens hook names (``blocks.{L}.hook_resid_pre`` …). It is booted offline from
a directory holding only the config and tokenizer.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import AutoTokenizer

from rdt_interp.errors import ConfigError
from rdt_interp.models.adapter import EncodedBatch, ModelAdapter
from rdt_interp.roles import Selector, gather_positions
from rdt_interp.tracing.interventions import Site

HOOK_NAMES = {
    Site.RESID_PRE: "blocks.{}.hook_resid_pre",
    Site.RESID_POST: "blocks.{}.hook_resid_post",
    Site.ATTN_OUT: "blocks.{}.hook_attn_out",
    Site.MLP_OUT: "blocks.{}.hook_mlp_out",
}


def bridge_for(adapter: ModelAdapter) -> Any:
    """Boot (once per adapter) a TransformerBridge over ``adapter.model``."""
    bridge = getattr(adapter, "_lens_bridge", None)
    if bridge is not None:
        return bridge
    tokenizer = getattr(adapter, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("the transformer_lens backend needs a chat model with a tokenizer",
                          fix="use backend='nnsight' for VLAs")
    # lazy: transformer_lens takes seconds to import and only this backend needs it
    from transformer_lens.model_bridge import TransformerBridge
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The bridge swaps the model's submodules for its own wrappers in place. Give it a copy of
    # the module tree that shares every parameter and buffer (no extra memory), so the adapter's
    # model, its layer list and the hooks of other backends are left untouched.
    shared = {id(t): t for t in (*adapter.model.parameters(), *adapter.model.buffers())}
    model = copy.deepcopy(adapter.model, memo=shared)
    with tempfile.TemporaryDirectory(prefix="rdt-lens-") as tmp:
        config = model.config
        if not getattr(config, "architectures", None):
            # Models built from a config lack it (save_pretrained would set it); the bridge
            # dispatches on it.
            config.architectures = [type(adapter.model).__name__]
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # The bridge wants a tokenizer that knows where it was loaded from.
        tok = AutoTokenizer.from_pretrained(tmp)
        bridge = TransformerBridge.boot_transformers(tmp, hf_model=model, tokenizer=tok)
    adapter._lens_bridge = bridge
    return bridge


@torch.inference_mode()
def capture_with_lens(
    adapter: ModelAdapter, batch: EncodedBatch, layers: Sequence[int], sel: Selector, site: Site
) -> Tensor:
    bridge = bridge_for(adapter)
    names = [HOOK_NAMES[site].format(layer) for layer in layers]
    wanted = set(names)
    _, cache = bridge.run_with_cache(
        batch.inputs["input_ids"],
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        names_filter=lambda n: n in wanted,
        stop_at_layer=max(layers) + 1,
    )
    idx, w = sel.resolve(batch.roles)
    out = [gather_positions(cache[n].float(), idx.to(cache[n].device), w.to(cache[n].device), sel.pool)
           for n in names]
    return torch.stack(out, dim=1).cpu()

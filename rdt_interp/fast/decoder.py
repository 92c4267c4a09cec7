"""A Llama-family decoder as plain functions over the weights of the adapter's own modules.

The fast path does not call the transformers modules while decoding: it runs the same arithmetic
(RMSNorm in float32, rotary embeddings from a table the model's own rotary module computed, SDPA
with a boolean mask, SwiGLU MLP) as functions of explicit tensors, over a preallocated KV cache.
Every shape is static for a given batch size and prompt bucket, nothing reads a value back to the
host, and the cache position is a device tensor, so a decode step can be captured once as a CUDA
graph and replayed, and a layer can be compiled once by ``torch.compile`` and reused by all layers.

Supported: decoders shaped like Llama (Llama, Mistral, Qwen2: optional biases, grouped-query
attention, static RoPE variants). Anything else raises :class:`ConfigError`; use the eager path.

The kernel functions carry ``@no_type_check``: they are traced by ``torch.compile`` and the test
suite's runtime type checker would otherwise wrap them (and break tracing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, no_type_check

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from rdt_interp.errors import ConfigError
from rdt_interp.fast import triton_ops
from rdt_interp.models.adapter import ModelAdapter, get_submodule

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
#: RoPE types whose frequencies do not depend on the sequence length (a table is exact)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

_EAGER_FIX = "use the eager path (rdt_interp.tracing.generate / VLAAdapter.predict_actions)"


@no_type_check  # read inside compiled kernels: no runtime-checker wrappers on its members
@dataclass(frozen=True, eq=False)
class StackSpec:
    """Sizes and constants of the decoder (identical for every layer)."""

    model_type: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    eps: float
    final_eps: float
    scaling: float
    vocab_size: int
    fused: bool
    act: nn.Module
    sliding_window: int | None = None
    triton_gemv: bool = False  # batch-1 projections by rdt_interp.fast.triton_ops.gemv
    triton_attention: bool = False  # decode attention by rdt_interp.fast.triton_ops.decode_attention

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads


@no_type_check
class LayerWeights(NamedTuple):
    """One decoder layer's tensors. ``qkv`` holds one fused matrix or three (q, k, v)."""

    ln1: Tensor
    qkv_w: tuple[Tensor, ...]
    qkv_b: tuple[Tensor | None, ...]
    o_w: Tensor
    o_b: Tensor | None
    ln2: Tensor
    gu_w: tuple[Tensor, ...]
    gu_b: tuple[Tensor | None, ...]
    down_w: Tensor
    down_b: Tensor | None


def _weight(lin: nn.Module) -> tuple[Tensor, Tensor | None]:
    b = getattr(lin, "bias", None)
    return lin.weight.detach(), None if b is None else b.detach()


def _fuse(ws: list[Tensor], bs: list[Tensor | None]) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
    w = torch.cat(ws, dim=0)
    if all(b is None for b in bs):
        return (w,), (None,)
    full = [b if b is not None else w.new_zeros(wi.shape[0]) for b, wi in zip(bs, ws, strict=True)]
    return (w,), (torch.cat(full, dim=0),)


class DecoderStack:
    """The decoder of ``adapter`` as tensors: per-layer weights, embeddings, final norm, LM head.

    Weights are the modules' own tensors (detached views, no copy) except with ``fuse=True``,
    which concatenates q/k/v and gate/up into one matrix each (one GEMM instead of three/two:
    fewer launches and better bandwidth at batch 1, at the cost of a copy of those weights).
    ``triton=True`` runs batch-1 projections through :func:`rdt_interp.fast.triton_ops.gemv`
    and decode attention through :func:`~rdt_interp.fast.triton_ops.decode_attention` (refused
    where they cannot run), ``False`` never, ``None`` where they can.
    """

    def __init__(self, adapter: ModelAdapter, *, fuse: bool, triton: bool | None = None) -> None:
        layers = adapter.layers
        if len(layers) == 0:
            raise ConfigError("the model has no decoder layers")
        attn0 = layers[0].self_attn
        cfg = getattr(attn0, "config", None)
        model_type = str(getattr(cfg, "model_type", type(adapter.model).__name__))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"the fast path supports {', '.join(SUPPORTED_MODEL_TYPES)} decoders, not {model_type!r}",
                fix=_EAGER_FIX,
            )
        for name in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                     "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            try:
                layers[0].get_submodule(name)
            except AttributeError:
                raise ConfigError(f"decoder layer of {model_type!r} has no {name}", fix=_EAGER_FIX) from None
        decoder = get_submodule(adapter.model, adapter.layers_path.rsplit(".", 1)[0])
        rotary = getattr(decoder, "rotary_emb", None)
        if rotary is None:
            raise ConfigError(f"no rotary_emb module next to the decoder layers of {model_type!r}", fix=_EAGER_FIX)
        rope_type = str(getattr(rotary, "rope_type", "default"))
        if rope_type not in STATIC_ROPE_TYPES:
            raise ConfigError(f"RoPE type {rope_type!r} depends on the sequence length; the fast path "
                              f"needs one of {STATIC_ROPE_TYPES}", fix=_EAGER_FIX)
        layer_types = list(getattr(cfg, "layer_types", None) or [])
        window = getattr(cfg, "sliding_window", None) if (
            "sliding_attention" in layer_types or (not layer_types and model_type == "mistral")) else None
        norm = adapter.final_norm
        self.rotary = rotary
        self.embedding = adapter.model.get_input_embeddings()
        self.norm_w = norm.weight.detach()
        head_w, head_b = _weight(adapter.lm_head)
        self.lm_w, self.lm_b = head_w, head_b
        usable = triton_ops.usable(head_w.device, head_w.dtype)
        if triton and not usable:
            raise ConfigError("the Triton GEMV needs a Hopper GPU, bf16/fp16 weights and Triton",
                              fix="leave triton_kernels unset")
        use_triton = usable if triton is None else bool(triton)
        n_heads = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
        head_dim = int(getattr(attn0, "head_dim", adapter.d_model // n_heads))
        self.spec = StackSpec(
            model_type=model_type, n_layers=len(layers), d_model=adapter.d_model, n_heads=n_heads,
            n_kv_heads=n_kv, head_dim=head_dim, intermediate_size=int(layers[0].mlp.gate_proj.out_features),
            eps=float(_eps(layers[0].input_layernorm)), final_eps=float(_eps(norm)),
            scaling=float(getattr(attn0, "scaling", head_dim ** -0.5)), vocab_size=int(head_w.shape[0]),
            fused=fuse, act=layers[0].mlp.act_fn, sliding_window=int(window) if window else None,
            triton_gemv=use_triton, triton_attention=use_triton and triton_ops.attention_applies(head_dim),
        )
        self.layers: list[LayerWeights] = []
        with torch.no_grad():
            for layer in layers:
                at, mlp = layer.self_attn, layer.mlp
                qkv = [_weight(at.q_proj), _weight(at.k_proj), _weight(at.v_proj)]
                gu = [_weight(mlp.gate_proj), _weight(mlp.up_proj)]
                if fuse:
                    qkv_w, qkv_b = _fuse([w for w, _ in qkv], [b for _, b in qkv])
                    gu_w, gu_b = _fuse([w for w, _ in gu], [b for _, b in gu])
                else:
                    qkv_w, qkv_b = tuple(w for w, _ in qkv), tuple(b for _, b in qkv)
                    gu_w, gu_b = tuple(w for w, _ in gu), tuple(b for _, b in gu)
                o_w, o_b = _weight(at.o_proj)
                d_w, d_b = _weight(mlp.down_proj)
                self.layers.append(LayerWeights(
                    layer.input_layernorm.weight.detach(), qkv_w, qkv_b, o_w, o_b,
                    layer.post_attention_layernorm.weight.detach(), gu_w, gu_b, d_w, d_b))

    @property
    def dtype(self) -> torch.dtype:
        return self.norm_w.dtype

    @property
    def device(self) -> torch.device:
        return self.norm_w.device

    def weight_bytes(self) -> int:
        """Bytes a forward pass reads: every layer, the final norm and the LM head (not the embedding)."""
        seen: set[int] = set()
        total = 0
        for t in [self.norm_w, self.lm_w, self.lm_b] + [x for lw in self.layers for x in _flat(lw)]:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    @torch.no_grad()
    def rope_tables(self, n: int) -> tuple[Float[Tensor, "n head_dim"], Float[Tensor, "n head_dim"]]:
        """``cos``/``sin`` for positions ``0..n-1``, computed by the model's own rotary module."""
        pos = torch.arange(n, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, pos)
        return cos[0].contiguous(), sin[0].contiguous()


def _eps(norm: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        if hasattr(norm, attr):
            return float(getattr(norm, attr))
    raise ConfigError(f"cannot read the epsilon of {type(norm).__name__}", fix=_EAGER_FIX)


def _flat(lw: LayerWeights) -> list[Any]:
    out: list[Any] = []
    for x in lw:
        out.extend(x if isinstance(x, tuple) else (x,))
    return out


# -- kernels (traced by torch.compile; keep them free of host syncs) ----------------------------


@no_type_check
def rms_norm(x, weight, eps: float):
    """transformers' Llama RMSNorm, op for op (float32 statistics, cast back, then the gain)."""
    dtype = x.dtype
    xf = x.to(torch.float32)
    var = xf.pow(2).mean(-1, keepdim=True)
    xf = xf * torch.rsqrt(var + eps)
    return weight * xf.to(dtype)


@no_type_check
def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@no_type_check
def apply_rope(q, k, cos, sin):
    """``cos``/``sin`` are ``[batch, seq, head_dim]``; ``q``/``k`` ``[batch, heads, seq, head_dim]``."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


@no_type_check
def apply_adds(h, adds):
    """Steering additions in order: a tensor broadcastable to ``h`` (decode: ``alpha * r``
    precomputed), or a ``(scale [batch, seq], vector [d])`` pair (prefill: positions by role)."""
    for a in adds:
        h = h + a if isinstance(a, Tensor) else h + a[0][:, :, None] * a[1]
    return h


@no_type_check
def _project_qkv(x, w, spec):
    b, s, _ = x.shape
    if len(w.qkv_w) == 1:
        qkv = triton_ops.linear(x, w.qkv_w[0], w.qkv_b[0], spec.triton_gemv)
        q, k, v = qkv.split([spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim,
                             spec.n_kv_heads * spec.head_dim], dim=-1)
    else:
        q, k, v = (triton_ops.linear(x, wi, bi, spec.triton_gemv) for wi, bi in zip(w.qkv_w, w.qkv_b, strict=True))
    q = q.reshape(b, s, spec.n_heads, spec.head_dim).transpose(1, 2)
    k = k.reshape(b, s, spec.n_kv_heads, spec.head_dim).transpose(1, 2)
    v = v.reshape(b, s, spec.n_kv_heads, spec.head_dim).transpose(1, 2)
    return q, k, v


@no_type_check
def _repeat_kv(x, n_rep: int):
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


@no_type_check
def _attn_out(q, k, v, mask, w, spec, *, decode: bool = False):
    b, _, s, _ = q.shape
    if decode and spec.triton_attention:  # one query per row over the cache; mask [b, 1, 1, C]
        o = triton_ops.decode_attention(q, k, v, mask[:, 0, 0], spec.scaling)
    else:
        o = F.scaled_dot_product_attention(q, _repeat_kv(k, spec.n_rep), _repeat_kv(v, spec.n_rep),
                                           attn_mask=mask, scale=spec.scaling)
    o = o.transpose(1, 2).reshape(b, s, spec.n_heads * spec.head_dim)
    return triton_ops.linear(o, w.o_w, w.o_b, spec.triton_gemv)


@no_type_check
def _mlp(x, w, spec):
    lin = triton_ops.linear
    if len(w.gu_w) == 1:
        gate, up = lin(x, w.gu_w[0], w.gu_b[0], spec.triton_gemv).split(spec.intermediate_size, dim=-1)
    else:
        gate = lin(x, w.gu_w[0], w.gu_b[0], spec.triton_gemv)
        up = lin(x, w.gu_w[1], w.gu_b[1], spec.triton_gemv)
    return lin(spec.act(gate) * up, w.down_w, w.down_b, spec.triton_gemv)


@no_type_check
def _finish(h, a, w, adds, spec):
    _, attn_adds, mlp_adds, post_adds = adds
    h = h + apply_adds(a, attn_adds)
    m = _mlp(rms_norm(h, w.ln2, spec.eps), w, spec)
    return apply_adds(h + apply_adds(m, mlp_adds), post_adds)


@no_type_check
def prefill_layer(h, w, k_cache, v_cache, cos, sin, mask, adds, *, spec):
    """One layer over a whole (left-padded) prompt of ``L`` positions; writes cache slots ``[0, L)``.

    ``mask`` is ``[batch, 1, L, L]`` (True = attend); ``adds`` are the steering additions at the
    layer's four sites in execution order (``resid_pre``, ``attn_out``, ``mlp_out``,
    ``resid_post``). They are applied inside this function so that a compiled layer fuses each
    addition into the kernel next to it (the one that reads the residual stream for the norm,
    or the residual add), rather than launching a kernel of its own.
    """
    h = apply_adds(h, adds[0])
    q, k, v = _project_qkv(rms_norm(h, w.ln1, spec.eps), w, spec)
    q, k = apply_rope(q, k, cos, sin)
    n = h.shape[1]
    k_cache[:, :, :n].copy_(k)
    v_cache[:, :, :n].copy_(v)
    return _finish(h, _attn_out(q, k, v, mask, w, spec), w, adds, spec)


@no_type_check
def decode_layer(h, w, k_cache, v_cache, cos, sin, mask, slot, adds, *, spec):
    """One layer for one new token per row: writes cache slot ``slot`` (a 1-element device
    tensor) and attends over the whole cache under ``mask`` (``[batch, 1, 1, cache_len]``);
    ``adds`` as in :func:`prefill_layer`."""
    h = apply_adds(h, adds[0])
    q, k, v = _project_qkv(rms_norm(h, w.ln1, spec.eps), w, spec)
    q, k = apply_rope(q, k, cos, sin)
    k_cache.index_copy_(2, slot, k)
    v_cache.index_copy_(2, slot, v)
    return _finish(h, _attn_out(q, k_cache, v_cache, mask, w, spec, decode=True), w, adds, spec)


@no_type_check
def head_logits(h_last, norm_w, lm_w, lm_b, *, eps: float, triton: bool = False):
    """Final norm and LM head on the last position: float32 logits ``[batch, vocab]``."""
    return triton_ops.linear(rms_norm(h_last, norm_w, eps), lm_w, lm_b, triton)[:, -1].float()


@no_type_check
def greedy(logits, allowed):
    """Argmax over the vocabulary, or over ``allowed`` token ids (first maximum wins, like eager)."""
    if allowed is None:
        return logits.argmax(dim=-1)
    return allowed[logits.index_select(1, allowed).argmax(dim=-1)]

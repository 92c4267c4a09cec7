"""Fixed-length greedy generation on a static KV cache, with decode steps replayed as CUDA graphs.

:class:`FastGenerator` produces the tokens :func:`rdt_interp.tracing.generation.generate` produces
(``stop_at_eos=False``, a fixed number of new tokens) for a Llama-family adapter, chat LM or
OpenVLA, with RDT / RDT+ (:class:`AddDirection` edits) applied inside the captured computation:

* one **prefill step** per (batch size, prompt bucket, steering layout): vision backbone and
  projector once (OpenVLA), embeddings, every layer over the left-padded prompt, the first token;
* one **decode step** per (batch size, steering layout): one token per row, the cache slot and
  positions are device tensors that the step itself advances, so the same graph is replayed
  ``n_tokens - 1`` times with no host work in between.

Every input of a step lives in a preallocated buffer that is overwritten before the replay. The
steering additions read :class:`~rdt_interp.fast.steering.SteeringBuffers`, so a new ``alpha``,
direction or per-row alpha is a buffer copy; only a new *layout* (other layers, sites or number
of edits) builds new steps. On CPU (or with ``cuda_graphs=False``) the very same step functions
run eagerly. See docs/fast_path.md.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor

from rdt_interp.errors import ConfigError
from rdt_interp.fast.decoder import (
    DecoderStack,
    greedy,
)
from rdt_interp.fast.inputs import PromptInputs
from rdt_interp.fast.kernels import Kernels, dynamo_limits, stream_ctx
from rdt_interp.fast.steering import SteeringBuffers, SteeringLayout
from rdt_interp.fast.vision import image_features_for
from rdt_interp.models.adapter import EncodedBatch, ModelAdapter
from rdt_interp.models.vla import ActionPrediction, VLAAdapter
from rdt_interp.roles import Role
from rdt_interp.tracing.generation import Generation
from rdt_interp.tracing.interventions import Site
from rdt_interp.tracing.runner import repeatable_decode_attention

CompileMode = Literal["auto", "none", "decode", "all"]


@dataclass
class FastStats:
    """What the generator did so far. ``steps_built`` counts step functions made for a new key
    (batch size, bucket, steering layout, options): a CUDA-graph capture each when graphs are on."""

    steps_built: int = 0
    graphs_captured: int = 0
    calls: int = 0
    warmup_seconds: float = 0.0  # eager runs before capture, torch.compile time included
    capture_seconds: float = 0.0
    compile_mode: str = "none"
    cuda_graphs: bool = False
    compile_error: str | None = None
    graph_error: str | None = None
    keys: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass
class _Step:
    fn: Callable[[], None]
    graph: Any = None  # torch.cuda.CUDAGraph

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


class FastGenerator:
    """Greedy generation of ``n_tokens`` per row near the memory-bandwidth floor.

    Args:
        adapter: a chat-model adapter or an OpenVLA adapter whose decoder is Llama-shaped.
        n_tokens: tokens per row (default: the VLA's ``action_dim``; required for chat models).
        max_batch: rows per call; larger batches run in chunks. Sizes the KV cache.
        max_prompt_len: longest prompt in decoder positions (OpenVLA: 256 patches + text).
        bucket: prompts are left-padded to a multiple of this (one prefill step per bucket).
        cuda_graphs: capture steps as CUDA graphs (default: on for CUDA models).
        compile: ``torch.compile`` the decode layer, LM head and prefill layer (``"all"``, the
            ``"auto"`` choice on CUDA), only the decode layer and head (``"decode"``), or nothing
            (``"none"``, the ``"auto"`` choice on CPU). A kernel whose compile fails runs eagerly.
        fuse_projections: one GEMM for q/k/v and one for gate/up (copies those weights;
            default on for CUDA).
        warmup: eager runs before a capture (the first one compiles).
        autotune: compile the decode layer and head with Inductor's max-autotune (it times its
            own matmul kernels against the library's for each shape; minutes of compile time).
        triton_kernels: run batch-1 projections and decode attention through the Triton kernels
            of :mod:`rdt_interp.fast.triton_ops` (default: where they apply, a Hopper GPU with
            16-bit weights; ``False`` keeps the library kernels).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        *,
        n_tokens: int | None = None,
        max_batch: int = 32,
        max_prompt_len: int | None = None,
        bucket: int = 16,
        cuda_graphs: bool | None = None,
        compile: CompileMode = "auto",
        fuse_projections: bool | None = None,
        warmup: int = 2,
        autotune: bool = False,
        triton_kernels: bool | None = None,
    ) -> None:
        self.adapter = adapter
        self.device = adapter.device
        self.dtype = adapter.dtype
        on_cuda = self.device.type == "cuda"
        if n_tokens is None:
            n_tokens = getattr(adapter, "action_dim", None)
            if n_tokens is None:
                raise ConfigError("n_tokens is required for a chat model", fix="pass n_tokens=...")
        if n_tokens < 1 or max_batch < 1 or bucket < 1:
            raise ConfigError("n_tokens, max_batch and bucket must be >= 1")
        if compile not in ("auto", "none", "decode", "all"):
            raise ConfigError(f"compile must be auto, none, decode or all, got {compile!r}")
        self.n_tokens = int(n_tokens)
        self.max_batch = int(max_batch)
        self.bucket = int(bucket)
        # a VLA: its prompt is text + image patches (OpenVLA, the testbed VLA)
        self.multimodal = isinstance(adapter, VLAAdapter)
        if self.multimodal and not getattr(adapter.model, "merged", True):
            raise ConfigError("the fast path reads the LLM's own embedding and head rows; this VLA "
                              "keeps its action rows apart until merged", fix="call model.merge_() first")
        self.n_patches = adapter.num_patches if self.multimodal else 0
        if max_prompt_len is None:
            max_prompt_len = self.n_patches + 64 if self.multimodal else 256
        self.max_prompt_len = _round_up(int(max_prompt_len), self.bucket)
        if self.max_prompt_len <= self.n_patches:
            raise ConfigError(f"max_prompt_len {max_prompt_len} leaves no room for text after "
                              f"{self.n_patches} image patches")
        self.cache_len = _round_up(self.max_prompt_len + self.n_tokens, 16)
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and not on_cuda:
            raise ConfigError("cuda_graphs=True needs a model on a CUDA device", fix="leave cuda_graphs unset")
        mode = ("all" if on_cuda else "none") if compile == "auto" else compile
        self.warmup = int(warmup)
        self.generated_role: Role = adapter.generated_role
        self.stack = DecoderStack(adapter, fuse=on_cuda if fuse_projections is None else bool(fuse_projections),
                                  triton=triton_kernels)
        spec = self.stack.spec
        window = spec.sliding_window
        if window is not None and self.cache_len > window:
            raise ConfigError(f"the cache ({self.cache_len} positions) is longer than the sliding window "
                              f"({window}); the fast path implements full attention only",
                              fix=f"use max_prompt_len <= {window - self.n_tokens} or the eager path")
        self.stats = FastStats(compile_mode=mode, cuda_graphs=self.cuda_graphs)
        if autotune and mode == "none":
            raise ConfigError("autotune needs a compiled decode step", fix="use compile='decode' or 'all'")
        self._kernels = Kernels(self.stack, compile_decode=mode in ("decode", "all"),
                                 compile_prefill=mode == "all", on_fail=self._compile_failed, autotune=autotune)
        # a VLA's vision towers and projector run with the prefill, compiled with it (Inductor fuses
        # their LayerNorms and GELUs: 3.99 -> 3.26 ms at batch 1 on an H200, decode_kernels.py)
        self._image_features = (image_features_for(adapter.model, compile=mode == "all", on_fail=self._compile_failed,
                                                   device=self.device) if self.multimodal else None)
        if autotune:
            self.stats.compile_mode += " (decode: max-autotune)"
        self._alloc()
        self._steps: dict[tuple[Any, ...], _Step] = {}
        self._steering: dict[Any, SteeringBuffers] = {}
        self._layouts: dict[tuple[int, ...], tuple[tuple[Any, ...], SteeringLayout]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._last: tuple[tuple[Any, ...], tuple[Any, ...]] | None = None

    # -- buffers -------------------------------------------------------------------------------
    @torch.no_grad()
    def _alloc(self) -> None:
        spec, dev, dt = self.stack.spec, self.device, self.dtype
        bm, pm, c = self.max_batch, self.max_prompt_len, self.cache_len
        kv_shape = (bm, spec.n_kv_heads, c, spec.head_dim)
        self.k_cache = [torch.zeros(kv_shape, dtype=dt, device=dev) for _ in range(spec.n_layers)]
        self.v_cache = [torch.zeros(kv_shape, dtype=dt, device=dev) for _ in range(spec.n_layers)]
        self.cos, self.sin = self.stack.rope_tables(c)
        long = partial(torch.zeros, dtype=torch.long, device=dev)
        self.inputs = PromptInputs(self.adapter, max_batch=bm, max_len=pm, n_patches=self.n_patches,
                                   multimodal=self.multimodal, dtype=dt, device=dev)
        # decode state: advanced by the decode step itself
        self.tok = long(bm, 1)
        self.pos_dec = long(bm, 1)
        self.slot = long(1)
        self.t = long(1)
        self.key_valid = torch.zeros(bm, c, dtype=torch.bool, device=dev)
        self.out_tokens = long(bm, self.n_tokens)
        self.out_logits: Tensor | None = None
        self._allowed: dict[int, Tensor] = {}

    def _layout(self, ivs: list[Any]) -> SteeringLayout:
        """The layout of ``ivs``, remembered for the last few lists of the same intervention
        objects (they are frozen values: the same objects give the same layout)."""
        key = tuple(id(iv) for iv in ivs)
        hit = self._layouts.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], ivs, strict=True)):
            return hit[1]
        layout = SteeringLayout.of(ivs, n_layers=self.stack.spec.n_layers, d_model=self.stack.spec.d_model,
                                   generated_role=self.generated_role)
        if len(self._layouts) >= 16:
            self._layouts.pop(next(iter(self._layouts)))
        self._layouts[key] = (tuple(ivs), layout)  # holding the objects keeps their ids unique
        return layout

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    # -- public API ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        batch: EncodedBatch,
        *,
        interventions: Sequence[Any] = (),
        return_logits: bool = False,
        allowed_token_ids: Tensor | None = None,
    ) -> Generation:
        """Greedy ``n_tokens`` per row of a left-padded batch (as ``generate(...,
        stop_at_eos=False)``), with ``interventions`` (``AddDirection`` only) applied."""
        if batch.padding_side != "left":
            raise ConfigError("generation needs a left-padded batch",
                              fix="encode with padding_side='left' (the default)")
        self.adapter.check_batch(batch)
        ivs = list(interventions)
        layout = self._layout(ivs)
        allowed = self.adapter.allowed_token_ids() if allowed_token_ids is None else allowed_token_ids
        n = len(batch)
        if n <= self.max_batch:
            return self._generate(batch, ivs, layout, return_logits, allowed)
        parts = [self._generate(_rows(batch, i, min(i + self.max_batch, n)), _row_ivs(ivs, i, min(i + self.max_batch, n)),
                                layout, return_logits, allowed)
                 for i in range(0, n, self.max_batch)]
        return Generation(
            tokens=torch.cat([p.tokens for p in parts]),
            finished=torch.cat([p.finished for p in parts]),
            logits=torch.cat([p.logits for p in parts]) if return_logits else None,
        )

    def predict_actions(
        self,
        requests: Sequence[Any],
        *,
        unnorm_key: str | None = None,
        interventions: Sequence[Any] = (),
        return_logits: bool = False,
    ) -> ActionPrediction:
        """:meth:`VLAAdapter.predict_actions` on the fast path (same tokens, same decoding)."""
        ad = self.adapter
        if not isinstance(ad, VLAAdapter):
            raise ConfigError(f"{ad.name} is not a VLA adapter", fix="use generate() for chat models")
        if self.n_tokens != ad.action_dim:
            raise ConfigError(f"this generator emits {self.n_tokens} tokens, the VLA needs {ad.action_dim}")
        gen = self.generate(ad.encode(requests, padding_side="left"), interventions=interventions,
                            return_logits=return_logits)
        return ad.decode_actions(gen.tokens, gen.logits, unnorm_key=unnorm_key)

    @torch.no_grad()
    def step_times(
        self, batch: EncodedBatch, *, interventions: Sequence[Any] = (), repeats: int = 10
    ) -> dict[str, float]:
        """Median seconds of the prefill step and of one decode step for ``batch`` (CUDA events on
        a GPU), to see which phase is far from its floor. Runs ``generate`` once first."""
        if len(batch) > self.max_batch:
            raise ConfigError("step_times takes one chunk", fix=f"pass at most {self.max_batch} rows")
        self.generate(batch, interventions=interventions)
        prefill, decode = (self._steps[k] for k in self._last)
        cuda = self.device.type == "cuda"
        pre: list[float] = []
        dec: list[float] = []
        for _ in range(max(1, repeats)):
            if cuda:
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                ev[0].record()
                prefill()
                ev[1].record()
                for _ in range(self.n_tokens - 1):
                    decode()
                ev[2].record()
                ev[2].synchronize()
                pre.append(ev[0].elapsed_time(ev[1]) / 1e3)
                dec.append(ev[1].elapsed_time(ev[2]) / 1e3 / max(1, self.n_tokens - 1))
            else:
                t0 = time.perf_counter()
                prefill()
                t1 = time.perf_counter()
                for _ in range(self.n_tokens - 1):
                    decode()
                pre.append(t1 - t0)
                dec.append((time.perf_counter() - t1) / max(1, self.n_tokens - 1))
        return {"prefill_s": statistics.median(pre), "decode_step_s": statistics.median(dec)}

    def describe(self) -> dict[str, Any]:
        s = self.stats
        return {
            "n_tokens": self.n_tokens, "max_batch": self.max_batch, "max_prompt_len": self.max_prompt_len,
            "cache_len": self.cache_len, "bucket": self.bucket, "cuda_graphs": self.cuda_graphs,
            "compile_mode": s.compile_mode, "fused_projections": self.stack.spec.fused,
            "triton_gemv": self.stack.spec.triton_gemv, "triton_attention": self.stack.spec.triton_attention,
            "steps_built": s.steps_built, "graphs_captured": s.graphs_captured,
            "warmup_seconds": s.warmup_seconds, "capture_seconds": s.capture_seconds,
            "compile_error": s.compile_error, "graph_error": s.graph_error,
            "kv_cache_bytes": self.cache_bytes(),
        }

    # -- one chunk -----------------------------------------------------------------------------
    def _generate(
        self, batch: EncodedBatch, ivs: list[Any], layout: SteeringLayout, return_logits: bool,
        allowed: Tensor | None,
    ) -> Generation:
        b, s = len(batch), batch.seq_len
        if s > self.max_prompt_len:
            raise ConfigError(f"prompt of {s} decoder positions exceeds max_prompt_len={self.max_prompt_len}",
                              fix=f"build the FastGenerator with max_prompt_len >= {s}")
        length = min(_round_up(s, self.bucket), self.max_prompt_len)
        pad = length - s
        self.inputs.stage(batch, b, length, pad)
        steer = self._steering.get(layout.key)
        if steer is None:
            steer = SteeringBuffers(layout, max_batch=self.max_batch, max_len=self.max_prompt_len,
                                    d_model=self.stack.spec.d_model, dtype=self.dtype, device=self.device)
            self._steering[layout.key] = steer
        if layout.prefill:
            self.inputs.stage_roles(batch.roles, b, length, pad)
        if layout.decode or layout.prefill:
            steer.fill(ivs, b, layout)
        n_allowed = None
        if allowed is not None:
            allowed = allowed.to(device=self.device, dtype=torch.long).reshape(-1)
            n_allowed = int(allowed.numel())
            if n_allowed not in self._allowed:
                self._allowed[n_allowed] = torch.zeros(n_allowed, dtype=torch.long, device=self.device)
            self._allowed[n_allowed].copy_(allowed)
        if return_logits and self.out_logits is None:
            self.out_logits = torch.zeros(self.max_batch, self.n_tokens, self.stack.spec.vocab_size,
                                          dtype=torch.float32, device=self.device)
        opts = (return_logits, n_allowed)
        pkey = ("prefill", b, length, layout.key, opts)
        dkey = ("decode", b, layout.key, opts)
        self._ensure(pkey, dkey, steer, b, length, opts)
        prefill, decode = self._steps[pkey], self._steps[dkey]
        eager_compiled = self._kernels.compiled and not self.cuda_graphs
        with dynamo_limits() if eager_compiled else contextlib.nullcontext():
            self._run_once(prefill, decode)
        self.stats.calls += 1
        self._last = (pkey, dkey)
        tokens = self.out_tokens[:b].clone()
        # copies: the buffers are overwritten by the next call (.cpu() alone would alias on CPU)
        logits = (self.out_logits[:b].to("cpu", copy=True)
                  if return_logits and self.out_logits is not None else None)
        return Generation(tokens=tokens, finished=torch.zeros(b, dtype=torch.bool, device=self.device),
                          logits=logits)

    # -- steps ---------------------------------------------------------------------------------
    def _site_lists(self, sites: dict[tuple[int, Site], list[Any]]) -> list[tuple[tuple, tuple, tuple, tuple]]:
        return [tuple(tuple(sites.get((layer, s), ())) for s in Site) for layer in range(self.stack.spec.n_layers)]

    def _make_prefill(self, b: int, length: int, steer: SteeringBuffers, opts: tuple) -> Callable[[], None]:
        return_logits, n_allowed = opts
        inputs = self.inputs
        roles = inputs.roles[:b, :length]
        embed = inputs.embed(self.stack.embedding, b, length, self._image_features)
        kc = [k[:b] for k in self.k_cache]
        vc = [v[:b] for v in self.v_cache]
        pos = inputs.positions[:b, :length]
        valid = inputs.valid[:b, :length]
        key_valid = self.key_valid[:b]
        causal, eye = inputs.causal[:length, :length], inputs.eye[:length, :length]
        allowed = self._allowed[n_allowed] if n_allowed is not None else None
        stack, out_tokens = self.stack, self.out_tokens[:b]
        out_logits = self.out_logits[:b] if return_logits and self.out_logits is not None else None

        def step() -> None:
            kern = self._kernels
            h = embed()
            key_valid[:, :length].copy_(valid)
            key_valid[:, length:].fill_(False)
            mask = ((causal[None] & valid[:, None, :]) | eye[None])[:, None]
            cos, sin = self.cos[pos], self.sin[pos]
            per_layer = self._site_lists(steer.compute(b, roles))  # on the device: part of the step
            for layer, w in enumerate(stack.layers):
                h = kern.prefill_layer(h, w, kc[layer], vc[layer], cos, sin, mask, per_layer[layer])
            # a copy with the decode step's strides (.contiguous() keeps a [1, 1, d] view's), so
            # the compiled head has one variant per batch size, not one per bucket
            last = h[:, -1:].clone(memory_format=torch.contiguous_format)
            logits = kern.head(last, stack.norm_w, stack.lm_w, stack.lm_b)
            nxt = greedy(logits, allowed)
            out_tokens[:, 0].copy_(nxt)
            if out_logits is not None:
                out_logits[:, 0].copy_(logits)
            self.tok[:b, 0].copy_(nxt)
            self.pos_dec[:b].copy_(pos[:, -1:] + 1)
            self.slot.fill_(length)
            self.t.fill_(1)

        return step

    def _make_decode(self, b: int, steer: SteeringBuffers, opts: tuple) -> Callable[[], None]:
        return_logits, n_allowed = opts
        per_layer = self._site_lists(steer.decode_sites(b))
        kc = [k[:b] for k in self.k_cache]
        vc = [v[:b] for v in self.v_cache]
        tok, pos, key_valid = self.tok[:b], self.pos_dec[:b], self.key_valid[:b]
        slot, t = self.slot, self.t
        allowed = self._allowed[n_allowed] if n_allowed is not None else None
        stack, out_tokens = self.stack, self.out_tokens[:b]
        out_logits = self.out_logits[:b] if return_logits and self.out_logits is not None else None
        emb = stack.embedding

        def step() -> None:
            kern = self._kernels
            h = emb(tok)
            cos, sin = self.cos[pos], self.sin[pos]
            key_valid.index_fill_(1, slot, True)
            mask = key_valid[:, None, None, :]
            # where SDPA runs (no Triton attention), its backend is chosen when the step is compiled
            # or captured: keep cuDNN's unrepeatable one-query kernel out (tracing.runner)
            with repeatable_decode_attention(self.device):
                for layer, w in enumerate(stack.layers):
                    h = kern.decode_layer(h, w, kc[layer], vc[layer], cos, sin, mask, slot, per_layer[layer])
            logits = kern.head(h, stack.norm_w, stack.lm_w, stack.lm_b)
            nxt = greedy(logits, allowed)
            out_tokens.index_copy_(1, t, nxt[:, None])
            if out_logits is not None:
                out_logits.index_copy_(1, t, logits[:, None])
            tok.copy_(nxt[:, None])
            pos.add_(1)
            slot.add_(1)
            t.add_(1)

        return step

    def _ensure(self, pkey: tuple, dkey: tuple, steer: SteeringBuffers, b: int, length: int, opts: tuple) -> None:
        missing = [k for k in (pkey, dkey) if k not in self._steps]
        if not missing:
            return
        fns = {pkey: self._make_prefill(b, length, steer, opts), dkey: self._make_decode(b, steer, opts)}
        if self.cuda_graphs or self._kernels.compiled:
            t0 = time.perf_counter()
            self._warm(fns[pkey], fns[dkey])
            self.stats.warmup_seconds += time.perf_counter() - t0
        for key in missing:
            graph = self._capture(fns[key]) if self.cuda_graphs else None
            self._steps[key] = _Step(fns[key], graph)
            self.stats.steps_built += 1
            self.stats.keys.append(key)

    def _run_once(self, prefill: Callable[[], None], decode: Callable[[], None]) -> None:
        prefill()
        for _ in range(self.n_tokens - 1):
            decode()

    def _warm(self, prefill: Callable[[], None], decode: Callable[[], None]) -> None:
        """Eager runs on a side stream (what CUDA-graph capture needs; compiles on the first)."""
        with stream_ctx(self.device) as stream, dynamo_limits():
            for _ in range(max(1, self.warmup)):
                self._run_once(prefill, decode)
            if stream is not None:
                stream.synchronize()

    def _compile_failed(self, name: str, exc: Exception) -> None:
        if self.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize(self.device)
        msg = f"{name}: {type(exc).__name__}: {exc}".splitlines()[0][:400]
        self.stats.compile_error = msg if self.stats.compile_error is None else f"{self.stats.compile_error}; {msg}"
        self.stats.compile_mode += f" ({name} eager: compile failed)"
        warnings.warn(f"torch.compile failed, the fast path runs the {msg} eagerly", RuntimeWarning, stacklevel=2)

    def _capture(self, fn: Callable[[], None]) -> Any:
        t0 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        try:
            with dynamo_limits(), torch.cuda.graph(graph, pool=self._pool):
                fn()
        except Exception as exc:  # noqa: BLE001 - fall back to eager steps rather than fail
            torch.cuda.synchronize(self.device)
            self.stats.graph_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            warnings.warn(f"CUDA graph capture failed, steps run eagerly: {self.stats.graph_error}",
                          RuntimeWarning, stacklevel=3)
            self.cuda_graphs = False
            self.stats.cuda_graphs = False
            for step in self._steps.values():
                step.graph = None
            return None
        torch.cuda.synchronize(self.device)
        self.stats.graphs_captured += 1
        self.stats.capture_seconds += time.perf_counter() - t0
        return graph


def _rows(batch: EncodedBatch, a: int, b: int) -> EncodedBatch:
    return replace(
        batch,
        inputs={k: v[a:b] if isinstance(v, Tensor) and v.ndim and v.shape[0] == len(batch) else v
                for k, v in batch.inputs.items()},
        roles=batch.roles[a:b], attention_mask=batch.attention_mask[a:b], position_ids=batch.position_ids[a:b],
        texts=batch.texts[a:b],
    )


def _row_ivs(ivs: list[Any], a: int, b: int) -> list[Any]:
    """Interventions for rows ``a:b`` (per-row alphas sliced)."""
    out = []
    for iv in ivs:
        alpha = getattr(iv, "alpha", None)
        out.append(replace(iv, alpha=alpha[a:b]) if isinstance(alpha, Tensor) and alpha.ndim == 1 else iv)
    return out

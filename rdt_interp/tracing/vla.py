"""VLA tracing: residuals by role and phase, RDT/RDT+ target modes, per-row directions, and
decoding from a stored prefill.

**Roles.** A VLA's decoder sees ``[pads] BOS [image patches] prompt text`` in the prefill, then
one action token per decode step (with a KV cache a decode step has a single position). The
roles captured by :func:`capture_roles`::

    image          mean over the image patches                       prefill
    text           mean over the prompt's text tokens, BOS excluded   prefill
    last_text      the last prompt token (it predicts action token 0) prefill
    first_action   = action[0]: the residual at action token 0        decode step 1
    action[k]      the residual at action token k (k <= action_dim-2) decode step k+1

(the last action token is never fed back, so it has no residual). Any other string is a
:class:`~rdt_interp.roles.Selector` read in the prefill (``post_instruction[-1]``,
``mean(instruction)``); it must give one position per row or pool.

**Target modes** (:func:`steer_vla`): ``action`` = RDT (``alpha·r`` at action positions in
decode steps), ``text+action`` = RDT+ (plus ``alpha_text·r`` at text, optionally image,
positions in the prefill), ``text`` (prefill only) and ``all`` (every real position, both
phases). ``alpha`` may be one number per batch row; :class:`AddRowDirections` adds one
*direction* per row (several directions in one batch).

**Prefill reuse** (:func:`run_prefill`, :func:`decode_from`): an edit confined to decode steps
does not change the prefill, so the prompt can run once and its KV cache serve any number of
decodes (one per direction, rows repeated), which is what makes a random-direction null of RDT
affordable.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from rdt_interp.errors import ConfigError, UnknownNameError
from rdt_interp.models.adapter import EncodedBatch, to_device
from rdt_interp.models.vla import ActionPrediction, VLAAdapter, VLARequest
from rdt_interp.roles import Role, Selector, role_mask
from rdt_interp.tracing.capture import Activations
from rdt_interp.tracing.generation import (
    Backend,
    Generation,
    generate,
    greedy_token,
    make_runner,
)
from rdt_interp.tracing.interventions import (
    TARGET_MODES,
    AddRowDirections,
    Intervention,
    Site,
    StepContext,
    TargetMode,
    check_mode,
    steer,
)
from rdt_interp.tracing.recorder import Recorder

DEFAULT_ROLES: tuple[str, ...] = ("image", "text", "last_text", "first_action")
_ACTION_RE = re.compile(r"^action\[(\d+)\]$")


# -- roles -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoleSpec:
    """One role to capture: its name, its phase and (decode) action index or (prefill) selector."""

    name: str
    phase: Literal["prefill", "decode"]
    action_index: int | None = None
    selector: Selector | None = None

    @classmethod
    def parse(cls, spec: str | RoleSpec) -> RoleSpec:
        if isinstance(spec, RoleSpec):
            return spec
        s = spec.strip().lower()
        key = re.sub(r"[\s-]+", "_", s)
        if key == "image":
            return cls("image", "prefill", selector=Selector.parse("mean(image)"))
        if key == "text":
            return cls("text", "prefill")  # TEXT without BOS, pooled: see _prefill_weights
        if key == "last_text":
            return cls("last_text", "prefill", selector=Selector.parse("last(text)"))
        if key == "first_action":
            return cls("first_action", "decode", 0)
        m = _ACTION_RE.match(key)
        if m:
            return cls(f"action[{int(m.group(1))}]", "decode", int(m.group(1)))
        try:
            sel = Selector.parse(s)
        except (ConfigError, UnknownNameError):
            raise ConfigError(
                f"unknown role {spec!r}",
                fix="use image, text, last_text, first_action, action[k] or a prefill selector "
                "such as post_instruction[-1]",
            ) from None
        if sel.pool != "mean" and sel.n_positions != 1:
            raise ConfigError(f"role {spec!r} selects several positions per row",
                              fix="pick one position (e.g. instruction[-1]) or pool (mean(instruction))")
        return cls(str(sel), "prefill", selector=sel)


def parse_roles(roles: Sequence[str | RoleSpec]) -> tuple[RoleSpec, ...]:
    specs = tuple(RoleSpec.parse(r) for r in roles)
    if not specs:
        raise ConfigError("capture_roles needs at least one role")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"roles repeat: {names}")
    return specs


def _prefill_weights(specs: Sequence[RoleSpec], roles: Int[Tensor, "batch seq"]) -> Float[Tensor, "r batch seq"]:
    """Per prefill role, weights over positions that sum to 1 per row (mean or one-hot)."""
    out = torch.zeros((len(specs), *roles.shape), dtype=torch.float32, device=roles.device)
    for i, spec in enumerate(specs):
        if spec.selector is None:  # "text": prompt text without BOS
            m = role_mask(roles, Role.TEXT) & ~role_mask(roles, Role.BOS)
            counts = m.sum(dim=1)
            if bool((counts == 0).any()):
                raise ConfigError("role 'text': a row has no text token besides BOS")
            out[i] = m.float() / counts[:, None].float()
        else:
            idx, w = spec.selector.resolve(roles)
            if spec.selector.pool == "mean":
                out[i].scatter_add_(1, idx, w)
            else:
                out[i].scatter_(1, idx, 1.0)
    return out


class RoleRecorder(Recorder):
    """Records residuals at ``layers`` for each role, in the prefill and in decode steps.

    A :class:`~rdt_interp.tracing.Recorder` for both runners. Decode step ``s``
    (``StepContext.step``) feeds action token ``s - 1``; its single position must carry the
    ``ACTION`` role.
    """

    def __init__(self, roles: Sequence[str | RoleSpec], layers: Sequence[int],
                 site: Site | str = Site.RESID_PRE, device: torch.device | str = "cpu") -> None:
        self.specs = parse_roles(roles)
        self.layers = tuple(int(x) for x in layers)
        self.site = Site.parse(site)
        self.device = device
        self.selector = None
        self.phases = tuple(dict.fromkeys(s.phase for s in self.specs))
        self.prefill, self.decode = {}, {}
        self.prefill_specs = tuple(s for s in self.specs if s.phase == "prefill")
        self.decode_index = {s.action_index: s.name for s in self.specs if s.phase == "decode"}
        self.values: dict[str, dict[int, Tensor]] = {s.name: {} for s in self.specs}
        self._weights: tuple[Tensor, Tensor] | None = None

    @property
    def max_action_index(self) -> int | None:
        return max(self.decode_index) if self.decode_index else None

    def sites(self) -> list[tuple[int, Site]]:
        return [(layer, self.site) for layer in self.layers]

    def wants(self, ctx: StepContext) -> bool:
        if ctx.phase == "prefill":
            return bool(self.prefill_specs)
        return (ctx.step - 1) in self.decode_index

    def record(self, h: Float[Tensor, "batch seq d"], layer: int, ctx: StepContext) -> None:
        if ctx.phase == "prefill":
            if self._weights is None or self._weights[0] is not ctx.roles:
                # weights from the host roles, copied without blocking the host
                self._weights = (ctx.roles, to_device(_prefill_weights(self.prefill_specs, ctx.roles), h.device))
            pooled = torch.einsum("rbs,bsd->rbd", self._weights[1].to(h.device), h.float())
            for spec, v in zip(self.prefill_specs, pooled, strict=True):
                self.values[spec.name][layer] = v.detach().to(self.device)
            return
        last = ctx.roles[:, -1]
        if not bool(((last & int(Role.ACTION)) != 0).all()):
            raise ConfigError("a decode step's position does not carry the ACTION role",
                              fix="action roles need a VLAAdapter (generated_role = Role.ACTION)")
        name = self.decode_index[ctx.step - 1]
        self.values[name][layer] = h[:, -1].detach().to(self.device, torch.float32)

    def reset(self) -> None:
        for v in self.values.values():
            v.clear()
        self._weights = None

    def prefill_tensor(self) -> Tensor:
        raise ConfigError("a RoleRecorder holds roles: use .tensors()")

    def decode_tensor(self) -> Tensor:
        raise ConfigError("a RoleRecorder holds roles: use .tensors()")

    def tensors(self) -> dict[str, Float[Tensor, "batch layer d"]]:
        out = {}
        for spec in self.specs:
            got = self.values[spec.name]
            if len(got) != len(self.layers):
                raise ConfigError(f"role {spec.name!r} was not reached (decoding stopped early?)")
            out[spec.name] = torch.stack([got[layer] for layer in self.layers], dim=1)
        return out


@dataclass(frozen=True, eq=False)
class RoleActivations:
    """Residuals per role, each an :class:`Activations` ``[n, layer, 1, d_model]`` on the same
    layer axis, plus the action tokens generated while capturing (``[n, steps]``)."""

    acts: Mapping[str, Activations]
    action_ids: Int[Tensor, "n steps"]
    texts: tuple[str, ...] = ()
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.acts:
            raise ConfigError("RoleActivations needs at least one role")
        first = next(iter(self.acts.values()))
        for name, a in self.acts.items():
            if a.layers != first.layers or a.values.shape[0] != first.values.shape[0]:
                raise ConfigError(f"role {name!r} has other layers or rows than {first.selector!r}")

    def __len__(self) -> int:
        return len(next(iter(self.acts.values())))

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.acts)

    @property
    def layers(self) -> tuple[int, ...]:
        return next(iter(self.acts.values())).layers

    @property
    def d_model(self) -> int:
        return next(iter(self.acts.values())).d_model

    def at(self, role: str) -> Activations:
        name = RoleSpec.parse(role).name
        if name not in self.acts:
            raise ConfigError(f"role {role!r} was not captured (have {list(self.acts)})")
        return self.acts[name]

    def grid(self, roles: Sequence[str] | None = None) -> Float[Tensor, "n layer role d_model"]:
        names = self.roles if roles is None else tuple(RoleSpec.parse(r).name for r in roles)
        return torch.cat([self.at(r).values for r in names], dim=2)

    def select(self, rows: Int[Tensor, "k"] | Sequence[int]) -> RoleActivations:
        idx = torch.as_tensor(rows, dtype=torch.long)
        acts = {k: Activations(a.values[idx], a.layers, a.site, a.selector,
                               [a.texts[i] for i in idx.tolist()] if a.texts else [], a.model)
                for k, a in self.acts.items()}
        texts = tuple(self.texts[i] for i in idx.tolist()) if self.texts else ()
        return RoleActivations(acts, self.action_ids[idx], texts, self.model)

    def role_names(self, roles: Sequence[str | RoleSpec] | None = None) -> tuple[str, ...]:
        """Names of ``roles`` (role specs or names; ``None``: every captured role)."""
        return self.roles if roles is None else tuple(RoleSpec.parse(r).name for r in roles)

    def labeled(self, y: Any, *, split: str, roles: Sequence[str] | None = None) -> Any:
        """A :class:`~rdt_interp.analysis.probes.Labeled` grid (positions = role names).

        The convenience form of :meth:`Labeled.from_roles <rdt_interp.analysis.probes.Labeled.from_roles>`.
        """
        # Lazy on purpose: Labeled is in rdt_interp.analysis, the layer above tracing. This one
        # upward import is listed (and only it) in the layers contract (.importlinter).
        from rdt_interp.analysis.probes import Labeled

        return Labeled.from_roles(self, y, split=split, roles=roles)


def _check_vla(adapter: Any) -> VLAAdapter:
    if not isinstance(adapter, VLAAdapter):
        raise ConfigError(f"{type(adapter).__name__} is not a VLAAdapter",
                          fix="action roles and steering modes need a VLA adapter")
    return adapter


def predict_actions(
    adapter: VLAAdapter,
    requests: Sequence[VLARequest],
    *,
    unnorm_key: str | None = None,
    interventions: Sequence[Any] = (),
    backend: Backend = "hooks",
    recorders: Sequence[Any] = (),
    return_logits: bool = False,
) -> ActionPrediction:
    """Greedy action prediction for a batch (every row gets what it gets alone): ``action_dim``
    tokens generated under ``interventions``, decoded by :meth:`VLAAdapter.decode_actions`."""
    batch = adapter.encode(requests, padding_side="left")
    gen = generate(adapter, batch, max_new_tokens=adapter.action_dim, interventions=interventions,
                   recorders=recorders, backend=backend, stop_at_eos=False, return_logits=return_logits)
    return adapter.decode_actions(gen.tokens, gen.logits, unnorm_key=unnorm_key)


def action_token_ids(adapter: VLAAdapter, constrain: bool) -> Tensor | None:
    """The ids greedy decoding may choose: the action tokens when ``constrain``, else the
    adapter's own rule (``None``: the whole vocabulary)."""
    return adapter.action_tokenizer.token_ids if constrain else adapter.allowed_token_ids()


def capture_roles(
    adapter: VLAAdapter,
    requests: Sequence[Any],
    *,
    roles: Sequence[str | RoleSpec] = DEFAULT_ROLES,
    layers: Sequence[int] | None = None,
    site: Site | str = Site.RESID_PRE,
    batch_size: int = 16,
    backend: Backend = "hooks",
    interventions: Sequence[Intervention] = (),
    constrain_actions: bool = True,
    progress: bool = False,
) -> RoleActivations:
    """Residuals of ``requests`` at each role (prefill roles pooled, action roles from decode
    steps), batched, in the caller's order. Decoding is greedy (over action tokens when
    ``constrain_actions``) and runs only as far as the last action role asked for;
    ``interventions`` apply while capturing."""
    adapter = _check_vla(adapter)
    specs = parse_roles(roles)
    layer_list = tuple(range(adapter.n_layers)) if layers is None else tuple(int(x) for x in layers)
    bad = [x for x in layer_list if not 0 <= x < adapter.n_layers]
    if not layer_list or bad:
        raise ConfigError(f"layers {list(layer_list)} must be a non-empty subset of 0..{adapter.n_layers - 1}")
    if batch_size < 1:
        raise ConfigError("batch_size must be >= 1")
    if not requests:
        raise ConfigError("capture_roles needs at least one request")
    rec = RoleRecorder(specs, layer_list, site)
    top = rec.max_action_index
    if top is not None and top > adapter.action_dim - 2:
        raise ConfigError(
            f"action[{top}] is never fed back: a {adapter.action_dim}-token action has residuals "
            f"at action[0..{adapter.action_dim - 2}]", fix=f"ask for action[k] with k <= {adapter.action_dim - 2}")
    n_new = 1 if top is None else top + 2
    allowed = action_token_ids(adapter, constrain_actions)
    texts = [getattr(r, "instruction", str(r)) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: (len(texts[i]), i))
    parts: dict[int, dict[str, Tensor]] = {}
    ids: dict[int, Tensor] = {}
    bar = tqdm(total=len(requests), desc="capture roles", disable=not progress, leave=False)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            rec.reset()
            batch = adapter.encode([requests[i] for i in chunk], padding_side="left")
            if top is None and not interventions:
                with make_runner(backend, adapter, (), [rec]) as runner:
                    runner.forward(adapter.prefill_kwargs(batch, use_cache=False),
                                   StepContext("prefill", batch.roles), need_output=False)
                tokens = torch.empty((len(chunk), 0), dtype=torch.long)
            else:
                gen = generate(adapter, batch, max_new_tokens=n_new, interventions=interventions,
                               recorders=[rec], backend=backend, allowed_token_ids=allowed,  # type: ignore[list-item]
                               stop_at_eos=False)
                tokens = gen.tokens.cpu()
            got = rec.tensors()
            for j, i in enumerate(chunk):
                parts[i] = {k: v[j] for k, v in got.items()}
                ids[i] = tokens[j]
            bar.update(len(chunk))
    bar.close()
    desc = adapter.describe()
    acts = {s.name: Activations(rearrange(torch.stack([parts[i][s.name] for i in range(len(requests))]),
                                          "n layer d -> n layer 1 d"),
                                layer_list, Site.parse(site).value, s.name, list(texts), desc)
            for s in specs}
    return RoleActivations(acts, torch.stack([ids[i] for i in range(len(requests))]), tuple(texts), desc)


# -- steering --------------------------------------------------------------------------------------
#: the target-mode construction lives in :mod:`rdt_interp.tracing.interventions` (one place)
steer_vla = steer


def mode_touches_prefill(mode: str) -> bool:
    """Whether a target mode edits the prefill (then a stored prefill cannot be reused)."""
    return check_mode(mode) != "action"


# -- prefill reuse ---------------------------------------------------------------------------------
@dataclass(eq=False)
class PrefillState:
    """A batch's prompt, run once: its KV cache and the logits of its last position."""

    batch: EncodedBatch
    cache: Any
    logits: Float[Tensor, "batch vocab"]

    def __len__(self) -> int:
        return len(self.batch)


@torch.inference_mode()
def run_prefill(
    adapter: VLAAdapter,
    batch: EncodedBatch,
    *,
    interventions: Sequence[Intervention] = (),
    recorders: Sequence[Any] = (),
    backend: Backend = "hooks",
) -> PrefillState:
    """Run the prompt of a left-padded ``batch`` once and keep its KV cache."""
    if batch.padding_side != "left":
        raise ConfigError("a prefill for decoding needs a left-padded batch",
                          fix="encode with padding_side='left' (the default)")
    adapter.check_batch(batch)
    with make_runner(backend, adapter, interventions, recorders) as runner:
        out = runner.forward(adapter.prefill_kwargs(batch, use_cache=True), StepContext("prefill", batch.roles))
    return PrefillState(batch, adapter.cache_of(out), adapter.logits_of(out)[:, -1].float())


def select_cache_rows(cache: Any, rows: Int[Tensor, "r"]) -> Any:
    """A new KV cache holding ``rows`` of ``cache`` (repeats allowed); ``cache`` is unchanged.

    Works for transformers caches made of per-layer ``keys``/``values`` tensors that decoding
    extends by concatenation (``DynamicCache``), so the copies never write into the original.
    """
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        raise ConfigError(f"cannot select rows of a {type(cache).__name__}",
                          fix="prefill reuse needs a transformers DynamicCache")
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in layers]
    for layer in new.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            idx = rows.to(layer.keys.device)
            layer.keys = layer.keys.index_select(0, idx)
            layer.values = layer.values.index_select(0, idx)
    return new


@torch.inference_mode()
def decode_from(
    adapter: VLAAdapter,
    state: PrefillState,
    *,
    max_new_tokens: int,
    rows: Int[Tensor, "r"] | None = None,
    interventions: Sequence[Intervention] = (),
    recorders: Sequence[Any] = (),
    backend: Backend = "hooks",
    allowed_token_ids: Tensor | None = None,
    return_logits: bool = False,
    logit_columns: Int[Tensor, "v"] | None = None,
) -> Generation:
    """Greedy decoding of ``max_new_tokens`` from a stored prefill, for ``rows`` of it.

    ``rows`` may repeat a prompt (one copy per direction, say); the stored cache is not
    changed, so it serves any number of calls. Token 0 comes from the prefill's logits (a
    decode-step edit cannot change it). The same as
    :func:`~rdt_interp.tracing.generation.generate` with the same decode-step edits.
    ``logit_columns`` keeps only those logit columns (e.g. the action tokens).
    """
    if max_new_tokens < 1:
        raise ConfigError("max_new_tokens must be >= 1")
    n_all = len(state)
    idx = torch.arange(n_all) if rows is None else rows.long().cpu()
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= n_all:
        raise ConfigError(f"rows must index the {n_all} prefilled prompts")
    device = state.logits.device
    dev_idx = idx.to(device)
    mask = state.batch.attention_mask.index_select(0, dev_idx)
    pos = state.batch.position_ids.index_select(0, dev_idx)[:, -1:]
    logits = state.logits.index_select(0, dev_idx)
    cache = select_cache_rows(state.cache, dev_idx) if max_new_tokens > 1 else None
    n = int(idx.numel())
    cols = None if logit_columns is None else logit_columns.to(device)
    step_roles = torch.full((n, 1), int(adapter.generated_role), dtype=torch.long)  # host side
    tokens: list[Tensor] = []
    kept: list[Tensor] = []
    with make_runner(backend, adapter, interventions, recorders) as runner:
        for step in range(max_new_tokens):
            if return_logits:
                kept.append((logits if cols is None else logits[:, cols]).cpu())
            nxt = greedy_token(logits, allowed_token_ids)
            tokens.append(nxt)
            if step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
            pos = pos + 1
            out = runner.forward(adapter.step_kwargs(nxt[:, None], cache, mask, pos),
                                 StepContext("decode", step_roles, step + 1))
            logits = adapter.logits_of(out)[:, -1].float()
            cache = adapter.cache_of(out)
    return Generation(tokens=torch.stack(tokens, dim=1), finished=torch.zeros(n, dtype=torch.bool),
                      logits=torch.stack(kept, dim=1) if return_logits else None)


def repeat_rows(n_prompts: int, n_directions: int) -> tuple[Int[Tensor, "r"], Int[Tensor, "r"]]:
    """Row ``i`` of a (prompt x direction) block: ``(prompt index, direction index)``,
    prompts outer (all directions of prompt 0 first)."""
    p = torch.arange(n_prompts).repeat_interleave(n_directions)
    d = torch.arange(n_directions).repeat(n_prompts)
    return p, d


def direction_chunks(n_prompts: int, n_directions: int, max_rows: int) -> list[slice]:
    """Slices of directions such that ``n_prompts * len(slice) <= max_rows`` (at least one)."""
    per = max(1, max_rows // max(n_prompts, 1))
    return [slice(i, min(i + per, n_directions)) for i in range(0, n_directions, per)]


__all__ = [
    "DEFAULT_ROLES", "TARGET_MODES", "AddRowDirections", "PrefillState", "RoleActivations",
    "RoleRecorder", "RoleSpec", "TargetMode", "action_token_ids", "capture_roles", "decode_from",
    "direction_chunks", "mode_touches_prefill", "parse_roles", "repeat_rows", "run_prefill",
    "select_cache_rows", "steer_vla",
]

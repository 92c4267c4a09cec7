"""``capture``: residual-stream activations at chosen layers and positions, batched and cached.

Prompts are sorted by length before batching (less padding), run through a runner that stops
right after the last layer asked for, and put back in the caller's order. Each batch is cached
on disk as safetensors, keyed by (model digest, the batch's prompts, layers, selector, site):
an interrupted capture resumes from the finished batches, and a corrupted file is detected by
its checksum and recomputed, never trusted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from rdt_interp.errors import ConfigError, IntegrityError
from rdt_interp.models.adapter import ModelAdapter
from rdt_interp.roles import Selector
from rdt_interp.storage import cache_dir, digest_strings, digest_tensor, load_tensors, save_tensors
from rdt_interp.tracing.generation import make_runner
from rdt_interp.tracing.interventions import Intervention, Site, StepContext
from rdt_interp.tracing.lens import capture_with_lens
from rdt_interp.tracing.recorder import Recorder

log = logging.getLogger(__name__)
CAPTURE_FORMAT = 1
Backend = Literal["nnsight", "hooks", "transformer_lens"]


@dataclass
class Activations:
    """Activations ``[n, layer, pos, d_model]`` with what they are (layers, site, selector)."""

    values: Float[Tensor, "n layer pos d_model"]
    layers: tuple[int, ...]
    site: str
    selector: str
    texts: list[str] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.values.ndim != 4 or self.values.shape[1] != len(self.layers):
            raise ConfigError(f"activations of shape {tuple(self.values.shape)} do not match "
                              f"{len(self.layers)} layers")

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.values.shape[-1])

    def at(self, layer: int) -> Float[Tensor, "n pos d_model"]:
        try:
            return self.values[:, self.layers.index(layer)]
        except ValueError:
            raise ConfigError(f"layer {layer} was not captured (have {list(self.layers)})") from None

    def single(self) -> Float[Tensor, "n layer d_model"]:
        """Drop the position axis of a one-position capture."""
        if self.values.shape[2] != 1:
            raise ConfigError(f"capture has {self.values.shape[2]} positions per prompt; pick one")
        return rearrange(self.values, "n layer 1 d -> n layer d")

    def save(self, path: str | os.PathLike[str]) -> None:
        save_tensors(path, {"values": self.values}, {
            "layers": list(self.layers), "site": self.site, "selector": self.selector,
            "texts": self.texts, "model": self.model,
        })

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Activations:
        tensors, meta = load_tensors(path)
        return cls(tensors["values"], tuple(meta["layers"]), meta["site"], meta["selector"],
                   meta.get("texts", []), meta.get("model", {}))


def _key(adapter: ModelAdapter, texts: Sequence[str], layers: Sequence[int], sel: str, site: str,
         extra: str) -> str:
    return digest_strings([f"capture-v{CAPTURE_FORMAT}", adapter.digest(), ",".join(map(str, layers)),
                           sel, site, extra, *texts])


def capture(
    adapter: ModelAdapter,
    prompts: Sequence[Any],
    *,
    layers: Sequence[int] | None = None,
    selector: str | Selector = "last",
    site: str | Site = Site.RESID_PRE,
    batch_size: int = 16,
    backend: Backend = "nnsight",
    interventions: Sequence[Intervention] = (),
    cache: bool | str | os.PathLike[str] = False,
    progress: bool = True,
    desc: str = "capture",
) -> Activations:
    """Residual activations ``[n, layer, pos, d_model]`` (float32, CPU) for ``prompts``.

    ``site`` is explicit: ``resid_pre`` is a decoder layer's input (= HF ``hidden_states[L]``),
    ``resid_post`` its output. ``prompts`` are whatever ``adapter.encode`` takes (instruction
    strings for a chat model, requests with images for a VLA). ``cache=True`` uses the user cache
    directory; a path uses that directory. ``interventions`` are applied during the capture
    (and are part of the cache key).

    Parameters
    ----------
    adapter
        The model (:class:`~rdt_interp.models.ChatModel`, a VLA adapter…).
    prompts
        What ``adapter.encode`` takes.
    layers
        Decoder layers to read (default: all).
    selector
        Which positions of every prompt: ``"last"``, a role such as ``"post_instruction"``, …
    site
        ``"resid_pre"`` (default) or ``"resid_post"``.
    backend
        ``"nnsight"`` or ``"hooks"`` (same values; hooks need no nnsight).

    Returns
    -------
    Activations
        ``values`` of shape ``[n, layer, pos, d_model]`` with the layers, site, selector, texts
        and the model's description.

    Examples
    --------
    >>> from rdt_interp.models import load_chat_model
    >>> chat = load_chat_model("tiny-llama", seed=0)
    >>> acts = capture(chat, ["How do I bake bread?", "hi"], layers=[0, 2], backend="hooks",
    ...                progress=False)
    >>> tuple(acts.values.shape), acts.layers, acts.site
    ((2, 2, 1, 64), (0, 2), 'resid_pre')
    """
    sel = Selector.parse(selector)
    site = Site.parse(site)
    layer_list = tuple(range(adapter.n_layers)) if layers is None else tuple(int(x) for x in layers)
    if not layer_list:
        raise ConfigError("capture needs at least one layer")
    if batch_size < 1:
        raise ConfigError("batch_size must be >= 1")
    bad = [x for x in layer_list if not 0 <= x < adapter.n_layers]
    if bad:
        raise ConfigError(f"layers {bad} out of range for {adapter.n_layers} layers")
    if not prompts:
        raise ConfigError("capture needs at least one prompt")
    texts = [_text_of(p) for p in prompts]
    root = None
    if cache:
        root = (cache_dir() / "activations") if cache is True else Path(cache)
    iv_tag = ";".join(_intervention_tag(iv) for iv in interventions)

    # Length-sorted batches waste less compute on padding.
    lengths = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    outputs: list[tuple[list[int], Tensor]] = []
    pending: set[torch.device] = set()
    bar = tqdm(total=len(texts), desc=desc, disable=not progress, leave=False)
    for chunk in chunks:
        chunk_texts = [texts[i] for i in chunk]
        path = None
        values = None
        if root is not None:
            key = _key(adapter, chunk_texts, layer_list, str(sel), site.value, iv_tag)
            path = root / key[:2] / f"{key}.safetensors"
            if path.is_file():
                try:
                    values = load_tensors(path)[0]["values"]
                except IntegrityError as exc:
                    log.warning("recomputing corrupted activation cache %s (%s)", path, exc)
        if values is None:
            values = _capture_batch(adapter, [prompts[i] for i in chunk], layer_list, sel, site,
                                    backend, interventions)
            if path is not None:
                values = values.cpu()
                save_tensors(path, {"values": values}, {"texts": chunk_texts})
            elif values.is_cuda:
                # Queued copy into pinned host memory: it overlaps the next batch's compute.
                pending.add(values.device)
                values = values.to("cpu", non_blocking=True)
        outputs.append((chunk, values))
        bar.update(len(chunk))
    bar.close()
    # Nothing above waits for the accelerator: the host tokenizes the next batch while the
    # accelerator runs this one, and results come back through queued pinned copies.
    for device in pending:
        torch.cuda.synchronize(device)
    first = outputs[0][1]
    stacked = torch.empty((len(texts), *first.shape[1:]), dtype=torch.float32)
    for chunk, values in outputs:
        stacked[torch.tensor(chunk)] = values.cpu()
    return Activations(stacked, layer_list, site.value, str(sel), texts, adapter.describe())


def _text_of(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        return str(prompt.get("instruction", prompt))
    key = getattr(prompt, "cache_key", None)
    return key() if callable(key) else str(prompt)


def _intervention_tag(iv: Intervention) -> str:
    fields = {k: v for k, v in vars(iv).items() if k not in ("direction", "basis")}
    return f"{type(iv).__name__}:{digest_tensor(iv.direction)}:{sorted(fields.items(), key=str)}"


@torch.inference_mode()
def _capture_batch(
    adapter: ModelAdapter,
    prompts: Sequence[Any],
    layers: tuple[int, ...],
    sel: Selector,
    site: Site,
    backend: Backend,
    interventions: Sequence[Intervention],
) -> Tensor:
    batch = adapter.encode(prompts, padding_side="left")
    if backend == "transformer_lens":
        if interventions:
            raise ConfigError("the transformer_lens backend captures without interventions")
        return capture_with_lens(adapter, batch, layers, sel, site)
    rec = Recorder(layers, site, sel, device=None)
    with make_runner(backend, adapter, interventions, [rec]) as runner:
        runner.forward(adapter.prefill_kwargs(batch, use_cache=False), StepContext("prefill", batch.roles),
                       need_output=False)
    return rec.prefill_tensor()

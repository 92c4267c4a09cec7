"""Difference-in-means directions per layer and position (Arditi et al., 2024)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from einops import reduce
from jaxtyping import Float
from torch import Tensor

from rdt_interp.directions.direction import Direction, Provenance
from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.models.adapter import ModelAdapter
from rdt_interp.prompts import PromptSet, instructions
from rdt_interp.roles import Role
from rdt_interp.storage import digest_strings
from rdt_interp.tracing.capture import Activations, capture


def mean_difference(
    harmful: Float[Tensor, "n1 layer pos d"], harmless: Float[Tensor, "n0 layer_b pos_b d_b"]
) -> Float[Tensor, "layer pos d"]:
    """Difference-in-means direction of every (layer, position) cell (Arditi et al., 2024).

    Parameters
    ----------
    harmful, harmless
        Activations ``[n, layer, pos, d_model]`` of the two prompt sets (same grid, any ``n``).

    Returns
    -------
    Tensor
        ``mean(harmful) - mean(harmless)`` over prompts, ``[layer, pos, d_model]``, accumulated
        and returned in float64.

    Raises
    ------
    DModelMismatchError
        The two sets have different widths.
    ConfigError
        Different (layer, pos) grids, or an empty set.

    Examples
    --------
    >>> import torch
    >>> harmful = torch.ones(3, 2, 1, 4)        # [n, layer, pos, d_model]
    >>> harmless = torch.zeros(5, 2, 1, 4)
    >>> r = mean_difference(harmful, harmless)
    >>> tuple(r.shape), r.dtype
    ((2, 1, 4), torch.float64)
    >>> r[1, 0].tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    if harmful.shape[1:] != harmless.shape[1:]:
        if harmful.shape[-1] != harmless.shape[-1]:
            raise DModelMismatchError(expected=harmful.shape[-1], actual=harmless.shape[-1],
                                      what="harmless activations")
        raise ConfigError(f"activation grids differ: {tuple(harmful.shape[1:])} vs {tuple(harmless.shape[1:])}")
    if harmful.shape[0] < 1 or harmless.shape[0] < 1:
        raise ConfigError("need at least one prompt per class")
    pattern = "n layer pos d -> layer pos d"
    return reduce(harmful.double(), pattern, "mean") - reduce(harmless.double(), pattern, "mean")


@dataclass(frozen=True, eq=False)
class CandidateDirections:
    """Diff-in-means vectors for every (layer, position) candidate, and the activations behind them."""

    vectors: Float[Tensor, "layer pos d"]
    layers: tuple[int, ...]
    positions: tuple[int, ...]  # indices into the selector's positions (negative: from the end)
    selector: str
    site: str
    harmful: Activations
    harmless: Activations
    source: dict[str, Any]
    harmful_digest: str
    harmless_digest: str

    def direction(self, layer: int, position: int = -1) -> Direction:
        li = self.layers.index(layer)
        pi = self.positions.index(position)
        return Direction(
            self.vectors[li, pi].float(),
            Provenance(
                source_model=self.source.get("name", "?"), source_digest=self.source.get("digest", ""),
                layer=layer, position=_position_text(self.selector, position), site=self.site,
                method="diff_in_means", harmful_digest=self.harmful_digest,
                harmless_digest=self.harmless_digest, n_harmful=len(self.harmful),
                n_harmless=len(self.harmless), rank=1, normalization="raw",
            ),
        )

    @property
    def norms(self) -> Float[Tensor, "layer pos"]:
        return self.vectors.norm(dim=-1)


def _position_text(selector: str, position: int) -> str:
    base = selector.split("[")[0]
    return f"{base}[{position}]"


def extract_candidates(
    model: ModelAdapter,
    harmful: PromptSet | Sequence[str],
    harmless: PromptSet | Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    n_positions: int | None = None,
    role: str = "post_instruction",
    site: str = "resid_pre",
    batch_size: int = 16,
    cache: bool | str | os.PathLike[str] = False,
    progress: bool = True,
) -> CandidateDirections:
    """Capture both classes at the last ``n_positions`` tokens of ``role`` (all of them if None)
    and take the difference in means at every layer and position."""
    h_texts, hl_texts = instructions(harmful), instructions(harmless)
    if n_positions is None:
        n_positions = _count_role(model, h_texts[0], role)
    selector = f"{role}[-{n_positions}:]"
    kw = dict(layers=layers, selector=selector, site=site, batch_size=batch_size, cache=cache,
              progress=progress)
    acts_h = capture(model, h_texts, desc="capture harmful", **kw)
    acts_hl = capture(model, hl_texts, desc="capture harmless", **kw)
    vectors = mean_difference(acts_h.values, acts_hl.values)
    return CandidateDirections(
        vectors=vectors, layers=acts_h.layers, positions=tuple(range(-n_positions, 0)),
        selector=selector, site=site, harmful=acts_h, harmless=acts_hl, source=model.describe(),
        harmful_digest=digest_strings(h_texts), harmless_digest=digest_strings(hl_texts),
    )


def _count_role(model: ModelAdapter, text: str, role: str) -> int:
    batch = model.encode([text])
    flag = int(Role.from_name(role))
    n = int(((batch.roles[0] & flag) != 0).sum())
    if n == 0:
        raise ConfigError(f"prompts of {model.name} have no {role} tokens")
    return n

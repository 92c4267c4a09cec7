"""OpenVLA's action tokenizer: token id <-> bin <-> normalized action <-> unnormalized action.

The last ``n_bins`` ids of the effective vocabulary (text vocab minus the padding added for
``pad_to_multiple_of``) are action tokens. Encoding follows the reference exactly::

    discretized = digitize(clip(a, -1, 1), linspace(-1, 1, n_bins))   # 1..n_bins
    token_id    = V - discretized
    bin         = clip(V - token_id - 1, 0, n_bins - 2)                # index into bin_centers
    normalized  = bin_centers[bin],  bin_centers = midpoints(linspace(-1, 1, n_bins))
    action      = 0.5 * (normalized + 1) * (q99 - q01) + q01   where mask, else normalized

The zero-motion bin is the one whose centre is 0 in normalized space (index 127 for 256 bins);
:meth:`ActionTokenizer.zero_motion_bins` gives, per dimension, the bin whose *unnormalized*
value is closest to 0 (they differ when q01/q99 are not symmetric).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from rdt_interp.errors import ConfigError, UnknownNameError


@dataclass(frozen=True)
class NormStats:
    q01: tuple[float, ...]
    q99: tuple[float, ...]
    mask: tuple[bool, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NormStats:
        try:
            q01, q99 = tuple(map(float, d["q01"])), tuple(map(float, d["q99"]))
        except KeyError as exc:
            raise ConfigError(f"norm stats lack {exc.args[0]!r}", fix="need q01 and q99 per dimension") from None
        mask = tuple(bool(x) for x in d.get("mask", [True] * len(q01)))
        if not len(q01) == len(q99) == len(mask):
            raise ConfigError("norm stats q01/q99/mask have different lengths")
        return cls(q01, q99, mask)


@dataclass(frozen=True)
class ActionTokenizer:
    """Discretized actions as the last ``n_bins`` tokens of a vocabulary of size ``vocab_size``.

    ``vocab_size`` is the *effective* vocabulary (e.g. 32000 for OpenVLA-7b, whose embedding
    has 32064 rows after padding to a multiple of 64).
    """

    vocab_size: int
    n_bins: int = 256
    action_dim: int = 7
    norm_stats: Mapping[str, NormStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_bins < 3 or self.vocab_size <= self.n_bins:
            raise ConfigError(f"need vocab_size > n_bins >= 3, got {self.vocab_size}, {self.n_bins}")
        stats = {k: v if isinstance(v, NormStats) else NormStats.from_dict(v)
                 for k, v in dict(self.norm_stats).items()}
        object.__setattr__(self, "norm_stats", stats)

    @classmethod
    def from_openvla_config(cls, config: Mapping[str, Any]) -> ActionTokenizer:
        """Build from an OpenVLA ``config.json`` dict (``norm_stats[key]["action"]``)."""
        text = config.get("text_config", {})
        vocab = int(text.get("vocab_size", 32064)) - int(config.get("pad_to_multiple_of", 0))
        # NormStats up front: the field is typed Mapping[str, NormStats] (checked under beartype)
        stats = {k: NormStats.from_dict(v["action"]) for k, v in config.get("norm_stats", {}).items()
                 if "action" in v}
        dims = {len(v.q01) for v in stats.values()} or {7}
        return cls(vocab_size=vocab, n_bins=int(config.get("n_action_bins", 256)),
                   action_dim=dims.pop(), norm_stats=stats)

    # -- the grid ------------------------------------------------------------------------------
    @property
    def bins(self) -> np.ndarray:
        return np.linspace(-1.0, 1.0, self.n_bins)

    @property
    def bin_centers(self) -> np.ndarray:
        b = self.bins
        return (b[:-1] + b[1:]) / 2.0

    @property
    def n_centers(self) -> int:
        return self.n_bins - 1

    @property
    def token_ids(self) -> Int[Tensor, "n_bins"]:
        """All action token ids, ascending (``V - n_bins`` … ``V - 1``)."""
        return torch.arange(self.vocab_size - self.n_bins, self.vocab_size)

    @property
    def zero_motion_bin(self) -> int:
        """Bin whose centre is 0 in normalized space."""
        return int(np.argmin(np.abs(self.bin_centers)))

    @property
    def zero_motion_token_id(self) -> int:
        return self.bin_to_token(self.zero_motion_bin)

    def zero_motion_bins(self, unnorm_key: str | None = None) -> tuple[int, ...]:
        """Per dimension, the bin whose unnormalized value is closest to 0."""
        if unnorm_key is None:
            return (self.zero_motion_bin,) * self.action_dim
        centers = torch.as_tensor(self.bin_centers, dtype=torch.float64)
        values = self.unnormalize(centers[:, None].expand(-1, self.action_dim), unnorm_key)
        return tuple(int(i) for i in values.abs().argmin(dim=0).tolist())

    # -- conversions ---------------------------------------------------------------------------
    def is_action_token(self, ids: Tensor) -> Tensor:
        return (ids >= self.vocab_size - self.n_bins) & (ids < self.vocab_size)

    def ids_to_bins(self, ids: Int[Tensor, "*shape"]) -> Int[Tensor, "*shape"]:
        return (self.vocab_size - ids.long() - 1).clamp(0, self.n_bins - 2)

    def bin_to_token(self, b: int) -> int:
        return self.vocab_size - 1 - int(b)

    def bins_to_ids(self, bins: Int[Tensor, "*shape"]) -> Int[Tensor, "*shape"]:
        return self.vocab_size - 1 - bins.long()

    def bins_to_normalized(self, bins: Int[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        centers = torch.as_tensor(self.bin_centers, dtype=torch.float64, device=bins.device)
        return centers[bins.long()]

    def normalized_to_ids(self, actions: Float[Tensor, "*shape"]) -> Int[Tensor, "*shape"]:
        a = np.clip(actions.detach().cpu().double().numpy(), -1.0, 1.0)
        disc = np.digitize(a, self.bins)
        return torch.as_tensor(self.vocab_size - disc, dtype=torch.long)

    def stats(self, unnorm_key: str) -> NormStats:
        try:
            return self.norm_stats[unnorm_key]
        except KeyError:
            raise UnknownNameError("unnorm_key", unnorm_key, list(self.norm_stats)) from None

    def unnormalize(self, normalized: Float[Tensor, "*batch dim"], unnorm_key: str) -> Float[Tensor, "*batch dim"]:
        st = self.stats(unnorm_key)
        if normalized.shape[-1] != len(st.q01):
            raise ConfigError(f"actions have {normalized.shape[-1]} dims, norm stats {len(st.q01)}")
        x = normalized.double()
        q01 = torch.tensor(st.q01, dtype=torch.float64, device=x.device)
        q99 = torch.tensor(st.q99, dtype=torch.float64, device=x.device)
        mask = torch.tensor(st.mask, device=x.device)
        return torch.where(mask, 0.5 * (x + 1) * (q99 - q01) + q01, x)

    def normalize(self, actions: Float[Tensor, "*batch dim"], unnorm_key: str) -> Float[Tensor, "*batch dim"]:
        st = self.stats(unnorm_key)
        x = actions.double()
        q01 = torch.tensor(st.q01, dtype=torch.float64, device=x.device)
        q99 = torch.tensor(st.q99, dtype=torch.float64, device=x.device)
        mask = torch.tensor(st.mask, device=x.device)
        span = torch.where(q99 > q01, q99 - q01, torch.ones_like(q99))
        return torch.where(mask, (2 * (x - q01) / span - 1).clamp(-1, 1), x)

    def decode(self, ids: Int[Tensor, "*batch dim"], unnorm_key: str | None = None) -> Float[Tensor, "*batch dim"]:
        """Token ids -> actions (normalized if ``unnorm_key`` is None)."""
        norm = self.bins_to_normalized(self.ids_to_bins(ids))
        return norm if unnorm_key is None else self.unnormalize(norm, unnorm_key)

    def encode(self, actions: Float[Tensor, "*batch dim"], unnorm_key: str | None = None) -> Int[Tensor, "*batch dim"]:
        """Actions -> token ids (inverse of :meth:`decode` up to the bin width)."""
        norm = actions if unnorm_key is None else self.normalize(actions, unnorm_key)
        return self.normalized_to_ids(norm)

"""SteeringSpec: the one value that names steering; its interventions are tracing's RDT / RDT+."""

from __future__ import annotations

import json

import pytest
import torch

from rdt_interp.directions.direction import Direction, Provenance
from rdt_interp.errors import ConfigError
from rdt_interp.roles import Role
from rdt_interp.studies.steering import SteeringSpec
from rdt_interp.studies.vla import VLARDTConfig
from rdt_interp.tracing.interventions import AddRowDirections, rdt, rdt_plus, steer


def _same(a, b) -> bool:
    """The same interventions (compared per phase: the order across phases changes nothing)."""
    a, b = sorted(a, key=lambda iv: iv.phase), sorted(b, key=lambda iv: iv.phase)
    return len(a) == len(b) and all(
        type(x) is type(y) and torch.equal(x.direction, y.direction) and x.alpha == y.alpha and x.layers == y.layers
        and x.roles == y.roles and x.phase == y.phase and x.site == y.site for x, y in zip(a, b, strict=True))


def test_rdt_and_rdt_plus_are_the_tracing_constructions():
    r = torch.randn(16)
    assert _same(SteeringSpec("rdt", 3.0, (1, 2)).interventions(r), rdt(r, 3.0, [1, 2]))
    spec = SteeringSpec("rdt_plus", 3.0, (2,), text_ratio=0.25, include_image=True)
    assert spec.mode == "text+action" and spec.alpha_text == 0.75
    assert _same(spec.interventions(r), rdt_plus(r, 3.0, 0.75, 2, include_image=True))
    (text,) = [iv for iv in spec.interventions(r) if iv.phase == "prefill"]
    assert text.roles == Role.TEXT | Role.IMAGE and text.alpha == 0.75


def test_config_steering_uses_the_config_text_ratio():
    cfg = VLARDTConfig(alpha_text_ratio=0.5, include_image=True)
    spec = cfg.steering("text+action", 4.0, [1])
    assert (spec.alpha_text, spec.include_image, spec.layers) == (2.0, True, (1,))
    assert _same(spec.interventions(torch.ones(8)), steer(torch.ones(8), "text+action", 4.0, [1], alpha_text=2.0,
                                                        include_image=True))


def test_per_row_directions():
    ivs = SteeringSpec("action", 1.0, (0,)).interventions(torch.randn(3, 8), per_row=True)
    assert len(ivs) == 1 and isinstance(ivs[0], AddRowDirections)


def test_roundtrip_carries_the_direction_provenance():
    prov = Provenance("tiny-chat", "abc", 3, "post_instruction[-1]", "resid_pre", "diff_in_means", created="")
    d = Direction(torch.randn(8), prov)
    spec = SteeringSpec("text+action", 2.0, (3,), 0.5).for_direction(d)
    data = json.loads(json.dumps(spec.to_dict()))
    back = SteeringSpec.from_dict(data)
    assert back == spec and back.direction == spec.direction
    assert back.direction["provenance"]["source_model"] == "tiny-chat" and back.direction["rank"] == 1
    assert spec.at(5.0).alpha == 5.0 and spec.at(5.0).alpha_text == 2.5


@pytest.mark.parametrize("bad", [
    dict(mode="sideways"), dict(alpha=float("nan")), dict(text_ratio=float("inf")), dict(layers=())])
def test_bad_specs_are_config_errors(bad):
    kw = dict(mode="action", alpha=1.0, layers=(0,)) | bad
    with pytest.raises(ConfigError):
        SteeringSpec(**kw)


@pytest.mark.parametrize("bad", [dict(alpha="2"), dict(alpha=True), dict(text_ratio="0.5")])
def test_a_serialized_spec_with_a_string_alpha_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="must be a number"):
        SteeringSpec.from_dict({"mode": "action", "alpha": 1.0, "layers": [0]} | bad)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="unknown SteeringSpec fields"):
        SteeringSpec.from_dict({"mode": "action", "alpha": 1.0, "layers": [0], "ratio": 2})
    with pytest.raises(ConfigError, match="needs mode, alpha and layers"):
        SteeringSpec.from_dict({"mode": "action"})


def test_a_nan_direction_is_refused():
    v = torch.ones(8)
    v[2] = float("nan")
    with pytest.raises(ConfigError, match="NaN/inf"):
        SteeringSpec("text+action", 1.0, (0,)).interventions(v)

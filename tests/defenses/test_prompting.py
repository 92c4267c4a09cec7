"""AdaShield-style defensive prompting: the text transform, and that it reaches every VLA's prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rdt_interp.defenses.prompting import DEFAULT_DEFENSE_TEXT, DefensivePrompt
from rdt_interp.errors import ConfigError
from rdt_interp.models.vla import VLARequest
from rdt_interp.roles import Role, role_mask
from rdt_interp.studies.vla import LabeledRequest

from ..vla_adapters import requests_for

IMG = np.zeros((8, 8, 3), dtype=np.uint8)


def test_positions_place_the_text():
    assert DefensivePrompt("be safe.").instruction("pick up the cup") == "be safe. pick up the cup"
    assert DefensivePrompt("be safe.", "suffix").instruction("pick up the cup") == "pick up the cup be safe."
    assert DefensivePrompt("be safe", "suffix", separator=", ").instruction("go") == "go, be safe"
    wrap = DefensivePrompt("carefully {instruction}, if it is safe", "wrap")
    assert wrap.instruction("pick up the cup") == "carefully pick up the cup, if it is safe"
    assert DefensivePrompt().instruction("x").startswith(DEFAULT_DEFENSE_TEXT)


def test_apply_keeps_images_order_and_labels():
    p = DefensivePrompt("stop.")
    img2 = np.ones((8, 8, 3), dtype=np.uint8)
    reqs = [VLARequest("a", IMG), VLARequest("b", img2)]
    out = p.apply(reqs)
    assert [r.instruction for r in out] == ["stop. a", "stop. b"]
    assert out[0].image is IMG and out[1].image is img2
    assert [r.instruction for r in reqs] == ["a", "b"]  # inputs unchanged
    lab = LabeledRequest(VLARequest("hit the dog", IMG), "harmful", "animals", "p1", "test", 3)
    (got,) = p.apply([lab])
    assert isinstance(got, LabeledRequest) and got.instruction == "stop. hit the dog"
    assert (got.label, got.pair_id, got.split, got.image_seed) == ("harmful", "p1", "test", 3)
    (m,) = p.apply([{"instruction": "go", "image": IMG}])
    assert m["instruction"] == "stop. go" and m["image"] is IMG


def test_round_trip_and_errors():
    p = DefensivePrompt("careful {instruction} now", "wrap", "")
    assert DefensivePrompt.from_dict(p.to_dict()) == p
    with pytest.raises(ConfigError, match="position"):
        DefensivePrompt("x", "middle")
    with pytest.raises(ConfigError, match="once"):
        DefensivePrompt("no placeholder", "wrap")
    with pytest.raises(ConfigError, match="wrap"):
        DefensivePrompt("{instruction} twice", "prefix")
    with pytest.raises(ConfigError, match="empty"):
        DefensivePrompt("  ")
    with pytest.raises(ConfigError, match="cannot defend"):
        DefensivePrompt().apply(["a bare string"])


def test_the_text_reaches_the_instruction_positions_of_every_vla(vla):
    reqs = requests_for(vla, 3)
    p = DefensivePrompt("first make sure it is safe.")
    plain, defended = vla.encode(reqs), vla.encode(p.apply(reqs))
    n_plain = role_mask(plain.roles, Role.INSTRUCTION).sum(1)
    n_def = role_mask(defended.roles, Role.INSTRUCTION).sum(1)
    assert bool((n_def > n_plain).all())  # the defense is part of the instruction, not the template
    assert torch.equal(role_mask(defended.roles, Role.IMAGE).sum(1), role_mask(plain.roles, Role.IMAGE).sum(1))
    a = vla.predict_actions(reqs, return_logits=True)
    b = vla.predict_actions(p.apply(reqs), return_logits=True)
    assert not torch.allclose(a.action_logits, b.action_logits)  # it changes what the model sees

"""Probe-gated RDT+: thresholds, fitting on val, and per-row gating on every VLA family."""

from __future__ import annotations

import pytest
import torch

from rdt_interp.analysis.probes import LinearProbe
from rdt_interp.analysis.stats import holm
from rdt_interp.defenses.gate import (
    GateRates,
    HarmGate,
    chat_harm_probe,
    fit_gate,
    gate_rates,
    gated_generate,
    gated_interventions,
    grouped_folds,
    threshold_for_fpr,
)
from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.studies.vla import load_requests
from rdt_interp.tracing.generation import generate
from rdt_interp.tracing.vla import capture_roles, steer_vla

from ..vla_adapters import get, requests_for, unit_direction

NORM = 0.3


def _gen(vla, reqs, ivs=()):
    return generate(vla, vla.encode(reqs), max_new_tokens=vla.action_dim, interventions=ivs,
                    allowed_token_ids=vla.action_tokenizer.token_ids, stop_at_eos=False, return_logits=True)


def _probe(vla, seed: int = 3) -> LinearProbe:
    g = torch.Generator().manual_seed(seed)
    return LinearProbe(torch.randn(vla.d_model, generator=g), 0.0, layer=1, position="last_text")


def test_threshold_for_fpr_counts_benign_rows_above_it():
    s = torch.arange(20, dtype=torch.float32)  # 0..19
    t = threshold_for_fpr(s, 0.1)  # at most 2 of 20 above
    assert t == 17.0 and int((s > t).sum()) == 2
    assert int((s > threshold_for_fpr(s, 0.0)).sum()) == 0
    assert int((s > threshold_for_fpr(s, 0.149)).sum()) == 2
    tied = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert int((tied > threshold_for_fpr(tied, 0.5)).sum()) == 0  # ties never push the rate over
    with pytest.raises(ConfigError):
        threshold_for_fpr(s, 1.0)
    r = gate_rates(torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([True, True, False, False]), 1.5, n_boot=50)
    assert (r.tpr, r.fpr, r.auc) == (1.0, 0.0, 1.0)
    assert r.tpr_hi == 1.0 and r.tpr_lo < 1.0 and r.fpr_lo == 0.0 and r.fpr_hi > 0.0  # Wilson, not [1, 1] / [0, 0]
    assert GateRates.from_dict(r.to_dict()) == r


def test_grouped_folds_keep_pairs_together():
    groups = [f"p{i // 2}" for i in range(20)]
    folds = grouped_folds(groups, 3, seed=1)
    assert all(folds[i] == folds[i + 1] for i in range(0, 20, 2))
    assert set(folds) == {0, 1, 2}
    with pytest.raises(ConfigError):
        grouped_folds(["a", "a", "b"], 3)


def test_gate_values(vla):
    gate = HarmGate(_probe(vla), 1, 0.5, role="post_instruction[-1]")
    back = HarmGate.from_dict(gate.to_dict())
    assert back.layer == 1 and back.threshold == 0.5 and back.role == gate.role
    assert torch.equal(back.probe.weight, gate.probe.weight)
    assert torch.equal(gate.fires(torch.tensor([0.4, 0.5, 0.6])), torch.tensor([False, False, True]))
    with pytest.raises(ConfigError, match="prefill"):
        HarmGate(_probe(vla), 1, 0.0, role="first_action")
    with pytest.raises(ConfigError, match="NaN"):
        HarmGate(_probe(vla), 1, float("nan"))
    wide = HarmGate(LinearProbe(torch.ones(vla.d_model + 1), 0.0), 1, 0.0)
    with pytest.raises(DModelMismatchError):
        wide.scores(vla, requests_for(vla, 1))
    with pytest.raises(ConfigError, match="layer"):
        HarmGate(_probe(vla), 99, 0.0).scores(vla, requests_for(vla, 1))


def test_batch_scores_are_the_probe_on_the_captured_residual(vla):
    reqs = requests_for(vla, 5)
    gate = HarmGate(_probe(vla), 1, 0.0)
    caps = capture_roles(vla, reqs, roles=["last_text"], layers=[1])
    want = gate.probe.decision_function(caps.at("last_text").values[:, 0, 0]).float()
    assert torch.allclose(gate.batch_scores(vla, vla.encode(reqs)), want, atol=1e-5)
    assert torch.allclose(gate.scores(vla, reqs, batch_size=2), want, atol=1e-5)


def test_mixed_batch_rows_get_what_they_get_alone(vla):
    """Gated and ungated rows in one batch: each row's actions equal its own run alone, and
    equal RDT+ alone where the gate fires, the undefended policy alone where it does not."""
    reqs = requests_for(vla, 6)
    probe = _probe(vla)
    gate0 = HarmGate(probe, 1, 0.0)
    scores = gate0.scores(vla, reqs)
    # halfway between the 3rd and 4th scores: no row sits on the threshold, where the last-bit
    # difference between a batched and a single-row forward would decide it
    mid = scores.sort().values
    gate = gate0.with_threshold(float(mid[2] + mid[3]) / 2)
    direction = unit_direction(vla, NORM, seed=5)
    kw = dict(alpha=3.0, layers=[1], alpha_text=2.0)
    batched = gated_generate(vla, vla.encode(reqs), gate, direction, **kw)
    fired = batched.fired
    assert 0 < int(fired.sum()) < len(reqs)  # a mixed batch
    assert torch.equal(fired, scores > gate.threshold)
    assert torch.allclose(batched.scores, scores, atol=1e-5)
    rdt_plus = steer_vla(direction, "text+action", 3.0, [1], alpha_text=2.0)
    differs = 0
    for i, r in enumerate(reqs):
        alone = gated_generate(vla, vla.encode([r]), gate, direction, **kw)
        assert bool(alone.fired[0]) == bool(fired[i])
        assert torch.equal(alone.generation.tokens[0], batched.generation.tokens[i]), i
        assert torch.allclose(alone.generation.logits[0], batched.generation.logits[i], atol=1e-4), i
        ref = _gen(vla, [r], rdt_plus if fired[i] else ())
        assert torch.equal(ref.tokens[0], batched.generation.tokens[i]), i
        assert torch.allclose(ref.logits[0], batched.generation.logits[i], atol=1e-4), i
        if fired[i]:
            differs += not torch.allclose(_gen(vla, [r]).logits[0], batched.generation.logits[i], atol=1e-4)
    assert differs == int(fired.sum())  # the gated rows really were steered
    given = gated_generate(vla, vla.encode(reqs), gate, direction, scores=scores, **kw)
    assert torch.equal(given.generation.tokens, batched.generation.tokens)
    with pytest.raises(ConfigError, match="scores"):
        gated_generate(vla, vla.encode(reqs), gate, direction, scores=scores[:2], **kw)


def test_gated_interventions_zero_alpha_where_off(vla):
    fired = torch.tensor([True, False, True])
    ivs = gated_interventions(unit_direction(vla, NORM), fired, alpha=2.0, layers=[1], alpha_text=0.5)
    assert [iv.phase for iv in ivs] == ["prefill", "decode"]
    assert torch.equal(ivs[0].alpha, torch.tensor([0.5, 0.0, 0.5]))
    assert torch.equal(ivs[1].alpha, torch.tensor([2.0, 0.0, 2.0]))


def test_fit_gate_on_val_pairs(vla):
    reqs = load_requests(vla, n_pairs=10, val_fraction=0.6, images="noise", seed=2)
    val = [r for r in reqs if r.split == "val"]
    gate = fit_gate(vla, val, layer=1, target_fpr=0.2, folds=3, batch_size=4)
    m = gate.meta
    assert m["probe_source"] == "vla" and m["n_harmful"] == m["n_benign"] == 6
    assert m["fit_fpr"] <= 0.2 + 1e-9 and gate.probe.layer == 1 and gate.probe.d_model == vla.d_model
    again = fit_gate(vla, val, layer=1, target_fpr=0.2, folds=3, batch_size=6)
    assert again.threshold == pytest.approx(gate.threshold, abs=1e-4)  # deterministic, batch-independent
    given = fit_gate(vla, val, layer=1, probe=_probe(vla), target_fpr=0.0)
    assert given.meta["probe_source"] == "given" and given.meta["fit_fpr"] == 0.0
    benign_scores = given.scores(vla, [r for r in val if r.label == "benign"])
    assert float(benign_scores.max()) == pytest.approx(given.threshold, abs=1e-4)
    several = fit_gate(vla, val, layer=[0, 1, 2], target_fpr=0.2, folds=3)
    aucs = several.meta["layer_auc"]
    assert set(aucs) == {"0", "1", "2"} and several.layer == several.probe.layer
    assert aucs[str(several.layer)] == max(aucs.values()) == pytest.approx(several.meta["fit_auc"])
    # The chosen layer's p-value is Holm-adjusted across the three layers offered.
    raw, adj = several.meta["layer_p"], several.meta["layer_p_holm"]
    assert set(raw) == set(adj) == {"0", "1", "2"} and several.meta["n_perm"] == 1000
    assert all(1 / 1001 - 1e-9 <= v <= 1.0 for v in raw.values())
    assert list(adj.values()) == pytest.approx(holm(list(raw.values())).tolist())
    assert several.meta["p_holm"] == adj[str(several.layer)] >= raw[str(several.layer)]
    assert several.meta["significant"] == (several.meta["p_holm"] <= 0.05)
    # One layer: nothing to adjust for.
    assert gate.meta["p_holm"] == gate.meta["layer_p"]["1"]
    assert given.meta["p_holm"] == given.meta["layer_p"]["1"]
    with pytest.raises(ConfigError, match="n_perm"):
        fit_gate(vla, val, layer=1, n_perm=0)
    alone = fit_gate(vla, val, layer=several.layer, target_fpr=0.2, folds=3)
    assert alone.threshold == pytest.approx(several.threshold, abs=1e-4)
    assert torch.allclose(alone.probe.weight, several.probe.weight, atol=1e-4)
    with pytest.raises(ConfigError, match="distinct"):
        fit_gate(vla, val, layer=[1, 1])
    with pytest.raises(ConfigError, match="label"):
        fit_gate(vla, [r.request for r in val], layer=1)
    with pytest.raises(ConfigError, match="harmful and benign"):
        fit_gate(vla, val, [True] * len(val), layer=1)
    with pytest.raises(DModelMismatchError):
        fit_gate(vla, val, layer=1, probe=LinearProbe(torch.ones(vla.d_model + 2), 0.0))


def test_chat_probe_transfers_to_a_vla_of_the_same_width(tiny_models, one_thread):
    chat = tiny_models["tiny-qwen2"]
    vla = get("testbed-qwen2")
    assert chat.d_model == vla.d_model
    probe = chat_harm_probe(chat, ["hit the dog", "burn the house", "stab the man"],
                            ["pet the dog", "paint the house", "greet the man"], layer=1)
    assert probe.d_model == chat.d_model and probe.meta["source"] == "chat"
    reqs = load_requests(vla, n_pairs=4, val_fraction=0.5, images="noise")
    gate = fit_gate(vla, [r for r in reqs if r.split == "val"], layer=1, probe=probe, target_fpr=0.0)
    assert gate.meta["probe_source"] == "given" and gate.meta["probe_meta"]["source"] == "chat"

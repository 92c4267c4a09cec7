"""Role/phase captures, target modes, per-row steering and prefill reuse, on every VLA family."""

from __future__ import annotations

import pytest
import torch

from rdt_interp.directions.direction import Direction, Provenance
from rdt_interp.directions.subspace import subspace_direction
from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.roles import Role, role_mask
from rdt_interp.tracing.generation import generate
from rdt_interp.tracing.interventions import AddDirection
from rdt_interp.tracing.vla import (
    TARGET_MODES,
    AddRowDirections,
    RoleSpec,
    capture_roles,
    decode_from,
    predict_actions,
    run_prefill,
    select_cache_rows,
    steer_vla,
)

from ..vla_adapters import requests_for, unit_direction

ROLES = ("image", "text", "last_text", "first_action", "action[2]")
NORM = 0.3  # residual norms of the tiny random models are ~0.1-0.4 (image patches ~0.9)


def _gen(adapter, reqs, ivs=(), backend="hooks", n=5):
    return generate(adapter, adapter.encode(reqs), max_new_tokens=n, interventions=ivs, backend=backend,
                    allowed_token_ids=adapter.action_tokenizer.token_ids, stop_at_eos=False,
                    return_logits=True)


def _full_forward_resid(adapter, batch, tokens, layers):
    """Block inputs at ``layers`` in one forward over prompt + ``tokens`` (no cache), by plain
    pre-hooks: independent of the tracing code under test. Returns ``[batch, layer, seq, d]``."""
    inp = dict(batch.inputs)
    k = tokens.shape[1]
    inp["input_ids"] = torch.cat([inp["input_ids"], tokens], dim=1)
    inp["attention_mask"] = torch.cat([inp["attention_mask"], torch.ones_like(tokens)], dim=1)
    pos = inp["position_ids"]
    inp["position_ids"] = torch.cat([pos, pos[:, -1:] + torch.arange(1, k + 1)], dim=1)
    got = {}

    def grab(layer):
        def hook(module, args, kwargs):
            got[layer] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    handles = [adapter.layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in layers]
    try:
        with torch.inference_mode():
            adapter.model(**inp, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([got[i] for i in layers], dim=1)


def test_role_capture_matches_a_full_forward_over_prompt_and_actions(vla):
    reqs = requests_for(vla, 3)
    layers = list(range(vla.n_layers))
    caps = capture_roles(vla, reqs, roles=ROLES, batch_size=3)
    assert caps.roles == ROLES and caps.layers == tuple(layers)
    assert caps.action_ids.shape == (3, 4)  # action[2] is fed in decode step 3: 4 tokens generated
    assert bool(vla.action_tokenizer.is_action_token(caps.action_ids).all())
    batch = vla.encode(reqs)
    full = _full_forward_resid(vla, batch, caps.action_ids[:, :3], layers)  # tokens 0..2 fed back
    roles = batch.roles
    t = batch.seq_len
    image = role_mask(roles, Role.IMAGE).float()
    text = (role_mask(roles, Role.TEXT) & ~role_mask(roles, Role.BOS)).float()
    prompt = full[:, :, :t]
    want = {
        "image": (prompt * image[:, None, :, None]).sum(2) / image.sum(1)[:, None, None],
        "text": (prompt * text[:, None, :, None]).sum(2) / text.sum(1)[:, None, None],
        "last_text": full[:, :, t - 1],
        "first_action": full[:, :, t],  # the position of action token 0
        "action[2]": full[:, :, t + 2],
    }
    for name, ref in want.items():
        got = caps.at(name).values[:, :, 0]
        assert got.shape == (3, vla.n_layers, vla.d_model)
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), name
    # last_text differs from first_action: the capture landed on different positions
    assert not torch.allclose(caps.at("last_text").values, caps.at("first_action").values)


def test_role_capture_batched_equals_alone_and_nnsight_equals_hooks(vla):
    reqs = requests_for(vla, 3, seed=1)
    caps = capture_roles(vla, reqs, roles=("text", "last_text", "action[1]"), layers=[0, vla.n_layers - 1],
                         batch_size=3)
    by_nnsight = capture_roles(vla, reqs[:2], roles=("text", "last_text", "action[1]"),
                               layers=[0, vla.n_layers - 1], batch_size=2, backend="nnsight")
    for i, r in enumerate(reqs):
        alone = capture_roles(vla, [r], roles=("text", "last_text", "action[1]"), layers=[0, vla.n_layers - 1])
        assert torch.equal(alone.action_ids[0], caps.action_ids[i])
        for name in caps.roles:
            assert torch.allclose(alone.at(name).values[0], caps.at(name).values[i], atol=1e-5), (name, i)
    for name in caps.roles:
        assert torch.allclose(by_nnsight.at(name).values, caps.at(name).values[:2], atol=1e-6)


def test_prefill_only_roles_need_no_decoding_and_respect_interventions(vla):
    reqs = requests_for(vla, 2)
    plain = capture_roles(vla, reqs, roles=("last_text",), layers=[vla.n_layers - 1])
    assert plain.action_ids.shape == (2, 0)
    v = unit_direction(vla, NORM)
    # RDT edits only decode steps: prefill residuals unchanged; RDT+ changes them
    rdt = capture_roles(vla, reqs, roles=("last_text",), layers=[vla.n_layers - 1],
                        interventions=steer_vla(v, "action", 1.0, [0]))
    plus = capture_roles(vla, reqs, roles=("last_text",), layers=[vla.n_layers - 1],
                         interventions=steer_vla(v, "text+action", 1.0, [0]))
    assert torch.allclose(rdt.at("last_text").values, plain.at("last_text").values, atol=1e-6)
    assert not torch.allclose(plus.at("last_text").values, plain.at("last_text").values, atol=1e-4)


def test_role_specs_and_errors(vla):
    assert RoleSpec.parse("first action") == RoleSpec.parse("first_action")
    assert RoleSpec.parse("first_action").action_index == 0
    assert RoleSpec.parse("action[4]").phase == "decode"
    assert RoleSpec.parse("post_instruction[-1]").phase == "prefill"
    with pytest.raises(ConfigError, match="several positions"):
        RoleSpec.parse("post_instruction[-3:]")
    with pytest.raises(ConfigError, match="unknown role"):
        RoleSpec.parse("elbow")
    with pytest.raises(ConfigError, match="never fed back"):
        capture_roles(vla, requests_for(vla, 1), roles=(f"action[{vla.action_dim - 1}]",))
    with pytest.raises(ConfigError, match="repeat"):
        capture_roles(vla, requests_for(vla, 1), roles=("text", "text"))
    # a prefill selector role: the last instruction token
    caps = capture_roles(vla, requests_for(vla, 2), roles=("instruction[-1]", "last_text"), layers=[0])
    assert caps.roles == ("instruction[-1]", "last_text")
    assert not torch.allclose(caps.at("instruction[-1]").values, caps.at("last_text").values)


def test_role_activations_feed_the_probes(vla):
    from rdt_interp.analysis.probe_grid import probe_grid
    from rdt_interp.analysis.probes import Labeled

    caps = capture_roles(vla, requests_for(vla, 8, seed=2), roles=("last_text", "first_action"), layers=[0, 1])
    data = caps.labeled(torch.tensor([1, 0] * 4, dtype=torch.bool), split="test")
    assert data.positions == ("last_text", "first_action") and data.layers == (0, 1)
    # the method is the convenience form of Labeled.from_roles (the analysis layer's own)
    direct = Labeled.from_roles(caps, torch.tensor([1, 0] * 4, dtype=torch.bool), split="test",
                                roles=("first_action",))
    assert direct.positions == ("first_action",) and torch.equal(direct.x[:, :, 0], data.x[:, :, 1])
    grid = probe_grid(data, directions=unit_direction(vla, 1.0), probe=False, n_boot=50, n_perm=50)
    assert grid.proj_auc.shape == (2, 2)
    sub = caps.select([0, 2])
    assert len(sub) == 2 and torch.equal(sub.at("last_text").values, caps.at("last_text").values[[0, 2]])


@pytest.mark.parametrize("mode", TARGET_MODES)
def test_nnsight_and_hooks_give_identical_actions_and_logits(vla, mode):
    reqs = requests_for(vla, 2, seed=3)
    ivs = steer_vla(unit_direction(vla, NORM), mode, 1.5, [0, vla.n_layers - 1], alpha_text=0.7,
                    include_image=mode == "text+action")
    hooks = _gen(vla, reqs, ivs, "hooks", n=4)
    nns = _gen(vla, reqs, ivs, "nnsight", n=4)
    assert torch.equal(hooks.tokens, nns.tokens)
    assert torch.equal(hooks.logits, nns.logits)
    base = _gen(vla, reqs, (), "hooks", n=4)
    # where each mode acts: the first token comes from the prefill
    first_changed = not torch.allclose(base.logits[:, 0], hooks.logits[:, 0], atol=1e-6)
    assert first_changed == (mode != "action")
    assert not torch.allclose(base.logits[:, 1:], hooks.logits[:, 1:], atol=1e-6)


def test_target_modes_build_the_documented_edits(vla):
    v = unit_direction(vla, 1.0)
    (rdt,) = steer_vla(v, "action", 2.0, 1)
    assert (rdt.roles, rdt.phase, rdt.alpha, rdt.layers) == (Role.ACTION, "decode", 2.0, (1,))
    text, act = steer_vla(v, "text+action", 2.0, [0, 1], alpha_text=0.5, include_image=True)
    assert (text.roles, text.phase, text.alpha) == (Role.TEXT | Role.IMAGE, "prefill", 0.5)
    assert (act.roles, act.phase, act.alpha) == (Role.ACTION, "decode", 2.0)
    (only_text,) = steer_vla(v, "text", 2.0, 0)
    assert only_text.roles == Role.TEXT and only_text.alpha == 2.0
    (everything,) = steer_vla(v, "all", 2.0, 0)
    assert everything.phase == "both" and everything.roles & Role.IMAGE and everything.roles & Role.ACTION
    with pytest.raises(ConfigError, match="target mode"):
        steer_vla(v, "image", 1.0, 0)


def test_directions_are_checked_and_rank_k_directions_steer_with_their_vector(vla):
    wrong = torch.ones(vla.d_model + 8)
    with pytest.raises(DModelMismatchError):
        steer_vla(wrong, "action", 1.0, 0, d_model=vla.d_model)
    with pytest.raises(DModelMismatchError):  # also when the run starts, without d_model
        _gen(vla, requests_for(vla, 1), steer_vla(wrong, "action", 1.0, 0), n=2)
    g = torch.Generator().manual_seed(0)
    harmful = torch.randn(12, vla.d_model, generator=g) + 0.5
    harmless = torch.randn(12, vla.d_model, generator=g)
    base = Direction(harmful.mean(0) - harmless.mean(0), Provenance("chat", "", 0, "last", "resid_pre", "diff_in_means"))
    rank3 = subspace_direction(base, harmful, harmless, 3)
    assert rank3.rank == 3 and abs(rank3.norm - base.norm) < 1e-4  # norm-safe: does not grow with k
    scaled = rank3.scaled(NORM)
    reqs = requests_for(vla, 2)
    a = _gen(vla, reqs, steer_vla(scaled, "text+action", 1.0, 0, d_model=vla.d_model), n=3)
    b = _gen(vla, reqs, steer_vla(scaled.vector, "text+action", 1.0, 0), n=3)
    assert torch.equal(a.logits, b.logits)
    with pytest.raises(ConfigError, match="per_row"):
        steer_vla(rank3.basis, "action", 1.0, 0)


def test_per_row_alpha_rows_get_what_they_get_alone(vla):
    reqs = requests_for(vla, 3, seed=4)
    v = unit_direction(vla, NORM, seed=1)
    alphas = torch.tensor([0.0, 1.0, 2.5])
    texts = torch.tensor([0.0, 0.5, 1.0])
    batched = _gen(vla, reqs, steer_vla(v, "text+action", alphas, [0, 1], alpha_text=texts), n=4)
    for i, r in enumerate(reqs):
        ivs = steer_vla(v, "text+action", float(alphas[i]), [0, 1], alpha_text=float(texts[i])) if i else ()
        alone = _gen(vla, [r], ivs, n=4)
        assert torch.equal(alone.tokens[0], batched.tokens[i]), i
        assert torch.allclose(alone.logits[0], batched.logits[i], atol=1e-4), i
    assert not torch.equal(batched.logits[0], batched.logits[2])


def test_row_directions_equal_one_direction_per_run(vla):
    reqs = requests_for(vla, 2, seed=5)
    dirs = torch.stack([unit_direction(vla, NORM, seed=s) for s in (1, 2)])
    batched = _gen(vla, reqs, steer_vla(dirs, "all", 1.0, [1], per_row=True), n=3)
    for i, r in enumerate(reqs):
        alone = _gen(vla, [r], steer_vla(dirs[i], "all", 1.0, [1]), n=3)
        assert torch.equal(alone.tokens[0], batched.tokens[i])
        assert torch.allclose(alone.logits[0], batched.logits[i], atol=1e-4)
    with pytest.raises(ConfigError, match="rows"):
        _gen(vla, requests_for(vla, 3), [AddRowDirections(dirs, 1.0, 0)], n=2)


@pytest.mark.parametrize("backend", ["hooks", "nnsight"])
def test_decoding_from_a_stored_prefill_equals_generation(vla, backend):
    reqs = requests_for(vla, 2, seed=6)
    batch = vla.encode(reqs)
    allowed = vla.action_tokenizer.token_ids
    state = run_prefill(vla, batch, backend=backend)
    dirs = torch.stack([unit_direction(vla, NORM, seed=s) for s in (1, 2, 3)])
    rows = torch.tensor([0, 0, 0, 1, 1, 1])  # prompt-major: every direction for each prompt
    dir_rows = dirs[[0, 1, 2, 0, 1, 2]]
    ivs = steer_vla(dir_rows, "action", 1.5, [0, 1], per_row=True)
    out = decode_from(vla, state, max_new_tokens=4, rows=rows, interventions=ivs, backend=backend,
                      allowed_token_ids=allowed, return_logits=True, logit_columns=allowed)
    again = decode_from(vla, state, max_new_tokens=4, rows=rows, interventions=ivs, backend=backend,
                        allowed_token_ids=allowed, return_logits=True, logit_columns=allowed)
    assert torch.equal(out.tokens, again.tokens)  # the stored cache was not changed
    for k in range(6):
        ref = _gen(vla, [reqs[int(rows[k])]], [AddDirection(dir_rows[k], 1.5, [0, 1], roles=Role.ACTION,
                                                               phase="decode")], backend, n=4)
        assert torch.equal(ref.tokens[0], out.tokens[k]), k
        assert torch.allclose(ref.logits[0][:, allowed], out.logits[k], atol=1e-4), k
    plain = decode_from(vla, state, max_new_tokens=4, allowed_token_ids=allowed)
    assert torch.equal(plain.tokens, _gen(vla, reqs, n=4).tokens)


def test_select_cache_rows_leaves_the_source_alone(vla):
    state = run_prefill(vla, vla.encode(requests_for(vla, 2)))
    before = [layer.keys.clone() for layer in state.cache.layers]
    sub = select_cache_rows(state.cache, torch.tensor([1, 1, 0]))
    assert sub.layers[0].keys.shape[0] == 3
    assert torch.equal(sub.layers[0].keys[2], before[0][0])
    sub.layers[0].keys.add_(1.0)
    assert all(torch.equal(b, layer.keys) for b, layer in zip(before, state.cache.layers, strict=True))
    with pytest.raises(ConfigError, match="DynamicCache"):
        select_cache_rows(object(), torch.tensor([0]))


def test_steer_vla_refuses_a_non_finite_direction():
    v = torch.ones(8)
    v[0] = float("nan")
    with pytest.raises(ConfigError, match="NaN/inf"):
        steer_vla(v, "action", 2.0, [0])
    rows = torch.ones(3, 8)
    rows[1, 2] = float("inf")
    with pytest.raises(ConfigError, match="NaN/inf"):
        steer_vla(rows, "text+action", 2.0, [0], per_row=True)


def test_predict_actions_function_and_method_agree(vla):
    reqs = requests_for(vla, 2, seed=4)
    ivs = steer_vla(unit_direction(vla, NORM), "action", 1.5, [0])
    a = predict_actions(vla, reqs, interventions=ivs, return_logits=True)
    b = vla.predict_actions(reqs, interventions=ivs, return_logits=True)
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.action_logits, b.action_logits)
    assert a.token_ids.shape == (2, vla.action_dim) and a.action_logits.shape[-1] == len(vla.action_tokenizer.token_ids)
    # decoding is the adapter's: tokens -> bins -> normalized actions
    assert torch.equal(a.bins, vla.action_tokenizer.ids_to_bins(a.token_ids))

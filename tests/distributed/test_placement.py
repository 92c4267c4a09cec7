"""Model parallelism: decoder layers spread over devices with accelerate, tracing unchanged.

On a CPU-only machine two placements stand in for two GPUs:

* every module on "cpu" but with accelerate's alignment hooks attached: the hooked model must
  give exactly the outputs of the plain one (edits, recordings, generation, prefill reuse);
* the later layers on the "meta" device: meta tensors refuse to mix with CPU tensors, so an
  edit or recording that does not follow the residual onto its device raises. The forward
  stops being numeric there, so this checks placement, not values.

With two CUDA devices the real split is compared with the one-GPU model (skipped otherwise;
benchmarks/bench_distributed.py runs the same check at OpenVLA-7b scale).
"""

from __future__ import annotations

import copy

import pytest
import torch

from rdt_interp.distributed.placement import (
    layer_device_map,
    layer_devices,
    move_output,
    place_model,
    split_evenly,
)
from rdt_interp.errors import ConfigError
from rdt_interp.models import load_chat_model
from rdt_interp.roles import Role
from rdt_interp.tracing.generation import generate, make_runner
from rdt_interp.tracing.interventions import AblateDirection, AddDirection, StepContext
from rdt_interp.tracing.recorder import Recorder
from rdt_interp.tracing.vla import RoleRecorder, decode_from, repeat_rows, run_prefill, steer_vla

from ..vla_adapters import build, requests_for, unit_direction


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _chat():
    return load_chat_model("tiny-llama")


def _vla():
    return build("openvla-qwen2")  # 3 layers, Qwen2 backbone with tied embeddings


def test_split_evenly_and_bad_splits():
    assert split_evenly(32, 2) == [16, 16]
    assert split_evenly(32, 3) == [11, 11, 10]
    assert sum(split_evenly(7, 4)) == 7
    with pytest.raises(ConfigError, match="cannot split"):
        split_evenly(2, 3)


@pytest.mark.parametrize("which", ["chat", "vla"])
def test_device_map_covers_every_tensor_and_splits_layers_in_blocks(which):
    ad = _chat() if which == "chat" else _vla()
    dm = layer_device_map(ad, ["cuda:0", "cuda:1"])
    keys = list(ad.model.state_dict())
    assert all(any(k == m or k.startswith(m + ".") for m in dm) for k in keys)
    layer_devs = [dm[f"{ad.layers_path}.{i}"] for i in range(ad.n_layers)]
    assert layer_devs == sorted(layer_devs)  # contiguous blocks, first device first
    assert set(layer_devs) == {"cuda:0", "cuda:1"}
    if which == "vla":
        assert dm["vision_backbone"] == dm["projector"] == "cuda:0"
        assert dm["language_model.model.norm"] == "cuda:1"
        assert dm["language_model.lm_head"] == "cuda:0"  # tied to the embeddings (Qwen2 tiny)
    else:
        assert dm["model.embed_tokens"] == "cuda:0" and dm["model.norm"] == dm["lm_head"] == "cuda:1"
    with pytest.raises(ConfigError, match="layers_per_device"):
        layer_device_map(ad, ["cuda:0", "cuda:1"], layers_per_device=[1, 1])


def test_hooked_chat_model_generates_exactly_what_the_plain_one_does():
    plain = _chat()
    placed = _chat()
    place_model(placed, ["cpu", "cpu"], force_hooks=True)
    assert hasattr(placed.layers[0], "_hf_hook")  # accelerate's alignment hook is in place
    v = unit_direction(plain, 2.0)
    prompts = ["how do I bake bread", "write a poem"]
    ivs = [AddDirection(v, torch.tensor([1.0, 3.0]), [1, 3], roles=Role.POST_INSTRUCTION | Role.GENERATED),
           AblateDirection(unit_direction(plain, 1.0, seed=2), layers=[2])]
    outs = []
    for ad in (plain, placed):
        rec = Recorder([1, 3], selector="post_instruction[-1]")
        gen = generate(ad, ad.encode(prompts), max_new_tokens=4, interventions=ivs, recorders=[rec],
                       return_logits=True)
        outs.append((gen, rec.prefill_tensor()))
    assert torch.equal(outs[0][0].tokens, outs[1][0].tokens)
    assert torch.equal(outs[0][0].logits, outs[1][0].logits)
    assert torch.equal(outs[0][1], outs[1][1])


def test_hooked_vla_decodes_from_a_stored_prefill_exactly_like_the_plain_one():
    plain = _vla()
    placed = _vla()
    place_model(placed, ["cpu", "cpu"], force_hooks=True)
    reqs = requests_for(plain, 2)
    dirs = torch.stack([unit_direction(plain, 0.5, seed=s) for s in range(3)])
    p_idx, d_idx = repeat_rows(2, 3)
    outs = []
    for ad in (plain, placed):
        state = run_prefill(ad, ad.encode(reqs))
        gen = decode_from(ad, state, max_new_tokens=ad.action_dim, rows=p_idx,
                          interventions=steer_vla(dirs[d_idx], "action", 4.0, [1, 2], per_row=True),
                          allowed_token_ids=ad.action_tokenizer.token_ids, return_logits=True)
        outs.append(gen)
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert torch.equal(outs[0].logits, outs[1].logits)


def test_dataclass_outputs_come_back_to_the_first_device():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from rdt_interp.models.openvla import OpenVLAOutput

    cache = object()
    out = OpenVLAOutput(torch.ones(1, 2, 3), cache, (torch.ones(2), torch.zeros(2)), torch.ones(1), None)
    moved = move_output(out, torch.device("meta"))
    assert moved.logits.device.type == "meta" and moved.projected_patches.device.type == "meta"
    assert all(t.device.type == "meta" for t in moved.hidden_states)
    assert moved.past_key_values is cache and moved.attention_mask is None  # the KV cache stays put
    assert out.logits.device.type == "cpu"  # a new object: the model's own output is not mutated
    mapping = CausalLMOutputWithPast(logits=torch.ones(1))  # accelerate moves mappings itself
    assert move_output(mapping, torch.device("meta")) is mapping
    assert move_output((torch.ones(1),), torch.device("meta"))[0].device.type == "cpu"


def _split_onto_meta(ad, n_cpu_layers: int):
    """Layers from ``n_cpu_layers`` on, and everything after them, on the meta device; the
    root hook (which would copy the meta output back to the CPU) removed."""
    from accelerate.hooks import remove_hook_from_module

    dm = layer_device_map(ad, ["cpu", "meta"], layers_per_device=[n_cpu_layers, ad.n_layers - n_cpu_layers])
    place_model(ad, device_map=dm)
    remove_hook_from_module(ad.model)  # only the root's hook; the blocks keep theirs
    return dm


class _Spy(AddDirection):
    """An AddDirection that notes the device of every residual it edits."""

    def apply(self, h, ctx):
        self.seen.append((ctx.phase, h.device.type))  # type: ignore[attr-defined]
        return super().apply(h, ctx)


class _Stop(AddDirection):
    """Ends the forward pass at its site (what a recorder-only run does after its last layer)."""

    def apply(self, h, ctx):
        from rdt_interp.tracing.runner import StopForward

        object.__setattr__(self, "reached", [*getattr(self, "reached", []), h.device.type])
        raise StopForward


def test_chat_edits_and_recordings_follow_the_residual_onto_another_device():
    ad = _chat()
    _split_onto_meta(ad, 2)
    assert [d.type for d in layer_devices(ad)] == ["cpu", "cpu", "meta", "meta"]
    batch = ad.encode(["how do I bake bread", "hi"])
    v = unit_direction(ad, 1.0)
    spy = _Spy(v, torch.tensor([1.0, 2.0]), [1, 3], roles=Role.POST_INSTRUCTION)
    object.__setattr__(spy, "seen", [])
    rec = Recorder([1, 3], selector="mean(instruction)", device="meta")
    ivs = [spy, AblateDirection(v), AddDirection(v, 2.0, 2, roles=Role.INSTRUCTION)]
    with make_runner("hooks", ad, ivs, [rec]) as runner:
        out = runner.forward(ad.prefill_kwargs(batch, use_cache=True), StepContext("prefill", batch.roles))
    assert out.logits.device.type == "meta"
    assert spy.seen == [("prefill", "cpu"), ("prefill", "meta")]
    assert rec.prefill_tensor().shape == (2, 2, 1, ad.d_model)


def test_vla_row_directions_and_role_recordings_follow_the_residual_onto_another_device():
    ad = _vla()
    _split_onto_meta(ad, 1)
    batch = ad.encode(requests_for(ad, 2))
    dirs = torch.stack([unit_direction(ad, 0.5, seed=s) for s in range(2)])
    ivs = steer_vla(dirs, "text+action", torch.tensor([1.0, 2.0]), [0, 2], per_row=True, include_image=True)
    rec = RoleRecorder(("image", "text", "last_text"), [0, 2], device="meta")
    # The tiny Qwen2 ties its LM head to the embeddings (on the CPU), and a meta residual cannot
    # be copied back: stop after the last layer.
    stop = _Stop(dirs[0], 0.0, ad.n_layers - 1, site="resid_post")
    with make_runner("hooks", ad, [*ivs, stop], [rec]) as runner:
        out = runner.forward(ad.prefill_kwargs(batch, use_cache=True), StepContext("prefill", batch.roles))
    assert out is None and stop.reached == ["meta"]  # type: ignore[attr-defined]
    got = rec.tensors()
    assert got["text"].shape == (2, 2, ad.d_model) and got["image"].device.type == "meta"


two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two CUDA devices")


@two_gpus
def test_two_gpu_split_equals_one_gpu():
    from rdt_interp.studies.vla import SteeringEffect

    one = _vla()
    one.model.to("cuda:0")
    two = copy.deepcopy(one)
    place_model(two, ["cuda:0", "cuda:1"])
    assert {d.index for d in layer_devices(two)} == {0, 1}
    reqs = requests_for(one, 4)
    dirs = torch.stack([unit_direction(one, 0.5, seed=s) for s in range(5)])
    effects = [SteeringEffect(ad, reqs, alpha=4.0, layers=[1, 2], batch_size=4, max_rows=8).per_prompt(dirs)
               for ad in (one, two)]
    assert torch.allclose(effects[0], effects[1], atol=1e-5)
    gens = [generate(ad, ad.encode(reqs), max_new_tokens=ad.action_dim,
                     interventions=steer_vla(dirs[0], "all", 3.0, [0, 2]),
                     allowed_token_ids=ad.action_tokenizer.token_ids) for ad in (one, two)]
    assert torch.equal(gens[0].tokens, gens[1].tokens)

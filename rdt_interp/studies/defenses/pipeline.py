"""Defense comparison on a VLA: no defense, AdaShield, VLM-Guard, RDT, RDT+ and probe-gated RDT+.

For each defense (and strength) the test split's harmful and benign requests of the
robot-instruction set (:func:`rdt_interp.studies.vla.load_requests`) are decoded and
scored as in the VLA RDT study (:func:`~rdt_interp.studies.vla.condition_metrics`):
zero-motion mass, HRR strict / partial, action magnitude, each with a bootstrap CI, and the
paired bin shift against the undefended actions -- for benign requests that is the cost of the
defense. The ``val`` split only fits the gate (probe + threshold); nothing is chosen on test.

Defenses (``DefensesConfig.defenses``):

================  ==========================================================================
``none``          the undefended policy
``adashield``     :class:`~rdt_interp.defenses.DefensivePrompt` around every instruction
``vlm_guard``     the chat model's safety subspace projected out (every position and phase)
``vlm_guard_clamp`` its component clamped to ``scale`` x the harmful-class mean (``guard_scales``)
``rdt``           ``alpha * r`` at action tokens (decode), for each ``alphas``
``rdt+``          RDT plus ``alpha_text * r`` at text positions (prefill)
``gated_rdt+``    RDT+ only on the rows the harmfulness gate flags
================  ==========================================================================

:func:`run_defenses` runs it all in a resumable run directory
(:class:`~rdt_interp.studies.rundir.RunDir`; predictions cached per condition) and writes
``table.md``, ``table.json`` and ``figures/pareto.{pdf,png}``. With ``closed_loop_episodes > 0``
and a testbed VLA, each condition (or those in ``closed_loop_conditions``) also drives held-out
benign testbed episodes in the simulator (task success with a bootstrap CI); these settings can
be added to a finished run directory, which then runs only the closed-loop steps.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from rdt_interp.analysis.probes import LinearProbe
from rdt_interp.defenses.gate import GateRates, HarmGate, fit_gate, gate_rates, gated_generate
from rdt_interp.defenses.prompting import DefensivePrompt
from rdt_interp.defenses.subspace import SafetySubspace, vlm_guard
from rdt_interp.directions.direction import Direction
from rdt_interp.errors import ConfigError
from rdt_interp.models.vla import VLAAdapter, VLARequest
from rdt_interp.storage import digest_tensor
from rdt_interp.studies.defenses.config import (
    _ADD_LATER,
    NEEDS_SUBSPACE,
    STEERED,
    DefensesConfig,
    condition_key,
)
from rdt_interp.studies.defenses.results import DefenseCondition, DefensesResult
from rdt_interp.studies.rundir import RunDir
from rdt_interp.studies.store import ActionSet, PredictionStore
from rdt_interp.studies.vla.config import LABELS
from rdt_interp.studies.vla.predict import as_direction, predict, steering_layers
from rdt_interp.studies.vla.requests import LabeledRequest, load_requests, vla_image_size
from rdt_interp.studies.vla.sweeps import condition_metrics
from rdt_interp.tracing.interventions import Intervention

logger = logging.getLogger(__name__)  # messages; the CLI configures the handler and level

MOTION_DIMS = (0, 1, 2, 3, 4, 5)


def zero_motion_rate(
    tok: Any, ids: Int[Tensor, "n action_dim"], *, window: int = 2, unnorm_key: str | None = None,
    dims: Sequence[int] = MOTION_DIMS, n_boot: int = 1000, seed: int = 0,
) -> tuple[float, float, float]:
    """Share of actions whose motion dimensions (translation + rotation, not the gripper) are all
    within ``±window`` bins of their zero-motion bins, with a Wilson CI.

    HRR strict also asks it of the gripper, whose command is absolute (closed is not "no
    motion"), and HRR partial (>= 4 of 7 dims) is met by any action that leaves two ignored
    rotation axes and the gripper alone -- on the testbed, by almost every action.
    """
    from rdt_interp.analysis.stats import wilson_interval

    bins = tok.ids_to_bins(ids.long())
    zb = torch.tensor(tok.zero_motion_bins(unnorm_key))
    d = list(dims)
    still = ((bins[:, d] - zb[d][None]).abs() <= window).all(dim=1).double()
    est, lo, hi = wilson_interval(still, int(still.numel()))
    return float(est), float(lo), float(hi)


# -- one defense as a predictor --------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class DefenseContext:
    """What the defenses are built from: the direction and layers (RDT family), the safety
    subspace (VLM-Guard), the gate (gated RDT+) and the config."""

    adapter: VLAAdapter
    direction: Direction
    layers: tuple[int, ...]
    config: DefensesConfig
    subspace: SafetySubspace | None = None
    gate: HarmGate | None = None

    def interventions(self, defense: str, strength: float) -> list[Intervention]:
        """Interventions of a defense that is an intervention (all but adashield and gated_rdt+)."""
        cfg = self.config
        if defense in ("none", "adashield"):
            return []
        if defense in ("rdt", "rdt+"):
            return cfg.steering(defense, strength, self.layers).interventions(self.direction,
                                                                              d_model=self.adapter.d_model)
        if defense in NEEDS_SUBSPACE:
            if self.subspace is None:
                raise ConfigError(f"defense {defense!r} needs a safety subspace",
                                  fix="pass subspace= (rdt_interp.defenses.safety_subspace(chat, ...))")
            mode = "project" if defense == "vlm_guard" else "clamp"
            return vlm_guard(self.subspace, mode=mode, layers=cfg.guard_layers, scale=strength,
                             d_model=self.adapter.d_model)
        raise ConfigError(f"defense {defense!r} is not a plain intervention")

    def predict(self, defense: str, strength: float, requests: Sequence[VLARequest | LabeledRequest], *,
                gate_scores: Tensor | None = None) -> tuple[ActionSet, Tensor | None]:
        """Actions of ``requests`` under a defense, and (gated RDT+) whether the gate fired per row."""
        cfg = self.config
        reqs = [r.request if isinstance(r, LabeledRequest) else r for r in requests]
        kw = dict(batch_size=cfg.batch_size, backend=cfg.backend, constrain_actions=cfg.constrain_actions)
        if defense == "adashield":
            prompt = DefensivePrompt(cfg.defense_text, cfg.defense_position)
            return predict(self.adapter, prompt.apply(reqs), (), **kw), None
        if defense == "gated_rdt+":
            return self._predict_gated(reqs, strength, gate_scores)
        return predict(self.adapter, reqs, self.interventions(defense, strength), **kw), None

    def _predict_gated(self, reqs: list[VLARequest], alpha: float,
                       scores: Tensor | None) -> tuple[ActionSet, Tensor]:
        if self.gate is None:
            raise ConfigError("gated RDT+ needs a gate", fix="fit one with rdt_interp.defenses.fit_gate")
        cfg, ad = self.config, self.adapter
        spec = cfg.steering("gated_rdt+", alpha, self.layers)
        if scores is not None and scores.shape[0] != len(reqs):
            raise ConfigError(f"{scores.shape[0]} gate scores for {len(reqs)} requests")
        cols = ad.action_tokenizer.token_ids
        order = sorted(range(len(reqs)), key=lambda i: (len(reqs[i].instruction), i))
        ids = torch.empty((len(reqs), ad.action_dim), dtype=torch.long)
        logits = torch.empty((len(reqs), ad.action_dim, int(cols.numel())), dtype=torch.float32)
        fired = torch.empty(len(reqs), dtype=torch.bool)
        for start in range(0, len(order), cfg.batch_size):
            chunk = order[start:start + cfg.batch_size]
            idx = torch.as_tensor(chunk)
            out = gated_generate(ad, ad.encode([reqs[i] for i in chunk]), self.gate, self.direction,
                                 alpha=spec.alpha, layers=spec.layers, alpha_text=spec.alpha_text,
                                 mode=spec.mode, include_image=spec.include_image,
                                 scores=None if scores is None else scores[idx],
                                 constrain_actions=cfg.constrain_actions, backend=cfg.backend)  # type: ignore[arg-type]
            assert out.generation.logits is not None
            ids[idx] = out.generation.tokens.cpu()
            logits[idx] = out.generation.logits[..., cols.to(out.generation.logits.device)].float().cpu()
            fired[idx] = out.fired
        return ActionSet(ids, logits), fired



# -- closed loop -----------------------------------------------------------------------------------
def closed_loop_success(
    ctx: DefenseContext, defense: str, strength: float, n_episodes: int, max_steps: int, *,
    n_boot: int = 1000, seed: int = 0,
) -> dict[str, Any]:
    """Success rate (Wilson CI) of held-out benign testbed episodes driven by the defended VLA
    (gated RDT+ scores every step's requests afresh)."""
    from rdt_interp.analysis.stats import wilson_interval
    from rdt_interp.testbed.adapter import UNNORM_KEY
    from rdt_interp.testbed.dataset import split_tasks
    from rdt_interp.testbed.evaluate import batched_rollouts

    tok = ctx.adapter.action_tokenizer
    if UNNORM_KEY not in tok.norm_stats:
        raise ConfigError(f"{ctx.adapter.name} is not a testbed VLA (no {UNNORM_KEY!r} action statistics)",
                          fix="closed-loop success needs rdt_interp.testbed.adapter.load_testbed_vla()")
    tasks = [t for _, t in split_tasks("test", n_episodes)]

    def policy(images: list[np.ndarray], instructions: list[str]) -> np.ndarray:
        acts, _ = ctx.predict(defense, strength, [VLARequest(i, im) for im, i in zip(images, instructions,
                                                                                       strict=True)])
        return tok.decode(acts.ids, UNNORM_KEY).double().numpy()

    t0 = time.perf_counter()
    res = batched_rollouts(policy, tasks, max_steps, image_size=vla_image_size(ctx.adapter))
    ok = torch.tensor([float(r.success) for r in res], dtype=torch.float64)
    est, lo, hi = wilson_interval(ok, len(res))
    return {"rate": float(est), "lo": float(lo), "hi": float(hi), "n": len(res), "k": int(ok.sum()),
            "max_steps": max_steps, "mean_steps": float(np.mean([r.n_steps for r in res])),
            "seconds": time.perf_counter() - t0}


# -- the run ---------------------------------------------------------------------------------------
def _fired_rates(fired: Tensor, labels: Sequence[str]) -> dict[str, float]:
    return {lab: float(fired[[i for i, x in enumerate(labels) if x == lab]].double().mean())
            for lab in LABELS if lab in labels}


def run_defenses(
    adapter: VLAAdapter,
    direction: Direction | Tensor,
    config: DefensesConfig,
    run_dir: str | Path,
    *,
    subspace: SafetySubspace | None = None,
    chat_probe: LinearProbe | None = None,
    progress: bool = False,
    log: Callable[[str], None] = logger.info,
) -> DefensesResult:
    """Run (or resume) the defense comparison in ``run_dir``.

    ``direction``: the chat model's refusal direction (RDT family); ``subspace``: its safety
    subspace (VLM-Guard; required when a VLM-Guard defense is asked for); ``chat_probe``: a
    harmfulness probe fitted on the chat model -- the gate's probe when
    ``config.gate_probe == "chat"``, otherwise evaluated next to the VLA-probe gate
    (``gate_alternatives``). A run directory of another config, model, direction, subspace or
    probe is refused.
    """
    from tqdm.auto import tqdm

    if not isinstance(adapter, VLAAdapter):
        raise ConfigError(f"{type(adapter).__name__} is not a VLAAdapter")
    d = as_direction(direction, adapter.d_model)
    layers = steering_layers(adapter, d, config.layers)
    if any(x in config.defenses for x in NEEDS_SUBSPACE) and subspace is None:
        raise ConfigError("VLM-Guard needs the chat model's safety subspace",
                          fix="pass subspace=safety_subspace(chat, harmful, harmless, layer=..., k=...)")
    if subspace is not None:
        subspace.check_d_model(adapter.d_model)
    if config.gate_probe == "chat" and chat_probe is None and "gated_rdt+" in config.defenses:
        raise ConfigError("gate_probe='chat' needs chat_probe=", fix="rdt_interp.defenses.chat_harm_probe(chat, ...)")
    dir_info = {"digest": digest_tensor(d.vector)[:16], "norm": d.norm, "rank": d.rank,
                "provenance": d.provenance.to_dict()}
    # Closed-loop settings and figures change no other step: a run can gain closed-loop
    # conditions later without recomputing the rest.
    identity = {k: v for k, v in config.to_dict().items() if k not in _ADD_LATER}
    run = RunDir(run_dir, {
        "experiment": "defenses", "config": identity, "model": adapter.describe(),
        "direction": {k: dir_info[k] for k in ("digest", "norm", "rank")},
        "subspace": subspace.info() if subspace is not None else None,
        "chat_probe": digest_tensor(chat_probe.weight)[:16] if chat_probe is not None else None}, log=log)
    timed = run.timed_step

    requests = load_requests(adapter, config.prompt_file, n_pairs=config.n_pairs, val_fraction=config.val_fraction,
                             images=config.images, seed=config.seed)
    listed = timed("requests", lambda: [r.to_dict() for r in requests])
    if [x["instruction"] for x in listed] != [r.instruction for r in requests]:
        raise ConfigError(f"{run.path} holds other requests than this config makes", fix="choose a new run directory")
    val = [r for r in requests if r.split == "val"]
    test = [r for r in requests if r.split == "test"]
    if not test:
        raise ConfigError("no test requests", fix="raise n_pairs or lower val_fraction")
    labels = [r.label for r in test]
    y_test = torch.tensor([lab == "harmful" for lab in labels])

    gate: HarmGate | None = None
    gate_test: GateRates | None = None
    alternatives: dict[str, Any] = {}
    test_scores: Tensor | None = None
    if "gated_rdt+" in config.defenses:
        gate_layers = [layers[0]] if config.gate_layers is None else list(config.gate_layers)

        def fit(probe: LinearProbe | None) -> dict[str, Any]:
            # a probe from elsewhere reads the layer it was fitted at, if the VLA has it
            at = [probe.layer] if probe is not None and probe.layer is not None else gate_layers
            return fit_gate(adapter, val, layer=at, role=config.gate_role,
                            target_fpr=config.gate_target_fpr, probe=probe, C=config.gate_C,
                            folds=config.gate_folds, batch_size=config.batch_size, backend=config.backend,  # type: ignore[arg-type]
                            seed=config.seed).to_dict()

        gate = HarmGate.from_dict(timed("gate", lambda: fit(chat_probe if config.gate_probe == "chat" else None)))

        def score_test(g: HarmGate) -> dict[str, Any]:
            s = g.scores(adapter, test, batch_size=config.batch_size, backend=config.backend)  # type: ignore[arg-type]
            return {"scores": s.tolist(), "rates": gate_rates(s, y_test, g.threshold, n_boot=config.n_boot,
                                                               seed=config.seed).to_dict()}

        scored = timed("gate_test", lambda: score_test(gate))
        test_scores = torch.tensor(scored["scores"], dtype=torch.float32)
        gate_test = GateRates.from_dict(scored["rates"])
        if chat_probe is not None and config.gate_probe == "vla":
            def alt() -> dict[str, Any]:
                g = HarmGate.from_dict(fit(chat_probe))
                return {"chat": {"gate": {k: v for k, v in g.to_dict().items() if k != "probe"},
                                 "test": score_test(g)["rates"]}}
            alternatives = timed("gate_alternatives", alt)

    ctx = DefenseContext(adapter, d, layers, config, subspace, gate)
    mcfg = config.metrics_config()
    store = PredictionStore(run.path / "predictions")
    base = store.get("test-none", lambda: ctx.predict("none", 0.0, test)[0], n_rows=len(test))
    conds: list[DefenseCondition] = []
    bar = tqdm(total=len(config.conditions()), desc="defenses", disable=not progress, leave=False)
    for defense, strength in config.conditions():
        key = condition_key(defense, strength)

        def do(defense: str = defense, strength: float = strength, key: str = key) -> dict[str, Any]:
            t0 = time.perf_counter()
            fired_t: Tensor | None = None
            if defense == "none":
                acts = base
            elif defense == "gated_rdt+":
                assert test_scores is not None and gate is not None
                fired_t = gate.fires(test_scores)
                acts = store.get(f"test-{key}", lambda: ctx.predict(defense, strength, test, gate_scores=test_scores)[0],
                                 n_rows=len(test))
            else:
                acts = store.get(f"test-{key}", lambda: ctx.predict(defense, strength, test)[0], n_rows=len(test))
            seconds = time.perf_counter() - t0
            res = condition_metrics(adapter.action_tokenizer, acts, base, labels, mcfg, mode=defense,
                                    alpha=strength, alpha_text=config.steering(defense, strength, layers).alpha_text
                                    if defense in STEERED else 0.0, split="test", layers=layers)
            tok = adapter.action_tokenizer
            still = {lab: zero_motion_rate(tok, acts.ids[[i for i, x in enumerate(labels) if x == lab]],
                                           window=config.window, unnorm_key=config.unnorm_key,
                                           n_boot=config.n_boot, seed=config.seed + k)
                     for k, lab in enumerate(LABELS) if lab in labels}
            return DefenseCondition(defense, strength, res, still,
                                    _fired_rates(fired_t, labels) if fired_t is not None else {}, None,
                                    seconds).to_dict()

        cond = DefenseCondition.from_dict(timed(f"condition-{key}", do))
        if config.closed_loop_episodes > 0 and (config.closed_loop_conditions is None
                                                or key in config.closed_loop_conditions):
            loop = timed(f"closed_loop-{key}-{config.closed_loop_episodes}x{config.closed_loop_steps}",
                         lambda defense=defense, strength=strength: closed_loop_success(
                             ctx, defense, strength, config.closed_loop_episodes, config.closed_loop_steps,
                             n_boot=config.n_boot, seed=config.seed))
            cond = dataclasses.replace(cond, closed_loop=loop)
        conds.append(cond)
        bar.update(1)
    bar.close()
    counts = {f"{s}/{lab}": sum(r.split == s and r.label == lab for r in requests)
              for s in ("val", "test") for lab in LABELS}
    result = DefensesResult(config, adapter.describe(), dir_info, layers, tuple(conds),
                            subspace.info() if subspace is not None else None,
                            {k: v for k, v in gate.to_dict().items() if k != "probe"} if gate is not None else None,
                            gate_test, alternatives, counts, run.timings())
    run.save("result", result.to_dict())
    run.save("table", result.table_rows())
    (run.path / "table.md").write_text(result.markdown())
    if config.figures:
        from rdt_interp.viz.defenses import defenses_figures  # figures read the result types only

        defenses_figures(result, run.path / "figures")
    return result



__all__ = ["DefenseContext", "closed_loop_success", "run_defenses", "zero_motion_rate"]

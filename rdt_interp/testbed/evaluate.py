"""Evaluate the testbed VLA: offline bin accuracy, closed-loop success, harmful vs benign motion,
and how often the original chat model refuses the text form of the same harmful instructions.

    rdt-interp testbed eval --out runs/testbed-eval.json [--delta DIR]

Sections (each is saved as soon as it is done, so a killed evaluation continues):

* ``bins`` — held-out benign test samples (test-split scenes, a third with unseen instruction
  templates or task/object combinations): greedy action tokens vs the expert's, per dimension
  exact and within ±k bins, decoded-action error.
* ``closed_loop`` — held-out test episodes run in the simulator with the VLA in the loop, vs the
  always-zero policy on the same episodes; success rates with percentile bootstrap CIs.
* ``harmful`` — the testbed's grounded harmful episodes (never in training) and their benign twins
  in the same scenes: first-step action metrics (zero-motion mass, HRR, magnitude) and short
  closed-loop rollouts (zero-motion steps, commanded translation, path length, grasps).
* ``image_dependence`` — the ``bins`` samples again with every image swapped for another
  sample's: how many action tokens change and how much bin accuracy drops (does it look?).
* ``chat`` — Qwen2.5-Coder-0.5B-Instruct (the VLA's base, with its own chat template) on the
  same instructions as text, greedy, substring refusal judge.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from rdt_interp.analysis.behaviour import action_metrics, refusal_rate
from rdt_interp.analysis.stats import mean_ci, wilson_interval
from rdt_interp.errors import ConfigError
from rdt_interp.models.vla import VLAAdapter, VLARequest
from rdt_interp.schema import strict_schema
from rdt_interp.storage import atomic_write_json, read_json
from rdt_interp.testbed.adapter import UNNORM_KEY
from rdt_interp.testbed.dataset import generate_demos, harmful_episodes, split_tasks
from rdt_interp.testbed.scene import render
from rdt_interp.testbed.sim import (
    DEFAULT_MAX_STEPS,
    ROTATION_EPS,
    TRANSLATION_EPS,
    EpisodeResult,
    Task,
    motion_stats,
    rollout,
    step,
    success,
    zero_policy,
)

logger = logging.getLogger(__name__)

WITHIN = (1, 5, 10)
DIM_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")


@dataclass(frozen=True)
class EvalConfig:
    n_bin_samples: int = 1024
    n_episodes: int = 240
    max_steps: int = DEFAULT_MAX_STEPS
    harmful_steps: int = 20
    chat_max_new_tokens: int = 48
    batch_size: int = 32
    n_boot: int = 2000
    seed: int = 0
    workers: int = 1  # processes that generate the held-out demonstrations

    def __post_init__(self) -> None:
        small = [f"{k}={v}" for k, v in asdict(self).items() if k != "seed" and v < 1]
        if small:
            raise ConfigError(f"evaluation settings must be >= 1, got {', '.join(small)}")


strict_schema(EvalConfig)



#: |decoded action| below these counts as "no motion" when comparing signs: half the expert's
#: command quantum (5 mm, 0.05 rad), so the sign classes are exactly the expert's
SIGN_EPS = (0.0025, 0.0025, 0.0025, 0.025, 0.025, 0.025)


# -- offline: bins vs the expert ----------------------------------------------------------------------
def bin_metrics(tok: Any, pred_ids: Int[Tensor, "n 7"], target_ids: Int[Tensor, "n 7"]) -> dict[str, Any]:
    """Per dimension: exact-bin and within-±k accuracy (a non-action token counts as wrong) and
    mean |bin difference| over the rows whose prediction is an action token."""
    is_act = tok.is_action_token(pred_ids)
    diff = (tok.ids_to_bins(pred_ids) - tok.ids_to_bins(target_ids)).abs().double()
    out: dict[str, Any] = {"n": int(pred_ids.shape[0]),
                           "action_token_rate": is_act.double().mean(0).tolist(),
                           "exact": ((diff == 0) & is_act).double().mean(0).tolist()}
    for k in WITHIN:
        out[f"within_{k}"] = ((diff <= k) & is_act).double().mean(0).tolist()
    masked = torch.where(is_act, diff, torch.nan)
    out["mean_abs_bin_diff"] = masked.nanmean(0).tolist()
    out["exact_all_dims"] = float(((diff == 0) & is_act).double().mean())
    out["within_5_all_dims"] = float(((diff <= 5) & is_act).double().mean())
    if UNNORM_KEY not in tok.norm_stats:  # no statistics: no actions to take signs of
        return out
    # direction of motion (-, 0, +) per motion dimension and open/closed for the gripper
    pred_a, true_a = tok.decode(pred_ids, UNNORM_KEY).double(), tok.decode(target_ids, UNNORM_KEY).double()
    eps = torch.tensor(SIGN_EPS, dtype=torch.float64)
    sign = lambda a: torch.where(a[:, :6].abs() <= eps, 0.0, a[:, :6].sign())  # noqa: E731
    same = torch.cat([sign(pred_a) == sign(true_a), ((pred_a[:, 6:] > 0.5) == (true_a[:, 6:] > 0.5))], dim=1)
    out["sign"] = (same & is_act).double().mean(0).tolist()
    return out


def predict_in_batches(
    vla: VLAAdapter, requests: Sequence[VLARequest], batch_size: int, *, return_logits: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Greedy ``(token_ids, actions, action_logits)`` for many requests, ``batch_size`` at a time."""
    ids, acts, logits = [], [], []
    for s in range(0, len(requests), batch_size):
        p = vla.predict_actions(requests[s:s + batch_size], unnorm_key=UNNORM_KEY, return_logits=return_logits)
        ids.append(p.token_ids.cpu())
        acts.append(p.actions.cpu())
        if return_logits:
            logits.append(p.action_logits.float().cpu())
    return torch.cat(ids), torch.cat(acts), (torch.cat(logits) if return_logits else None)


def _bin_samples(cfg: EvalConfig, image_size: int) -> tuple[Any, np.ndarray]:
    demos = generate_demos("test", min_samples=cfg.n_bin_samples, image_size=image_size, workers=cfg.workers)
    return demos, np.sort(np.random.default_rng([cfg.seed, 0xB1]).permutation(len(demos))[:cfg.n_bin_samples])


def evaluate_bins(vla: VLAAdapter, cfg: EvalConfig) -> dict[str, Any]:
    demos, idx = _bin_samples(cfg, vla.image_size)
    reqs = [VLARequest(demos.instructions[int(demos.instruction_ids[j])], demos.images[j]) for j in idx]
    tok = vla.action_tokenizer
    pred, actions, _ = predict_in_batches(vla, reqs, cfg.batch_size)
    expert = torch.from_numpy(demos.actions[idx]).double()
    target = tok.encode(expert, UNNORM_KEY)
    novel_eps = {e.index for e in demos.episodes if e.novel}
    novel = torch.tensor([int(demos.episode_ids[j]) in novel_eps for j in idx])
    out = {"all": bin_metrics(tok, pred, target),
           "seen_instructions": bin_metrics(tok, pred[~novel], target[~novel]),
           "novel_instructions": bin_metrics(tok, pred[novel], target[novel]) if novel.any() else None,
           "dims": list(DIM_NAMES), "within": list(WITHIN)}
    # the expert's own actions, discretized and decoded: the floor of the bin error
    err = (actions.double() - expert).abs()
    out["mean_abs_error"] = err.mean(0).tolist()
    out["quantization_error"] = (tok.decode(target, UNNORM_KEY) - expert).abs().mean(0).tolist()
    # a constant-action baseline: every dimension's most common expert bin
    mode = torch.mode(target, dim=0).values
    out["majority_baseline"] = bin_metrics(tok, mode.expand_as(target), target)
    out["episodes"] = len({int(demos.episode_ids[j]) for j in idx})
    return out


def evaluate_image_dependence(vla: VLAAdapter, cfg: EvalConfig, n: int = 256) -> dict[str, Any]:
    """Does the policy look? The same samples as ``bins`` with each image swapped for another
    sample's (the next one in the set: another step or scene): how many action tokens change,
    and how much bin accuracy vs the expert drops."""
    demos, idx = _bin_samples(cfg, vla.image_size)
    idx = idx[:n]
    swapped = np.roll(idx, len(idx) // 2)  # half the set away: another episode, another scene
    ins = [demos.instructions[int(demos.instruction_ids[j])] for j in idx]
    tok = vla.action_tokenizer
    own, _, _ = predict_in_batches(vla, [VLARequest(i, demos.images[j]) for i, j in zip(ins, idx, strict=True)],
                                   cfg.batch_size)
    other, _, _ = predict_in_batches(vla, [VLARequest(i, demos.images[j]) for i, j in zip(ins, swapped, strict=True)],
                                     cfg.batch_size)
    target = tok.encode(torch.from_numpy(demos.actions[idx]).double(), UNNORM_KEY)
    changed = (own != other).double()
    return {"n": len(idx), "tokens_changed": changed.mean(0).tolist(),
            "rows_with_any_change": float(changed.amax(1).mean()),
            "mean_abs_bin_change": (tok.ids_to_bins(own) - tok.ids_to_bins(other)).abs().double().mean(0).tolist(),
            "own_image": bin_metrics(tok, own, target), "swapped_image": bin_metrics(tok, other, target)}


# -- closed loop --------------------------------------------------------------------------------------
def vla_batch_policy(
    vla: VLAAdapter, batch_size: int, *, blank: bool = False
) -> Callable[[list[np.ndarray], list[str]], np.ndarray]:
    """The VLA as a batched policy; ``blank=True`` shows it a black image instead of the scene."""
    def act(images: list[np.ndarray], instructions: list[str]) -> np.ndarray:
        if blank:
            images = [np.zeros_like(im) for im in images]
        reqs = [VLARequest(i, im) for im, i in zip(images, instructions, strict=True)]
        _, actions, _ = predict_in_batches(vla, reqs, batch_size)
        return actions.numpy()

    return act


def constant_policy(action: np.ndarray) -> Callable[[list[np.ndarray], list[str]], np.ndarray]:
    """Always the same action (the constant-bin baseline), whatever it sees."""
    a = np.asarray(action, dtype=np.float32)
    return lambda images, instructions: np.repeat(a[None], len(images), axis=0)


def constant_bin_action(vla: VLAAdapter, cfg: EvalConfig) -> tuple[list[int], np.ndarray]:
    """Every dimension's most common expert bin on validation demonstrations, and its action."""
    tok = vla.action_tokenizer
    demos = generate_demos("val", min_samples=cfg.n_bin_samples, image_size=vla.image_size, workers=cfg.workers)
    ids = tok.encode(torch.from_numpy(demos.actions).double(), UNNORM_KEY)
    mode = torch.mode(ids, dim=0).values
    return tok.ids_to_bins(mode).tolist(), tok.decode(mode[None], UNNORM_KEY)[0].float().numpy()


def batched_rollouts(
    policy: Callable[[list[np.ndarray], list[str]], np.ndarray],
    tasks: Sequence[Task],
    max_steps: int,
    *,
    image_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[EpisodeResult]:
    """:func:`rdt_interp.testbed.sim.rollout` for many tasks in lockstep (one batched policy call
    per step); episode ``i`` gets exactly what ``rollout`` would give it."""
    states = [[t.scene] for t in tasks]
    actions: list[list[np.ndarray]] = [[] for _ in tasks]
    ok = [success(t, t.scene) for t in tasks]
    for k in range(max_steps):
        live = [i for i in range(len(tasks)) if not ok[i]]
        if not live:
            break
        images = [render(states[i][-1], image_size) for i in live]
        acts = policy(images, [tasks[i].instruction for i in live])
        for i, a in zip(live, acts, strict=True):
            a = np.asarray(a, dtype=np.float32)
            actions[i].append(a)
            states[i].append(step(states[i][-1], a))
            ok[i] = success(tasks[i], states[i][-1])
        if progress is not None:
            progress(k + 1, len(live))
    out = []
    for i, t in enumerate(tasks):
        acts = np.stack(actions[i]).astype(np.float32) if actions[i] else np.zeros((0, 7), np.float32)
        out.append(EpisodeResult(t, ok[i], len(actions[i]), acts, tuple(states[i]),
                                 motion_stats(acts, tuple(states[i]))))
    return out


def _rate(flags: Sequence[bool]) -> dict[str, float] | None:
    """A rate with its Wilson interval; None for an empty group (nothing to estimate)."""
    k, n = int(sum(bool(f) for f in flags)), len(flags)
    if n == 0:
        return None
    rate, lo, hi = wilson_interval(k, n)
    return {"rate": rate, "lo": lo, "hi": hi, "n": n, "k": k, "interval": "wilson95"}


def evaluate_closed_loop(vla: VLAAdapter, cfg: EvalConfig, *, progress: bool = False) -> dict[str, Any]:
    """Held-out test episodes with the VLA in the loop, next to three baselines on the same
    episodes: the always-zero policy, the constant most-common-bin policy and the VLA shown a
    black image (does success come from looking?). ``progress``: a bar per policy on a terminal."""
    from rdt_interp.testbed.dataset import is_novel

    specs_tasks = split_tasks("test", cfg.n_episodes)
    tasks = [t for _, t in specs_tasks]
    t0 = time.perf_counter()
    bins, const = constant_bin_action(vla, cfg)

    def run(name: str, policy: Callable[[list[np.ndarray], list[str]], np.ndarray]) -> list[EpisodeResult]:
        with tqdm(total=cfg.max_steps, desc=f"closed loop, {name}", unit="step", leave=False,
                  disable=None if progress else True) as bar:

            def step_done(k: int, n: int) -> None:
                bar.update(1)
                bar.set_postfix(running=n)
                if k % 20 == 0:
                    logger.debug("[closed loop, %s] step %d: %d running (%.0f s)", name, k, n,
                                 time.perf_counter() - t0)

            return batched_rollouts(policy, tasks, cfg.max_steps, image_size=vla.image_size, progress=step_done)

    results = {"vla": run("vla", vla_batch_policy(vla, cfg.batch_size)),
               "vla_blank_image": run("blank image", vla_batch_policy(vla, cfg.batch_size, blank=True)),
               "constant_bin": run("constant", constant_policy(const)),
               "zero_policy": [rollout(zero_policy, t, cfg.max_steps) for t in tasks]}
    ok = {k: [bool(r.success) for r in v] for k, v in results.items()}
    vla_ok = ok["vla"]
    diff = torch.tensor([float(a) - float(b) for a, b in zip(vla_ok, ok["zero_policy"], strict=True)],
                        dtype=torch.float64)
    est, lo, hi = mean_ci(diff, n_boot=cfg.n_boot, seed=cfg.seed)
    by_family: dict[str, Any] = {}
    for fam in sorted({t.family for t in tasks}):
        sel = [i for i, t in enumerate(tasks) if t.family == fam]
        by_family[fam] = {name: _rate([flags[i] for i in sel]) for name, flags in ok.items()}
    novel = [is_novel(ts) for ts, _ in specs_tasks]
    res = results["vla"]
    return {
        **{name: _rate(flags) for name, flags in ok.items()},
        "constant_bin_action": {"bins": bins, "action": const.tolist(), "chosen_on": "val demonstrations"},
        "difference_vs_zero": {"mean": float(est), "lo": float(lo), "hi": float(hi), "interval": "bootstrap95"},
        "by_family": by_family,
        "novel": _rate([o for o, n in zip(vla_ok, novel, strict=True) if n]),
        "seen": _rate([o for o, n in zip(vla_ok, novel, strict=True) if not n]),
        "max_steps": cfg.max_steps,
        "episodes": [{"instruction": t.instruction, "seed": t.scene.seed, "family": t.family,
                      "novel": n, "success": o, "n_steps": r.n_steps,
                      "mean_translation": r.motion.mean_translation, "grasped": list(r.motion.grasped)}
                     for t, r, o, n in zip(tasks, res, vla_ok, novel, strict=True)],
        "seconds": time.perf_counter() - t0,
    }


# -- harmful vs benign motion ---------------------------------------------------------------------------
def _still(actions: Tensor) -> Tensor:
    """Zero-motion actions in the simulator's sense (|d| <= 1 mm and |rot| <= 0.01 rad)."""
    return (actions[:, :3].abs() <= TRANSLATION_EPS).all(1) & (actions[:, 3:6].abs() <= ROTATION_EPS).all(1)


def _summary(values: Sequence[float], cfg: EvalConfig) -> dict[str, float]:
    est, lo, hi = mean_ci(torch.tensor(values, dtype=torch.float64), n_boot=cfg.n_boot, seed=cfg.seed)
    return {"mean": float(est), "lo": float(lo), "hi": float(hi), "n": len(values)}


def evaluate_harmful(vla: VLAAdapter, cfg: EvalConfig) -> dict[str, Any]:
    eps = harmful_episodes(include_twins=True)
    harm = [e for e in eps if e.prompt.label == "harmful"]
    twin = [e for e in eps if e.prompt.label != "harmful"]
    if len(harm) != len(twin):
        raise ConfigError("harmful episodes and twins do not pair up")
    tok = vla.action_tokenizer
    t0 = time.perf_counter()
    out: dict[str, Any] = {"n_pairs": len(harm), "steps": cfg.harmful_steps}
    first: dict[str, Any] = {}
    for name, group in (("harmful", harm), ("benign_twin", twin)):
        reqs = [VLARequest(e.task.instruction, render(e.task.scene, vla.image_size)) for e in group]
        ids, acts, logits = predict_in_batches(vla, reqs, cfg.batch_size, return_logits=True)
        m = action_metrics(tok, logits=logits, ids=ids if bool(tok.is_action_token(ids).all()) else None,
                           unnorm_key=UNNORM_KEY, magnitude_dims=(0, 1, 2), n_boot=cfg.n_boot, seed=cfg.seed,
                           label=name)
        first[name] = {
            "zero_motion_rate": _rate(_still(acts.double()).tolist()),
            "translation_cm": _summary((acts[:, :3].double().norm(dim=1) * 100).tolist(), cfg),
            "zero_mass": list(m.value("zero_mass")), "hrr_strict": list(m.value("hrr_strict")),
            "hrr_partial": list(m.value("hrr_partial")), "magnitude_m": list(m.value("magnitude")),
            "gripper_open_rate": _rate((acts[:, 6] > 0.5).tolist()),
            "action_token_rate": float(tok.is_action_token(ids).double().mean()),
        }
        first[name]["_translation"] = (acts[:, :3].double().norm(dim=1) * 100).tolist()
    diff = [a - b for a, b in zip(first["harmful"].pop("_translation"), first["benign_twin"].pop("_translation"),
                                  strict=True)]
    first["paired_translation_diff_cm"] = _summary(diff, cfg)
    out["first_step"] = first
    logger.info("[harmful] first-step predictions done (%.0f s)", time.perf_counter() - t0)
    policy = vla_batch_policy(vla, cfg.batch_size)
    rolls = batched_rollouts(policy, [e.task for e in harm + twin], cfg.harmful_steps, image_size=vla.image_size)
    loop: dict[str, Any] = {}
    for name, sl in (("harmful", slice(0, len(harm))), ("benign_twin", slice(len(harm), None))):
        rs = rolls[sl]
        group = (harm + twin)[sl]
        near = []
        for e, r in zip(group, rs, strict=True):
            named = [r.motion.closest[k] for k in e.objects if k in r.motion.closest]
            if named:
                near.append(100 * min(named))
        loop[name] = {
            "frac_zero_motion_steps": _summary([r.motion.frac_zero_motion for r in rs], cfg),
            "all_steps_zero_motion": _rate([r.motion.zero_motion for r in rs]),
            "mean_translation_cm": _summary([100 * r.motion.mean_translation for r in rs], cfg),
            "path_length_cm": _summary([100 * r.motion.path_length for r in rs], cfg),
            "grasped_something": _rate([bool(r.motion.grasped) for r in rs]),
            "closest_to_named_object_cm": _summary(near, cfg) if near else None,
        }
    loop["paired_path_length_diff_cm"] = _summary(
        [100 * (a.motion.path_length - b.motion.path_length)
         for a, b in zip(rolls[:len(harm)], rolls[len(harm):], strict=True)], cfg)
    out["closed_loop"] = loop
    from collections import Counter

    out["categories"] = dict(Counter(e.prompt.category for e in harm))
    out["seconds"] = time.perf_counter() - t0
    return out


# -- the chat model on the same instructions ------------------------------------------------------------
def evaluate_chat(cfg: EvalConfig, chat: Any | None = None) -> dict[str, Any]:
    """Refusal rate of the base chat model on the harmful instructions and their benign twins."""
    from rdt_interp.prompts import robot_instructions
    from rdt_interp.tracing.generation import complete

    if chat is None:
        from rdt_interp.testbed.adapter import load_base_model

        chat = load_base_model()
    ps = list(robot_instructions())
    grounded = {e.prompt.instruction for e in harmful_episodes()}
    t0 = time.perf_counter()
    out: dict[str, Any] = {"model": chat.name, "max_new_tokens": cfg.chat_max_new_tokens,
                           "template": "the model's own chat template (default system prompt), greedy"}
    for label in ("harmful", "benign"):
        items = [p for p in ps if p.label == label]
        texts = complete(chat, [p.instruction for p in items], max_new_tokens=cfg.chat_max_new_tokens,
                         batch_size=cfg.batch_size, progress=False)
        rr = refusal_rate(texts, n_boot=cfg.n_boot, seed=cfg.seed, label=label)
        out[label] = _rate(rr.flags)
        if label == "harmful":
            sel = [i for i, p in enumerate(items) if p.instruction in grounded]
            out["harmful_grounded"] = _rate([rr.flags[i] for i in sel])
        out[f"{label}_completions"] = [{"instruction": p.instruction, "completion": t, "refused": f}
                                       for p, t, f in zip(items, texts, rr.flags, strict=True)]
    out["seconds"] = time.perf_counter() - t0
    return out


# -- the run ------------------------------------------------------------------------------------------
SECTIONS = ("bins", "closed_loop", "harmful", "chat", "image_dependence")


def evaluate(
    out: str | os.PathLike[str],
    vla: VLAAdapter | None = None,
    cfg: EvalConfig | None = None,
    *,
    sections: Sequence[str] = SECTIONS,
    chat: Any | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the sections not yet in ``out`` (a JSON file), saving after each; returns the results.

    Messages go to :mod:`logging` (``rdt_interp.testbed.evaluate``); ``progress`` shows progress
    bars when the output is a terminal.
    """
    cfg = cfg or EvalConfig()
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown sections {unknown}", fix=f"choose from {list(SECTIONS)}")
    path = Path(out)
    results: dict[str, Any] = read_json(path) if path.is_file() else {}
    if results.get("config", asdict(cfg)) != asdict(cfg):
        raise ConfigError(f"{path} holds results of another evaluation configuration",
                          fix="use a new output file")
    results["config"] = asdict(cfg)
    if vla is None and any(s != "chat" and s not in results for s in sections):
        from rdt_interp.testbed.adapter import load_testbed_vla

        vla = load_testbed_vla()
    if vla is not None:
        results["model"] = vla.describe() | {"manifest_delta_sha256": getattr(vla, "manifest", {}).get(
            "delta", {}).get("sha256")}
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "bins": lambda: evaluate_bins(vla, cfg),
        "closed_loop": lambda: evaluate_closed_loop(vla, cfg, progress=progress),
        "harmful": lambda: evaluate_harmful(vla, cfg),
        "chat": lambda: evaluate_chat(cfg, chat),
        "image_dependence": lambda: evaluate_image_dependence(vla, cfg),
    }
    for name in sections:
        if name in results:
            continue
        t0 = time.perf_counter()
        logger.info("[evaluate] %s…", name)
        results[name] = runners[name]()
        results.setdefault("seconds", {})[name] = time.perf_counter() - t0
        atomic_write_json(path, results)
        logger.info("[evaluate] %s done in %.0f s", name, time.perf_counter() - t0)
    return results


def evaluate_delta(
    out: str | os.PathLike[str],
    delta: str | os.PathLike[str] | None = None,
    cfg: EvalConfig | None = None,
    *,
    sections: Sequence[str] = SECTIONS,
    device: str = "cpu",
    threads: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """:func:`evaluate` of a trained delta (default: the committed one) on ``device``, with the
    base chat model for the ``chat`` section (``rdt-interp testbed eval``)."""
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:  # before any model loads
        raise ConfigError(f"unknown sections {unknown}", fix=f"choose from {list(SECTIONS)}")
    torch.set_num_threads(threads)
    from rdt_interp.testbed.adapter import load_testbed_vla

    vla = load_testbed_vla(delta, device=device)
    chat = None
    if "chat" in sections:
        from rdt_interp.models import load_chat_model
        from rdt_interp.testbed.adapter import BASE_MODEL

        chat = load_chat_model(BASE_MODEL, device=device)
    return evaluate(out, vla, cfg, sections=sections, chat=chat, progress=progress)

"""The chat side of RDT, end to end: extract -> select -> choose alpha -> evaluate -> figures.

Prompts: train splits for extraction, validation splits for selection and for choosing the
addition coefficient, test splits only for the final numbers. As in Arditi et al., the train and
validation prompts are filtered first (:func:`~rdt_interp.directions.selection.filter_prompts`):
harmful ones the model does not refuse and harmless ones it does are dropped (step ``filter``;
``filter_data = false`` turns it off, a departure the report names). Test prompts are never
filtered. Every step is cached in the run directory
(:class:`~rdt_interp.studies.rundir.RunDir`), so an interrupted run resumes.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rdt_interp.directions.diff_in_means import CandidateDirections, extract_candidates
from rdt_interp.directions.direction import Direction
from rdt_interp.directions.scoring import PromptBatch, kl_divergence, last_logprobs
from rdt_interp.directions.selection import (
    CandidateScore,
    SelectionConfig,
    SelectionResult,
    filter_prompts,
    select_direction,
)
from rdt_interp.errors import ConfigError, SelectionError
from rdt_interp.models.chat import ChatModel
from rdt_interp.prompts import load_split
from rdt_interp.storage import digest_strings, digest_tensor
from rdt_interp.studies.chat.config import ChatRefusalConfig
from rdt_interp.studies.rundir import RunDir
from rdt_interp.tracing.generation import complete
from rdt_interp.tracing.interventions import AblateDirection, AddDirection

logger = logging.getLogger(__name__)  # messages; the CLI configures the handler and level


def _n_val(cfg: ChatRefusalConfig) -> int:
    return max(cfg.selection.final_n, cfg.alpha_val_n)


def _pools(cfg: ChatRefusalConfig) -> dict[str, list[str]]:
    """The prompts each split is drawn from. With filtering, every harmful train / val prompt
    (half of them are complied with at baseline on small models) and twice the needed harmless
    ones, so that enough remain."""
    s = cfg.seed
    if not cfg.filter_data:
        return {
            "harmful_train": load_split("harmful_train").take(cfg.n_train, seed=s).instructions,
            "harmless_train": load_split("harmless_train").take(cfg.n_train, seed=s).instructions,
            "harmful_val": load_split("harmful_val").take(cfg.selection.final_n, seed=s).instructions,
            "harmless_val": load_split("harmless_val").take(_n_val(cfg), seed=s).instructions,
        }
    return {
        "harmful_train": load_split("harmful_train").instructions,
        "harmless_train": load_split("harmless_train").take(2 * cfg.n_train, seed=s).instructions,
        "harmful_val": load_split("harmful_val").instructions,
        "harmless_val": load_split("harmless_val").take(2 * _n_val(cfg), seed=s).instructions,
    }


def _sample(items: list[str], n: int, seed: int) -> list[str]:
    """``n`` of ``items`` at random (all if fewer), in their original order."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


def _filter_step(model: ChatModel, cfg: ChatRefusalConfig) -> dict[str, Any]:
    pools = _pools(cfg)
    want = {"harmful_train": cfg.n_train, "harmless_train": cfg.n_train,
            "harmful_val": cfg.selection.final_n, "harmless_val": _n_val(cfg)}
    out: dict[str, Any] = {"splits": {}, "counts": {}, "filtered": cfg.filter_data}
    for split in ("train", "val"):
        h, hl = pools[f"harmful_{split}"], pools[f"harmless_{split}"]
        if cfg.filter_data:
            f = filter_prompts(model, h, hl, batch_size=cfg.selection.batch_size)
            kept = {f"harmful_{split}": f.harmful, f"harmless_{split}": f.harmless}
        else:
            kept = {f"harmful_{split}": h, f"harmless_{split}": hl}
        for name, pool in ((f"harmful_{split}", h), (f"harmless_{split}", hl)):
            chosen = _sample(kept[name], want[name], cfg.seed)
            if len(chosen) < 2:
                raise ConfigError(f"only {len(kept[name])} of {len(pool)} {name} prompts pass the data filter",
                                  fix="this model barely refuses (or refuses everything); set "
                                      "[chat] filter_data = false and read the numbers with that in mind")
            out["splits"][name] = chosen
            out["counts"][name] = {"pool": len(pool), "kept": len(kept[name]), "used": len(chosen)}
    return out


def chat_splits(model: ChatModel, cfg: ChatRefusalConfig, run: RunDir) -> dict[str, list[str]]:
    """Every split of the study: train / val filtered (step ``filter``, cached), test as drawn."""
    filtered = run.timed_step("filter", lambda: _filter_step(model, cfg))
    s = cfg.seed
    return {**filtered["splits"],
            "harmful_test": load_split("harmful_test").take(cfg.n_test, seed=s).instructions,
            "harmless_test": load_split("harmless_test").take(cfg.n_test, seed=s).instructions}


def chat_run_dir(run_dir: str | Path, cfg: ChatRefusalConfig, *, log: Callable[[str], None] = logger.info) -> RunDir:
    """The chat study's run directory (its config is the study's chat section)."""
    return RunDir(run_dir, {"experiment": "chat_refusal", **cfg.to_dict()}, log=log)


def run_chat_refusal(
    model: ChatModel, cfg: ChatRefusalConfig, run_dir: str | Path, *, progress: bool = True,
    log: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Run (or resume) the whole chat-side study in ``run_dir``; returns the summary dict."""
    t_start = time.perf_counter()
    run = chat_run_dir(run_dir, cfg, log=log)
    timed = run.timed_step
    splits = chat_splits(model, cfg, run)

    cands: list[CandidateDirections] = []

    def candidates() -> CandidateDirections:
        if not cands:
            cands.append(extract_candidates(
                model, splits["harmful_train"], splits["harmless_train"],
                batch_size=cfg.capture_batch_size, cache=run.file("activations"), progress=progress))
        return cands[0]

    def do_extract() -> dict[str, Any]:
        c = candidates()
        return {"layers": list(c.layers), "positions": list(c.positions), "selector": c.selector,
                "norms": c.norms.tolist(), "n_harmful": len(c.harmful), "n_harmless": len(c.harmless)}

    timed("extract", do_extract)

    def do_select() -> dict[str, Any]:
        key = selection_key(candidates(), splits, cfg.selection)
        failed = run.load("selection_failed") if run.done("selection_failed") else {}
        # After a failed selection, a relaxation only re-picks from the same table.
        scored = ([CandidateScore(**s) for s in failed["scores"]] if failed.get("key") == key else None)
        if scored is not None:
            log("[reuse]  the scored table of the failed selection (same candidates, prompts and filters)")
        try:
            return select_direction(model, candidates(), splits["harmful_val"], splits["harmless_val"],
                                    cfg.selection, progress=progress, scored=scored).to_dict()
        except SelectionError as exc:
            run.save("selection_failed", {"key": key, "scores": [asdict(s) for s in exc.scores],
                                          "error": str(exc)})
            raise

    selection = SelectionResult.from_dict(timed("selection", do_select))
    dir_path = run.file("direction.safetensors")
    if not dir_path.is_file():
        candidates().direction(selection.layer, selection.position).save(dir_path)
    direction = Direction.load(dir_path, d_model=model.d_model)
    layer = selection.layer

    def add(alpha: float) -> list[AddDirection]:
        return [AddDirection(direction, alpha, layer)]

    def gen(prompts: list[str], ivs, desc: str) -> list[str]:
        return complete(model, prompts, max_new_tokens=cfg.max_new_tokens, interventions=ivs,
                        batch_size=cfg.gen_batch_size, progress=progress, desc=desc)

    def do_alpha() -> dict[str, Any]:
        from rdt_interp.analysis.behaviour import refusal_rate

        val = splits["harmless_val"][: cfg.alpha_val_n]
        rows = []
        for a in cfg.alphas:
            texts = gen(val, add(a), f"alpha={a:g} (val)")
            rr = refusal_rate(texts, n_boot=cfg.n_boot, seed=cfg.seed, label=f"alpha={a:g}")
            rows.append({"alpha": a, "refusal": rr.rate, "lo": rr.lo, "hi": rr.hi, "examples": texts[:3]})
        best = max(rows, key=lambda r: (r["refusal"], -r["alpha"]))
        return {"rows": rows, "chosen_alpha": best["alpha"], "n": len(val), "split": "harmless_val"}

    alpha_sweep = timed("alpha_sweep", do_alpha)
    alpha = float(alpha_sweep["chosen_alpha"])
    ablate = [AblateDirection(direction.ablation_basis)]

    def do_generations() -> dict[str, Any]:
        return {
            "baseline_harmful": gen(splits["harmful_test"], [], "baseline harmful"),
            "baseline_harmless": gen(splits["harmless_test"], [], "baseline harmless"),
            "ablation_harmful": gen(splits["harmful_test"], ablate, "ablation harmful"),
            "addition_harmless": gen(splits["harmless_test"], add(alpha), f"addition harmless a={alpha:g}"),
        }

    generations = timed("generations", do_generations)

    def do_kl() -> dict[str, Any]:
        from rdt_interp.analysis.stats import mean_ci

        batch = PromptBatch.build(model, splits["harmless_test"])
        base = last_logprobs(model, batch)
        kl = kl_divergence(base, last_logprobs(model, batch, ablate))
        est, lo, hi = mean_ci(kl.double(), n_boot=cfg.n_boot, seed=cfg.seed)
        return {"kl": float(est), "lo": float(lo), "hi": float(hi), "per_prompt": kl.tolist()}

    kl = timed("kl_ablation", do_kl)

    def do_eval() -> dict[str, Any]:
        from rdt_interp.analysis.behaviour import refusal_rate

        out: dict[str, Any] = {}
        for key, texts in generations.items():
            rr = refusal_rate(texts, n_boot=cfg.n_boot, seed=cfg.seed, label=key)
            out[key] = {"refusal": rr.rate, "refusal_lo": rr.lo, "refusal_hi": rr.hi,
                        "compliance": 1 - rr.rate, "compliance_lo": 1 - rr.hi, "compliance_hi": 1 - rr.lo,
                        "n": rr.n, "flags": list(rr.flags)}
        return out

    evaluation = timed("evaluation", do_eval)

    def removed_share() -> dict[str, Any]:
        """Of the harmful test prompts refused at baseline, the share ablation made complied with
        (the part of compliance that ablation caused, not baseline compliance)."""
        from rdt_interp.analysis.stats import wilson_interval

        base, abl = evaluation["baseline_harmful"]["flags"], evaluation["ablation_harmful"]["flags"]
        refused = [i for i, f in enumerate(base) if f]
        if not refused:
            return {"rate": None, "lo": None, "hi": None, "k": 0, "n": 0}
        k = sum(1 for i in refused if not abl[i])
        rate, lo, hi = wilson_interval(k, len(refused))
        return {"rate": rate, "lo": lo, "hi": hi, "k": k, "n": len(refused)}

    removed = removed_share()
    summary = {
        "model": model.describe(),
        "layer": layer, "position": selection.position, "filters_passed": selection.filters_passed,
        "relaxation": selection.relaxation,
        "departures": departures(model, cfg, selection),
        "data": run.load("filter")["counts"],
        "alpha": alpha, "direction_norm": direction.norm,
        "baseline_harmful_refusal": evaluation["baseline_harmful"]["refusal"],
        "baseline_harmless_refusal": evaluation["baseline_harmless"]["refusal"],
        "ablation_harmful_compliance": evaluation["ablation_harmful"]["compliance"],
        "addition_harmless_refusal": evaluation["addition_harmless"]["refusal"],
        "ablation_removed_refusals": removed,
        "kl_harmless_ablation": kl["kl"],
        "evaluation": {k: {kk: vv for kk, vv in v.items() if kk != "flags"} for k, v in evaluation.items()},
        "kl": {k: v for k, v in kl.items() if k != "per_prompt"},
        "timings_s": run.timings(),
        "n_test": cfg.n_test,
        "direction_file": str(dir_path),
    }
    summary["wall_s_this_invocation"] = time.perf_counter() - t_start
    run.save("summary", summary)
    return summary


def selection_key(candidates: CandidateDirections, splits: dict[str, list[str]], config: SelectionConfig) -> str:
    """What a selection table depends on: the candidate vectors, the validation prompts and
    every selection setting but the relaxation (which only changes the pick)."""
    settings = {k: v for k, v in asdict(config).items() if k != "if_none_pass"}
    return digest_strings([digest_tensor(candidates.vectors), *splits["harmful_val"], "\x00",
                           *splits["harmless_val"], json.dumps(settings, sort_keys=True)])


def departures(model: ChatModel, cfg: ChatRefusalConfig, selection: SelectionResult | None = None) -> list[str]:
    """Every way this run departs from Arditi et al.'s procedure (empty: none)."""
    out = []
    if getattr(model, "template_name", "model") != "reference":
        out.append("prompt format: the tokenizer's own chat template (reference: Arditi et al.'s "
                   "format for the family, e.g. no default system prompt for Qwen)")
    if getattr(model, "system_prompt", None) is not None:
        out.append("a system prompt (reference: none)")
    out += cfg.departures()
    if selection is not None and selection.relaxation is not None:
        out.append(f"no candidate passed the filters; picked with relaxation {selection.relaxation!r}")
    return out


def load_chat_results(run_dir: str | Path) -> dict[str, Any]:
    """Everything the figures need, read from a finished run directory (no model)."""
    run = Path(run_dir)
    import json

    def rd(name: str) -> Any:
        return json.loads((run / f"{name}.json").read_text())

    return {"selection": rd("selection"), "alpha_sweep": rd("alpha_sweep"), "evaluation": rd("evaluation"),
            "kl": rd("kl_ablation"), "summary": rd("summary"), "extract": rd("extract")}


__all__ = ["ChatRefusalConfig", "chat_run_dir", "chat_splits", "departures", "load_chat_results",
           "run_chat_refusal"]

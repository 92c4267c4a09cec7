"""The chat side of RDT, end to end: extract -> select -> choose alpha -> evaluate -> figures.

Prompts: train splits for extraction, validation splits for selection and for choosing the
addition coefficient, test splits only for the final numbers. Every step is cached in the run
directory (:class:`~rdt_interp.experiments.rundir.RunDir`), so an interrupted run resumes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rdt_interp.directions.diff_in_means import CandidateDirections, extract_candidates
from rdt_interp.directions.direction import Direction
from rdt_interp.directions.scoring import PromptBatch, kl_divergence, last_logprobs
from rdt_interp.directions.selection import SelectionConfig, SelectionResult, select_direction
from rdt_interp.experiments.rundir import RunDir
from rdt_interp.models.chat import ChatModel
from rdt_interp.prompts import load_split
from rdt_interp.tracing.generation import complete
from rdt_interp.tracing.interventions import AblateDirection, AddDirection


@dataclass(frozen=True)
class ChatRefusalConfig:
    model: str = "qwen2.5-coder-0.5b-instruct"
    n_train: int = 128
    n_test: int = 64
    alphas: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    alpha_val_n: int = 32
    max_new_tokens: int = 48
    gen_batch_size: int = 32
    capture_batch_size: int = 16
    # Arditi et al.'s defaults (steering score at coefficient 1). The demo config raises
    # selection.steering_alpha for the 0.5B model: see rdt_interp/data/configs/demo.toml.
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    n_boot: int = 2000
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChatRefusalConfig:
        d = dict(d)
        d["selection"] = SelectionConfig(**d.get("selection", {}))
        d["alphas"] = tuple(d.get("alphas", cls.alphas))
        return cls(**d)


def _splits(cfg: ChatRefusalConfig) -> dict[str, list[str]]:
    s = cfg.seed
    return {
        "harmful_train": load_split("harmful_train").take(cfg.n_train, seed=s).instructions,
        "harmless_train": load_split("harmless_train").take(cfg.n_train, seed=s).instructions,
        "harmful_val": load_split("harmful_val").take(cfg.selection.final_n, seed=s).instructions,
        "harmless_val": load_split("harmless_val").take(max(cfg.selection.final_n, cfg.alpha_val_n), seed=s).instructions,
        "harmful_test": load_split("harmful_test").take(cfg.n_test, seed=s).instructions,
        "harmless_test": load_split("harmless_test").take(cfg.n_test, seed=s).instructions,
    }


def run_chat_refusal(
    model: ChatModel, cfg: ChatRefusalConfig, run_dir: str | Path, *, progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Run (or resume) the whole chat-side study in ``run_dir``; returns the summary dict."""
    t_start = time.perf_counter()
    run = RunDir(run_dir, {"experiment": "chat_refusal", **cfg.to_dict()}, log=log)
    splits = _splits(cfg)
    timed = run.timed_step

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
    selection = SelectionResult.from_dict(timed("selection", lambda: select_direction(
        model, candidates(), splits["harmful_val"], splits["harmless_val"], cfg.selection,
        progress=progress).to_dict()))
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
    summary = {
        "model": model.describe(),
        "layer": layer, "position": selection.position, "filters_passed": selection.filters_passed,
        "alpha": alpha, "direction_norm": direction.norm,
        "baseline_harmful_refusal": evaluation["baseline_harmful"]["refusal"],
        "baseline_harmless_refusal": evaluation["baseline_harmless"]["refusal"],
        "ablation_harmful_compliance": evaluation["ablation_harmful"]["compliance"],
        "addition_harmless_refusal": evaluation["addition_harmless"]["refusal"],
        "kl_harmless_ablation": kl["kl"],
        "evaluation": {k: {kk: vv for kk, vv in v.items() if kk != "flags"} for k, v in evaluation.items()},
        "kl": {k: v for k, v in kl.items() if k != "per_prompt"},
        "timings_s": run.timings(),
        "n_test": cfg.n_test,
    }
    summary["wall_s_this_invocation"] = time.perf_counter() - t_start
    run.save("summary", summary)
    return summary


def load_chat_results(run_dir: str | Path) -> dict[str, Any]:
    """Everything the figures need, read from a finished run directory (no model)."""
    run = Path(run_dir)
    import json

    def rd(name: str) -> Any:
        return json.loads((run / f"{name}.json").read_text())

    return {"selection": rd("selection"), "alpha_sweep": rd("alpha_sweep"), "evaluation": rd("evaluation"),
            "kl": rd("kl_ablation"), "summary": rd("summary"), "extract": rd("extract")}


__all__ = ["ChatRefusalConfig", "load_chat_results", "run_chat_refusal"]

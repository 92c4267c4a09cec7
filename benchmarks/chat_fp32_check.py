"""Does a bf16 chat-side run hold in fp32? Reruns its decisive parts in float32 on the same prompts.

    .venv/bin/python benchmarks/chat_fp32_check.py runs/demo [--n-test 128] [--top 5]

Reads a finished run directory (``RUN/chat``: filter, selection, α sweep, evaluation) made in
bf16 and, with the same model in float32 and the same prompts:

* the data filter's decisions on the validation pools (how many prompts change side);
* the diff-in-means vectors of the filtered train prompts (cosine with the bf16 ones at the
  chosen candidate);
* the selection scores (ablation, steering, KL) of the chosen candidate and the ``--top`` best by
  bf16 ablation score among those the run's pick considered (the passing ones, or the
  relaxation's pool): is the winner the same;
* the four test rates (baseline / ablated harmful, baseline / +α·r harmless) and the KL, with
  the bf16 run's direction and α, on the first ``--n-test`` test prompts of each class.

Writes ``RUN/chat/fp32_check.json`` and prints a table. No test prompt informs any choice.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished study run directory (bf16)")
    ap.add_argument("--n-test", type=int, default=128, help="test prompts per class for the four rates")
    ap.add_argument("--top", type=int, default=5,
                    help="candidates the run's pick considered (by bf16 ablation score) to rescore")
    ap.add_argument("--no-rates", action="store_true", help="skip the test generations (steps 1-3 only)")
    args = ap.parse_args()

    from rdt_interp.analysis.behaviour import refusal_rate
    from rdt_interp.directions.diff_in_means import extract_candidates
    from rdt_interp.directions.direction import Direction
    from rdt_interp.directions.scoring import (
        PromptBatch,
        kl_divergence,
        last_logprobs,
        refusal_score,
    )
    from rdt_interp.directions.selection import SelectionResult, filter_prompts, passes_filters
    from rdt_interp.models.loading import load_chat_model
    from rdt_interp.storage import read_json
    from rdt_interp.studies.chat import (
        ChatRefusalConfig,
        _pools,
        chat_run_dir,
        chat_splits,
    )
    from rdt_interp.studies.config import parse_config
    from rdt_interp.tracing.generation import complete
    from rdt_interp.tracing.interventions import AblateDirection, AddDirection

    chat_dir = args.run / "chat"
    study = parse_config({k: v for k, v in read_json(args.run / "config.json").items() if k != "experiment"})
    cfg: ChatRefusalConfig = study.chat
    sel = SelectionResult.from_dict(read_json(chat_dir / "selection.json"))
    bf16_eval = read_json(chat_dir / "evaluation.json")
    bf16_kl = read_json(chat_dir / "kl_ablation.json")
    alpha = float(read_json(chat_dir / "alpha_sweep.json")["chosen_alpha"])
    t0 = time.perf_counter()
    model = load_chat_model(study.chat_model.name, dtype="float32", template=study.chat_model.template,
                            system_prompt=study.chat_model.system_prompt)
    splits = chat_splits(model, cfg, chat_run_dir(chat_dir, cfg))  # the bf16 run's filtered prompts (cached)
    out: dict = {"run": str(args.run), "alpha": alpha, "chosen_bf16": [sel.layer, sel.position]}

    # 1. the data filter on the validation pools
    pools = _pools(cfg)
    f32 = filter_prompts(model, pools["harmful_val"], pools["harmless_val"])
    bf = read_json(chat_dir / "filter.json")["counts"]
    out["filter_val"] = {"harmful_kept_fp32": len(f32.harmful), "harmful_kept_bf16": bf["harmful_val"]["kept"],
                         "harmless_kept_fp32": len(f32.harmless), "harmless_kept_bf16": bf["harmless_val"]["kept"]}
    print("filter (val pools):", out["filter_val"], flush=True)

    # 2. diff-in-means vectors in fp32
    cands = extract_candidates(model, splits["harmful_train"], splits["harmless_train"],
                               batch_size=cfg.capture_batch_size, progress=False)
    bf_dir = Direction.load(chat_dir / "direction.safetensors")
    v32 = cands.vectors[cands.layers.index(sel.layer), cands.positions.index(sel.position)].float()
    out["cosine_chosen_vector"] = float(torch.nn.functional.cosine_similarity(v32, bf_dir.vector.float(), dim=0))
    out["norm_ratio_chosen_vector"] = float(v32.norm() / bf_dir.vector.float().norm())
    print(f"chosen vector fp32 vs bf16: cosine {out['cosine_chosen_vector']:.4f}, "
          f"norm ratio {out['norm_ratio_chosen_vector']:.4f}", flush=True)

    # 3. selection scores of the chosen and the best passing candidates
    finals = sel.final_scores()
    # the candidates the run's pick considered: the passing ones, or under a relaxation its pool
    if sel.relaxation == "ignore_steering":
        pool = [s for s in finals if s.kl <= cfg.selection.kl_threshold]
    elif sel.relaxation == "unfiltered":
        pool = list(finals)
    else:
        pool = [s for s in finals if s.passes]
    ranked = sorted(pool, key=lambda s: s.ablation)[: args.top]
    if sel.chosen() not in ranked:
        ranked.append(sel.chosen())
    h = splits["harmful_val"][: cfg.selection.final_n]
    hl = splits["harmless_val"][: cfg.selection.final_n]
    ids = model.refusal_token_ids()
    both, harmless = PromptBatch.build(model, h + hl), PromptBatch.build(model, hl)
    base_hl = last_logprobs(model, both)[len(h):]
    rows = []
    for s in ranked:
        r = cands.vectors[cands.layers.index(s.layer), cands.positions.index(s.position)].float()
        lp = last_logprobs(model, both, [AblateDirection(r)])
        abl, kl = float(refusal_score(lp[: len(h)], ids).mean()), float(kl_divergence(base_hl, lp[len(h):]).mean())
        steer = float(refusal_score(last_logprobs(model, harmless, [AddDirection(r, cfg.selection.steering_alpha,
                                                                                   s.layer)]), ids).mean())
        rows.append({"layer": s.layer, "position": s.position, "bf16": [s.ablation, s.steering, s.kl],
                     "fp32": [abl, steer, kl], "passes_fp32": passes_filters(kl, steer, abl, cfg.selection)})
        print(f"  L{s.layer} P{s.position}: ablation {s.ablation:.3f} -> {abl:.3f}, steering {s.steering:.3f} -> "
              f"{steer:.3f}, KL {s.kl:.4f} -> {kl:.4f}", flush=True)
    # the same pick in fp32: the passing ones, or the relaxation's pool
    if sel.relaxation == "ignore_steering":
        pool32 = [r for r in rows if r["fp32"][2] <= cfg.selection.kl_threshold]
    elif sel.relaxation == "unfiltered":
        pool32 = rows
    else:
        pool32 = [r for r in rows if r["passes_fp32"]]
    winner = min(pool32, key=lambda r: r["fp32"][0]) if pool32 else None
    out["selection_rescored"] = rows
    out["chosen_fp32_among_rescored"] = [winner["layer"], winner["position"]] if winner else None
    print("winner among the rescored, fp32:", out["chosen_fp32_among_rescored"], "bf16:", out["chosen_bf16"],
          flush=True)

    if args.no_rates:
        out["seconds"] = time.perf_counter() - t0
        (chat_dir / "fp32_check_selection.json").write_text(json.dumps(out, indent=1))
        return
    # 4. the four test rates and the KL with the bf16 run's direction and alpha
    n = args.n_test
    ht, hlt = splits["harmful_test"][:n], splits["harmless_test"][:n]
    ablate, add = [AblateDirection(bf_dir.ablation_basis)], [AddDirection(bf_dir, alpha, sel.layer)]

    def gen(prompts, ivs):
        return complete(model, prompts, max_new_tokens=cfg.max_new_tokens, interventions=ivs,
                        batch_size=cfg.gen_batch_size, progress=False)

    rates = {}
    for key, prompts, ivs in (("baseline_harmful", ht, []), ("ablation_harmful", ht, ablate),
                              ("baseline_harmless", hlt, []), ("addition_harmless", hlt, add)):
        rr = refusal_rate(gen(prompts, ivs), label=key)
        b = bf16_eval[key]["flags"][:n]
        rates[key] = {"fp32": [rr.rate, rr.lo, rr.hi], "bf16_same_prompts": sum(b) / len(b),
                      "agree": sum(int(x == y) for x, y in zip(rr.flags, b, strict=True)) / len(b)}
        print(f"  {key}: refusal fp32 {rr.rate:.3f} [{rr.lo:.3f}, {rr.hi:.3f}] vs bf16 {sum(b) / len(b):.3f} "
              f"(per-prompt agreement {rates[key]['agree']:.3f})", flush=True)
    batch = PromptBatch.build(model, hlt)
    kl = kl_divergence(last_logprobs(model, batch), last_logprobs(model, batch, ablate))
    out["rates"] = rates
    out["kl"] = {"fp32": float(kl.mean()), "bf16_same_prompts": float(torch.tensor(bf16_kl["per_prompt"][:n]).mean())}
    out["n_test"] = n
    out["seconds"] = time.perf_counter() - t0
    print("KL:", out["kl"], f"({out['seconds']:.0f} s)", flush=True)
    (chat_dir / "fp32_check.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

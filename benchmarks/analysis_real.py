"""The analysis stack on real activations: Qwen2.5-Coder-0.5B-Instruct, harmful vs harmless.

    .venv/bin/python benchmarks/analysis_real.py --out runs/analysis_real [--n 96]

Captures the residual stream (``resid_pre``, every layer) at the five post-instruction tokens of
the built-in Arditi et al. splits, then, with every number carrying a CI and a null:

* per-layer projection AUC on the *test* split along the class-mean difference of the *train*
  split, and the AUC on test of a logistic probe fitted on train (figure ``probe_layers``): with
  a separate train split every interval and p-value is exact;
* layer selection on the *val* split, reported on test (printed);
* the spectrum at the selected layer against shuffled features, and principal angles of the
  top-k subspaces (train vs test at the selected layer, selected vs last layer) against random
  subspaces (figure ``geometry``);
* the specificity of the train direction on test against 1000 random directions, with controls
  ``-r``, label-shuffled class means and an early layer's direction (figure ``specificity``);
* agreement of the train and val directions per layer against random directions (figure
  ``split_alignment``).

Results are saved as JSON next to the figures (PDF + PNG). About 2-4 minutes of 2-core CPU the
first time (the capture is cached under the user cache directory).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from rdt_interp.analysis.alignment import align_directions
from rdt_interp.analysis.probe_grid import evaluate_selected, probe_grid
from rdt_interp.analysis.probes import Labeled, class_mean_difference
from rdt_interp.analysis.specificity import (
    ProjectionAUC,
    label_shuffled_direction,
    specificity_test,
)
from rdt_interp.analysis.subspace import compare_subspaces, spectrum, top_subspace
from rdt_interp.models import load_chat_model
from rdt_interp.prompts import load_split
from rdt_interp.roles import Role
from rdt_interp.tracing import capture
from rdt_interp.viz import figures
from rdt_interp.viz.style import new_figure, paper_style, save_figure

SELECTOR = "post_instruction[-5:]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/analysis_real")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--n", type=int, default=96, help="prompts per class in train and test")
    ap.add_argument("--n-random", type=int, default=1000)
    ap.add_argument("--k", type=int, default=4, help="subspace rank for principal angles")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model = load_chat_model(args.model)
    print(f"loaded {args.model} ({model.n_layers} layers, d={model.d_model}) in {time.perf_counter() - t0:.0f} s")

    def grab(split: str, n: int | None) -> object:
        ps = load_split(split).take(n, seed=0)
        return capture(model, ps.instructions, selector=SELECTOR, site="resid_pre", batch_size=16,
                       cache=True, progress=False, desc=split)

    t0 = time.perf_counter()
    n_val = len(load_split("harmful_val"))  # 39: the whole harmful val split, as many harmless
    splits = {}
    for name, n in (("train", args.n), ("val", n_val), ("test", args.n)):
        splits[name] = Labeled.from_classes(grab(f"harmful_{name}", n), grab(f"harmless_{name}", n),
                                            split=name)
    train, val, test = splits["train"], splits["val"], splits["test"]
    print(f"captured {sum(len(s.y) for s in splits.values())} prompts x {len(train.layers)} layers x "
          f"{len(train.positions)} positions in {time.perf_counter() - t0:.0f} s")
    # Which token each post-instruction position is (the chat template's, same for every prompt).
    batch = model.encode(["x"], padding_side="left")
    post = (batch.roles[0] & int(Role.POST_INSTRUCTION)) != 0
    ids = batch.inputs["input_ids"][0][post].tolist()[-5:]
    tokens = [repr(model.tokenizer.decode([i]))[1:-1] for i in ids]
    labels = {p: f"{p.split('[')[1][:-1]}: {t}" for p, t in zip(train.positions, tokens, strict=True)}
    print("post-instruction tokens:", labels)

    # -- per-layer probe grid on test, direction from train ----------------------------------------
    t0 = time.perf_counter()
    grid = probe_grid(test, fit=train, n_boot=1000, n_perm=1000, seed=0)
    grid.save(out / "probe_grid_test.json")
    print(f"probe grid on test in {time.perf_counter() - t0:.0f} s; projection: {grid.proj_source}; "
          f"probe: {grid.probe_source}; unconverged fits: {grid.n_unconverged}")
    last = train.positions[-1]
    print(f"\nheld-out AUC per layer at {last} ({labels[last]}), test n = {grid.n_pos} + {grid.n_neg}:")
    print(" layer  proj AUC [95% CI]       d      probe AUC [95% CI]")
    for L in grid.layers:
        c = grid.cell(L, last)
        print(f"  {L:3d}   {c['proj_auc']:.3f} [{c['proj_auc_lo']:.3f}, {c['proj_auc_hi']:.3f}]  "
              f"{c['proj_d']:5.2f}   {c['probe_auc']:.3f} [{c['probe_auc_lo']:.3f}, {c['probe_auc_hi']:.3f}]")
    shown = (train.positions[0], train.positions[2], last)
    fig = figures.probe_layers(grid, positions=shown, labels=labels)
    print("wrote", *save_figure(fig, out / "probe_layers"))

    # -- layer selection on val, reported on test --------------------------------------------------
    sel = evaluate_selected(val, test, fit=train, metric="proj_auc", position=last,
                            n_boot=1000, n_perm=1000)
    sel.save(out / "layer_selection.json")
    print(f"\nselected on val (n = {val.n_pos} + {val.n_neg}): layer {sel.layer} (val AUC {sel.val_value:.3f}); "
          f"test AUC {sel.test_value:.3f} [{sel.test_lo:.3f}, {sel.test_hi:.3f}], p = {sel.test_p:.4f}")
    L = sel.layer

    # -- geometry: spectrum and principal angles ---------------------------------------------------
    x_train = train.cell(L, last)
    sp = spectrum(x_train, n_null=50, label="train activations")
    sp.save(out / "spectrum.json")
    last_layer = train.layers[-1]
    angles = [
        compare_subspaces(top_subspace(x_train, args.k), top_subspace(test.cell(L, last), args.k),
                          n_null=1000, label_a=f"L{L} train", label_b="test"),
        compare_subspaces(top_subspace(x_train, args.k), top_subspace(train.cell(last_layer, last), args.k),
                          n_null=1000, label_a=f"L{L}", label_b=f"L{last_layer}"),
    ]
    for a in angles:
        a.save(out / f"angles_{a.label_a}_{a.label_b}.json".replace(" ", "_"))
    print(f"\nspectrum at layer {L}: {sp.n_above_null} components above the shuffled null; "
          f"top-1 explains {sp.explained[0]:.1%}")
    for a in angles:
        print(f"angles {a.label_a} vs {a.label_b}: {np.round(a.angles_deg, 1)} deg "
              f"(random: {np.round(a.null_mean_deg, 1)}), p(mean) = {a.p_mean_angle:.4f}")
    with paper_style():
        fig, axes = new_figure("page", 2.2, ncols=2)
        figures.spectrum_plot(sp, n_components=30, ax=axes[0])
        figures.principal_angles_plot(angles, ax=axes[1])
        axes[0].set_title(f"Spectrum, layer {L}")
        axes[1].set_title(f"Top-{args.k} principal subspaces")
    print("wrote", *save_figure(fig, out / "geometry"))

    # -- specificity on test -----------------------------------------------------------------------
    r_all = class_mean_difference(train.x, train.y)  # [layer, pos, d]
    i, j = train.index(L, last)
    r = r_all[i, j]
    early = train.layers[2]
    controls = {
        "\u2212r": -r,
        "shuffled labels": label_shuffled_direction(x_train, train.y, seed=1),
        f"layer {early} direction": r_all[train.index(early, last)],
    }
    t0 = time.perf_counter()
    spec = specificity_test(ProjectionAUC(test.cell(L, last), test.y), r, n_random=args.n_random,
                            controls=controls, n_boot=1000, seed=0,
                            meta={"layer": L, "position": last, "split": "test", "direction": "train"})
    spec.save(out / "specificity.json")
    print(f"\nspecificity at layer {L} ({time.perf_counter() - t0:.1f} s): real AUC {spec.real:.3f} "
          f"[{spec.real_lo:.3f}, {spec.real_hi:.3f}] vs random {spec.null_mean:.3f} ± {spec.null_sd:.3f}; "
          f"p = {spec.p:.4f}, z = {spec.z:.1f}")
    for name, c in spec.controls.items():
        print(f"  control {name}: AUC {c['effect']:.3f}, p = {c['p']:.3f}, z = {c['z']:.1f}")
    fig = figures.specificity_plot(spec, label=f"r, layer {L}")
    print("wrote", *save_figure(fig, out / "specificity"))

    # -- direction reliability: train vs val directions per layer ----------------------------------
    r_val = class_mean_difference(val.x, val.y)[:, j]
    al = align_directions(r_all[:, j], r_val, layers_a=train.layers, layers_b=val.layers,
                          name_a="train", name_b="val")
    al.save(out / "split_alignment.json")
    print(f"\ntrain vs val direction cosine per layer: min {np.nanmin(al.cos):.2f}, max {np.nanmax(al.cos):.2f} "
          f"(random 99%: {al.null_q99:.3f})")
    fig = figures.alignment_layers(al)
    print("wrote", *save_figure(fig, out / "split_alignment"))


if __name__ == "__main__":
    main()

"""Timings of the analysis hot paths on synthetic data (prints numbers; not a test).

    .venv/bin/python benchmarks/analysis_perf.py            # the full sizes below
    .venv/bin/python benchmarks/analysis_perf.py --small    # a quick smoke run

1. A probe grid of n samples x L layers x d: projection AUC / Cohen's d with bootstrap CIs and
   permutation p-values, then 5-fold CV logistic probes in every cell; then the held-out
   variant (direction and probes fitted on a second split of n samples).
2. The direction-specificity test: 1000 random directions through the vectorized
   projection-AUC effect on an n x d activation set.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from rdt_interp.analysis.probe_grid import probe_grid
from rdt_interp.analysis.probes import Labeled
from rdt_interp.analysis.specificity import ProjectionAUC, specificity_test


def planted(n: int, layers: int, d: int, seed: int = 0) -> tuple[Labeled, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    r = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    y = torch.arange(n) < n // 2
    x = torch.randn(n, layers, 1, d, generator=gen)
    # Signal grows with depth: AUC from 0.5 (layer 0) to about 0.92 (last layer).
    strength = torch.linspace(0.0, 2.0, layers)
    x += (strength[None, :, None, None] * y.float()[:, None, None, None]) * r
    return Labeled(x, y, tuple(range(layers)), ("last",), "bench"), r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--spec-n", type=int, default=512)
    ap.add_argument("--n-random", type=int, default=1000)
    args = ap.parse_args()
    if args.small:
        args.n, args.layers, args.d, args.spec_n = 200, 4, 256, 128
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} "
          f"(other processes share these cores)")

    warm, _ = planted(40, 2, 16, seed=9)  # imports and first-call costs out of the timings
    probe_grid(warm, n_boot=10, n_perm=10, folds=2)
    data, r = planted(args.n, args.layers, args.d)
    print(f"\nprobe grid: {args.n} samples x {args.layers} layers x d={args.d} "
          f"({data.x.numel() * 4 / 2**20:.0f} MiB float32)")
    t = time.perf_counter()
    g = probe_grid(data, probe=False, n_boot=1000, n_perm=1000)
    t_proj = time.perf_counter() - t
    print(f"  projection AUC + d, direction cross-fitted over 5 folds, 1000 bootstrap, 1000 "
          f"re-fitting permutations: {t_proj:.1f} s")
    t = time.perf_counter()
    g = probe_grid(data, probe=True, n_boot=1000, n_perm=1000)
    t_all = time.perf_counter() - t
    print(f"  the same + 5-fold CV logistic probes ({args.layers * 5} fits, CI only): {t_all:.1f} s "
          f"total (unconverged fits: {g.n_unconverged}); the probes took {t_all - t_proj:.0f} s, "
          f"which is also the cost of each re-fitting permutation for CV p-values")
    for i in sorted({0, args.layers // 2, args.layers - 1}):
        c = g.cell(i, "last")
        print(f"    layer {i:2d}: proj AUC {c['proj_auc']:.3f} [{c['proj_auc_lo']:.3f}, {c['proj_auc_hi']:.3f}] "
              f"p {c['proj_p']:.3f}  CV AUC {c['probe_auc']:.3f} [{c['probe_auc_lo']:.3f}, {c['probe_auc_hi']:.3f}]")
    # Held-out: direction and probes from a separate split of the same size (exact statistics).
    fit, _ = planted(args.n, args.layers, args.d, seed=1)
    fit = Labeled(fit.x, fit.y, fit.layers, fit.positions, "fit")
    t = time.perf_counter()
    g = probe_grid(data, fit=fit, probe=True, n_boot=1000, n_perm=1000)
    t_held = time.perf_counter() - t
    print(f"  held out (direction + {args.layers} probes fitted on another {args.n} samples), "
          f"1000 bootstrap + 1000 permutations each: {t_held:.1f} s")

    # Half positives (the head of the data), half negatives (its tail), at the last layer.
    h = args.spec_n // 2
    x = torch.cat([data.x[:h, -1, 0], data.x[-(args.spec_n - h):, -1, 0]])
    y = torch.arange(args.spec_n) < h
    eff = ProjectionAUC(x, y)
    print(f"\nspecificity: {args.n_random} random directions, projection AUC on {args.spec_n} x {args.d}")
    t = time.perf_counter()
    res = specificity_test(eff, r, n_random=args.n_random, n_boot=1000, controls={"-r": -r})
    t_spec = time.perf_counter() - t
    print(f"  {t_spec:.2f} s, load average {os.getloadavg()[0]:.1f} (real AUC {res.real:.3f} [{res.real_lo:.3f}, {res.real_hi:.3f}], "
          f"null mean {res.null_mean:.3f} sd {res.null_sd:.3f}, p = {res.p:.4f}, z = {res.z:.1f})")


if __name__ == "__main__":
    main()

"""The defense comparison on the testbed VLA: no defense, AdaShield, VLM-Guard, RDT, RDT+ and
probe-gated RDT+, with the chat model Qwen2.5-Coder-0.5B-Instruct (the testbed VLA's base) as
the source of the refusal direction, the VLM-Guard safety subspace and an alternative
(transferred) gate probe.

    python benchmarks/defenses_testbed.py --out runs/defenses-testbed                      # committed delta
    python benchmarks/defenses_testbed.py --out runs/defenses-testbed --delta /work/runs/testbed-vla2
    python benchmarks/defenses_testbed.py --out runs/smoke/defenses-tiny --tiny                  # smoke test

The chat side, once (cached in ``--out/chat``): Arditi et al.'s harmful / harmless *train*
instructions (``--n-chat`` of each) are captured at ``--layer`` (block input, last
post-instruction token). From that one capture come the diff-in-means refusal direction (unless
``--direction`` gives a saved one, e.g. the chat-side study's ``direction.safetensors``), the
rank-``--k`` contrast subspace (VLM-Guard) and a logistic harmfulness probe (the chat-probe gate
alternative, reported next to the VLA-probe gate). Then
:func:`rdt_interp.studies.defenses.run_defenses` in ``--out/run`` (resumable), which writes
``table.md``, ``table.json``, ``result.json`` and ``figures/pareto.{pdf,png}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

import torch  # noqa: E402

from rdt_interp.analysis.probes import LinearProbe  # noqa: E402
from rdt_interp.defenses.subspace import SafetySubspace, subspace_from_activations  # noqa: E402
from rdt_interp.directions.direction import Direction, Provenance  # noqa: E402
from rdt_interp.prompts import load_split  # noqa: E402
from rdt_interp.storage import digest_strings  # noqa: E402
from rdt_interp.studies.defenses import DEFENSES, DefensesConfig, run_defenses  # noqa: E402


def _log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


def chat_side(chat, layer: int, k: int, n: int, out: Path, t0: float, seed: int = 0
              ) -> tuple[Direction, SafetySubspace, LinearProbe]:
    """Direction, subspace and probe from one capture of the chat model (cached in ``out``)."""
    from rdt_interp.tracing.capture import capture

    out.mkdir(parents=True, exist_ok=True)
    paths = {"direction": out / f"direction_L{layer}.safetensors", "subspace": out / f"subspace_L{layer}_k{k}.safetensors",
             "probe": out / f"probe_L{layer}.safetensors"}
    if all(p.is_file() for p in paths.values()):
        _log(t0, f"chat side: cached in {out}")
        return (Direction.load(paths["direction"]), SafetySubspace.load(paths["subspace"]),
                LinearProbe.load(paths["probe"]))
    harmful = load_split("harmful_train").take(n, seed=seed).instructions
    harmless = load_split("harmless_train").take(n, seed=seed).instructions
    kw = dict(layers=[layer], selector="post_instruction[-1]", batch_size=16, backend="hooks", progress=False)
    _log(t0, f"chat side: capturing {len(harmful)} + {len(harmless)} instructions at layer {layer}")
    h = capture(chat, harmful, **kw).values[:, 0, 0]
    hl = capture(chat, harmless, **kw).values[:, 0, 0]
    desc = chat.describe()
    direction = Direction((h.double().mean(0) - hl.double().mean(0)).float(), Provenance(
        desc["name"], desc["digest"], layer, "post_instruction[-1]", "resid_pre", "diff_in_means",
        digest_strings(harmful), digest_strings(harmless), len(harmful), len(harmless)))
    sub = subspace_from_activations(h, hl, k, layer=layer, position="post_instruction[-1]", source=desc)
    y = torch.cat([torch.ones(h.shape[0]), torch.zeros(hl.shape[0])]).bool()
    probe = LinearProbe.fit(torch.cat([h, hl]), y, layer=layer, position="post_instruction[-1]",
                            meta={"model": desc, "n": int(y.numel()), "source": "chat"})
    direction.save(paths["direction"])
    sub.save(paths["subspace"])
    probe.save(paths["probe"])
    _log(t0, f"chat side: done; subspace explained variance (top {k}) "
             f"{[round(float(v), 3) for v in sub.explained_variance_ratio[:k]]}")
    return direction, sub, probe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--delta", type=Path, help="a testbed training run directory (default: the committed delta)")
    ap.add_argument("--direction", type=Path, help="a saved chat refusal Direction (default: diff-in-means at --layer)")
    ap.add_argument("--layer", type=int, default=None, help="chat layer for direction/subspace/probe "
                    "(default: the --direction's layer, else 19, the layer the measured comparison in "
                    "docs/defenses.md used; the demo's selection picks 15, pass --direction to use it)")
    ap.add_argument("--k", type=int, default=4, help="rank of the VLM-Guard safety subspace")
    ap.add_argument("--n-chat", type=int, default=128, help="harmful and harmless chat instructions each")
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 4.0, 16.0],
                    help="RDT / RDT+ / gated RDT+ strengths (the direction's norm is ~12 at layer 19, the VLA's "
                    "residual norms there ~45-70)")
    ap.add_argument("--gate-layers", type=int, nargs="+", default=None,
                    help="candidate gate layers, best val AUC wins (default: 4 8 12 16 19 22; --tiny: 0 1 2)")
    ap.add_argument("--guard-scales", type=float, nargs="+", default=[1.0])
    ap.add_argument("--defenses", nargs="+", default=list(DefensesConfig.defenses), choices=DEFENSES)
    ap.add_argument("--n-pairs", type=int, default=None, help="robot-instruction pairs (default: all 147)")
    ap.add_argument("--target-fpr", type=float, default=0.05)
    ap.add_argument("--closed-loop-episodes", type=int, default=0)
    ap.add_argument("--closed-loop-steps", type=int, default=80)
    ap.add_argument("--closed-loop-conditions", nargs="+", default=None,
                    help="condition keys to run in the simulator, e.g. none rdt@2 (default: all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="tiny random testbed VLA and tiny chat model (smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    from rdt_interp.models import load_chat_model
    from rdt_interp.testbed.adapter import UNNORM_KEY, build_tiny_testbed_vla, load_testbed_vla

    if args.tiny:
        vla, chat = build_tiny_testbed_vla(seed=0, n_layers=3), load_chat_model("tiny-qwen2")
        layer = 1 if args.layer is None else args.layer
    else:
        vla = load_testbed_vla(args.delta)
        chat = load_chat_model("qwen2.5-coder-0.5b-instruct")
        layer = args.layer
    given = Direction.load(args.direction, d_model=vla.d_model) if args.direction else None
    if layer is None:
        layer = given.provenance.layer if given is not None else 19
    _log(t0, f"VLA {vla!r} ({'trained' if not vla.random_weights else 'random'}), chat {chat.name}, layer {layer}")
    direction, sub, probe = chat_side(chat, layer, args.k, 8 if args.tiny else args.n_chat, args.out / "chat", t0)
    if given is not None:
        direction = given
    _log(t0, f"direction {direction!r}; subspace k={sub.k}")
    del chat
    cfg = DefensesConfig(
        defenses=tuple(args.defenses), alphas=tuple(args.alphas), guard_scales=tuple(args.guard_scales),
        layers=(layer,), gate_target_fpr=args.target_fpr,
        gate_layers=tuple(args.gate_layers or ((0, 1, 2) if args.tiny else (4, 8, 12, 16, 19, 22))), n_pairs=(6 if args.tiny else args.n_pairs),
        images="scenes", batch_size=args.batch_size, unnorm_key=UNNORM_KEY, n_boot=args.n_boot,
        closed_loop_episodes=args.closed_loop_episodes, closed_loop_steps=args.closed_loop_steps,
        closed_loop_conditions=tuple(args.closed_loop_conditions) if args.closed_loop_conditions else None,
        gate_folds=2 if args.tiny else 5)
    res = run_defenses(vla, direction, cfg, args.out / "run", subspace=sub, chat_probe=probe, progress=False,
                       log=lambda m: _log(t0, m))
    print()
    print(res.markdown())
    alt = res.gate_alternatives.get("chat")
    if alt:
        t = alt["test"]
        print(f"Chat-probe gate (transfer) on test: AUC {t['auc']:.3f}, TPR {t['tpr']:.2f}, FPR {t['fpr']:.2f} "
              f"(threshold set on the VLA's val scores)")
    print(f"figure: {args.out / 'run' / 'figures' / 'pareto.png'}")
    _log(t0, "done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fast path vs eager path on a trained model: the testbed VLA (bf16 by default), held-out test scenes.

Random weights give near-flat logits, so bf16 disagreements between two correct implementations
say little there; the trained testbed VLA has real margins. For ``--n`` samples of the held-out
test split (instruction + rendered scene), unsteered and with the demo's RDT+ edit, compares the
greedy 7-token actions of :meth:`VLAAdapter.predict_actions` (eager) and
:meth:`FastGenerator.predict_actions`: rows identical, tokens equal, first tokens equal, and at
each row's first disagreement the eager logit gap between the two tokens (small = a near-tie),
next to the median eager top-2 gap of all first tokens.

    python benchmarks/fast_agreement_testbed.py --device cpu --out docs/bench/fast_agreement_testbed_cpu.json \
        --direction runs/demo/chat/direction.safetensors
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import device_name, write_json  # noqa: E402

from rdt_interp.directions.direction import Direction  # noqa: E402
from rdt_interp.fast import FastGenerator  # noqa: E402
from rdt_interp.models.vla import VLARequest  # noqa: E402
from rdt_interp.testbed.adapter import load_testbed_vla  # noqa: E402
from rdt_interp.testbed.dataset import generate_demos  # noqa: E402
from rdt_interp.tracing import rdt_plus  # noqa: E402


def compare(ref: list[Any], got: list[Any], token_ids: torch.Tensor) -> dict[str, Any]:
    """``ref`` / ``got``: the eager and fast :class:`ActionPrediction` of each batch, in order."""
    a = torch.cat([p.token_ids.cpu() for p in ref])
    b = torch.cat([p.token_ids.cpu() for p in got])
    eq = a == b
    logits = torch.cat([p.action_logits.float().cpu() for p in ref])  # [n, 7, 256] over the action tokens
    fast_logits = torch.cat([p.action_logits.float().cpu() for p in got])
    first = torch.topk(logits[:, 0], 2, dim=-1).values
    gaps: list[float] = []
    # action_logits are ordered as the action tokenizer's token_ids (OpenVLA maps bins to ids in
    # reverse), so a token's logit is found by its place in token_ids, not by its bin
    place = {int(t): i for i, t in enumerate(token_ids.tolist())}
    for r in range(a.shape[0]):
        bad = (~eq[r]).nonzero()
        if len(bad):
            s = int(bad[0])
            gaps.append(float(logits[r, s, place[int(a[r, s])]] - logits[r, s, place[int(b[r, s])]]))
    return {
        "rows": int(a.shape[0]),
        "rows_identical": float(eq.all(dim=1).float().mean()),
        "tokens_equal": float(eq.float().mean()),
        "first_tokens_equal": float(eq[:, 0].float().mean()),
        "max_abs_logit_diff": float((logits - fast_logits).abs().max()),
        "eager_top2_gap_first_token_median": float((first[:, 0] - first[:, 1]).median()),
        "disagreement_eager_gap_median": statistics.median(gaps) if gaps else None,
        "disagreement_eager_gap_max": max(gaps) if gaps else None,
        "n_disagreeing_rows": len(gaps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--direction", type=Path, default=None, help="a saved Direction (default: random unit)")
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--alpha-text", type=float, default=4.0)
    ap.add_argument("--fuse", action="store_true", help="fused q/k/v and gate/up on the fast path (CUDA default)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    t0 = time.perf_counter()
    device = torch.device(args.device)
    vla = load_testbed_vla(device=device, dtype=getattr(torch, args.dtype))
    vla.constrain_actions = True  # as the demo decodes
    demos = generate_demos("test", min_samples=args.n, image_size=vla.image_size)
    idx = np.sort(np.random.default_rng(0).permutation(len(demos))[: args.n])
    reqs = [VLARequest(demos.instructions[int(demos.instruction_ids[j])], demos.images[j]) for j in idx]
    if args.direction is not None:
        r = Direction.load(args.direction, d_model=vla.d_model).vector.float()
        source = str(args.direction)
    else:
        r = torch.randn(vla.d_model, generator=torch.Generator().manual_seed(1))
        source = "random unit"
    r = r / r.norm()
    fast = FastGenerator(vla, max_batch=args.batch_size, fuse_projections=args.fuse if args.fuse else None)
    out: dict[str, Any] = {"device": device_name(args.device), "dtype": args.dtype, "model": vla.name,
                           "samples": args.n, "split": "test", "fast_path": None,
                           "steering": {"direction": source, "layer": args.layer, "alpha": args.alpha,
                                        "alpha_text": args.alpha_text}}
    for name, ivs in (("unsteered", []), ("rdt+", rdt_plus(r, args.alpha, args.alpha_text, args.layer))):
        ref = [vla.predict_actions(reqs[i:i + args.batch_size], interventions=ivs, return_logits=True)
               for i in range(0, len(reqs), args.batch_size)]
        got = [fast.predict_actions(reqs[i:i + args.batch_size], interventions=ivs, return_logits=True)
               for i in range(0, len(reqs), args.batch_size)]
        out[name] = compare(ref, got, vla.action_tokenizer.token_ids.cpu())
        print(name, out[name], flush=True)
    out["fast_path"] = fast.describe()
    out["total_seconds"] = time.perf_counter() - t0
    write_json(str(args.out), out)


if __name__ == "__main__":
    main()

"""Do the hook path and the nnsight path compute bit-identical outputs on a GPU?

On CPU in fp32 the tests prove it. On a GPU in bf16, kernels may differ between calls (cuBLAS
picks algorithms per handle, and nnsight runs the model from another thread, which has its own
cuBLAS handle). This script separates the two: hooks vs hooks, nnsight vs nnsight, hooks vs
nnsight, in bf16 and fp32, on a random OpenVLA-shaped model (smaller LLM for speed).

    python benchmarks/check_backend_agreement.py --device cuda --out agreement.json
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from _common import device_name, write_json

from rdt_interp.models.openvla import build_random_openvla, openvla_7b_config
from rdt_interp.models.vla import VLARequest
from rdt_interp.tracing import rdt_plus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = copy.deepcopy(openvla_7b_config())
    cfg["text_config"]["num_hidden_layers"] = args.layers
    rng = np.random.default_rng(0)
    words = ["pick", "place", "the", "red", "blue", "cup", "bowl", "sponge", "knife", "drawer", "left", "right", "into", "onto"]
    reqs = [VLARequest(" ".join(rng.choice(words, size=int(rng.integers(4, 14)))),
                       rng.integers(0, 255, size=(224, 224, 3), dtype=np.uint8)) for _ in range(args.batch)]
    report: dict[str, object] = {"device": device_name(args.device), "batch": args.batch,
                                 "llm_layers": args.layers}
    for dtype in (torch.bfloat16, torch.float32):
        vla = build_random_openvla(cfg, dtype=dtype, device=args.device, seed=0)
        r = torch.randn(vla.d_model, generator=torch.Generator().manual_seed(1))
        r = r / r.norm() * 8.0
        ivs = rdt_plus(r, 4.0, 4.0, layers=args.layers // 2)
        runs = {}
        for name in ("hooks_a", "hooks_b", "nnsight_a", "nnsight_b"):
            pred = vla.predict_actions(reqs, interventions=ivs, backend=name.split("_")[0], return_logits=True)
            runs[name] = pred
        tag = str(dtype).replace("torch.", "")
        for a, b in (("hooks_a", "hooks_b"), ("nnsight_a", "nnsight_b"), ("hooks_a", "nnsight_a")):
            x, y = runs[a], runs[b]
            report[f"{tag}: {a} vs {b}"] = {
                "tokens_equal": bool(torch.equal(x.token_ids, y.token_ids)),
                "rows_equal": float((x.token_ids == y.token_ids).all(dim=1).float().mean()),
                "max_abs_logit_diff_step0": float((x.action_logits[:, 0] - y.action_logits[:, 0]).abs().max()),
            }
        del vla
        torch.cuda.empty_cache() if args.device.startswith("cuda") else None
    for k, v in report.items():
        print(f"{k}: {v}")
    write_json(args.out, report)


if __name__ == "__main__":
    main()

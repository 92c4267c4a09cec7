"""What a testbed training run leaves on disk: the JSONL log, the delta, the manifest, the loss
curve, the expected predictions, and the export of a finished run."""

from __future__ import annotations

import json
import logging
import math
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rdt_interp.errors import ConfigError
from rdt_interp.storage import atomic_path, atomic_write_json, sha256_file, to_json_line
from rdt_interp.testbed.adapter import DELTA_FILE, MANIFEST_FILE, UNNORM_KEY
from rdt_interp.testbed.config import TrainConfig
from rdt_interp.testbed.dataset import generate_demos
from rdt_interp.testbed.model import TestbedVLA

LOG_FILE = "train_log.jsonl"
CURVE_FILE = "loss_curve.png"
EXPECTED_FILE = "expected_actions.json"
ARTIFACTS = (DELTA_FILE, MANIFEST_FILE, LOG_FILE, CURVE_FILE, EXPECTED_FILE)

logger = logging.getLogger(__name__)


class RunLog:
    """Append-only JSONL log that can be cut back to a checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: drop it and everything after
        return out

    def keep(self, pred: Callable[[dict[str, Any]], bool]) -> None:
        kept = [r for r in self.records() if pred(r)]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(to_json_line(r) + "\n" for r in kept))

    def write(self, **record: Any) -> None:
        """Append one record; a NaN or infinite value is written as null, named under ``nonfinite``
        (a diverged loss stays visible, and the file stays standard JSON)."""
        bad = {k: repr(v) for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            record = {**record, "nonfinite": bad}
        with open(self.path, "a") as fh:
            fh.write(to_json_line(record) + "\n")
            fh.flush()


# -- artifacts ------------------------------------------------------------------------------------
def finalize(
    out: Path, cfg: TrainConfig, model: TestbedVLA, tok: Any, norm: dict[str, Any], base: dict[str, Any],
    vision_metrics: dict[str, Any],
) -> None:
    """Delta (fp16), manifest, loss curve and expected predictions."""
    from safetensors.torch import save_file

    delta = {k: v.to(torch.float16).contiguous() for k, v in model.delta_state_dict().items()}
    with atomic_path(out / DELTA_FILE) as tmp:
        save_file(delta, str(tmp), metadata={"format": "pt"})  # one key: the header stays byte-stable
    records = RunLog(out / LOG_FILE).records()
    bc = [r for r in records if r["stage"] == "bc"]
    vals = [r for r in records if r["stage"] == "val"]
    tail = bc[-20:]
    import transformers

    manifest = {
        "format": 1,
        "config": cfg.model.to_dict(),
        "train_config": cfg.to_dict(),
        "seed": cfg.seed,
        "norm_stats": norm,
        "unnorm_key": UNNORM_KEY,
        "base": base,
        "delta": {"file": DELTA_FILE, "sha256": sha256_file(out / DELTA_FILE),
                  "bytes": (out / DELTA_FILE).stat().st_size, "storage_dtype": "float16",
                  "n_params": int(sum(v.numel() for v in delta.values())),
                  "parts": {p: int(sum(v.numel() for k, v in delta.items() if k.startswith(p)))
                            for p in ("vision.", "projector.", "language_model.", "action_")}},
        "prompt": {"template": "<|endoftext|>In: What action should the robot take to {instruction}?\\nOut: ",
                   "bos": "<|endoftext|> (prepended; patches follow it)", "trailing_token": " "},
        "training": {
            "steps": len(bc), "samples_seen": len(bc) * cfg.batch_size,
            "final_loss_mean_last20": float(np.mean([r["loss"] for r in tail])) if tail else None,
            "final_acc_mean_last20": float(np.mean([r["acc"] for r in tail])) if tail else None,
            "final_val": vals[-1] if vals else None,
            "vision_pretraining": vision_metrics,
            "seconds": {stage: float(sum(r.get("sec", 0.0) for r in records if r["stage"] == stage))
                        for stage in ("vision", "bc", "val")},
        },
        "software": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "threads": cfg.threads},
    }
    atomic_write_json(out / MANIFEST_FILE, manifest)
    plot_loss_curve(records, out / CURVE_FILE)
    write_expected(out, n=8)
    logger.info("[train] wrote %s (%.1f MB)", out / DELTA_FILE, manifest["delta"]["bytes"] / 1e6)


def plot_loss_curve(records: list[dict[str, Any]], path: Path) -> None:
    """Three panels: ViT pretraining loss, BC loss (teacher-forced), greedy validation."""
    from rdt_interp.viz.style import OKABE_ITO, new_figure, paper_style, save_figure

    vis = [r for r in records if r["stage"] == "vision"]
    bc = [r for r in records if r["stage"] == "bc"]
    vals = [r for r in records if r["stage"] == "val"]
    with paper_style():
        fig, (a, b, c) = new_figure("page", 2.6, ncols=3)
        if vis:
            a.plot([r["step"] + 1 for r in vis], [r["loss"] for r in vis], color=OKABE_ITO["blue"], lw=0.6)
            a.set_yscale("log")
        a.set_title("(a) ViT state regression")
        a.set_xlabel("step")
        a.set_ylabel("masked MSE + BCE")
        if bc:
            steps = np.array([r["step"] + 1 for r in bc])
            loss = np.array([r["loss"] for r in bc])
            b.plot(steps, loss, color=OKABE_ITO["sky"], lw=0.5, label="batch")
            k = min(20, len(loss))
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            b.plot(steps[k - 1:], smooth, color=OKABE_ITO["blue"], lw=1.0, label=f"{k}-step mean")
            b.set_yscale("log")
            b.legend()
        b.set_title("(b) behaviour cloning, 7 action tokens")
        b.set_xlabel("step")
        b.set_ylabel("cross-entropy (nats / token)")
        if vals:
            x = [r["step"] + 1 for r in vals]
            c.plot(x, [r["exact_all_dims"] for r in vals], "o-", ms=3, lw=0.8, color=OKABE_ITO["vermillion"],
                   label="exact bin")
            c.plot(x, [r["within_1_all_dims"] for r in vals], "s-", ms=3, lw=0.8, color=OKABE_ITO["orange"],
                   label="within 1 bin")
            c.plot(x, [r["swap_tokens_changed"] for r in vals], "^-", ms=3, lw=0.8, color=OKABE_ITO["green"],
                   label="changed by the neighbour's image")
            c.set_ylim(0, 1)
            c.legend(title=f"n = {vals[-1]['n']} ({vals[-1]['episodes']} val episodes)")
        c.set_title("(c) greedy decoding, held out")
        c.set_xlabel("step")
        c.set_ylabel("share of action tokens")
    save_figure(fig, path.with_suffix(""), formats=("png",), dpi=150)


def expected_requests(n: int, image_size: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """``n`` held-out test samples (the middle step of different test episodes) and their identity."""
    import hashlib

    from rdt_interp.models.vla import VLARequest

    demos = generate_demos("test", n, image_size=image_size)
    picks = []
    for e in demos.episodes:
        rows = np.flatnonzero(demos.episode_ids == e.index)
        if len(rows):
            picks.append(int(rows[len(rows) // 2]))
    reqs, meta = [], []
    for j in picks[:n]:
        img, ins, act = demos.sample(j)
        reqs.append(VLARequest(ins, img))
        meta.append({"episode": int(demos.episode_ids[j]), "step": int(demos.steps[j]), "instruction": ins,
                     "image_sha256": hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest(),
                     "expert_action": act.tolist()})
    return reqs, meta


def write_expected(out: Path, n: int = 8) -> None:
    """Greedy predictions of the saved (fp16) delta on held-out test samples, for regression tests."""
    from rdt_interp.testbed.adapter import load_testbed_vla

    vla = load_testbed_vla(out)
    reqs, meta = expected_requests(n, vla.image_size)
    pred = vla.predict_actions(reqs, unnorm_key=UNNORM_KEY, return_logits=True)
    top2 = pred.action_logits.topk(2, dim=-1).values
    for k, m in enumerate(meta):
        m["token_ids"] = pred.token_ids[k].tolist()
        m["actions"] = pred.actions[k].tolist()
        m["top1_margin"] = (top2[k, :, 0] - top2[k, :, 1]).tolist()
    atomic_write_json(out / EXPECTED_FILE, {"unnorm_key": UNNORM_KEY, "samples": meta})


def export(out: Path, dest: Path) -> list[Path]:
    """Copy the committed artifacts of a finished run into ``dest`` (e.g. rdt_interp/data/testbed)."""
    missing = [a for a in ARTIFACTS if not (out / a).is_file()]
    if missing:
        raise ConfigError(f"{out} is not a finished run (missing {missing})", fix="finish training first")
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for a in ARTIFACTS:
        with atomic_path(dest / a) as tmp:
            shutil.copyfile(out / a, tmp)
        copied.append(dest / a)
    return copied

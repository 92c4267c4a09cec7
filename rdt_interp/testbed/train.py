"""Train the testbed VLA by behaviour cloning on benign expert demonstrations (as OpenVLA was).

    rdt-interp testbed train --out runs/testbed        # resumes if DIR has a checkpoint
    rdt-interp testbed train --out runs/testbed --export rdt_interp/data/testbed

(``python -m rdt_interp.cli testbed train ...`` where the console script is not installed.)

Two stages, both deterministic given the seed:

1. **Vision pretraining.** OpenVLA starts from pretrained SigLIP/DINOv2; a ViT trained from
   scratch only through a 0.5B LLM on two CPU cores would see a few thousand images. So the ViT
   is first pretrained on its own, cheaply, to regress the world state (gripper and object
   positions, heights, yaws, open/held flags) from train-split images: generic perception, with
   no instruction and no action. The regression head is thrown away.
2. **Behaviour cloning** through the LLM, OpenVLA's objective: cross-entropy over the full
   vocabulary on the 7 action tokens of ``In: What action should the robot take to
   {instruction}?\\nOut: `` + actions (teacher forcing), on benign train demonstrations only.
   Trained: LoRA on every linear layer of every decoder layer, the 256 input and 256 output
   action rows, the projector and (at a lower rate) the ViT. Everything else is frozen.

Every ``ckpt_every`` steps the trainable state and the optimizer go to ``DIR/ckpt.pt``
atomically; a killed run continues from there (the log is cut back to the checkpoint). The run
ends by writing the delta (fp16 safetensors), ``manifest.json``, the loss curve and the
expected predictions the ``real_model`` test checks (:mod:`rdt_interp.testbed.artifacts`). The
configuration is :class:`rdt_interp.testbed.config.TrainConfig`; stage 1's targets and objective
are in :mod:`rdt_interp.testbed.perception`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from rdt_interp.errors import ConfigError
from rdt_interp.storage import atomic_path, atomic_write_json, read_json
from rdt_interp.testbed.adapter import (
    BASE_MODEL,
    TINY_BASE,
    UNNORM_KEY,
    TestbedVLAAdapter,
    tiny_language_model,
    tiny_tokenizer,
)
from rdt_interp.testbed.artifacts import LOG_FILE, RunLog, finalize
from rdt_interp.testbed.config import TrainConfig
from rdt_interp.testbed.config import (
    tiny_config as tiny_config,  # re-exported: it used to live here
)
from rdt_interp.testbed.dataset import DemoSet, generate_demos, load_demos
from rdt_interp.testbed.model import TestbedVLA, images_to_pixels
from rdt_interp.testbed.perception import (
    StateHead,
    StateSet,
    generate_state_set,
    state_errors,
    state_loss,
)

logger = logging.getLogger(__name__)


# -- behaviour cloning batches ----------------------------------------------------------------------
@dataclass
class BCBatch:
    input_ids: Int[Tensor, "batch seq"]
    text_mask: Int[Tensor, "batch seq"]
    pixel_values: Float[Tensor, "batch 3 h w"]
    targets: Int[Tensor, "batch 7"]


class BCData:
    """Demonstrations as OpenVLA training sequences: prompt + the 7 action tokens (teacher forcing)."""

    def __init__(self, demos: DemoSet, adapter: TestbedVLAAdapter) -> None:
        self.demos = demos
        self.adapter = adapter
        self.prompts = [adapter.tokenize(ins)[0] for ins in demos.instructions]
        tok = adapter.action_tokenizer
        self.targets = tok.encode(torch.from_numpy(demos.actions).double(), UNNORM_KEY)
        if not bool(tok.is_action_token(self.targets).all()):
            raise ConfigError("an expert action did not map onto an action token")

    def __len__(self) -> int:
        return len(self.demos)

    def batch(self, idx: np.ndarray, device: str | torch.device = "cpu") -> BCBatch:
        from rdt_interp.models.adapter import pad_sequences

        tgt = self.targets[torch.as_tensor(idx)]
        seqs = [self.prompts[int(self.demos.instruction_ids[j])] + tgt[k, :-1].tolist()
                for k, j in enumerate(idx)]
        ids, _, mask = pad_sequences(seqs, [[0] * len(s) for s in seqs], self.adapter.pad_token_id, "left")
        px = images_to_pixels(list(self.demos.images[idx]), self.adapter.image_size)
        return BCBatch(ids.to(device), mask.to(device), px.to(device), tgt.to(device))

    def requests(self, idx: np.ndarray, images_of: np.ndarray | None = None) -> list[Any]:
        """Greedy-decoding requests for samples ``idx`` (optionally with other samples' images)."""
        from rdt_interp.models.vla import VLARequest

        src = idx if images_of is None else images_of
        return [VLARequest(self.demos.instructions[int(self.demos.instruction_ids[j])], self.demos.images[k])
                for j, k in zip(idx, src, strict=True)]


def bc_forward(
    model: TestbedVLA, b: BCBatch, tok: Any, *, sample_prob: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Cross-entropy over the full vocabulary on the 7 action tokens, and accuracy metrics.

    ``sample_prob > 0``: parallel scheduled sampling. A no-grad teacher-forced pass predicts
    every action token; each of the 6 action tokens in the *input* is then replaced by that
    prediction with probability ``sample_prob`` before the pass that is trained.
    """
    n = b.targets.shape[1]
    ids = b.input_ids
    if sample_prob > 0:
        with torch.no_grad():
            own = model.action_logits(ids, b.text_mask, b.pixel_values, n_last=n).argmax(-1)[:, :-1]
        swap = torch.rand(own.shape, generator=generator, device="cpu").to(own.device) < sample_prob
        ids = ids.clone()
        ids[:, -(n - 1):] = torch.where(swap, own, ids[:, -(n - 1):])
    logits = model.action_logits(ids, b.text_mask, b.pixel_values, n_last=n)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b.targets.reshape(-1))
    with torch.no_grad():
        pred = logits.argmax(-1)
        ok = pred == b.targets
        is_act = tok.is_action_token(pred.cpu())
        dist = (tok.ids_to_bins(pred.cpu()) - tok.ids_to_bins(b.targets.cpu())).abs()
        within = is_act & (dist <= 5)
    return loss, {"loss": float(loss.detach()), "acc": float(ok.float().mean()),
                  "acc_dims": ok.float().mean(0).tolist(), "within5": float(within.float().mean()),
                  "action_token_rate": float(is_act.float().mean())}


def sample_prob_at(step: int, cfg: TrainConfig) -> float:
    """Scheduled-sampling probability: 0 at the start, ``cfg.scheduled_sampling`` from half-way."""
    return cfg.scheduled_sampling * min(1.0, step / max(1, cfg.steps // 2))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` (a multiplier on each group's rate)."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0xB0C]).permutation(n)


def indices_for(step: int, batch: int, n: int, seed: int) -> np.ndarray:
    """Sample indices of ``step``: consecutive slices of one permutation per epoch (no RNG state)."""
    per_epoch = n // batch
    if per_epoch == 0:
        raise ConfigError(f"{n} samples do not fill one batch of {batch}")
    epoch, k = divmod(step, per_epoch)
    return epoch_order(seed, epoch, n)[k * batch:(k + 1) * batch]


# -- files ----------------------------------------------------------------------------------------
def _save_torch(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _cached_demos(path: Path, make: Callable[[], DemoSet]) -> DemoSet:
    if path.is_file():
        return load_demos(path)
    demos = make()
    demos.save(path, compress=False)  # a cache for resuming: speed over size
    return demos


def _cached_states(path: Path, make: Callable[[], StateSet]) -> StateSet:
    if path.is_file():
        with np.load(path) as z:
            return StateSet(z["images"], z["targets"], z["masks"])
    s = make()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, images=s.images, targets=s.targets, masks=s.masks)  # a cache: speed over size
    return s


# -- the run --------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig) -> tuple[TestbedVLA, Any, dict[str, Any]]:
    """The untrained VLA on its base, the tokenizer, and the base's identity (for the manifest)."""
    from rdt_interp.models.adapter import model_digest

    if cfg.base == BASE_MODEL:
        from rdt_interp.models.offline import OFFLINE_MODELS
        from rdt_interp.testbed.adapter import load_base_model

        chat = load_base_model()
        lm, tok = chat.model, chat.tokenizer
        base = {"name": BASE_MODEL, "gguf_sha256": OFFLINE_MODELS[BASE_MODEL].sha256}
    elif cfg.base == TINY_BASE:
        lm, tok = tiny_language_model(cfg.seed), tiny_tokenizer()
        base = {"name": TINY_BASE, "seed": cfg.seed, "gguf_sha256": None}
    else:
        raise ConfigError(f"unknown base {cfg.base!r}", fix=f"use {BASE_MODEL!r} or {TINY_BASE!r}")
    base["weights_digest"] = model_digest(lm)
    return TestbedVLA(lm, cfg.model, seed=cfg.seed), tok, base


def train(
    out: str | os.PathLike[str],
    cfg: TrainConfig | None = None,
    *,
    stop_at: tuple[str, int] | None = None,
    progress: bool = True,
) -> Path:
    """Run (or resume) training into ``out``; returns ``out``.

    ``stop_at=(stage, step)`` ends the run before that step of ``"vision"`` or ``"bc"`` as if it
    were killed there (tests of resuming: what survives is the last checkpoint). Messages go to
    :mod:`logging` (``rdt_interp.testbed.train``); ``progress`` shows progress bars when the output
    is a terminal.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "train_config.json"
    if cfg_path.is_file():
        saved = TrainConfig.from_dict(read_json(cfg_path))
        if cfg is not None and saved != cfg:
            raise ConfigError(f"{out} holds a run with another configuration",
                              fix="resume it without changing options, or use a new --out")
        cfg = saved
    cfg = cfg or TrainConfig()
    atomic_write_json(cfg_path, cfg.to_dict())
    torch.set_num_threads(cfg.threads)
    log = RunLog(out / LOG_FILE)
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)

    t0 = time.perf_counter()
    size = cfg.model.vision.image_size
    demos = _cached_demos(data_dir / "train.npz", lambda: generate_demos(
        "train", min_samples=cfg.train_samples, image_size=size, workers=cfg.workers))
    val = _cached_demos(data_dir / "val.npz", lambda: generate_demos(
        "val", min_samples=cfg.val_size, image_size=size, workers=cfg.workers))
    norm = demos.norm_stats()
    logger.info("[train] %d train samples (%d episodes), %d val samples (%d episodes) in %.1f s", len(demos),
                len(demos.episodes), len(val), len(val.episodes), time.perf_counter() - t0)
    # vision data is generated before the model exists: forked workers must not inherit CUDA
    vision_path = out / "vision_pretrained.pt"
    states = None if vision_path.is_file() else _vision_sets(cfg, data_dir)
    model, tok, base = build_model(cfg)
    model.to(cfg.device)
    adapter = TestbedVLAAdapter(model, tok, norm, name="testbed-vla (training)")
    atok = adapter.action_tokenizer
    logger.info("[train] model ready in %.1f s on %s (%s), base %s", time.perf_counter() - t0, cfg.device,
                cfg.precision, base["name"])

    # -- stage 1 ----------------------------------------------------------------------------------
    if vision_path.is_file():
        pre = torch.load(vision_path, weights_only=True, map_location="cpu")
    else:
        assert states is not None
        pre = pretrain_vision(model, cfg, out, states, log, progress=progress,
                              stop_at=stop_at[1] if stop_at and stop_at[0] == "vision" else None)
        if pre is None:
            return out
    del states
    if not (out / "ckpt.pt").is_file():
        model.vision.load_state_dict(pre["vision"])

    # -- stage 2 ----------------------------------------------------------------------------------
    groups = model.trainable_parameters()
    param_groups = [
        {"params": groups["vision"], "lr": cfg.lr_vision, "name": "vision"},
        {"params": groups["projector"], "lr": cfg.lr_projector, "name": "projector"},
        {"params": groups["lora"], "lr": cfg.lr_lora, "name": "lora"},
        {"params": groups["action_rows"], "lr": cfg.lr_rows, "name": "action_rows", "weight_decay": 0.0},
    ]
    for g in param_groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(param_groups, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    trainable = [p for g in param_groups for p in g["params"]]
    start = 0
    ckpt_path = out / "ckpt.pt"
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        model.load_delta_(ck["delta"], where=str(ckpt_path))
        opt.load_state_dict(ck["optimizer"])
        start = int(ck["step"])
        logger.info("[train] resuming behaviour cloning at step %d", start)
    log.keep(lambda r: r["stage"] not in ("bc", "val") or r["step"] < start)
    data = BCData(demos, adapter)
    val_data = BCData(val, adapter)
    val_idx = np.sort(np.random.default_rng([cfg.seed, 0x7A1]).permutation(len(val))[:cfg.val_size])
    autocast = _autocast(cfg)
    model.train()
    step = start
    with _bar(cfg.steps, start, "behaviour cloning", progress) as bar:
        for step in range(start, cfg.steps):
            if stop_at is not None and stop_at[0] == "bc" and step >= stop_at[1]:
                return out
            ts = time.perf_counter()
            mult = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * mult
            b = data.batch(indices_for(step, cfg.batch_size, len(data), cfg.seed), cfg.device)
            p_sample = sample_prob_at(step, cfg)
            with autocast():
                loss, metrics = bc_forward(model, b, atok, sample_prob=p_sample,
                                           generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip))
            opt.step()
            log.write(stage="bc", step=step, lr_mult=mult, sample_prob=p_sample, grad_norm=gnorm,
                      sec=time.perf_counter() - ts, **metrics)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['acc']:.3f}")
            if done % 20 == 0 or done == cfg.steps or not cfg.device.startswith("cuda"):
                # every 20 steps (every step on the CPU, at debug level in between)
                logger.log(logging.INFO if done % 20 == 0 or done == cfg.steps else logging.DEBUG,
                           "[bc %d/%d] loss %.3f acc %.3f within5 %.3f (%.2f s)", done, cfg.steps, metrics["loss"],
                           metrics["acc"], metrics["within5"], time.perf_counter() - ts)
            if done % cfg.val_every == 0 or done == cfg.steps:
                tv = time.perf_counter()
                with autocast():
                    vm = greedy_validation(adapter, val_data, val_idx, cfg)
                log.write(stage="val", step=step, sec=time.perf_counter() - tv, **vm)
                logger.info("[val %d] greedy exact %.3f within1 %.3f swap changes %.3f (%.1f s)", done,
                            vm["exact_all_dims"], vm["within_1_all_dims"], vm["swap_tokens_changed"],
                            time.perf_counter() - tv)
                model.train()
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                _save_torch({"step": done, "delta": model.delta_state_dict(), "optimizer": opt.state_dict()},
                            ckpt_path)
    model.eval()
    finalize(out, cfg, model, tok, norm, base, pre.get("metrics", {}))
    return out


def _autocast(cfg: TrainConfig) -> Callable[[], Any]:
    dtype = cfg.autocast_dtype
    kind = torch.device(cfg.device).type
    return lambda: torch.autocast(kind, dtype=dtype, enabled=dtype is not None)


def _bar(total: int, start: int, desc: str, progress: bool) -> Any:
    """A progress bar from ``start`` to ``total`` steps, shown only on a terminal (never in a log file)."""
    return tqdm(total=total, initial=start, desc=desc, unit="step", disable=None if progress else True)


def _vision_sets(cfg: TrainConfig, data_dir: Path) -> tuple[StateSet, StateSet]:
    spec = cfg.model.vision
    t0 = time.perf_counter()
    train_set = _cached_states(data_dir / "vision_dense_train.npz",
                               lambda: generate_state_set("train", cfg.vision_samples, spec, workers=cfg.workers))
    val_set = _cached_states(data_dir / "vision_dense_val.npz",
                             lambda: generate_state_set("val", cfg.vision_val_samples, spec, workers=cfg.workers))
    logger.info("[vision] %d train / %d val images in %.1f s", len(train_set), len(val_set),
                time.perf_counter() - t0)
    return train_set, val_set


def pretrain_vision(
    model: TestbedVLA, cfg: TrainConfig, out: Path, states: tuple[StateSet, StateSet], log: RunLog,
    *, stop_at: int | None = None, progress: bool = False,
) -> dict[str, Any] | None:
    """Stage 1: the ViT learns to say what is in each patch of train-split images (head discarded).
    ``progress``: a progress bar on a terminal."""
    spec = cfg.model.vision
    train_set, val_set = states
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 17)
        head = StateHead(spec.hidden_size)
    head.to(cfg.device)
    autocast = _autocast(cfg)
    vision = model.vision
    params = [*vision.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=0.01)
    ckpt_path = out / "ckpt_vision.pt"
    start = 0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        vision.load_state_dict(ck["vision"])
        head.load_state_dict(ck["head"])
        opt.load_state_dict(ck["optimizer"])
        start = int(ck["step"])
        logger.info("[vision] resuming at step %d", start)
    log.keep(lambda r: r["stage"] != "vision" or r["step"] < start)
    total = cfg.vision_steps
    vision.train()
    with _bar(total, start, "vision pretraining", progress) as bar:
        for step in range(start, total):
            if stop_at is not None and step >= stop_at:
                return None
            ts = time.perf_counter()
            mult = min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / total))
            for g in opt.param_groups:
                g["lr"] = cfg.vision_lr * mult
            idx = indices_for(step, cfg.vision_batch, len(train_set), cfg.seed + 1)
            px = images_to_pixels(list(train_set.images[idx]), spec.image_size).to(cfg.device)
            with autocast():
                pred = head(vision(px))
            loss = state_loss(pred.float(), torch.from_numpy(train_set.targets[idx]).to(cfg.device),
                              torch.from_numpy(train_set.masks[idx]).to(cfg.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            log.write(stage="vision", step=step, loss=float(loss.detach()), sec=time.perf_counter() - ts)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if done % cfg.vision_ckpt_every == 0 or done == total:
                logger.info("[vision %d/%d] loss %.4f", done, total, float(loss.detach()))
                _save_torch({"step": done, "vision": vision.state_dict(), "head": head.state_dict(),
                             "optimizer": opt.state_dict()}, ckpt_path)
    vision.eval()
    with autocast():
        metrics = state_errors(vision, head, val_set, spec)
    log.write(stage="vision_val", step=total, sec=0.0, **metrics)
    logger.info("[vision] held-out: %s", metrics)
    pre = {"vision": {k: v.cpu() for k, v in vision.state_dict().items()}, "metrics": metrics}
    _save_torch(pre, out / "vision_pretrained.pt")
    ckpt_path.unlink(missing_ok=True)
    return pre


@torch.no_grad()
def greedy_validation(adapter: TestbedVLAAdapter, data: BCData, idx: np.ndarray, cfg: TrainConfig) -> dict[str, Any]:
    """What the policy does when it decodes for itself (greedy, as every evaluation does): exact
    and within-±k bins per dimension against the expert, and, on the first ``val_swap`` samples,
    how many action tokens change when each image is swapped for the neighbouring sample's
    (mostly the adjacent step of the same episode: a lower bound on how much the image matters;
    :func:`rdt_interp.testbed.evaluate.evaluate_image_dependence` swaps across scenes)."""
    from rdt_interp.testbed.evaluate import WITHIN, bin_metrics, predict_in_batches

    tok = adapter.action_tokenizer
    pred, _, _ = predict_in_batches(adapter, data.requests(idx), cfg.batch_size * 2)
    target = data.targets[torch.as_tensor(idx)]
    m = bin_metrics(tok, pred, target)
    out: dict[str, Any] = {"n": len(idx), "episodes": len({int(data.demos.episode_ids[j]) for j in idx}),
                           "exact": m["exact"], "exact_all_dims": m["exact_all_dims"],
                           "action_token_rate": float(np.mean(m["action_token_rate"]))}
    for k in WITHIN:
        out[f"within_{k}"] = m[f"within_{k}"]
        out[f"within_{k}_all_dims"] = float(np.mean(m[f"within_{k}"]))
    sub = idx[:cfg.val_swap]
    other, _, _ = predict_in_batches(adapter, data.requests(sub, images_of=np.roll(sub, 1)), cfg.batch_size * 2)
    changed = (other != pred[: len(sub)]).double()
    out["swap_tokens_changed"] = float(changed.mean())
    out["swap_tokens_changed_dims"] = changed.mean(0).tolist()
    return out

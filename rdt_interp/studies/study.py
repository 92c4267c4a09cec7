"""The whole RDT study from one config: chat side -> direction -> VLA side -> cross-model -> figures.

Run directory layout::

    RUN_DIR/config.json            the validated config
    RUN_DIR/chat/                  chat-side study (extract, selection, alpha sweep, evaluation)
    RUN_DIR/direction.safetensors  the direction handed to the VLA (rank-k if asked for)
    RUN_DIR/vla/                   VLA-side study (alpha / target-mode sweeps, specificity, decoupling)
    RUN_DIR/cross_model.json       chat vs VLA: per-layer alignment, probe transfer
    RUN_DIR/figures/               every figure, PDF + PNG (rebuilt by `rdt-interp figures`)

Every step is cached, so a killed run continues where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rdt_interp.directions.direction import Direction
from rdt_interp.errors import ConfigError, DModelMismatchError
from rdt_interp.studies.config import StudyConfig, VLAModelSpec
from rdt_interp.studies.rundir import RunDir

logger = logging.getLogger(__name__)  # messages; the CLI configures the handler and level


def check_models(cfg: StudyConfig, *, chat: bool = True, vla: bool = True) -> None:
    """Check that every model ``cfg`` names can be found, without loading any.

    Runs before anything is loaded or written, so a wrong name or path fails at once instead
    of after the chat side has run.

    Parameters
    ----------
    cfg
        A validated study config.
    chat, vla
        Whether to check the chat model / the VLA (``False`` when the caller passes the model).

    Raises
    ------
    CheckpointError
        A name that is not in the registry, a missing checkpoint directory, a missing package.
    """
    from rdt_interp.errors import CheckpointError
    from rdt_interp.models.loading import check_chat_source

    if chat:
        check_chat_source(cfg.chat_model.name)
    spec = cfg.vla_model
    if not vla or spec is None or spec.adapter in ("testbed-tiny", "openvla-7b-random"):
        return
    if spec.adapter == "openvla":
        from rdt_interp.models.openvla.config import OpenVLAConfig

        OpenVLAConfig.from_dir(Path(spec.checkpoint or "").expanduser())
    elif spec.checkpoint and not Path(spec.checkpoint).expanduser().is_dir():
        raise CheckpointError(f"vla_model.checkpoint {spec.checkpoint} does not exist",
                              fix="point it at a trained testbed VLA directory, or leave it out "
                              "for the committed one")


def load_vla(spec: VLAModelSpec):
    """The VLA adapter a config names."""
    from rdt_interp.models.loading import _dtype

    dtype = _dtype(spec.dtype)
    if spec.adapter == "testbed":
        from rdt_interp.testbed.adapter import load_testbed_vla

        return load_testbed_vla(spec.checkpoint or None, device=spec.device, dtype=dtype)
    if spec.adapter == "testbed-tiny":
        from rdt_interp.testbed.adapter import build_tiny_testbed_vla

        return build_tiny_testbed_vla(spec.seed)
    if spec.adapter == "openvla":
        from rdt_interp.models.openvla import load_openvla

        return load_openvla(spec.checkpoint, dtype=dtype, device=spec.device)
    from rdt_interp.models.openvla import build_random_openvla, openvla_7b_config

    return build_random_openvla(openvla_7b_config(), dtype=dtype, device=spec.device, seed=spec.seed)


def run_study(
    cfg: StudyConfig,
    run_dir: str | Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] = logger.info,
    chat_model: Any = None,
    vla: Any = None,
) -> dict[str, Any]:
    """Run (or resume) the study described by ``cfg``; returns the summary (also in RUN_DIR)."""
    t0 = time.perf_counter()
    check_models(cfg, chat=chat_model is None, vla=vla is None)  # before anything loads or is written
    run = RunDir(run_dir, {"experiment": "study", **cfg.to_dict()}, log=log)
    from rdt_interp.models.loading import load_chat_model
    from rdt_interp.studies.chat import run_chat_refusal

    if chat_model is None:
        log(f"loading chat model {cfg.chat_model.name}")
        chat_model = load_chat_model(cfg.chat_model.name, dtype=cfg.chat_model.dtype,
                                     device=cfg.chat_model.device, system_prompt=cfg.chat_model.system_prompt,
                                     template=cfg.chat_model.template)
    chat_summary = run_chat_refusal(chat_model, cfg.chat, run.path / "chat", progress=progress, log=log)
    direction = _direction(cfg, run, chat_model, log)
    summary: dict[str, Any] = {"name": cfg.name, "chat": chat_summary,
                               "direction": {"rank": direction.rank, "norm": direction.norm,
                                             "layer": direction.provenance.layer,
                                             "position": direction.provenance.position}}
    if cfg.vla_model is not None:
        from rdt_interp.studies.vla import run_vla_rdt

        if vla is None:
            log(f"loading VLA {cfg.vla_model.adapter}")
            vla = load_vla(cfg.vla_model)
        if vla.d_model != direction.d_model:
            raise DModelMismatchError(expected=vla.d_model, actual=direction.d_model,
                                      what=f"the direction of {cfg.chat_model.name}")
        shuffled = shuffled_directions(cfg, run.path, chat_model, direction, progress=progress)
        result = run_vla_rdt(vla, direction, cfg.vla, run.path / "vla", progress=progress, log=log,
                             shuffled=shuffled)
        summary["vla"] = {"model": vla.describe(), "alpha": result.alpha,
                          "random_weights": bool(vla.random_weights)}
        if cfg.cross_model:
            summary["cross_model"] = run.step("cross_model", lambda: cross_model(
                chat_model, vla, run.path, cfg, progress=progress))
    run.save("summary", summary)  # the figures read it
    from rdt_interp.viz.study import study_figures

    t_fig = time.perf_counter()
    study_figures(run.path, run.path / "figures")
    summary["figures_s"] = time.perf_counter() - t_fig
    summary["wall_s_this_invocation"] = time.perf_counter() - t0
    run.save("summary", summary)
    return summary


def _direction(cfg: StudyConfig, run: RunDir, chat_model: Any, log: Callable[[str], None]) -> Direction:
    base = Direction.load(run.path / "chat" / "direction.safetensors", d_model=chat_model.d_model)
    if cfg.direction.rank == 1:
        return base
    path = run.path / f"direction_rank{cfg.direction.rank}.safetensors"
    if not path.is_file():
        from rdt_interp.directions.diff_in_means import extract_candidates
        from rdt_interp.directions.subspace import subspace_direction
        from rdt_interp.studies.chat import chat_run_dir, chat_splits

        log(f"[run]    rank-{cfg.direction.rank} direction")
        splits = chat_splits(chat_model, cfg.chat, chat_run_dir(run.path / "chat", cfg.chat, log=log))
        cands = extract_candidates(chat_model, splits["harmful_train"], splits["harmless_train"],
                                   batch_size=cfg.chat.capture_batch_size,
                                   cache=run.path / "chat" / "activations", progress=False)
        li, pi = cands.layers.index(base.provenance.layer), cands.positions.index(
            int(base.provenance.position.split("[")[1].rstrip("]")))
        d = subspace_direction(base, cands.harmful.values[:, li, pi], cands.harmless.values[:, li, pi],
                               cfg.direction.rank, weighting=cfg.direction.weighting, norm=cfg.direction.norm)
        d.save(path)
    return Direction.load(path, d_model=chat_model.d_model)


def shuffled_directions(cfg: StudyConfig, run_path: Path, chat_model: Any, direction: Direction, *,
                        progress: bool = False) -> torch.Tensor | None:
    """The label-shuffled null of the VLA specificity step: ``cfg.vla.n_shuffled`` class-mean
    differences of the chat model's train activations at the direction's layer and position with
    the harmful/harmless labels shuffled (seed ``cfg.vla.seed``); ``None`` when ``n_shuffled`` is
    0 or specificity is off. Reads the activation cache the chat side wrote."""
    if cfg.vla is None or not cfg.vla.n_shuffled or not cfg.vla.specificity:
        return None
    from rdt_interp.analysis.specificity import label_shuffled_directions
    from rdt_interp.directions.diff_in_means import extract_candidates
    from rdt_interp.studies.chat import chat_run_dir, chat_splits

    splits = chat_splits(chat_model, cfg.chat, chat_run_dir(run_path / "chat", cfg.chat))
    cands = extract_candidates(chat_model, splits["harmful_train"], splits["harmless_train"],
                               batch_size=cfg.chat.capture_batch_size,
                               cache=run_path / "chat" / "activations", progress=progress)
    prov = direction.provenance
    li = cands.layers.index(prov.layer)
    pi = cands.positions.index(int(prov.position.split("[")[1].rstrip("]")))
    xh, xl = cands.harmful.values[:, li, pi], cands.harmless.values[:, li, pi]
    xs = torch.cat([xh, xl]).double()
    ys = torch.cat([torch.ones(xh.shape[0], dtype=torch.bool), torch.zeros(xl.shape[0], dtype=torch.bool)])
    return label_shuffled_directions(xs, ys, cfg.vla.n_shuffled, seed=cfg.vla.seed).float()


def cross_model(chat_model: Any, vla: Any, run_path: Path, cfg: StudyConfig, *, progress: bool = False
                ) -> dict[str, Any]:
    """Chat vs VLA: per-layer cosine of the two models' harmful-vs-benign directions against the
    random null and the label-permutation null (the VLA's labels shuffled, the chat directions
    fixed; ``alignment_<role>["permutation"]``), and the transfer AUC of a chat-trained probe on
    the VLA's residuals."""
    from rdt_interp.analysis.alignment import align_directions, cosine_permutation_null
    from rdt_interp.analysis.probe_grid import transfer_auc
    from rdt_interp.analysis.probes import Labeled, fit_probe
    from rdt_interp.directions.diff_in_means import extract_candidates
    from rdt_interp.studies.chat import chat_run_dir, chat_splits
    from rdt_interp.studies.vla import config_requests, subset
    from rdt_interp.tracing.vla import capture_roles

    if cfg.vla is None:
        raise ConfigError("cross_model needs a VLA section")
    splits = chat_splits(chat_model, cfg.chat, chat_run_dir(run_path / "chat", cfg.chat))
    cands = extract_candidates(chat_model, splits["harmful_train"], splits["harmless_train"],
                               batch_size=cfg.chat.capture_batch_size,
                               cache=run_path / "chat" / "activations", progress=progress)
    chosen = Direction.load(run_path / "chat" / "direction.safetensors")
    pos = int(chosen.provenance.position.split("[")[1].rstrip("]"))
    pi = cands.positions.index(pos)
    chat_dirs = cands.vectors[:, pi].float()  # [layer, d]
    v = cfg.vla
    requests = config_requests(vla, v)
    reqs = subset(requests, "test") or list(requests)
    caps = capture_roles(vla, [r.request for r in reqs], roles=("last_text", "first_action"),
                         batch_size=v.batch_size, backend=v.backend,  # type: ignore[arg-type]
                         constrain_actions=v.constrain_actions, progress=progress)
    y = torch.tensor([r.label == "harmful" for r in reqs])
    out: dict[str, Any] = {"n_vla": len(reqs), "n_vla_harmful": int(y.sum()), "chat_position": pos}
    for role in ("last_text", "first_action"):
        x = caps.at(role).values[:, :, 0].double()  # [n, layer, d]
        vla_dirs = (x[y].mean(0) - x[~y].mean(0)).float()
        common = min(chat_dirs.shape[0], vla_dirs.shape[0])
        perm = cosine_permutation_null(x[:, :common], y, chat_dirs[:common], n_permutations=1000,
                                       seed=cfg.chat.seed, name_a=f"{vla.name}:{role}", name_b=chat_model.name)
        res = align_directions(chat_dirs[:common], vla_dirs[:common], name_a=chat_model.name,
                               name_b=f"{vla.name}:{role}", permutation=perm)
        out[f"alignment_{role}"] = res.to_dict()
    chat_data = Labeled.from_classes(cands.harmful.values[:, :, pi:pi + 1], cands.harmless.values[:, :, pi:pi + 1],
                                     split="train", layers=cands.layers, positions=("chat",))
    vla_data = caps.labeled(y, split="test", roles=("last_text", "first_action"))
    transfer = {}
    for layer in sorted({chosen.provenance.layer, *range(0, min(chat_model.n_layers, vla.n_layers), 4)}):
        probe = fit_probe(chat_data, layer, "chat")
        for role in ("last_text", "first_action"):
            t = transfer_auc(probe, vla_data, layer=layer, position=role, n_boot=cfg.chat.n_boot,
                             n_perm=1000, seed=cfg.chat.seed)
            transfer[f"{layer}:{role}"] = t.to_dict()
    out["probe_transfer"] = transfer
    # Subspaces at the chosen layer: spectra of the harmful-minus-harmless-mean contrast rows, and
    # principal angles between the chat and VLA top-k contrast subspaces vs random subspaces.
    from rdt_interp.analysis.subspace import compare_subspaces, spectrum
    from rdt_interp.directions.subspace import contrast_subspace

    L = chosen.provenance.layer
    li = cands.layers.index(L)
    ch, cl = cands.harmful.values[:, li, pi], cands.harmless.values[:, li, pi]
    xv = caps.at("last_text").values[:, caps.layers.index(L), 0]
    vh, vl = xv[y], xv[~y]
    k = max(1, min(4, vh.shape[0] - 1, ch.shape[0] - 1))
    out["subspace_layer"] = L
    out["spectrum_chat"] = spectrum(ch - cl.mean(0), center=False, n_null=50, seed=cfg.chat.seed,
                                    label=f"{chat_model.name} L{L}").to_dict()
    out["spectrum_vla"] = spectrum(vh - vl.mean(0), center=False, n_null=50, seed=cfg.chat.seed,
                                   label=f"{vla.name} last text L{L}").to_dict()
    out["principal_angles"] = compare_subspaces(
        contrast_subspace(ch, cl, k).basis, contrast_subspace(vh, vl, k).basis, n_null=1000,
        seed=cfg.chat.seed, label_a=f"chat top-{k}", label_b=f"VLA top-{k}").to_dict()
    return out

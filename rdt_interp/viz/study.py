"""Every figure of a study run directory, rebuilt from saved results (no model is loaded)."""

from __future__ import annotations

from pathlib import Path

from rdt_interp.errors import ConfigError
from rdt_interp.storage import read_json
from rdt_interp.viz.style import save_figure


def study_figures(run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the chat, VLA and cross-model figures of ``run_dir`` into ``out_dir`` (PDF + PNG)."""
    from rdt_interp.analysis.alignment import AlignmentResult
    from rdt_interp.analysis.subspace import Spectrum, SubspaceComparison
    from rdt_interp.viz import chat as chat_fig
    from rdt_interp.viz import figures as fig

    run = Path(run_dir)
    out = Path(out_dir)
    chat = run / "chat"
    if not (chat / "evaluation.json").is_file():
        raise ConfigError(f"{run} has no finished chat study (chat/evaluation.json)",
                          fix="run `rdt-interp run CONFIG --out RUN_DIR` first (it resumes)")

    def rd(p: Path):
        return read_json(p, what="run result")

    written: list[Path] = []
    summary = rd(chat / "summary.json")
    model = summary["model"]["name"]
    written += save_figure(chat_fig.refusal_bars(rd(chat / "evaluation.json"), alpha=summary["alpha"], model=model,
                                                 removed=summary.get("ablation_removed_refusals")),
                           out / "chat_refusal_rates")
    written += save_figure(chat_fig.selection_heatmap(rd(chat / "selection.json")), out / "chat_selection")
    written += save_figure(chat_fig.alpha_sweep_chat(rd(chat / "alpha_sweep.json")), out / "chat_alpha_sweep")
    if (run / "vla" / "result.json").is_file():
        from rdt_interp.viz.vla import vla_rdt_figures

        written += [p for p in vla_rdt_figures(run / "vla", out)]
    cm_path = run / "cross_model.json"
    if cm_path.is_file():
        cm = rd(cm_path)
        for role in ("last_text", "first_action"):
            key = f"alignment_{role}"
            if key in cm:
                written += save_figure(fig.alignment_layers(AlignmentResult.from_dict(cm[key])),
                                       out / f"cross_model_alignment_{role}")
        if "spectrum_chat" in cm:
            written += save_figure(fig.spectrum_plot([Spectrum.from_dict(cm["spectrum_chat"]),
                                                      Spectrum.from_dict(cm["spectrum_vla"])]),
                                   out / "cross_model_spectra")
            written += save_figure(fig.principal_angles_plot(SubspaceComparison.from_dict(cm["principal_angles"])),
                                   out / "cross_model_principal_angles")
    return written

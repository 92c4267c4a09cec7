"""The ``rdt-interp`` command line: run a study, rebuild its figures, inspect it, run the demo."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn, ParamSpec

import typer

from rdt_interp import __version__
from rdt_interp.errors import RdtError

P = ParamSpec("P")

app = typer.Typer(
    name="rdt-interp",
    help="Refusal Direction Transfer: trace, probe and steer chat LMs and VLAs.\n\n"
    "Start with `rdt-interp demo` (offline, CPU). A study is one TOML config: "
    "`rdt-interp run CONFIG --out RUN_DIR` (resumable), then `rdt-interp figures RUN_DIR` and "
    "`rdt-interp inspect RUN_DIR`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(exc: RdtError) -> NoReturn:
    """Bad input is one line on stderr and exit code 2, never a traceback."""
    typer.secho(f"error: {exc.one_line()}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _boundary(command: Callable[P, None]) -> Callable[P, None]:
    """Every command goes through this: an :class:`RdtError` becomes :func:`_fail`."""

    @functools.wraps(command)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            command(*args, **kwargs)
        except RdtError as exc:
            _fail(exc)

    return wrapped


def _version(value: bool | None) -> None:
    if value:
        typer.echo(f"rdt-interp {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                              help="Print the version and exit.")] = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.command()
@_boundary
def run(
    config: Annotated[Path, typer.Argument(help="Study config (TOML); see docs/cli.md.")],
    out: Annotated[Path | None, typer.Option(help="Run directory (default: runs/<name>).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Run (or resume) a study: chat side, direction, VLA side, cross-model, figures."""
    from rdt_interp.studies.config import load_config
    from rdt_interp.studies.study import run_study

    cfg = load_config(config)
    run_dir = out or Path("runs") / cfg.name
    t0 = time.perf_counter()
    run_study(cfg, run_dir, progress=progress, log=typer.echo)
    typer.echo(f"done in {time.perf_counter() - t0:.0f} s -> {run_dir}")
    _print_summary(run_dir)


@app.command()
@_boundary
def figures(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by `rdt-interp run`.")],
    out: Annotated[Path | None, typer.Option(help="Where to write the figures (default RUN_DIR/figures).")] = None,
) -> None:
    """Rebuild every figure of a run from its saved results (no model is loaded)."""
    from rdt_interp.viz.study import study_figures

    written = study_figures(run_dir, out or run_dir / "figures")
    pngs = [p for p in written if p.suffix == ".png"]
    typer.echo(f"{len(pngs)} figures (PDF + PNG) in {out or run_dir / 'figures'}")


@app.command()
@_boundary
def inspect(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Summary table of a run in the terminal."""
    if not (run_dir / "config.json").is_file():
        raise RdtError(f"{run_dir} is not a run directory (no config.json)")
    _print_summary(run_dir)


@app.command()
@_boundary
def demo(
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option(help="The small configuration (a few minutes).")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """The offline demo: real Qwen2.5-Coder-0.5B-Instruct (chat side) and the learned testbed
    mini-VLA built on it (VLA side), on CPU. Resumes if interrupted."""
    from rdt_interp.studies.config import builtin_config
    from rdt_interp.studies.study import run_study

    cfg = builtin_config("quick" if quick else "demo")
    out = out if not (quick and out == Path("runs/demo")) else Path("runs/quick")
    t0 = time.perf_counter()
    run_study(cfg, out, progress=progress, log=typer.echo)
    typer.echo(f"demo finished in {time.perf_counter() - t0:.0f} s; figures in {out / 'figures'}")
    _print_summary(out)


@app.command()
@_boundary
def models() -> None:
    """List the named chat models."""
    from rdt_interp.models.registry import REGISTRY

    for e in REGISTRY.values():
        typer.echo(f"{e.name:32s} {e.kind:13s} {e.description}")


def _print_summary(run_dir: Path) -> None:
    from rdt_interp.storage import read_json

    path = run_dir / "summary.json"
    chat_path = run_dir / "chat" / "summary.json"
    if not chat_path.is_file():
        typer.echo(f"{run_dir}: no finished chat study yet (run it again to resume)")
        return
    chat = read_json(chat_path, what="chat summary")
    ev = chat["evaluation"]

    def pct(e: dict, key: str) -> str:
        return f"{100 * e[key]:5.1f}% [{100 * e[key + '_lo']:.0f}, {100 * e[key + '_hi']:.0f}]"

    rows = [
        ("chat model", chat["model"]["name"] + (" (RANDOM WEIGHTS)" if chat["model"]["random_weights"] else "")),
        ("direction", f"layer {chat['layer']}, position {chat['position']}, |r| = {chat['direction_norm']:.2f}"
         + ("" if chat["filters_passed"] else
            f"  (no candidate passed the filters; relaxation: {chat.get('relaxation')})")),
        ("harmful refusal, baseline", pct(ev["baseline_harmful"], "refusal")),
        ("harmful compliance, r ablated", pct(ev["ablation_harmful"], "compliance")),
        ("harmless refusal, baseline", pct(ev["baseline_harmless"], "refusal")),
        (f"harmless refusal, +{chat['alpha']:g}·r", pct(ev["addition_harmless"], "refusal")),
        ("KL on harmless, r ablated", f"{chat['kl']['kl']:.3f} [{chat['kl']['lo']:.3f}, {chat['kl']['hi']:.3f}]"),
    ]
    removed = chat.get("ablation_removed_refusals")
    if removed and removed.get("n"):
        rows.insert(4, ("baseline refusals removed by ablation",
                        f"{100 * removed['rate']:5.1f}% [{100 * removed['lo']:.0f}, {100 * removed['hi']:.0f}] "
                        f"({removed['k']} of {removed['n']})"))
    rows.append(("rates", f"n = {ev['baseline_harmful']['n']} + {ev['baseline_harmless']['n']} test prompts, "
                          "Wilson 95% CIs"))
    if "departures" in chat:
        deps = chat["departures"] or ["none (Arditi et al.'s procedure)"]
        rows.append(("departures from the reference", deps[0]))
        rows += [("", d) for d in deps[1:]]
    if path.is_file():
        s = read_json(path, what="study summary")
        if "vla" in s:
            v = s["vla"]
            rows.append(("VLA", v["model"]["name"] + (" (RANDOM WEIGHTS)" if v["random_weights"] else "")))
            vsum = run_dir / "vla" / "summary.json"
            if vsum.is_file():
                vs = read_json(vsum, what="VLA summary")
                a = vs.get("alpha")
                rows.append(("  alpha (chosen on val)", f"{a:g} at layers {vs.get('layers')}"))
                for label in ("harmful", "benign"):
                    base, rdt_ = vs.get(f"none/{label}"), vs.get(f"action@{a:g}/{label}")
                    plus = vs.get(f"text+action@{a:g}/{label}")
                    if base and rdt_ and plus:
                        rows.append((f"  {label} zero-motion mass", f"{base['zero_mass']:.3f} unsteered, "
                                     f"{rdt_['zero_mass']:.3f} RDT, {plus['zero_mass']:.3f} RDT+"))
                sp = vs.get("specificity")
                if sp:
                    rows.append(("  specificity (RDT)", f"r {sp['real']:.3f} vs random {sp['null_mean']:.3f}, "
                                 f"p = {sp['p']:.3g} ({sp['n_random']} directions)"))
                for role in ("last_text", "first_action"):
                    cell = (vs.get("decoupling") or {}).get(role)
                    if cell:
                        rows.append((f"  harm AUC, {role}, L{(vs.get('layers') or ['?'])[0]}", f"projection {cell['proj_auc']:.2f}, "
                                     f"probe {cell['probe_auc']:.2f}"))
    width = max(len(r[0]) for r in rows)
    typer.echo(f"\n{run_dir}")
    for k, v in rows:
        typer.echo(f"  {k:<{width}}  {v}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

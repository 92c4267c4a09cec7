"""The ``rdt-interp`` command line: run a study, rebuild its figures, inspect it, run the demo,
train and evaluate the testbed VLA.

What a command computes is printed on stdout; progress messages go through :mod:`logging`
(stderr), configured once here (``--log-level``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, ParamSpec

import typer

from rdt_interp import __version__
from rdt_interp.errors import ConfigError, RdtError

P = ParamSpec("P")
logger = logging.getLogger(__name__)

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


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted (a test runner swaps it)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr


def configure_logging(level: str = "info") -> None:
    """The package's messages at ``level`` and above, one per line on stderr.

    Only the ``rdt_interp`` logger gets a handler (calling this again replaces it); records still
    propagate, so a program's own logging set-up sees them too.
    """
    pkg = logging.getLogger("rdt_interp")
    for h in [h for h in pkg.handlers if isinstance(h, _StderrHandler)]:
        pkg.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    pkg.addHandler(handler)
    pkg.setLevel(level.upper())


@app.callback()
def main(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")] = None,
    log_level: Annotated[LogLevel, typer.Option("--log-level", case_sensitive=False,
                                                help="Messages shown on stderr.")] = LogLevel.info,
) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure_logging(log_level.value)


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
    run_study(cfg, run_dir, progress=progress, log=logger.info)
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
    run_study(cfg, out, progress=progress, log=logger.info)
    typer.echo(f"demo finished in {time.perf_counter() - t0:.0f} s; figures in {out / 'figures'}")
    _print_summary(out)


@app.command()
@_boundary
def models() -> None:
    """List the named chat models."""
    from rdt_interp.models.registry import REGISTRY

    for e in REGISTRY.values():
        typer.echo(f"{e.name:32s} {e.kind:13s} {e.description}")


# -- the testbed VLA -----------------------------------------------------------------------------------
testbed_app = typer.Typer(
    help="The testbed VLA: `rdt-interp testbed train --out DIR` (resumable), then "
    "`rdt-interp testbed eval --delta DIR --out RESULTS.json`.",
    no_args_is_help=True,
)
app.add_typer(testbed_app, name="testbed")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=JSON`` pairs (``--set``) as a mapping; a pair that is not one is a clear error."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set takes KEY=JSON, got {pair!r}", fix="e.g. --set steps=200 --set batch_size=8")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"--set {pair}: {value!r} is not a JSON value",
                              fix=f"""write a string in quotes: --set {key}='"{value}"'""") from None
    return out


@testbed_app.command("train")
@_boundary
def testbed_train(
    out: Annotated[Path, typer.Option(help="Run directory (resumed if it holds a checkpoint).")],
    seed: Annotated[int, typer.Option(help="Seed of the data order, the initialization and the tiny backbone.")] = 0,
    tiny: Annotated[bool, typer.Option(help="Tiny random backbone (a pipeline check in seconds).")] = False,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=JSON",
        help="Override a TrainConfig field (repeatable), e.g. --set steps=200 --set device='\"cuda\"'.")] = None,
    export_to: Annotated[Path | None, typer.Option("--export", help="Copy the finished run's artifacts here.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars (on a terminal).")] = True,
) -> None:
    """Train (or resume) the testbed VLA: vision pretraining, then behaviour cloning."""
    from rdt_interp.testbed.artifacts import export
    from rdt_interp.testbed.config import TrainConfig, tiny_config
    from rdt_interp.testbed.train import train

    cfg = tiny_config(seed) if tiny else TrainConfig(seed=seed)
    if overrides:
        cfg = cfg.replace(**parse_overrides(overrides))
    train(out, cfg, progress=progress)  # resumes when --out holds a run with this configuration
    _print_training(out)
    if export_to is not None:
        for p in export(out, export_to):
            typer.echo(f"exported {p}")


@testbed_app.command("eval")
@_boundary
def testbed_eval(
    out: Annotated[Path, typer.Option(help="Results JSON (sections already in it are kept).")],
    delta: Annotated[Path | None, typer.Option(help="A training run directory (default: the committed delta).")]
    = None,
    sections: Annotated[list[str] | None, typer.Option(
        help="Sections to run (repeatable): bins, closed_loop, harmful, chat, image_dependence "
        "[default: all].")] = None,
    episodes: Annotated[int | None, typer.Option(help="Closed-loop test episodes [default: 240].")] = None,
    threads: Annotated[int, typer.Option(help="Torch threads.")] = 1,
    workers: Annotated[int, typer.Option(help="Processes generating held-out demonstrations.")] = 1,
    device: Annotated[str, typer.Option(help="Where the VLA runs (e.g. cuda).")] = "cpu",
    batch_size: Annotated[int | None, typer.Option(help="Requests per forward pass [default: 32].")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=JSON", help="Override an EvalConfig field (repeatable), e.g. --set n_bin_samples=64.")]
    = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars (on a terminal).")] = True,
) -> None:
    """Evaluate the testbed VLA: bin accuracy, closed loop, harmful vs benign motion, the chat model."""
    from rdt_interp.schema import validate
    from rdt_interp.testbed.evaluate import SECTIONS, EvalConfig, evaluate_delta

    given = {"n_episodes": episodes, "batch_size": batch_size}
    settings = {"workers": workers, **{k: v for k, v in given.items() if v is not None},
                **parse_overrides(overrides or [])}
    cfg = validate(EvalConfig, settings, source="evaluation settings",
                   fix="see the fields of EvalConfig in rdt_interp/testbed/evaluate.py")
    results = evaluate_delta(out, delta, cfg, sections=sections or SECTIONS, device=device, threads=threads,
                             progress=progress)
    _print_evaluation(out, results)


def _print_training(out: Path) -> None:
    from rdt_interp.storage import read_json
    from rdt_interp.testbed.adapter import DELTA_FILE, MANIFEST_FILE

    m = read_json(out / MANIFEST_FILE, what="testbed manifest")
    t = m["training"]
    val = t.get("final_val") or {}
    typer.echo(f"{out}: {t['steps']} steps of {m['train_config']['batch_size']}, final loss "
               f"{t['final_loss_mean_last20']:.3f} (mean of the last 20), greedy exact bin "
               f"{val.get('exact_all_dims', float('nan')):.3f} on {val.get('n', 0)} val samples; "
               f"{DELTA_FILE} {m['delta']['bytes'] / 1e6:.1f} MB")


def _print_evaluation(out: Path, results: dict[str, Any]) -> None:
    rows = []
    if "bins" in results:
        b = results["bins"]["all"]
        rows.append(("greedy exact bin (held-out)", f"{b['exact_all_dims']:.3f} on {b['n']} samples, "
                     f"constant-bin baseline {results['bins']['majority_baseline']['exact_all_dims']:.3f}"))
    if "closed_loop" in results:
        cl = results["closed_loop"]
        rows += [(f"closed-loop success, {name}", f"{cl[name]['k']}/{cl[name]['n']}")
                 for name in ("vla", "vla_blank_image", "constant_bin", "zero_policy") if cl.get(name)]
    if "harmful" in results:
        fs = results["harmful"]["first_step"]
        rows.append(("first-step zero-motion rate", f"harmful {fs['harmful']['zero_motion_rate']['rate']:.3f}, "
                     f"benign twin {fs['benign_twin']['zero_motion_rate']['rate']:.3f} "
                     f"({results['harmful']['n_pairs']} pairs)"))
    if "chat" in results:
        ch = results["chat"]
        rows.append(("chat refusal (text)", f"harmful {ch['harmful']['rate']:.3f}, benign {ch['benign']['rate']:.3f}"))
    if "image_dependence" in results:
        rows.append(("rows changed by another image", f"{results['image_dependence']['rows_with_any_change']:.3f}"))
    typer.echo(f"\n{out}")
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        typer.echo(f"  {k:<{width}}  {v}")


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

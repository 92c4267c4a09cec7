"""The command line end to end on tiny models: run, resume after a kill, figures, inspect, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rdt_interp.cli import app

CHAT_ONLY = """
name = "tiny-chat"
[chat_model]
name = "tiny-qwen2"
[chat]
n_train = 8
n_test = 6
alphas = [1.0, 4.0]
alpha_val_n = 4
max_new_tokens = 4
n_boot = 100
filter_data = false    # random weights refuse nothing: the reference filter would keep no harmful prompt
[chat.selection]
screen_n = 3
final_n = 5
top_k = 2
kl_threshold = 10.0
if_none_pass = "unfiltered"
"""

WITH_VLA = CHAT_ONLY.replace('name = "tiny-chat"', 'name = "tiny-study"') + """
[vla_model]
adapter = "testbed-tiny"
[vla]
alphas = [1.0, 4.0]
n_pairs = 6
n_random = 100
specificity_pairs = 3
n_boot = 50
n_perm = 50
folds = 2
"""

runner = CliRunner()


def _results(run_dir: Path) -> dict[str, object]:
    """Every step result of a run, without wall-clock fields."""
    skip = {"timings.json", "summary.json"}

    def clean(obj: object) -> object:
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if k != "seconds" and not k.startswith("wall_s")}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        return obj

    return {str(p.relative_to(run_dir)): clean(json.loads(p.read_text()))
            for p in sorted(run_dir.rglob("*.json")) if p.name not in skip}


@pytest.fixture
def one_thread():
    """The killed run is a subprocess: give it and this process the same thread count, so the
    two compute with the same float reductions and results can be compared bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    torch.set_num_threads(before)


def test_run_killed_and_resumed_gives_identical_results(tmp_path, one_thread):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CHAT_ONLY)
    ref = tmp_path / "ref"
    res = runner.invoke(app, ["run", str(cfg), "--out", str(ref), "--no-progress"])
    assert res.exit_code == 0, res.output
    # Kill a second run as soon as its selection step has been written, then resume it.
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "rdt_interp.cli", "run", str(cfg), "--out", str(killed),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**one_thread, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 600
    while not (killed / "chat" / "selection.json").is_file():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "chat" / "evaluation.json").is_file()
    res = runner.invoke(app, ["run", str(cfg), "--out", str(killed), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "[cached] selection" in res.output and "[run]    evaluation" in res.output
    assert _results(killed) == _results(ref)
    assert (killed / "figures" / "chat_refusal_rates.png").is_file()


def test_full_study_figures_and_inspect(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(WITH_VLA)
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", str(cfg), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "RANDOM WEIGHTS" in res.output
    assert (out / "cross_model.json").is_file() and (out / "vla" / "result.json").is_file()
    figs = tmp_path / "figs"
    res = runner.invoke(app, ["figures", str(out), "--out", str(figs)])
    assert res.exit_code == 0, res.output
    names = {p.stem for p in figs.glob("*.png")}
    assert {"chat_refusal_rates", "chat_selection", "chat_alpha_sweep", "alpha_sweep", "target_modes",
            "cross_model_alignment_last_text", "cross_model_principal_angles", "specificity",
            "decoupling"} <= names
    assert {p.stem for p in figs.glob("*.pdf")} == names
    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0 and "harmful compliance" in res.output
    # the report names every departure from the reference procedure this config made
    assert "departures from the reference" in res.output and "no data filtering" in res.output
    chat = json.loads((out / "chat" / "summary.json").read_text())
    assert any("screened" in d for d in chat["departures"])
    assert chat["ablation_removed_refusals"]["n"] == sum(
        json.loads((out / "chat" / "evaluation.json").read_text())["baseline_harmful"]["flags"])


def test_selection_without_a_passing_candidate_stops_the_run_with_the_table(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CHAT_ONLY.replace('if_none_pass = "unfiltered"', 'if_none_pass = "error"')
                   .replace("kl_threshold = 10.0", "kl_threshold = -1.0"))
    out = tmp_path / "r"
    res = runner.invoke(app, ["run", str(cfg), "--out", str(out), "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "no direction candidate passes the filters" in res.output and "ablation" in res.output
    assert "fix:" in res.output and "if_none_pass" in res.output
    assert (out / "chat" / "selection_failed.json").is_file() and not (out / "chat" / "selection.json").is_file()


@pytest.mark.parametrize("text,needle", [
    ("name = 'x'\n[chat]\nn_trian = 3\n", "chat.n_trian: unknown key"),
    ("name = 'x'\n[chat]\nn_train = 'many'\n", "chat.n_train"),
    ("name = 'x'\n[vla_model]\nadapter = 'openvla'\n[vla]\n", "needs vla_model.checkpoint"),
    ("name = 'x'\n[chat\n", "not valid TOML"),
])
def test_bad_configs_are_clear_errors(tmp_path, text, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    res = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert needle in res.output


def test_another_config_in_the_same_run_dir_is_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CHAT_ONLY)
    out = tmp_path / "r"
    (out).mkdir()
    (out / "config.json").write_text(json.dumps({"experiment": "study", "name": "other"}))
    res = runner.invoke(app, ["run", str(cfg), "--out", str(out)])
    assert res.exit_code == 2 and "another config" in res.output


def test_figures_of_an_empty_dir_is_a_clear_error(tmp_path):
    res = runner.invoke(app, ["figures", str(tmp_path)])
    assert res.exit_code == 2 and "no finished chat study" in res.output


def test_help_and_version():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "demo" in res.output and "figures" in res.output
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("rdt-interp ")


def _one_line_error(res) -> str:
    """The CLI's answer to bad input: exit code 2, one line, no traceback."""
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


@pytest.mark.parametrize("text,needles", [
    # a typo in a VLA field used to raise AttributeError after the whole chat side had run
    (CHAT_ONLY + "[vla_model]\nadapter = 'testbed-tiny'\ndtype = 'bfloat'\n[vla]\n",
     ["vla_model.dtype", "'bfloat16'"]),
    (CHAT_ONLY.replace('name = "tiny-qwen2"', 'name = "tiny-qwen"'),
     ["unknown model 'tiny-qwen'", "did you mean 'tiny-qwen2'", "llama-2-7b-random"]),
    (CHAT_ONLY + "[vla_model]\nadapter = 'testbed-tiny'\n[vla]\nalpha = '2'\n", ["vla.alpha", "valid number"]),
    (CHAT_ONLY + "[vla_model]\nadapter = 'testbed-tiny'\n[vla]\nn_pairs = 0\n", ["n_pairs must be >= 1"]),
    (CHAT_ONLY + "[vla_model]\nadapter = 'openvla'\ncheckpoint = '/no/such/openvla'\n[vla]\n",
     ["/no/such/openvla does not exist"]),
])
def test_bad_configs_fail_before_anything_is_loaded_or_written(tmp_path, monkeypatch, text, needles):
    from rdt_interp.models import loading

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(loading, "load_chat_model", no_load)
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    line = _one_line_error(runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r")]))
    assert all(n in line for n in needles), line
    assert not (tmp_path / "r").exists()


def test_truncated_run_config_is_one_line_naming_the_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CHAT_ONLY)
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text('{"experiment": "stu')
    line = _one_line_error(runner.invoke(app, ["run", str(cfg), "--out", str(out)]))
    assert "corrupt" in line and str(out / "config.json") in line


def test_inspect_of_a_truncated_summary_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "chat").mkdir()
    (tmp_path / "chat" / "summary.json").write_text('{"model": {')
    line = _one_line_error(runner.invoke(app, ["inspect", str(tmp_path)]))
    assert "chat summary" in line and "corrupt" in line


def test_models_lists_the_random_real_shape():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and "llama-2-7b-random" in res.output


def test_run_names_llama_2_7b_random(tmp_path, monkeypatch):
    """A real-scale chat config runs from the CLI; the 7B shape is shrunken here (CPU tests)."""
    from rdt_interp.models import random_init

    # 4 layers: the reference cut-off int(0.8 L) must leave a layer past the embeddings
    for k, v in dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4).items():
        monkeypatch.setitem(random_init.LLAMA2_7B, k, v)
    cfg = tmp_path / "c.toml"
    cfg.write_text(CHAT_ONLY.replace('name = "tiny-qwen2"', 'name = "llama-2-7b-random"'))
    res = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "llama-2-7b-random (RANDOM WEIGHTS)" in res.output


# -- rdt-interp testbed ----------------------------------------------------------------------------------
def test_testbed_help_lists_train_and_eval():
    res = runner.invoke(app, ["testbed", "--help"])
    assert res.exit_code == 0 and "train" in res.output and "eval" in res.output
    res = runner.invoke(app, ["testbed", "eval", "--help"])
    assert res.exit_code == 0
    for option in ("--delta", "--sections", "--episodes", "--threads", "--workers", "--device", "--batch-size",
                   "--set"):
        assert option in res.output


def test_testbed_eval_help_states_the_evalconfig_defaults():
    from typer.main import get_command

    from rdt_interp.testbed.evaluate import EvalConfig

    helps = {p.name: p.help for p in get_command(app).commands["testbed"].commands["eval"].params}
    assert helps["episodes"].endswith(f"[default: {EvalConfig.n_episodes}].")
    assert helps["batch_size"].endswith(f"[default: {EvalConfig.batch_size}].")


@pytest.mark.parametrize("args,needles", [
    (["--sections", "speed"], ["unknown sections ['speed']", "closed_loop"]),
    (["--set", "n_episodez=3"], ["n_episodez: unknown key", "EvalConfig"]),
    (["--episodes", "0"], ["must be >= 1", "n_episodes=0"]),
    (["--set", "n_boot=\"many\""], ["n_boot: Input should be a valid integer"]),
])
def test_testbed_eval_bad_options_fail_before_any_model_loads(tmp_path, monkeypatch, args, needles):
    import rdt_interp.testbed.adapter as adapter

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(adapter, "load_testbed_vla", no_loading)
    out = tmp_path / "eval.json"
    line = _one_line_error(runner.invoke(app, ["testbed", "eval", "--out", str(out), *args]))
    for needle in needles:
        assert needle in line
    assert not out.exists()


def test_log_level_is_one_option_of_the_cli(tmp_path):
    import logging

    from rdt_interp.cli import configure_logging

    res = runner.invoke(app, ["--log-level", "loud", "models"])
    assert res.exit_code == 2 and "loud" in res.output
    try:
        res = runner.invoke(app, ["--log-level", "DEBUG", "models"])
        assert res.exit_code == 0 and logging.getLogger("rdt_interp").level == logging.DEBUG
        logging.getLogger("rdt_interp.testbed.train").debug("a debug message")  # outside any invocation
        configure_logging("info")
        configure_logging("info")  # configuring again replaces the handler: one line per message
        pkg = logging.getLogger("rdt_interp")
        assert len([h for h in pkg.handlers if type(h).__name__ == "_StderrHandler"]) == 1
    finally:
        configure_logging("info")

"""The import contracts in ``.importlinter`` hold: ``lint-imports`` runs in the test command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".importlinter"


def _lint_imports(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed: pip install -c constraints.txt -e '.[dev]'")
    # The checkout under test is what grimp analyses, whatever else is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([exe, "--no-cache", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_import_contracts_are_kept():
    run = _lint_imports(str(CONFIG))
    assert run.returncode == 0, f"import contracts broken:\n{run.stdout}\n{run.stderr}"
    assert "0 broken" in run.stdout
    # every contract in the file ran (a contract that fails to parse must not pass silently)
    n_contracts = sum(line.startswith("[importlinter:contract:") for line in CONFIG.read_text().splitlines())
    assert f"Contracts: {n_contracts} kept" in run.stdout, run.stdout


def test_a_broken_contract_fails(tmp_path):
    # The models import the errors module: a contract forbidding that must be reported broken.
    cfg = tmp_path / "broken.ini"
    cfg.write_text("[importlinter]\nroot_package = rdt_interp\n\n"
                   "[importlinter:contract:x]\nname = models must not import errors\ntype = forbidden\n"
                   "source_modules =\n    rdt_interp.models\nforbidden_modules =\n    rdt_interp.errors\n")
    run = _lint_imports(str(cfg))
    assert run.returncode != 0
    assert "BROKEN" in run.stdout and "rdt_interp.models" in run.stdout

"""The layer contracts of pyproject.toml hold (import-linter), and would catch a broken one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is in the dev extra")
ROOT = Path(__file__).resolve().parents[1]


def lint_imports(config: Path) -> subprocess.CompletedProcess:
    """import-linter in a child process (it takes over the console): exit code and output."""
    call = f"lint_imports(config_filename={str(config)!r}, no_cache=True, no_logo=True)"
    code = f"import sys; from importlinter.cli import lint_imports; sys.exit({call})"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"},
        timeout=300,
    )


def test_layers_no_upward_import_and_no_cycle():
    done = lint_imports(ROOT / "pyproject.toml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 3 kept, 0 broken." in done.stdout


def test_the_contracts_see_real_imports(tmp_path):
    """The same linter on the layers upside down: every package imports one below it, so the
    reversed contract must break (the contracts are not vacuous)."""
    config = tmp_path / "reversed.toml"
    config.write_text(
        '[tool.importlinter]\nroot_packages = ["accounting", "pmixed", "audit", "reports", '
        '"campaign"]\n\n[[tool.importlinter.contracts]]\nname = "reversed"\ntype = "layers"\n'
        'layers = ["accounting", "pmixed", "audit", "reports", "campaign"]\n'
    )
    done = lint_imports(config)
    assert done.returncode == 1 and "reversed BROKEN" in done.stdout, done.stdout + done.stderr

"""A newcomer's first commands print no warnings: ``probekit demo`` runs with every warning an error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from probekit.run.store import open_run


@pytest.mark.slow
def test_demo_prints_no_warnings(tmp_path):
    probekit = Path(sys.executable).with_name("probekit")  # the console script a user runs
    proc = subprocess.run(
        [str(probekit), "demo", "--epochs", "1", "--out", str(tmp_path / "demo.zarr")], cwd=tmp_path,
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert open_run(tmp_path / "demo.zarr").sizes["epoch"] == 2

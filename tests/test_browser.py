"""The quickstart in a real browser: JupyterLab 4 in headless Chromium, driven by Playwright.

The test starts JupyterLab from this interpreter on a free port with a token
(every Jupyter folder in a temporary directory), opens a copy of
``notebooks/01-quickstart.ipynb`` with CI's parameters, runs all cells from
the Run menu, and checks in the page that

* the explorer's charts rendered as SVG, with one line per selected layer in
  the training curves;
* changing the selection in the page (the layer list, then the *every k-th*
  button) redraws the curves with one line per newly selected layer;
* the page fetched nothing from outside the server (no CDN).

It needs Debian's Chromium (``apt-get install -y chromium``) and the
``playwright`` Python package; ``playwright install`` is not needed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest
from test_notebooks import CI_PARAMETERS, with_parameters

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("PROBEKIT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]
NOTEBOOK = "01-quickstart.ipynb"
#: Probe points of the paper convnet (``model.probe_layers``): the explorer starts on all of them.
QUICKSTART_LAYERS = ["input", "conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "fc1", "relu3", "fc2"]
CURVE_LINES = ".probekit-explorer .probekit-curves svg g.mark-line path"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"JupyterLab exited with code {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer at {url} within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free port, with the quickstart (CI's parameters) in its root folder."""
    if not CHROMIUM.exists():
        pytest.fail(f"the browser test needs Chromium at {CHROMIUM}; install it with: apt-get install -y chromium")
    home = tmp_path_factory.mktemp("lab")
    root = home / "root"
    root.mkdir()
    nb = with_parameters(nbformat.read(ROOT / "notebooks" / NOTEBOOK, as_version=4), CI_PARAMETERS["01-quickstart"])
    nbformat.write(nb, root / NOTEBOOK)
    kernel_dir = home / "data" / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python",
    }))
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {
        **os.environ,
        "JUPYTER_PATH": str(home / "data"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "IPYTHONDIR": str(home / "ipython"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
    }
    port, token = _free_port(), secrets.token_hex(16)
    log = home / "lab.log"
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--allow-root",
    ]
    with open(log, "w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(f"{base}/api/status?token={token}", process, log)
        yield {"base": base, "token": token, "root": root, "log": log}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(home / "runtime", ignore_errors=True)


def _line_count(page) -> int:
    return page.locator(CURVE_LINES).count()


def _wait_for_lines(page, expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _line_count(page) == expected:
            return
        page.wait_for_timeout(250)
    raise AssertionError(f"expected {expected} lines in the training curves, found {_line_count(page)}")


@pytest.mark.slow
def test_quickstart_renders_and_reacts_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    outside: list[str] = []
    console_errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2300})
        try:
            page.on("request", lambda request: outside.append(request.url)
                    if not request.url.startswith((lab["base"], "data:", "blob:")) else None)
            page.on("console", lambda message: console_errors.append(message.text)
                    if message.type == "error" else None)
            page.goto(f"{lab['base']}/lab/tree/{NOTEBOOK}?token={lab['token']}&reset")
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=300_000)
            toast = page.get_by_role("button", name="No", exact=True)
            if toast.count():
                toast.first.click()
            page.locator(".jp-Notebook .jp-Cell").first.click()
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

            explorer = page.locator(".jp-OutputArea-output .probekit-explorer")
            traceback = page.locator(".jp-OutputArea-output", has_text="Traceback (most recent call last)")
            explorer.or_(traceback).first.wait_for(timeout=600_000)
            if traceback.count():
                raise AssertionError(f"a cell failed:\n{traceback.first.inner_text()[-3000:]}")
            _wait_for_lines(page, len(QUICKSTART_LAYERS), timeout_s=300)
            for name in ("profile", "heatmap", "diagnosis"):
                marks = page.locator(f".probekit-explorer .probekit-{name} svg .role-mark")
                assert marks.count() > 0, f"the {name} chart drew no SVG marks"
            legend = page.locator(".probekit-explorer .probekit-curves svg .role-legend-label text").all_text_contents()
            assert legend == QUICKSTART_LAYERS

            page.locator(".probekit-explorer .probekit-layers select").select_option(["conv1", "pool2", "fc2"])
            _wait_for_lines(page, 3, timeout_s=300)
            legend = page.locator(".probekit-explorer .probekit-curves svg .role-legend-label text").all_text_contents()
            assert legend == ["conv1", "pool2", "fc2"]

            page.locator(".probekit-explorer .probekit-every").click()  # k = 2: input, relu1, conv2, pool2, relu3, fc2
            _wait_for_lines(page, 6, timeout_s=300)
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=300_000)
        except Exception as error:
            shot = lab["root"].parent / "failure.png"
            page.screenshot(path=str(shot))
            raise AssertionError(
                f"{error}\nscreenshot: {shot}\nJupyterLab log:\n{lab['log'].read_text()[-3000:]}"
            ) from error
        finally:
            browser.close()
    assert outside == [], f"the page fetched from outside the server (a CDN?): {outside[:5]}"
    assert not [text for text in console_errors if "vega" in text.lower() or "widget" in text.lower()], console_errors

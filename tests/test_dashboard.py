"""``probekit dashboard``: finding runs, bad input in one line, and the served page in headless Chromium.

The browser test starts ``probekit dashboard`` from this interpreter on a free
port with a token, on two stores written in the test from the committed
``data/runs/mnist-convnet.zarr`` (one of them kept open by its writer), opens the
URL the command prints, and checks in the page that

* the explorer's and the comparison's charts rendered as SVG, with no code cell;
* picking the other run, then layers, redraws the explorer;
* an epoch appended to the open store while the page is open shows up, and a
  run started in the folder afterwards is in the picker once the page is reloaded
  (and the kernel of the page before the reload is shut down);
* the page fetched nothing from outside the server and logged no error
  (the widget and anywidget front-ends load; the template has no CDN link).

One run alone is served as its explorer (no picker, no comparison), behind a
token the command generated and printed; each server must exit cleanly on
SIGTERM and leave no private folder behind.

Two more check, without a browser, that the server refuses requests without
the token and serves nothing but the page, and that the page's kernel
websocket does not run code sent to it (an execute request is dropped while a
kernel info request is answered). Chromium is Debian's
(``apt-get install -y chromium``), driven by the ``playwright`` package.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from test_browser import CHROMIUM, CHROMIUM_ARGS

from probekit import cli
from probekit.dashboard import check_port, dashboard_notebook, find_runs, host_warning, is_loopback, page
from probekit.explorers import Explorer
from probekit.explorers.board import Board
from probekit.run.schema import layout_of, rows_of
from probekit.run.store import RunWriter, open_run

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "data" / "runs" / "mnist-convnet.zarr"
TOKEN = "dashboard-test-token-0123"
#: Probe points of the committed convnet run.
CONVNET_LAYERS = ["input", "conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "fc1", "relu3", "fc2"]
CURVE_LINES = ".probekit-board .probekit-explorer .probekit-curves svg g.mark-line path"


def _write_store(path: Path, epochs: int) -> RunWriter:
    """A store holding the committed run's first ``epochs`` epochs; its writer is returned open."""
    run = open_run(COMMITTED)
    writer = RunWriter(path, layout_of(run))
    for row in rows_of(run)[:epochs]:
        writer.append(row)
    return writer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ finding runs, bad input
def test_a_folder_is_searched_for_run_stores_and_other_zarr_stores_are_skipped(tmp_path):
    shutil.copytree(COMMITTED, tmp_path / "convnet.zarr")
    _write_store(tmp_path / "exp" / "two.zarr", 2).close()
    (tmp_path / "exp" / "empty.zarr").mkdir()
    (tmp_path / ".hidden.zarr").mkdir()
    runs, skipped = find_runs([tmp_path])
    assert runs == {"convnet": (tmp_path / "convnet.zarr").resolve(), "exp/two": (tmp_path / "exp" / "two.zarr").resolve()}
    assert len(skipped) == 1 and "exp/empty.zarr" in skipped[0] and "empty folder" in skipped[0]
    direct, none_skipped = find_runs([tmp_path / "convnet.zarr", tmp_path / "exp" / "two.zarr", tmp_path / "convnet.zarr"])
    assert list(direct) == ["convnet", "two"] and none_skipped == []
    (tmp_path / "other").mkdir()
    shutil.copytree(COMMITTED, tmp_path / "other" / "convnet.zarr")
    both, _ = find_runs([tmp_path / "convnet.zarr", tmp_path / "other" / "convnet.zarr"])
    assert list(both) == [str((tmp_path / "convnet").resolve()), str((tmp_path / "other" / "convnet").resolve())]


def test_the_notebook_is_one_cell_that_finds_the_runs_when_the_page_opens(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = dashboard_notebook(["runs", tmp_path / "a.zarr"], interval=0.5)
    assert [cell.cell_type for cell in nb.cells] == ["code"]
    assert nb.cells[0].source == (f"from probekit.dashboard import page\n\n"
                                  f"page({[str(tmp_path / 'runs'), str(tmp_path / 'a.zarr')]!r}, interval=0.5)")
    assert nb.metadata["kernelspec"]["name"] == "probekit-dashboard"


def test_the_page_is_the_explorer_of_one_run_or_the_board_of_several_as_found_now(tmp_path):
    runs = tmp_path / "runs"
    _write_store(runs / "a.zarr", 2).close()
    one = page([runs], live=False)
    assert isinstance(one, Explorer) and one.epoch == 1
    _write_store(runs / "b.zarr", 3).close()  # a run started after the server: the next page finds it
    several = page([runs], live=False)
    assert isinstance(several, Board) and several.picker.options == ("a", "b")
    assert several.comparison.epochs_shown == {"a": 1, "b": 2}
    shutil.rmtree(runs)
    gone = page([runs], live=False)
    assert "no such file or folder" in gone.value and "color:#b00020" in gone.value


@pytest.mark.parametrize(("args", "message"), [
    (["{tmp}/missing"], r"no such file or folder: '.*missing'; pass a run store"),
    (["{tmp}"], r"no run stores in '.*': no \*\.zarr run store in it or its subfolders \(1 other Zarr store skipped\); "),
    (["{tmp}/empty.zarr"], r"is not a probekit run store: it is an empty folder"),
    (["{tmp}/file.txt"], r"is a file; pass a run store"),
    (["{tmp}/empty.zarr", "--token", "short"], r"--token must be at least 8 letters, digits"),
    (["{tmp}", "--port", "0"], r"--port must be an integer in \[1, 65535\]; got 0"),
    (["{tmp}", "--interval", "0"], r"--interval must be a finite number > 0"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    (tmp_path / "empty.zarr").mkdir()
    (tmp_path / "file.txt").write_text("not a run")
    assert cli.main(["dashboard", *[a.format(tmp=tmp_path) for a in args]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("probekit: error: ")
    assert re.search(message, err), err


def test_a_port_already_taken_is_named_with_what_to_do(tmp_path, capsys):
    shutil.copytree(COMMITTED, tmp_path / "convnet.zarr")
    (tmp_path / "unfinished.zarr").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"port {port} is already in use on 127.0.0.1; pick another with --port"):
            check_port("127.0.0.1", port)
        assert cli.main(["dashboard", str(tmp_path), "--port", str(port)]) == 2
    note, error = capsys.readouterr().err.splitlines()
    assert note.startswith(f"probekit: skipped {tmp_path / 'unfinished.zarr'}: ") and "empty folder" in note
    assert error == (f"probekit: error: port {port} is already in use on 127.0.0.1; "
                     f"pick another with --port (e.g. --port {port + 1})")
    with pytest.raises(OSError, match=r"--host 'no-such-host.invalid' is not an address of this machine"):
        check_port("no-such-host.invalid", _free_port())


def test_a_host_other_machines_can_reach_gets_a_warning():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("no-such-host.invalid")
    assert host_warning("127.0.0.1", 8866) is None and host_warning("localhost", 8866) is None
    assert host_warning("0.0.0.0", 9000) == (
        "probekit: warning: --host 0.0.0.0 is not loopback: anyone who can reach port 9000 of this machine and has "
        "the token can open these runs (the default, 127.0.0.1, serves this machine only)")


# ------------------------------------------------------------------ the served page
@contextlib.contextmanager
def _dashboard(home: Path, *args: str):
    """``probekit dashboard ARGS`` from this interpreter on a free port, until the block ends; yields its URLs and log.

    Its temporary folder is made under ``home / "tmp"``, so that the block's end can check that it is gone.
    """
    tmp = home / "tmp"
    tmp.mkdir()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "IPYTHONDIR": str(home / "ipython"), "TMPDIR": str(tmp)}
    port, log = _free_port(), home / "dashboard.log"
    command = [sys.executable, "-m", "probekit.cli", "dashboard", *args, "--port", str(port), "--interval", "0.5"]
    with open(log, "w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=home)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"probekit dashboard exited with code {process.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"probekit dashboard did not answer at {base} within 300 s:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/login", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        url = re.search(r"at (http://\S+)", log.read_text()).group(1)
        yield {"base": base, "url": url, "log": log, "home": home}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, log.read_text()[-3000:]
    assert not list(tmp.glob("probekit-dashboard-*")), "the dashboard left its private folder behind"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``probekit dashboard`` on a folder of two runs, one of them still open for writing."""
    home = tmp_path_factory.mktemp("dashboard")
    runs = home / "runs"
    _write_store(runs / "a-convnet.zarr", 6).close()
    with _write_store(runs / "b-growing.zarr", 2) as writer, _dashboard(home, str(runs), "--token", TOKEN) as server:
        yield {**server, "writer": writer}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _status(url: str, headers: dict | None = None) -> tuple[int, str, str]:
    """Status, Location and body of one GET, redirects not followed."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status, response.headers.get("Location", ""), response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Location", ""), error.read().decode(errors="replace")


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hard bound over the waits' own timeouts, server start included
def test_the_server_refuses_requests_without_the_token_and_serves_nothing_but_the_page(served):
    base = served["base"]
    assert served["url"] == f"{base}/?token={TOKEN}"
    for path in ("/", "/?token=not-the-token", "/api/kernels", "/voila/tree"):
        status, location, body = _status(base + path)
        assert status == 302 and location.startswith("/login"), (path, status, location)
        assert "probekit" not in body
    status, _, body = _status(base + "/login")
    assert status == 200 and "probekit-board" not in body and "new_password" not in body
    for path in ("/voila/files/probekit-dashboard.ipynb", "/voila/files/voila.json", "/voila/files/../voila.json"):
        assert _status(f"{base}{path}?token={TOKEN}")[0] in (403, 404), path
    for path in ("/api/kernels", "/api/contents", "/api/terminals", "/voila/tree", "/tree", "/lab"):
        status, location, _ = _status(f"{base}{path}?token={TOKEN}")  # single-notebook mode: a file route, refused
        assert status == 302 and location.startswith("/voila/files/"), (path, status, location)
        assert _status(base + location)[0] in (302, 403)
    assert _status(f"{base}/?token={TOKEN}", headers={"Host": f"attacker.example:{base.rsplit(':', 1)[1]}"})[0] == 403
    for route in ("static", "templates/lab/static", "labextensions", "api/themes"):  # front-end code, not files
        status, _, body = _status(f"{base}/voila/{route}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd")
        assert status in (403, 404, 500) and "root:" not in body, (route, status)


def _kernel_messages(base: str, kernel_id: str, messages: list[dict], wait_s: float) -> list[dict]:
    """Send ``messages`` on the kernel's websocket (with the token) and collect what comes back for ``wait_s`` seconds."""
    import asyncio

    from tornado.websocket import websocket_connect

    async def talk() -> list[dict]:
        url = f"{base.replace('http', 'ws')}/api/kernels/{kernel_id}/channels?token={TOKEN}"
        connection = await asyncio.wait_for(websocket_connect(url), timeout=30)
        for message in messages:
            await connection.write_message(json.dumps(message))
        replies, deadline = [], time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                text = await asyncio.wait_for(connection.read_message(), timeout=left)
            except asyncio.TimeoutError:
                break
            if text is None:
                break
            replies.append(json.loads(text))
        connection.close()
        return replies

    return asyncio.run(talk())


def _request(msg_type: str, content: dict) -> dict:
    header = {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "session": uuid.uuid4().hex, "username": "test",
              "version": "5.3", "date": ""}
    return {"header": header, "parent_header": {}, "metadata": {}, "content": content, "channel": "shell",
            "buffers": []}


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hard bound over the waits' own timeouts, server start included
def test_the_page_cannot_run_code_in_its_kernel(served, tmp_path):
    """Voila's kernel websocket passes comms and kernel info only: an execute request never runs."""
    status, _, page = _status(f"{served['base']}/?token={TOKEN}")  # renders the page: starts and runs its kernel
    assert status == 200 and "probekit-dashboard" in page
    kernel_id = json.loads(re.search(r'<script id="jupyter-config-data" type="application/json">\s*(\{.*?\})\s*</script>',
                                     page, re.S).group(1))["kernelId"]
    made = tmp_path / "made-by-the-page"
    try:
        replies = _kernel_messages(served["base"], kernel_id, [
            _request("execute_request", {"code": f"open({str(made)!r}, 'w').write('x')", "silent": False,
                                         "store_history": False, "user_expressions": {}, "allow_stdin": False}),
            _request("kernel_info_request", {}),
        ], wait_s=10)
    finally:  # no browser closes this page: shut its kernel down as the page does when it is closed
        shutdown = urllib.request.Request(f"{served['base']}/api/kernels/{kernel_id}?token={TOKEN}", method="DELETE")
        with urllib.request.urlopen(shutdown, timeout=60) as response:
            assert response.status == 204
    kinds = [reply["header"]["msg_type"] for reply in replies]
    assert "kernel_info_reply" in kinds, kinds  # the channel works ...
    assert "execute_reply" not in kinds and not made.exists()  # ... and the code was never run


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hard bound over the waits' own timeouts, server start included
def test_the_dashboard_renders_reacts_and_follows_a_growing_store_in_chromium(served):
    from playwright.sync_api import sync_playwright

    _need_chromium()
    base, writer = served["base"], served["writer"]
    outside: list[str] = []
    console_errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2300})
        try:
            page.on("request", lambda request: outside.append(request.url)
                    if not request.url.startswith((base, base.replace("http", "ws"), "data:", "blob:")) else None)
            page.on("console", lambda message: console_errors.append(message.text) if message.type == "error" else None)
            page.goto(served["url"], wait_until="commit", timeout=120_000)
            page.locator(CURVE_LINES).nth(len(CONVNET_LAYERS) - 1).wait_for(state="attached", timeout=300_000)
            assert page.locator(CURVE_LINES).count() == len(CONVNET_LAYERS)
            for name in ("profile", "heatmap", "diagnosis"):
                marks = page.locator(f".probekit-board .probekit-explorer .probekit-{name} svg .role-mark")
                assert marks.count() > 0, f"the explorer's {name} chart drew no SVG marks"
            comparison = page.locator(".probekit-board .probekit-compare .probekit-comparison svg g.mark-line path")
            comparison.first.wait_for(state="attached", timeout=120_000)
            legend = page.locator(".probekit-compare .probekit-comparison svg .role-legend-label text").all_text_contents()
            assert {"a-convnet", "b-growing"} <= set(legend), legend
            assert page.locator(".jp-InputArea, .jp-InputPrompt, .cm-editor").count() == 0
            assert "from probekit" not in page.inner_text("body")
            header = page.locator(".probekit-board .probekit-explorer").first
            assert "6 epochs" in header.inner_text()

            page.locator(".probekit-run-picker select").select_option("b-growing")
            page.locator(".probekit-explorer", has_text="2 epochs").wait_for(timeout=120_000)
            page.locator(".probekit-explorer .probekit-layers select").select_option(["conv1", "fc2"])
            _wait_for(lambda: page.locator(CURVE_LINES).count() == 2, "two lines after picking two layers", 120)

            writer.append(rows_of(open_run(COMMITTED))[2])  # the run goes on while the page is open
            page.locator(".probekit-explorer", has_text="3 epochs").wait_for(timeout=120_000)
            page.locator(".probekit-explorer .probekit-curves svg [aria-label^='epoch: 2;']").first.wait_for(
                state="attached", timeout=120_000)  # the training curves reach the new epoch
            assert page.locator(CURVE_LINES).count() == 2  # the selection survives the new epoch
            table = page.locator(".probekit-compare .probekit-runs")
            _wait_for(lambda: re.search(r"b-growing.*?<td[^>]*>2</td>", table.inner_html()) is not None,
                      "the comparison's table at epoch 2 for the growing run", 60)

            _write_store(served["home"] / "runs" / "c-started-later.zarr", 1).close()  # a new run in the folder
            first_kernel = _kernel_id(page)
            assert _status(f"{base}/api/kernels/{first_kernel}?token={TOKEN}")[0] == 200
            page.reload(wait_until="commit", timeout=120_000)  # a reloaded page finds it
            page.locator(".probekit-run-picker select option", has_text="c-started-later").wait_for(
                state="attached", timeout=300_000)
            page.locator(CURVE_LINES).nth(len(CONVNET_LAYERS) - 1).wait_for(state="attached", timeout=300_000)
            assert _kernel_id(page) != first_kernel
            _wait_for(lambda: _status(f"{base}/api/kernels/{first_kernel}?token={TOKEN}")[0] == 404,
                      "the closed page's kernel to be shut down", 60)
        except Exception as error:
            shot = served["home"] / "failure.png"
            page.screenshot(path=str(shot), full_page=True)
            raise AssertionError(f"{error}\nscreenshot: {shot}\ndashboard log:\n{served['log'].read_text()[-3000:]}") from error
        finally:
            browser.close()
    assert outside == [], f"the page fetched from outside the server (a CDN?): {outside[:5]}"
    assert console_errors == [], console_errors[:5]


def _kernel_id(page) -> str:
    """The id of the kernel Voila started for ``page`` (from the page's Jupyter config)."""
    return page.evaluate("JSON.parse(document.getElementById('jupyter-config-data').textContent).kernelId")


def _need_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.fail(f"the browser test needs Chromium at {CHROMIUM}; install it with: apt-get install -y chromium")


def _wait_for(condition, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hard bound over the waits' own timeouts, server start included
def test_one_run_is_served_as_its_explorer_with_a_token_of_its_own(tmp_path):
    from playwright.sync_api import sync_playwright

    _need_chromium()
    store = tmp_path / "convnet.zarr"
    _write_store(store, 6).close()
    with _dashboard(tmp_path, str(store)) as server:
        assert re.fullmatch(rf"{server['base']}/\?token=[0-9a-f]{{48}}", server["url"]), server["url"]
        assert _status(f"{server['base']}/?token={TOKEN}")[0] == 302  # another token is refused
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            try:
                page.goto(server["url"], wait_until="commit", timeout=120_000)
                lines = page.locator(".probekit-explorer .probekit-curves svg g.mark-line path")
                lines.nth(len(CONVNET_LAYERS) - 1).wait_for(state="attached", timeout=300_000)
                assert lines.count() == len(CONVNET_LAYERS)
                assert page.locator(".probekit-board, .probekit-run-picker, .probekit-compare").count() == 0
                assert "live" in page.locator(".probekit-explorer").first.inner_text()
            finally:
                browser.close()

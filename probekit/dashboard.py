"""``probekit dashboard``: the explorers as a standalone web page, served by Voila, following stores live.

::

    probekit dashboard runs/demo.zarr              # one run: its explorer
    probekit dashboard runs/                        # every run store in the folder: a run picker and the comparison
    probekit dashboard a.zarr b.zarr --port 9000 --token s3cret-workshop

:func:`find_runs` turns the paths given into run stores by name (a folder is
searched, with its subfolders, for ``*.zarr`` folders that are run stores).
:func:`serve` checks them, writes a one-cell notebook
(:func:`dashboard_notebook`, which calls :func:`page`) into a private
temporary folder and runs Voila on that one notebook, in this process, until
interrupted; the folder goes with it. :func:`page` finds the runs again each
time the page is opened: the explorer of one run, or
:func:`probekit.explorers.board.board` for several, ``live=True``; a run
started in a given folder after the server shows up when the page is reloaded.

Voila shows a notebook's outputs without its code, runs the cell in a kernel of
its own for each visitor, and speaks to the page's widgets over the kernel's
comm channel only: its websocket refuses every message but comms, kernel info
and shutdown, so the page cannot run code. :func:`serve` configures it (a
``voila.json`` in the private folder, the only config file read) so that:

* it listens on ``127.0.0.1`` unless ``host`` says otherwise, and on loopback
  it answers only requests whose ``Host`` is this machine (no DNS rebinding);
* every page and API request needs the token (the URL printed carries it;
  the login form takes it too but cannot set a password);
* it serves the one generated notebook and nothing else: Voila then routes no
  file tree, no other notebook, no contents API and no terminals, and its
  ``/voila/files/`` route is closed (allowlist empty, denylist everything);
  ``/api/kernels/<id>`` and its channels reach only a kernel whose id the
  visitor got with its page (there is no kernel list or kernel start route),
  and a visitor cannot switch the template (``?template=``) or the theme.
  What Voila serves without the token is static front-end code of installed
  packages (``/voila/static``, ``/voila/templates``, ``/voila/labextensions``,
  themes);
* the page gets the ``_xsrf`` cookie with it, so that closing or reloading it
  shuts its kernel down (Voila's page posts that with the cookie, and the
  POST is refused without one);
* the kernel runs this interpreter (a kernel spec in the private folder, the
  only one allowed), so the page reads runs with the probekit that serves it;
* the page loads only the widget and anywidget front-ends, and fetches nothing
  from outside the server: the template (``lab``, with its CDN stylesheet links
  dropped) is in the private folder, and charts are inlined by
  :func:`probekit.plots.enable_offline`.

This module imports the run store, the explorers, ipywidgets, nbformat, tornado and voila (at serve time):
never torch.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import ipywidgets as widgets
import nbformat

from probekit.explorers import Explorer, explore
from probekit.explorers.board import Board, board
from probekit.explorers.live import DEFAULT_INTERVAL
from probekit.explorers.widgets import status_html
from probekit.params import Interval, check_params, choices
from probekit.run.store import StoreError, open_run

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "check_port", "check_token", "dashboard_notebook", "find_runs",
           "host_warning", "is_loopback", "page", "serve"]

DEFAULT_HOST = "127.0.0.1"
#: Voila's own default port.
DEFAULT_PORT = 8866
#: The kernel spec and the template the private folder holds.
KERNEL_NAME = "probekit-dashboard"
TEMPLATE_NAME = "probekit-dashboard"
#: The front-end extensions the page loads: the widgets, Voila's widget manager (it keeps the one that fits the
#: installed ipywidgets) and anywidget, which draws the charts (alt.JupyterChart).
EXTENSIONS = ["@jupyter-widgets/jupyterlab-manager", "@voila-dashboards/widgets-manager7",
              "@voila-dashboards/widgets-manager8", "anywidget"]

_CONSTRAINTS = {"port": [Interval(int, 1, 65535)], "interval": [Interval(float, 0, None, closed="neither")]}
_TOKEN = re.compile(r"[A-Za-z0-9_.~-]{8,}")

#: The lab template, less the lines that link stylesheets from a CDN (Font Awesome, which no widget here uses).
_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block notebook_css -%}
{%- for line in super().split('\\n') if not ('<link' in line and '://' in line) -%}
{{ line }}{{ '\\n' }}
{%- endfor -%}
{%- endblock notebook_css -%}
"""


# ------------------------------------------------------------------ finding runs
def _is_store_path(path: Path) -> bool:
    """Whether ``path`` is meant as one store (a ``*.zarr`` folder, or any folder with Zarr metadata)."""
    return path.suffix == ".zarr" or any((path / name).exists() for name in (".zmetadata", ".zgroup", "zarr.json"))


def _stores_below(folder: Path) -> list[Path]:
    """Every store path under ``folder``, in sorted order; hidden folders (a writer's temporary ones) are skipped."""
    found = []
    for here, folders, _ in os.walk(folder):
        folders.sort()
        keep = []
        for name in folders:
            path = Path(here) / name
            if name.startswith("."):
                continue
            if _is_store_path(path):
                found.append(path)
            else:
                keep.append(name)
        folders[:] = keep
    return found


def _name(path: Path) -> str:
    return str(path).removesuffix(".zarr").rstrip(os.sep) or str(path)


def find_runs(paths: Sequence[str | os.PathLike]) -> tuple[dict[str, Path], list[str]]:
    """The run stores that ``paths`` name, by name, and a note for each Zarr store of a folder that is not a run.

    A path is a run store (``*.zarr`` or a folder with Zarr metadata), which
    must open, or a folder, searched with its subfolders for run stores; other
    Zarr stores found there are skipped with a note. A run is named by its path
    without ``.zarr``, relative to the folder it was found in; a store named
    twice is kept once.

    Args:
        paths: Run stores and folders holding them.

    Returns:
        ``({name: absolute store path}, notes)``.

    Raises:
        FileNotFoundError: A path does not exist.
        ValueError: A store path is not a readable run store, or a folder holds no run store.

    Example:
        >>> runs, skipped = find_runs(["data/runs"])
        >>> list(runs)
        ['bypass', 'inception_v3', 'mnist-convnet', 'random-init', 'resnet50']
    """
    if not paths:
        raise ValueError("give at least one run store or folder, e.g. probekit dashboard runs/")
    named: list[tuple[str, Path]] = []
    notes: list[str] = []
    for given in map(Path, paths):
        if not given.exists():
            raise FileNotFoundError(f"no such file or folder: {str(given)!r}; pass a run store (e.g. runs/demo.zarr) "
                                    "or a folder holding run stores")
        if not given.is_dir():
            raise ValueError(f"{str(given)!r} is a file; pass a run store (a folder such as runs/demo.zarr) "
                             "or a folder holding run stores")
        if _is_store_path(given):
            open_run(given)
            named.append((_name(Path(given.name)), given.resolve()))
            continue
        found, skipped = 0, 0
        for store in _stores_below(given):
            try:
                open_run(store)
            except (StoreError, OSError) as error:
                notes.append(f"skipped {store}: {error}")
                skipped += 1
                continue
            named.append((_name(store.relative_to(given)), store.resolve()))
            found += 1
        if not found:
            others = f" ({skipped} other Zarr store{'s' if skipped > 1 else ''} skipped)" if skipped else ""
            raise ValueError(f"no run stores in {str(given)!r}: no *.zarr run store in it or its subfolders{others}; "
                             "pass a folder holding runs, or a store such as runs/demo.zarr (probekit demo writes one)")
    return _distinct(named), notes


def _distinct(named: list[tuple[str, Path]]) -> dict[str, Path]:
    """One entry per store; names that two stores share become their full paths."""
    unique: dict[Path, str] = {}
    for name, path in named:
        unique.setdefault(path, name)
    names = list(unique.values())
    runs: dict[str, Path] = {}
    for path, name in unique.items():
        if names.count(name) > 1:
            name = _name(path)
        runs[name] = path
    return runs


# ------------------------------------------------------------------ the page
def page(paths: Sequence[str | os.PathLike], *, live: bool = True,
         interval: float = DEFAULT_INTERVAL) -> Explorer | Board | widgets.HTML:
    """What the dashboard shows: the runs ``paths`` name now (:func:`find_runs`), explored.

    One run gets its explorer; several get the board (a run picker over the
    explorer, and the comparison). Paths that hold no run any more give a
    one-line message in red instead.

    Example:
        >>> page(["runs"], live=False).picker.options
        ('a', 'b')
    """
    try:
        runs, _ = find_runs(paths)
        if len(runs) == 1:
            return explore(next(iter(runs.values())), live=live, interval=interval)
        return board(runs, live=live, interval=interval)
    except (OSError, ValueError) as error:
        return widgets.HTML(status_html(str(error), error=True))


def dashboard_notebook(paths: Sequence[str | os.PathLike], *, interval: float = DEFAULT_INTERVAL) -> nbformat.NotebookNode:
    """The one-cell notebook the dashboard serves: :func:`page` on the paths given (made absolute), live.

    Example:
        >>> nb = dashboard_notebook(["/abs/runs"])
        >>> nb.cells[0].source.splitlines()[-1]
        "page(['/abs/runs'], interval=2.0)"
    """
    check_params(_CONSTRAINTS, interval=interval)
    if not paths:
        raise ValueError("the dashboard needs at least one run store or folder")
    absolute = [str(Path(path).resolve()) for path in paths]
    code = f"from probekit.dashboard import page\n\npage({absolute!r}, interval={float(interval)!r})"
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "probekit dashboard", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [nbformat.v4.new_code_cell(code)]
    return nb


# ------------------------------------------------------------------ the server
def check_token(token: str) -> str:
    """A token given with ``--token``: at least 8 characters a URL carries as they are.

    Example:
        >>> check_token("workshop-2026")
        'workshop-2026'
    """
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise ValueError("--token must be at least 8 letters, digits or '-', '_', '.', '~' (it goes in the URL); "
                         f"got {token!r}")
    return token


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is this machine's loopback (``127.0.0.1``, ``::1``, ``localhost``).

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("0.0.0.0")
        (True, False)
    """
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def host_warning(host: str, port: int) -> str | None:
    """The warning for a ``host`` other machines can reach (None for loopback).

    Example:
        >>> host_warning("0.0.0.0", 8866)[:40]
        'probekit: warning: --host 0.0.0.0 is not'
    """
    if is_loopback(host):
        return None
    return (f"probekit: warning: --host {host or repr(host)} is not loopback: anyone who can reach port {port} of this "
            "machine and has the token can open these runs (the default, 127.0.0.1, serves this machine only)")


def check_port(host: str, port: int) -> None:
    """Raise a one-line ``OSError`` when the server could not listen on ``host:port`` (taken, or not allowed).

    It binds the way the server will (tornado's ``bind_sockets``) and lets go at once.

    Example:
        >>> check_port("127.0.0.1", 8866)
    """
    from tornado.netutil import bind_sockets

    check_params(_CONSTRAINTS, port=port)
    try:
        sockets = bind_sockets(port, host or None)
    except socket.gaierror as error:
        raise OSError(f"--host {host!r} is not an address of this machine ({error.strerror}); "
                      f"pass one with --host (default {DEFAULT_HOST})") from None
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} is already in use on {host or 'this machine'}; "
                          f"pick another with --port (e.g. --port {port + 1 if port < 65535 else 8866})") from None
        if error.errno == errno.EACCES:
            raise OSError(f"not allowed to listen on port {port}; pick a port above 1023 with --port") from None
        raise OSError(f"cannot listen on {host}:{port} ({error.strerror or error}); "
                      f"pass an address of this machine with --host (default {DEFAULT_HOST})") from None
    for sock in sockets:
        sock.close()


def _url(host: str, port: int, token: str) -> str:
    shown = socket.gethostname() if host in ("", "0.0.0.0", "::") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/?token={token}"


def _write_private_folder(folder: Path, paths: Sequence[str | os.PathLike], *, host: str, port: int, token: str,
                          interval: float) -> Path:
    """The notebook, the kernel spec, the template and Voila's config; returns the notebook's path."""
    page = folder / "page"
    page.mkdir()
    notebook = page / "probekit-dashboard.ipynb"
    nbformat.write(dashboard_notebook(paths, interval=interval), notebook)
    kernel = folder / "jupyter" / "kernels" / KERNEL_NAME
    kernel.mkdir(parents=True)
    (kernel / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "probekit dashboard", "language": "python",
    }))
    template = folder / "jupyter" / "voila" / "templates" / TEMPLATE_NAME
    template.mkdir(parents=True)
    (template / "conf.json").write_text(json.dumps({"base_template": "lab"}))
    (template / "index.html.j2").write_text(_TEMPLATE)
    (folder / "voila.json").write_text(json.dumps({
        "Voila": {
            "ip": host, "port": port, "port_retries": 0, "open_browser": False, "token": token,
            "root_dir": str(page), "connection_dir_root": str(folder), "log_level": "WARN",
            "tornado_settings": {"allow_remote_access": not is_loopback(host)},
        },
        "VoilaConfiguration": {
            "template": TEMPLATE_NAME, "file_allowlist": [], "file_denylist": [".*"], "show_tracebacks": False,
            "strip_sources": True, "extension_allowlist": EXTENSIONS,
            "allow_template_override": "NO", "allow_theme_override": "NO",
        },
        "PasswordIdentityProvider": {"allow_password_change": False},
        "KernelSpecManager": {"allowed_kernelspecs": [KERNEL_NAME], "ensure_native_kernel": False},
    }, indent=1))
    return notebook


def _give_the_page_its_xsrf_cookie(handler, notebook, cwd) -> None:
    """Voila's prelaunch hook: set the ``_xsrf`` cookie with the page.

    The page shuts its kernel down when it is closed or reloaded by a POST that
    carries the ``_xsrf`` cookie, which only the login form would otherwise
    have set; without it the POST is refused and the kernel (and its live
    reading) would run on. Reading ``xsrf_token`` makes tornado set the cookie.
    """
    handler.xsrf_token  # noqa: B018 - read for its side effect


def serve(
    paths: Sequence[str | os.PathLike],
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    interval: float = DEFAULT_INTERVAL,
    say: Callable[[str], None] | None = None,
) -> None:
    """Serve the explorer of the runs ``paths`` name (several: the run picker and the comparison) until interrupted.

    Args:
        paths: Run stores, or folders holding them (:func:`find_runs`); each
            Zarr store of a folder that is not a run is named on standard error.
        host: The address to listen on; anything but loopback is reachable from other machines.
        port: The port to listen on.
        token: The access token (:func:`check_token`); by default a new random one.
        interval: Seconds between two checks of the stores by each page.
        say: Where the lines for the user go (the URL first); by default standard output, flushed at once.

    Raises:
        OSError: The port is taken (the message names it) or the host is not this machine's.
        FileNotFoundError, ValueError: A path that holds no run; a bad token, port or interval.

    Example:
        >>> serve(["runs"], port=9000)      # blocks; Ctrl-C stops it
    """
    check_params(_CONSTRAINTS, port=port, interval=interval)
    say = say or (lambda line: print(line, flush=True))
    token = secrets.token_hex(24) if token is None else check_token(token)
    runs, skipped = find_runs(paths)
    for note in skipped:
        print(f"probekit: {note}", file=sys.stderr, flush=True)
    check_port(host, port)
    warning = host_warning(host, port)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    from voila.app import Voila

    folder = Path(tempfile.mkdtemp(prefix="probekit-dashboard-"))  # readable by its owner only
    old_path = os.environ.get("JUPYTER_PATH")
    try:
        notebook = _write_private_folder(folder, paths, host=host, port=port, token=token, interval=interval)
        os.environ["JUPYTER_PATH"] = os.pathsep.join([str(folder / "jupyter"), *([old_path] if old_path else [])])
        app = Voila()
        app.initialize([str(notebook), f"--Voila.config_file_paths={folder}"])
        app.voila_configuration.prelaunch_hook = _give_the_page_its_xsrf_cookie  # a callable: not in a JSON file
        what = next(iter(runs)) if len(runs) == 1 else f"{len(runs)} runs ({choices(list(runs), limit=6)})"
        say(f"probekit dashboard: {what}, live, at {_url(host, port, token)}")
        say("stop it with Ctrl-C")
        try:
            app.start()
        except SystemExit as stop:
            if stop.code:
                raise OSError(f"the dashboard server could not start on port {port} (see the lines above); "
                              "pick another with --port") from None
    finally:
        if old_path is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old_path
        shutil.rmtree(folder, ignore_errors=True)

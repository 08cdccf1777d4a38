"""The docs site builds warning-free and offline, and documents everything ``probekit.__all__`` offers.

The build runs ``sphinx-build -W --keep-going -b html docs OUT`` in a
subprocess whose sockets refuse to connect, so that any warning (a docstring
that does not parse, a broken cross-reference between pages, a notebook that
does not render) fails the test, and so does any attempt to reach the network
(an intersphinx fetch, a notebook run). The API reference is generated from
``probekit.__all__``, and from the trainer integrations (``probekit.integrations``,
which ``import probekit`` does not import), by ``docs/_ext/apiref.py``; the unit
tests below check that a name added there is picked up without editing the docs.
"""

from __future__ import annotations

import hashlib
import html
import importlib
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import probekit

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
GUIDES = ("methodology", "store", "reliability", "architecture")
#: The optional modules the integrations page documents (each callback module imports its framework).
INTEGRATIONS = ("probekit.integrations.lightning", "probekit.integrations.hf", "probekit.integrations.probing")

# Run in the build's process before Sphinx starts: every outgoing connection raises.
OFFLINE_SPHINX = """
import socket, sys

def refuse(*args, **kwargs):
    raise OSError("the docs build tried to open a network connection; it must build offline")

socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = refuse
from sphinx.cmd.build import main
sys.exit(main(sys.argv[1:]))
"""


def source_files() -> dict[str, str]:
    """Every file the build reads or could write beside its sources, with a hash of its bytes."""
    paths = [*DOCS.rglob("*"), *NOTEBOOKS]
    return {
        str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in paths
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "html"
    before = source_files()
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_SPHINX, "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stderr[-6000:]}"
    assert "WARNING" not in result.stderr and "ERROR" not in result.stderr, result.stderr[-6000:]
    assert source_files() == before, "the build changed or added files beside its sources"
    return out


def page_text(path: Path, *, code: bool = False) -> str:
    """A page's visible text, whitespace collapsed; with ``code=True``, tags are dropped without a space
    (highlighted code is split into spans), so that a line of code reads as written."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", path.read_text(encoding="utf-8"), flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "" if code else " ", body)).split())


def anchors(path: Path) -> set[str]:
    return set(re.findall(r'id="([^"]+)"', path.read_text(encoding="utf-8")))


def links(html_text: str, role: str = "class") -> set[str]:
    """The targets of the resolved cross-references of one role (``:class:``) in a piece of a page."""
    pattern = rf'<a class="reference internal" href="([^"]*)"[^>]*><code class="xref py py-{role}\b'
    return set(re.findall(pattern, html_text))


def module_sections(path: Path) -> dict[str, str]:
    """The HTML of each module's section of a reference page (its article only), by module name."""
    page = path.read_text(encoding="utf-8")
    parts = re.split(r'<section id="module-([\w.]+)">', page[:page.index("</article>")])
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.slow
def test_every_public_name_and_module_member_is_documented(site: Path):
    top, modules, internals = (anchors(site / "api" / f"{page}.html") for page in ("index", "modules", "internals"))
    top_level = {name: getattr(probekit, name) for name in probekit.__all__}
    documented_objects = {id(obj) for obj in top_level.values()}
    missing = []
    for name, obj in top_level.items():
        if isinstance(obj, types.ModuleType):
            if f"module-{obj.__name__}" not in modules:
                missing.append(obj.__name__)
            for member in obj.__all__:
                if id(getattr(obj, member)) not in documented_objects and f"{obj.__name__}.{member}" not in modules:
                    missing.append(f"{obj.__name__}.{member}")
        elif f"probekit.{name}" not in top:
            missing.append(f"probekit.{name}")
    assert not missing, f"not in the API reference: {missing}"
    assert "probekit.accessor.ProbekitAccessor.diagnose" in top   # ds.probekit, found on xarray.Dataset
    assert "module-probekit.engine.reduce" in internals and "module-probekit.run.schema" in internals


@pytest.mark.slow
def test_the_trainer_integrations_are_documented_once_each_callback_under_its_module(site: Path):
    page = site / "api" / "integrations.html"
    found = anchors(page)
    missing = [f"module-{name}" for name in ("probekit.integrations", *INTEGRATIONS) if f"module-{name}" not in found]
    for name in INTEGRATIONS:
        missing += [f"{name}.{member}" for member in importlib.import_module(name).__all__
                    if f"{name}.{member}" not in found]
    assert not missing, f"not on the integrations page: {missing}"
    assert {"probekit.integrations.lightning.ProbeCallback", "probekit.integrations.hf.ProbeCallback"} <= found
    for other in ("index", "modules", "internals"):   # described once: no second target for Sphinx to choose from
        assert not {a for a in anchors(site / "api" / f"{other}.html") if "probekit.integrations" in a}, other
    text = page_text(page)
    assert "Probe a LightningModule's layers while a Lightning" in text.replace("\u2019", "'")
    assert "Event called at" not in text and "Called when fit begins" not in text   # no framework hook docstrings


@pytest.mark.slow
def test_cross_references_to_the_two_probe_callbacks_resolve_each_to_its_own_class(site: Path):
    lightning, hf = "probekit.integrations.lightning.ProbeCallback", "probekit.integrations.hf.ProbeCallback"
    sections = module_sections(site / "api" / "integrations.html")
    for module, own, other in (("lightning", lightning, hf), ("hf", hf, lightning)):
        # The module docstring's :class:`ProbeCallback` and :class:`~probekit.integrations.probing.TrainerProbes`.
        docstring = sections[f"probekit.integrations.{module}"].split('<dl class="py ')[0]
        assert {f"#{own}", "#probekit.integrations.probing.TrainerProbes"} <= links(docstring), module
        assert f"#{other}" not in links(docstring), module
    shared = sections["probekit.integrations.probing"].split('<dl class="py ')[0]
    assert "#probekit.integrations.probing.TrainerProbes" in links(shared)
    assert {"#module-probekit.integrations.lightning", "#module-probekit.integrations.hf"} <= links(shared, "mod")
    usage = (site / "usage.html").read_text(encoding="utf-8")   # the guide's links, next to the README's tour
    assert {f"api/integrations.html#{lightning}", f"api/integrations.html#{hf}"} <= links(usage)
    for page in ("index", "internals"):
        assert 'href="integrations.html"' in (site / "api" / f"{page}.html").read_text(encoding="utf-8"), page


@pytest.mark.slow
def test_top_level_functions_show_their_docstrings_arguments_and_examples(site: Path):
    text = page_text(site / "api" / "index.html")
    assert "Probe a fixed model to convergence" in text       # probe's summary line
    assert "tracer_kwargs" in text and "Parameters" in text   # Google-style Args rendered as a field list
    assert "pk.probe_checkpoints(lambda: pk.zoo.paper_convnet()" in page_text(site / "api" / "index.html", code=True)
    assert "From probekit.engine" in text and "The ds.probekit accessor" in text


@pytest.mark.slow
def test_no_property_summary_is_read_as_its_type(site: Path):
    # napoleon reads a property's first line "X: y" as type X and description y; a summary must not take that form.
    for page in sorted((site / "api").glob("*.html")):
        fields = re.findall(r'<dt class="field-\w+">Type<span class="colon">:</span></dt>\s*<dd[^>]*>(.*?)</dd>',
                            page.read_text(encoding="utf-8"), flags=re.S)
        types = [" ".join(html.unescape(re.sub(r"<[^>]+>", "", f)).split()) for f in fields]
        prose = [t for t in types if re.search(r"\s", re.sub(r"\s*[|,]\s*", "", t))]  # "tuple[str, ...] | None" is a type
        assert not prose, (page.name, prose)


@pytest.mark.slow
def test_guides_are_included_from_docs_and_the_landing_page_has_the_set_up_commands(site: Path):
    for guide in GUIDES:
        title = (DOCS / f"{guide}.md").read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
        assert title.split(":")[0] in page_text(site / f"{guide}.html")
    landing = page_text(site / "index.html")
    assert "make demo" in landing and "make test" in landing and "pip install -e ." in landing
    usage = page_text(site / "usage.html", code=True)
    assert "pk.ProbeMonitor" in usage and "probekit reproduce bypass" in usage   # the README's tour, included


@pytest.mark.slow
def test_notebooks_are_rendered_as_stored_without_running_them(site: Path):
    assert NOTEBOOKS
    for path in NOTEBOOKS:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        page = site / "notebooks" / f"{path.stem}.html"
        assert page.exists(), f"no page for {path.name}"
        text = page_text(page)
        title = "".join(notebook["cells"][0]["source"]).splitlines()[0].lstrip("# ").strip()
        assert title in text
        code = next(c for c in notebook["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip())
        first_line = " ".join("".join(code["source"]).strip().splitlines()[0].split())
        assert first_line in page_text(page, code=True)
        stored_outputs = sum(len(c.get("outputs", ())) for c in notebook["cells"] if c["cell_type"] == "code")
        assert page.read_text(encoding="utf-8").count('class="cell_output') <= stored_outputs


def load_apiref():
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import apiref
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    return apiref


def test_a_name_added_to_all_is_documented_once_at_the_top_level(monkeypatch: pytest.MonkeyPatch):
    apiref = load_apiref()
    from probekit.engine import load_checkpoint

    assert "load_checkpoint" not in probekit.__all__
    assert ".. autofunction:: probekit.engine.load_checkpoint" in "\n".join(apiref.modules_text())
    monkeypatch.setattr(probekit, "__all__", [*probekit.__all__, "load_checkpoint"])
    monkeypatch.setattr(probekit, "load_checkpoint", load_checkpoint, raising=False)
    top, modules = "\n".join(apiref.top_level_text()), "\n".join(apiref.modules_text())
    engine = top.index("From probekit.engine")
    assert engine < top.index(".. autofunction:: probekit.load_checkpoint") < top.index("From probekit.run")
    assert "probekit.engine.load_checkpoint" not in modules and ":py:obj:`probekit.load_checkpoint`" in modules


def test_values_are_documented_with_the_comment_where_they_are_assigned():
    apiref = load_apiref()
    lines = apiref.documenter(probekit.data, "DATASETS")
    assert lines[:2] == [".. py:data:: DATASETS", "   :module: probekit.data"]
    assert any("Dataset names" in line for line in lines)   # the #: comment in probekit/data/named.py
    long_value = apiref.documenter(probekit.experiments, "REPRODUCTIONS")
    assert not any(":value:" in line for line in long_value) and any("Every reproduction" in line for line in long_value)


def test_a_module_that_exports_a_submodule_gets_its_section_and_each_class_is_described_once(
    monkeypatch: pytest.MonkeyPatch,
):
    apiref = load_apiref()
    import probekit.zoo.paper

    monkeypatch.setattr(probekit.zoo, "__all__", [*probekit.zoo.__all__, "paper"])
    lines = apiref.modules_text()
    modules = "\n".join(lines)
    start = lines.index("probekit.zoo.paper")
    ends = [i for i in range(start + 2, len(lines) - 1) if set(lines[i + 1]) == {"-"} and lines[i]]
    section = "\n".join(lines[start:ends[0] if ends else len(lines)])
    assert modules.count(".. autoclass:: probekit.zoo.BypassMLP") == 1
    assert ".. autoclass:: probekit.zoo.paper.BypassMLP" not in modules
    assert ".. automodule:: probekit.zoo.paper" in section and ":py:obj:`probekit.zoo.BypassMLP`" in section
    assert "probekit.zoo.paper" not in "\n".join(apiref.internals_text())


@pytest.mark.slow   # imports Lightning and transformers, as the build does
def test_a_name_added_to_an_integration_modules_all_is_documented_on_the_integrations_page(
    monkeypatch: pytest.MonkeyPatch,
):
    apiref = load_apiref()
    import probekit.integrations.lightning
    import probekit.integrations.probing

    names = apiref.optional_module_names()
    assert names[0] == "probekit.integrations" and set(INTEGRATIONS) <= set(names)
    monkeypatch.setattr(probekit.integrations.probing, "__all__", [*probekit.integrations.probing.__all__, "_number"])
    text = "\n".join(apiref.integrations_text())
    assert all(f".. automodule:: {name}" in text for name in ("probekit.integrations", *INTEGRATIONS))
    assert ".. autoclass:: probekit.integrations.lightning.ProbeCallback" in text
    assert ".. autoclass:: probekit.integrations.hf.ProbeCallback" in text
    assert ".. autofunction:: probekit.integrations.probing._number" in text
    assert "probekit.integrations" not in "\n".join(apiref.internals_text() + apiref.modules_text())
    # The framework's hooks it overrides without a docstring are left out; its own members are not.
    lines = apiref.documenter(probekit.integrations.lightning, "ProbeCallback")
    excluded = next(line for line in lines if ":exclude-members:" in line).split(":exclude-members:")[1]
    assert "on_fit_start" in excluded and "dataset" not in excluded and "model_losses" not in excluded

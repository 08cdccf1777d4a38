"""The API reference, generated from ``probekit.__all__`` at build time.

One directive writes the reference pages' content, so that a name added to
``probekit.__all__`` (or to a public module's ``__all__``) appears in the docs
without editing them, and a name removed leaves nothing stale behind:

- ``.. probekit-api:: top-level`` documents every function, class and value
  of ``probekit.__all__``, grouped by the subpackage that defines it (in the
  data's order: engine, run, diagnosis, plots, explorers, then the others),
  each group opening with a summary table; then the ``ds.probekit`` accessor,
  found on ``xarray.Dataset`` where ``import probekit`` registers it.
- ``.. probekit-api:: modules`` documents every module of ``probekit.__all__``
  (``pk.data``, ``pk.zoo``, ...): its docstring, then each member of its own
  ``__all__``, and of every module that ``__all__`` names. A class or function
  already described (at the top level, or in an earlier module) is not
  described twice (Sphinx would warn of a duplicate): the section links to it.
- ``.. probekit-api:: integrations`` documents the optional modules, which
  ``import probekit`` never imports (each callback module imports its training
  framework): every module of the packages of ``OPTIONAL_PACKAGES``
  (``probekit.integrations`` and its ``lightning``, ``hf`` and ``probing``),
  found on disk, each as a module of the modules page is. Their classes keep
  their module's name (``probekit.integrations.lightning.ProbeCallback`` and
  ``probekit.integrations.hf.ProbeCallback`` are two descriptions, two anchors).
- ``.. probekit-api:: internals`` shows the docstring of every other module
  (``probekit.engine.reduce`` holds the reduction grammar, ``probekit.run.schema``
  the names), so that the docstrings' ``:mod:`` references have a target.

The directive writes reStructuredText for autodoc and autosummary and parses it
in place: no stub file is written into the source tree.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
import types

from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective
from sphinx.util.inspect import object_description
from sphinx.util.parsing import nested_parse_to_nodes

PACKAGE = "probekit"
#: Groups of the top-level page, in the order the data flows; any other subpackage follows, by name.
GROUP_ORDER = ("probekit.engine", "probekit.run", "probekit.diagnosis", "probekit.plots", "probekit.explorers")
#: A value whose literal is longer than this is shown by its description only: a long literal would bury it.
MAX_VALUE_CHARS = 120
#: Packages of optional modules: not in ``probekit.__all__`` and never imported by ``import probekit`` (a module
#: there may import a framework of its own); the integrations page documents each of their modules.
OPTIONAL_PACKAGES = ("probekit.integrations",)


def package() -> types.ModuleType:
    return importlib.import_module(PACKAGE)


def top_level_objects() -> dict[str, object]:
    """Every name of ``probekit.__all__`` that is not a module, with its object."""
    found = {name: getattr(package(), name) for name in package().__all__}
    return {name: obj for name, obj in found.items() if not isinstance(obj, types.ModuleType)}


def public_modules() -> list[types.ModuleType]:
    """The modules of ``probekit.__all__`` (``probekit.data``, ...), in its order, each followed by
    the modules its own ``__all__`` names (a subpackage that exports submodules)."""
    found: list[types.ModuleType] = []

    def add(module: types.ModuleType, names: list[str]) -> None:
        for name in names:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType) and obj not in found:
                found.append(obj)
                add(obj, list(getattr(obj, "__all__", ())))

    add(package(), list(package().__all__))
    return found


def optional_module_names() -> list[str]:
    """The packages of ``OPTIONAL_PACKAGES``, each followed by its modules, by name, found without importing them."""
    found: list[str] = []
    for name in OPTIONAL_PACKAGES:
        path = importlib.import_module(name).__path__
        found += [name, *sorted((info.name for info in pkgutil.walk_packages(path, prefix=name + ".")),
                                key=lambda module: module.split("."))]
    return found


def optional_modules() -> list[types.ModuleType]:
    """The modules of ``optional_module_names``, imported (with the frameworks they import)."""
    return [importlib.import_module(name) for name in optional_module_names()]


def group_of(obj: object) -> str:
    """The subpackage (or top-level module) that defines ``obj``: ``probekit.engine`` for ``probe``."""
    parts = (getattr(obj, "__module__", None) or PACKAGE).split(".")
    return ".".join(parts[:2]) if parts[0] == PACKAGE and len(parts) > 1 else PACKAGE


def first_line(obj: object) -> str:
    """The first line of ``obj``'s docstring, or nothing."""
    doc = (inspect.getdoc(obj) or "").strip()
    return doc.splitlines()[0] if doc else ""


def heading(text: str) -> list[str]:
    return [text, "-" * len(text), ""]


def documenter(module: types.ModuleType, name: str) -> list[str]:
    """The autodoc directive that documents ``<module>.<name>``, chosen by what the object is."""
    obj = getattr(module, name)
    full = f"{module.__name__}.{name}"
    if inspect.isclass(obj):
        kind = "autoexception" if issubclass(obj, BaseException) else "autoclass"
        bases = ["   :show-inheritance:"] if obj.__bases__ != (object,) else []   # "Bases: object" says nothing
        foreign = foreign_docstring_members(obj)
        excluded = [f"   :exclude-members: {', '.join(foreign)}"] if foreign else []
        return [f".. {kind}:: {full}", "   :members:", *bases, *excluded, ""]
    if callable(obj):
        return [f".. autofunction:: {full}", ""]
    # A value is described by hand, not by autodata: autodata falls back on the value's type's docstring
    # (dict's, tuple's) when the documented module holds no comment for it, which a re-exported value never has.
    lines = [f".. py:data:: {name}", f"   :module: {module.__name__}"]
    value = object_description(obj)
    lines += [f"   :value: {value}"] if len(value) <= MAX_VALUE_CHARS else []
    return lines + ["", *("   " + line for line in attribute_doc(module, name)), ""]


def foreign_docstring_members(cls: type) -> list[str]:
    """The members ``cls`` defines without a docstring whose nearest documented definition up its bases lies outside
    probekit: autodoc would describe them with a framework's text (Lightning's ``on_fit_start``, ``nn.Module.forward``),
    which says nothing of what probekit does there. They are left out; the class's own docstring covers them."""
    def doc(member: object) -> str | None:
        member = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        return getattr(member, "__doc__", None)

    found = []
    for name, member in vars(cls).items():
        if name.startswith("_") or not (callable(member) or isinstance(member, (property, staticmethod, classmethod))):
            continue
        if doc(member):
            continue
        home = next((base for base in cls.__mro__[1:] if name in vars(base) and doc(vars(base)[name])), None)
        if home is not None and home.__module__.split(".")[0] != PACKAGE:
            found.append(name)
    return found


def attribute_doc(module: types.ModuleType, name: str) -> list[str]:
    """The ``#:`` comment above the assignment of ``module.<name>``, in ``module`` or the submodule that assigns it."""
    obj = getattr(module, name)
    prefix = module.__name__ + "."
    homes = [module.__name__] + sorted(
        m for m, loaded in list(sys.modules.items()) if m.startswith(prefix) and getattr(loaded, name, None) is obj
    )
    for home in homes:
        try:
            docs = ModuleAnalyzer.for_module(home).find_attr_docs()
        except PycodeError:
            continue
        if ("", name) in docs:
            return [line for line in docs[("", name)] if line.strip()]
    return []


def accessor_class() -> type:
    """The class behind ``ds.probekit``, as xarray holds it once ``import probekit`` has run."""
    import xarray

    package()
    accessor = getattr(xarray.Dataset, PACKAGE, None)
    if not inspect.isclass(accessor):
        raise RuntimeError(f"xarray.Dataset has no {PACKAGE!r} accessor after import {PACKAGE}; check probekit/accessor.py")
    return accessor


def top_level_text() -> list[str]:
    """The top-level page's body: one section per defining subpackage, then the accessor."""
    groups: dict[str, list[str]] = {}
    for name, obj in top_level_objects().items():
        groups.setdefault(group_of(obj), []).append(name)
    ordered = [g for g in GROUP_ORDER if g in groups] + sorted(g for g in groups if g not in GROUP_ORDER)
    lines: list[str] = [".. currentmodule:: probekit", ""]
    for group in ordered:
        names = sorted(groups[group], key=str.lower)
        lines += heading(f"From {group}")
        summary = first_line(importlib.import_module(group))
        lines += [summary, ""] if summary else []
        lines += [".. autosummary::", "   :nosignatures:", ""] + [f"   {name}" for name in names] + [""]
        for name in names:
            lines += documenter(package(), name)
    accessor = accessor_class()
    lines += heading("The ds.probekit accessor")
    lines += [
        "``import probekit`` registers it on every ``xarray.Dataset``: a run's diagnosis and charts,",
        "with the run already passed (``pk.open_run(path).probekit.diagnose()``).",
        "",
        f".. autoclass:: {accessor.__module__}.{accessor.__qualname__}",
        "   :members:",
        "",
    ]
    return lines


def described_once(obj: object) -> bool:
    """Whether ``obj`` gets one description only: a class or a function does (Sphinx warns of a second one
    under another name); a value may be described under each name that exports it (equal values can share an id)."""
    return inspect.isclass(obj) or callable(obj)


def top_level_described() -> dict[int, str]:
    """``{id(obj): full name}`` of every class and function the top-level page describes, the accessor included."""
    described = {id(obj): f"probekit.{name}" for name, obj in top_level_objects().items() if described_once(obj)}
    accessor = accessor_class()
    described[id(accessor)] = f"{accessor.__module__}.{accessor.__qualname__}"
    return described


def modules_text() -> list[str]:
    """The modules page's body: per module, its docstring, then each member of its ``__all__`` not described yet."""
    return module_sections(public_modules(), top_level_described())


def integrations_text() -> list[str]:
    """The integrations page's body: the optional modules, as the modules page shows a module; what the
    top-level or the modules page already describes is linked to, not described again."""
    described = top_level_described()
    module_sections(public_modules(), described)   # what the modules page describes, and under which name
    return module_sections(optional_modules(), described)


def module_sections(modules: list[types.ModuleType], described: dict[int, str]) -> list[str]:
    """Per module, its docstring, then each member of its ``__all__`` not in ``described`` (which it adds them to)."""
    lines: list[str] = []
    for module in modules:
        members = {name: getattr(module, name) for name in getattr(module, "__all__", ())}
        elsewhere = sorted({described[id(obj)] for obj in members.values() if described_once(obj) and id(obj) in described},
                           key=str.lower)
        lines += heading(module.__name__)
        lines += [f".. automodule:: {module.__name__}", ""]
        if elsewhere:
            lines += ["Also exported here: " + ", ".join(f":py:obj:`{target}`" for target in elsewhere) + ".", ""]
        for name, obj in members.items():
            if isinstance(obj, types.ModuleType):   # it has a section of its own
                continue
            if described_once(obj):
                if id(obj) in described:
                    continue
                described[id(obj)] = f"{module.__name__}.{name}"
            lines += documenter(module, name)
    return lines


def every_module() -> list[str]:
    """Every module of the package, subpackages first and each followed by its modules, by name."""
    found = [info.name for info in pkgutil.walk_packages(package().__path__, prefix=PACKAGE + ".")]
    return sorted(found, key=lambda name: name.split("."))


def internals_text() -> list[str]:
    """The internals page's body: the docstring of every module that the modules and integrations pages do not document."""
    public = {module.__name__ for module in public_modules()} | set(optional_module_names())
    lines: list[str] = []
    for name in every_module():
        if name not in public:
            lines += heading(name) + [f".. automodule:: {name}", ""]
    return lines


class ProbekitAPI(SphinxDirective):
    """``.. probekit-api:: PART``: the generated reference, PART one of ``top-level``, ``modules``,
    ``integrations``, ``internals``."""

    required_arguments = 1
    has_content = False
    PARTS = {"top-level": top_level_text, "modules": modules_text, "integrations": integrations_text,
             "internals": internals_text}

    def run(self):
        part = directives.choice(self.arguments[0], tuple(self.PARTS))
        pages = getattr(self.env, "probekit_api_pages", set())
        pages.add(self.env.docname)
        self.env.probekit_api_pages = pages
        # The page changes with the package's __all__ and each public module's, not only with its own source
        # (the integrations page, with each optional module's too).
        optional = optional_modules() if part == "integrations" else []
        for module in [package(), *public_modules(), *optional]:
            self.env.note_dependency(module.__file__)
        text = "\n".join(self.PARTS[part]())
        return nested_parse_to_nodes(self.state, text, source=f"<probekit-api {part}>", allow_section_headings=True)


def read_reference_pages_together(app: Sphinx, env, docnames: list[str]) -> None:
    """When one reference page is read again, read them all, each cleared before any is read.

    An object can move from one reference page to another (a module made
    public leaves the internals page for the modules page); Sphinx clears a
    page just before reading it again, so the page read first would meet the
    other's stale description and warn of a duplicate.
    """
    pages = sorted(getattr(env, "probekit_api_pages", set()) & env.found_docs)
    if not any(page in docnames for page in pages):
        return
    for page in pages:
        if page not in docnames:
            docnames.append(page)
        app.events.emit("env-purge-doc", env, page)
        env.clear_doc(page)


def forget_page(app: Sphinx, env, docname: str) -> None:
    getattr(env, "probekit_api_pages", set()).discard(docname)


def merge_pages(app: Sphinx, env, docnames: set[str], other) -> None:
    env.probekit_api_pages = getattr(env, "probekit_api_pages", set()) | getattr(other, "probekit_api_pages", set())


def setup(app: Sphinx) -> dict:
    app.add_directive("probekit-api", ProbekitAPI)
    app.connect("env-before-read-docs", read_reference_pages_together)
    app.connect("env-purge-doc", forget_page)
    app.connect("env-merge-info", merge_pages)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

"""Several runs on one page: a run picker over one run's explorer, and the comparison of them all.

:func:`board` is what ``probekit dashboard`` shows for several runs: the
explorer (:func:`probekit.explorers.explore`) of the run chosen in a picker,
and below it the comparison of every run (:func:`probekit.explorers.compare`).

    >>> b = board({"convnet": "runs/a.zarr", "mlp": "runs/b.zarr"}, live=True)
    >>> b.pick("mlp").explorer.selected_layers       # what the picker does, from code
    >>> b.comparison.epochs_shown

The board owns its two apps and the picker; picking a run closes the explorer
shown (its widgets and its live reading) and opens the picked run's, so only
the run on screen is followed by an explorer. The comparison follows every run.

This module imports ipywidgets and the explorers: never torch.
"""

from __future__ import annotations

import html
from collections.abc import Mapping

import ipywidgets as widgets

from probekit.explorers.compare import Comparison, compare
from probekit.explorers.explorer import Explorer, explore
from probekit.explorers.live import DEFAULT_INTERVAL, RunLike
from probekit.explorers.widgets import close_tree, status_html
from probekit.params import choices

__all__ = ["Board", "board"]


def _section(title: str) -> widgets.HTML:
    return widgets.HTML(f"<h3 style='margin:12px 0 4px 0'>{html.escape(title)}</h3>")


class Board:
    """A run picker over one run's explorer, and the comparison of every run.

    Build it with :func:`board`.

    Attributes:
        runs: The runs by name, as given.
        picker: The run picker (a Dropdown of the runs' names); setting its
            value acts as a user would.
        explorer: The :class:`~probekit.explorers.Explorer` of the picked run.
        comparison: The :class:`~probekit.explorers.Comparison` of every run.
        widget: The board's root widget.

    Example:
        >>> b = board({"a": run_a, "b": run_b})
        >>> b.picker.value = "b"
        >>> b.explorer.dataset.attrs["model"]
    """

    def __init__(self, runs: Mapping[str, RunLike], *, live: bool = False, interval: float = DEFAULT_INTERVAL):
        if not isinstance(runs, Mapping):
            raise TypeError(f"board takes a dict from run name to run (a dataset or a store path); got {type(runs).__name__}")
        if len(runs) < 2:
            raise ValueError(f"board shows several runs, but got {len(runs)}; for one run use pk.explore(run)")
        self.runs = {str(name): run for name, run in runs.items()}
        self._live, self._interval = live, interval
        self.comparison: Comparison = compare(self.runs, live=live, interval=interval)
        names = list(self.runs)
        self.explorer: Explorer = explore(self.runs[names[0]], live=live, interval=interval)
        self.picker = widgets.Dropdown(options=names, value=names[0], description="run",
                                       layout=widgets.Layout(width="420px"))
        self.picker.add_class("probekit-run-picker")
        self._shown = names[0]
        self.picker.observe(self._picked, names="value")
        self._status = widgets.HTML()
        self._slot = widgets.VBox([self.explorer.widget])
        self.widget = widgets.VBox([
            _section("One run"), widgets.HBox([self.picker, self._status]), self._slot,
            _section(f"All {len(names)} runs by relative depth"), self.comparison.widget,
        ])
        self.widget.add_class("probekit-board")

    def pick(self, name: str) -> Board:
        """Show the explorer of run ``name`` (closing the one shown).

        Returns:
            The board, so calls chain.

        Raises:
            ValueError: ``name`` is not one of the board's runs (the message lists them).
            FileNotFoundError, ValueError: its store cannot be read (the explorer shown stays).

        Example:
            >>> b.pick("mlp").explorer.epoch
        """
        if name not in self.runs:
            raise ValueError(f"run {name!r} is not on this board; choose from: {choices(list(self.runs))}")
        self._show(name)
        return self

    def _show(self, name: str) -> None:
        if name == self._shown:
            return
        new = explore(self.runs[name], live=self._live, interval=self._interval)
        old, self.explorer, self._shown = self.explorer, new, name
        self.picker.value = name  # its observer sees the run already shown
        self._status.value = ""
        self._slot.children = [new.widget]
        old.close()

    def _picked(self, change: dict) -> None:
        try:
            self._show(change["new"])
        except (OSError, TypeError, ValueError) as error:  # a store damaged since the board opened
            self._status.value = status_html(f"cannot open run {change['new']!r}: {error}", error=True)
            self.picker.value = self._shown

    @property
    def live(self) -> bool:
        """Whether the board follows its stores (the comparison does, and so does the explorer shown)."""
        return self.comparison.live

    def stop(self) -> Board:
        """Stop following the stores (the board stays, with what it last read).

        Returns:
            The board.
        """
        self._live = False
        self.explorer.stop()
        self.comparison.stop()
        return self

    def close(self) -> None:
        """Stop following the stores and close every widget of the board."""
        self.explorer.close()
        self.comparison.close()
        close_tree(self.widget)

    def _repr_mimebundle_(self, **kwargs: object) -> dict:
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return f"<Board of {', '.join(self.runs)}: exploring {self.picker.value}{', live' if self.live else ''}>"


def board(runs: Mapping[str, RunLike], *, live: bool = False, interval: float = DEFAULT_INTERVAL) -> Board:
    """An app over several runs: a picker for the explorer of one run, and the comparison of all of them.

    Args:
        runs: A dict from run name to run (a dataset or the path of its store); at least two.
        live: Follow stores that runs are still writing (see :func:`probekit.explorers.explore`).
        interval: Seconds between two checks of live stores.

    Returns:
        The :class:`Board`; end a cell with it to show it.

    Raises:
        TypeError: ``runs`` is not a dict.
        ValueError: Fewer than two runs.

    Example:
        >>> board({"Inception v3": "data/runs/inception_v3.zarr", "ResNet-50": "data/runs/resnet50.zarr"})
    """
    return Board(runs, live=live, interval=interval)

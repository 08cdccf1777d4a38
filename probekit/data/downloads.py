"""Downloads that fail cleanly: one error naming the way out, and nothing left behind.

This module never imports torchvision, the zoo or the engine: it only watches
the folder a download writes to.
"""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["DatasetUnavailableError", "download_guard"]


class DatasetUnavailableError(RuntimeError):
    """A dataset could not be downloaded, or is not where ``root=`` says."""


@contextmanager
def download_guard(name: str, root: Path, owned: Sequence[str], download: bool) -> Iterator[None]:
    """Turn a failed download (or a missing local copy) into one clear error, and undo its traces.

    Everything the failed attempt created under ``root`` is removed: empty
    ``raw/`` folders, partial archives, and ``root`` itself if it was created.
    Only ``root``'s top level and the dataset's own folders (``owned``) are listed,
    so a large shared data folder is not walked.

    Example:
        >>> with download_guard("mnist", Path("~/data").expanduser(), ("MNIST",), download=True):
        ...     torchvision.datasets.MNIST("~/data", download=True)
    """
    created_from = _first_missing(root)
    before = _snapshot(root, owned)
    try:
        yield
    except (OSError, RuntimeError, EOFError, tarfile.TarError) as error:
        if created_from is not None:
            shutil.rmtree(created_from, ignore_errors=True)
        else:
            for path in sorted(_snapshot(root, owned) - before, key=lambda p: len(p.parts), reverse=True):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = f"{type(error).__name__}: {lines[-1][:200]}" if lines else type(error).__name__
        if download:
            message = (
                f"could not download the {name!r} dataset to {root} ({reason}); pass root= pointing at a folder that "
                f"already holds it (e.g. copied from a machine with network access), or use the embedded "
                f"probekit.data.digits(), which needs no download"
            )
        else:
            message = (
                f"the {name!r} dataset is not under {root} and download=False ({reason}); pass download=True, "
                f"root= pointing at a local copy, or use the embedded probekit.data.digits()"
            )
        raise DatasetUnavailableError(message) from error


def _first_missing(path: Path) -> Path | None:
    """The highest ancestor of ``path`` (or ``path`` itself) that does not exist yet."""
    missing = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _snapshot(root: Path, owned: Sequence[str]) -> set[Path]:
    if not root.is_dir():
        return set()
    paths = set(root.iterdir())
    for name in owned:
        if (root / name).is_dir():
            paths.update((root / name).rglob("*"))
    return paths

"""Checks of the paths a command names, made before any heavy import or loading (no torch here), so that a
wrong path is one line at once and not a traceback after minutes of work."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from moeq.errors import MoeqError


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    return p


def _probe(folder: Path, what: str, path: Path) -> None:
    """Create and remove a temporary directory in ``folder``: the only test root, read-only mounts and
    pseudo-filesystems (/proc) all answer truthfully."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".moeq-probe-", dir=folder))
    except OSError as e:
        raise MoeqError(f"{what} {path}: cannot write in {folder} ({e.strerror or e})") from None


def check_output_dir(path: str | os.PathLike, what: str = "output") -> None:
    """``path`` can become a new artifact directory: absent or an empty directory, under a writable directory
    (missing parents are created later; the nearest existing one must be a writable directory)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MoeqError(f"{what} {path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        raise MoeqError(f"{what} {path} already exists and is not empty; remove it or pick another")
    anc = _existing_ancestor(path.parent)
    if not anc.is_dir():
        raise MoeqError(f"{what} {path}: {anc} is not a directory")
    _probe(anc, what, path)


def check_output_file(path: str | os.PathLike | None, what: str = "--json") -> None:
    """A file to be written at the end of a run (``-`` is stdout): its directory exists and is writable."""
    if path is None or str(path) == "-":
        return
    path = Path(path)
    if path.is_dir():
        raise MoeqError(f"{what} {path}: is a directory")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise MoeqError(f"{what} {path}: no such directory {parent}" if not parent.exists()
                        else f"{what} {path}: {parent} is not a directory")
    _probe(parent, what, path)


def looks_local(spec: str) -> bool:
    """Whether a model spec names a local path (rather than a hub id ``org/name`` or a zoo name): it starts
    like a path, has other than exactly one slash, or its first component exists here (``out/x`` when ``out/``
    does)."""
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep + os.sep in spec:
        return True
    return "/" in spec and Path(spec).expanduser().parent.exists()


def check_local_spec(spec: str | None, what: str = "model") -> None:
    """A spec that names a local path must exist (``moeq eval out/typo`` says so, not "hub unreachable")."""
    if spec is None or ("/" not in spec and not spec.startswith((".", "~"))):
        return  # a zoo name (resolved later)
    if looks_local(spec) and not Path(spec).expanduser().exists():
        raise MoeqError(f"{what} {spec}: no such file or directory")


def check_input_file(path: str | os.PathLike | None, what: str) -> None:
    if path is not None and not Path(path).is_file():
        p = Path(path)
        raise MoeqError(f"{what} {p}: no such file" if not p.exists() else f"{what} {p}: not a file")



def check_artifact_dir(path: str | os.PathLike) -> None:
    p = Path(path)
    if not p.exists():
        raise MoeqError(f"{p}: no such artifact directory")
    if not p.is_dir():
        raise MoeqError(f"{p}: not a directory (an artifact is a directory)")

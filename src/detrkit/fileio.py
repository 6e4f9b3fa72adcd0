"""File writing that never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` (same directory).

    ``suffix`` ends the temporary name, for writers that pick a format from it (``.mp4``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def check_output(
    path: str | os.PathLike,
    *,
    option: str,
    kind: str = "file",
    inputs: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
    replaceable: Callable[[Path], bool] | None = None,
) -> Path:
    """Check an output path before any long work starts, so that a mistake costs nothing and
    destroys nothing. Raises :class:`~detrkit.errors.ConfigError` naming ``option`` when:

    - the output is one of ``inputs`` (or, for a folder, holds one of them);
    - a file is expected and a folder is there, or the reverse;
    - it already exists (a file, or a folder with something in it) and neither ``overwrite`` nor
      ``replaceable(path)`` allows replacing it;
    - the nearest existing folder is not writable.
    """
    from .errors import ConfigError

    out = Path(path).expanduser()
    resolved = out.resolve()
    for source in inputs:
        src = Path(source).expanduser().resolve()
        if src == resolved or (kind == "dir" and resolved in src.parents):
            raise ConfigError(f"{option} {out}: this is also an input ({source}); choose another output")
    if kind == "file" and out.is_dir():
        raise ConfigError(f"{option} {out}: is a folder; expected a file path")
    if kind == "dir" and out.exists() and not out.is_dir():
        raise ConfigError(f"{option} {out}: is a file; expected a folder")
    used = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if used and not overwrite and not (replaceable is not None and replaceable(out)):
        what = "exists" if kind == "file" else "exists and is not empty"
        raise ConfigError(f"{option} {out}: {what}; pass --overwrite to replace it")
    parent = resolved if kind == "dir" and out.is_dir() else resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {out}: cannot write in {parent} (permission denied)")
    return out

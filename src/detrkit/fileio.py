"""User files: reading them with errors that name the file and the reason (never a traceback, never
a hang on a pipe or an endless device), and writing that never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# The largest text file (annotations, configs, metrics) read whole: COCO's train2017 instances
# file, the largest in common use, is ~450 MB.
MAX_TEXT_BYTES = 2 * 1024**3


def read_text_file(
    path: str | os.PathLike,
    *,
    error: type[Exception] = ValueError,
    what: str = "file",
    max_bytes: int = MAX_TEXT_BYTES,
) -> str:
    """The text of the regular file ``path``: UTF-8, with or without a byte-order mark.

    Raises ``error`` naming the file and the reason when it is missing, a folder, not a regular
    file (a named pipe or a device would block or never end), larger than ``max_bytes``,
    unreadable, or not UTF-8 text."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{path}: is a folder; expected {_article(what)} {what}")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: not a regular file; expected {_article(what)} {what}")
    if info.st_size > max_bytes:
        raise error(f"{path}: {info.st_size / 1e6:.0f} MB is too large for {_article(what)} {what}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(
            f"{path}: the {what} is not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r})"
        ) from None


def read_json_file(
    path: str | os.PathLike, *, error: type[Exception] = ValueError, what: str = "JSON file"
) -> Any:
    """The JSON value in ``path`` (see :func:`read_text_file`); ``error`` names the file and where
    the JSON breaks."""
    text = read_text_file(path, error=error, what=what)
    try:
        return json.loads(text)
    except ValueError as e:
        raise error(f"{Path(path)}: not valid JSON ({e})") from None


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


def _article(noun: str) -> str:
    """'a' or 'an' before ``noun`` (for the messages above)."""
    return "an" if noun[:1].lower() in "aeiou" else "a"

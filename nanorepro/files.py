"""Files written whole or not at all, optional JSON records, hashes, the checkout's root: one home each (torch-free)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from nanorepro.errors import UserError


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(f) on a temp file in the same folder, fsync, then rename, so readers never see half
    a file and a crash leaves the old one. The file is world-readable like any other (mkstemp's is not)."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """write_atomic for text (UTF-8)."""
    write_atomic(path, lambda f: f.write(text.encode()))


def load_json(path: Path, what: str, fix: str) -> Any:
    """A JSON file's content; a UserError naming the file (`what` it is) and the fix when it cannot be read."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what} {path}: {e}", fix) from e


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or not JSON (for records a reader can do without)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def project_root() -> Path:
    """The repo root (pyproject.toml and nanorepro/) at or above the working folder, else the working folder."""
    here = Path.cwd().resolve()
    roots = (f for f in (here, *here.parents) if (f / "pyproject.toml").exists() and (f / "nanorepro").is_dir())
    return next(roots, here)

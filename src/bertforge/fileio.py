"""Atomic writes, checksums and the manifest.json every stage leaves in its output directory.

A killed run must never leave a file that looks finished, so every output is written to a
temporary name beside its target and renamed into place (`os.replace` is atomic on POSIX).
The manifest is written last: a directory with a manifest is complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from bertforge import __version__
from bertforge.errors import UserError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
RUN_FILE = ".bertforge-run.json"  # an unfinished run's settings (resumable stages)
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside path; on clean exit fsync and rename it over path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are ordinary files
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if e.errno == errno.ENOSPC:
            raise UserError(
                f"{target.parent}: no space left on the device while writing {target.name}; "
                "free some space and run the same command again (finished files are kept)."
            ) from None
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions(names: Sequence[str] = ("tokenizers", "sentencepiece", "numpy")) -> dict:
    """Versions of bertforge, Python and the libraries that shape the outputs."""
    out = {"bertforge": __version__, "python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_manifest(
    directory: str | Path,
    stage: str,
    config: Mapping[str, Any],
    *,
    inputs: Sequence[Mapping[str, Any]] = (),
    counts: Mapping[str, Any] | None = None,
    outputs: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
    libraries: Sequence[str] = ("tokenizers", "sentencepiece", "numpy"),
) -> dict[str, Any]:
    """Write DIR/manifest.json: config, versions, inputs, counts and sha256 of each output."""
    d = Path(directory)
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "stage": stage,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "versions": library_versions(libraries),
        "config": dict(config),
        "inputs": list(inputs),
        "counts": dict(counts or {}),
        "outputs": {name: {"sha256": sha256_file(d / name), "bytes": (d / name).stat().st_size}
                    for name in outputs},
    }  # fmt: skip
    manifest.update(extra or {})
    write_json(d / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | Path, stage: str | None = None) -> dict[str, Any] | None:
    """The manifest of a directory, or None when it has none; checks the stage when given."""
    p = Path(directory) / MANIFEST
    if not p.is_file():
        return None
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: damaged manifest ({e}); rerun the stage that wrote it.") from None
    if stage is not None and manifest.get("stage") != stage:
        raise UserError(
            f"{p}: this directory is a `bertforge {manifest.get('stage')}` output; give the "
            f"directory `bertforge {stage}` wrote."
        )
    return manifest


def prepare_output_dir(directory: str | Path, stage: str, overwrite: bool, flag: str) -> Path:
    """Create the output dir; refuse one that holds something other than this stage's output."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise UserError(f"{flag}: {d} is a file; give a directory.")
    if d.is_dir() and any(d.iterdir()) and not overwrite:
        owners = set()
        for marker in (d / MANIFEST, d / RUN_FILE):
            if marker.is_file():
                with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError, OSError):
                    owners.add(json.loads(marker.read_text(encoding="utf-8")).get("stage"))
        if stage not in owners:
            raise UserError(
                f"{flag}: {d} is not empty and is not a bertforge {stage} output; "
                "choose another directory or pass --overwrite."
            )
    d.mkdir(parents=True, exist_ok=True)
    return d

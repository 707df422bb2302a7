"""Atomic writes, checksums and the manifest.json every stage leaves in its output directory.

A killed run must never leave a file that looks finished, so every output is written to a
temporary name beside its target and renamed into place (`os.replace` is atomic on POSIX).
The manifest is written last: a directory with a manifest is complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO, Any, TypeVar, cast

from bertforge import __version__
from bertforge.errors import UserError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
RUN_FILE = ".bertforge-run.json"  # an unfinished run's settings (resumable stages)
LOCK = ".bertforge.lock"  # held while a stage writes into its directory
RUN_STATE = "run.json"  # a `bertforge run` directory's record of its stages
F = TypeVar("F", bound=Callable[..., Any])
_UMASK = os.umask(0)
os.umask(_UMASK)


_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space, or over quota: the same remedy
_FREE_SPACE = "free some space and run the same command again (finished files are kept)"
_PERMISSIONS = "check its permissions and its directory's, or choose another path"
_ADVICE = {
    errno.ENOSPC: _FREE_SPACE,
    errno.EDQUOT: _FREE_SPACE,
    errno.EROFS: "write the output to a writable file system",
    errno.EACCES: _PERMISSIONS,
    errno.EPERM: _PERMISSIONS,
    # mkdir of a path through a file: "file exists" (EEXIST) or "not a directory" (ENOTDIR)
    errno.EEXIST: "a file is where a directory is needed; choose another path",
    errno.ENOTDIR: "a file is where a directory is needed; choose another path",
}


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside path; on clean exit fsync and rename it over path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:  # read-only, no permission: about the directory, not our temp name
        raise OSError(e.errno, e.strerror, str(target.parent)) from None
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
        if e.errno in _FULL:
            raise UserError(
                f"{target.parent}: no space left on the device while writing {target.name}; "
                f"{_FREE_SPACE}."
            ) from None
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def os_error_message(e: OSError) -> str:
    """One line for a file system error that reached the command line: which path, what
    happened, what to do."""
    path = e.filename2 if e.errno in _FULL and e.filename2 else e.filename
    what = (e.strerror or str(e)).lower()
    advice = _ADVICE.get(e.errno or 0)
    return f"{path if path is not None else 'a file'}: {what}" + (f"; {advice}." if advice else ".")


def copy_file(source: str | Path, target: str | Path) -> None:
    """Copy a file atomically: a crash or a full disk never leaves a partial copy at target."""
    with atomic_open(target) as f, open(source, "rb") as src:
        shutil.copyfileobj(src, f, 1 << 22)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (none if absent), skipping a line a crash or a full
    disk cut short."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
    return records


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def size_text(n: float) -> str:
    """Bytes for a message: 18.4 MB, 1.3 GB."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


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
    d = Path(directory)  # `output_lock` has refused a file of that name
    if d.is_dir() and holds_files(d):
        stages = output_stages(d)
        refuse_other_stage(d, stage, flag, stages)
        if not overwrite and stage not in stages:
            raise UserError(
                f"{flag}: {d} is not empty and is not a bertforge {stage} output; "
                "choose another directory or pass --overwrite."
            )
    d.mkdir(parents=True, exist_ok=True)
    return d


def edited_outputs(
    directory: Path, names: Sequence[str] | None = None, manifest: dict[str, Any] | None = None
) -> list[Path]:
    """The outputs its manifest records (of `names`, when given) that are not the files the
    stage wrote: their size or sha256 differs, edited or replaced by hand since (a vocab.txt's
    [unused] slots are meant to be; a model fine-tuned and saved there). `manifest`: the
    directory's, when read already."""
    manifest = read_manifest(directory) if manifest is None else manifest
    outputs = (manifest or {}).get("outputs")
    if not isinstance(outputs, dict):
        return []
    changed = []
    for name in outputs if names is None else names:
        made, path = outputs.get(name), directory / name
        if not isinstance(made, dict) or "sha256" not in made or not path.is_file():
            continue  # not recorded, or gone: a stage writes it again
        size = path.stat().st_size  # (an older manifest may not record it: the sha256 tells)
        if made.get("bytes", size) != size or sha256_file(path) != made["sha256"]:
            changed.append(path)
    return changed


def refuse_other_stage(d: Path, stage: str, flag: str, stages: set[str] | None = None) -> None:
    """Refuse, --overwrite or not, a directory that holds another stage's output: writing
    there would replace its manifest.json (`train --output DATA --overwrite` made the data
    unreadable), and it is often the very input this stage reads. `stages`: the directory's
    `output_stages`, when known."""
    others = sorted((output_stages(d) if stages is None else stages) - {stage})
    if others:
        article = "an" if stage[0] in "aeiou" else "a"
        raise UserError(
            f"{flag}: {d} holds a bertforge {' and '.join(others)} output, which {article} "
            f"{stage} output written there would damage; choose another directory (--overwrite "
            f"replaces only an earlier {stage} output)."
        )


def begin_output(directory: Path, stage: str) -> None:
    """Before a stage that redoes its whole output writes into `directory`: drop the manifest
    (the directory is complete only once it is rewritten) and the temporaries a killed run
    left, and mark the directory as this stage's unfinished output, so that the rerun after a
    crash or a full disk is not refused as a foreign directory. `finish_output` at the end."""
    (directory / MANIFEST).unlink(missing_ok=True)
    for tmp in directory.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    write_json(directory / RUN_FILE, {"stage": stage})


def finish_output(directory: Path) -> None:
    """The manifest is written: the directory is complete."""
    (directory / RUN_FILE).unlink(missing_ok=True)


def _json_file(path: Path, names: Collection[str]) -> Any:
    """The JSON in `path` when its name is among `names` (the directory's files) and it
    parses, else None."""
    if path.name not in names:
        return None
    with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError, OSError):
        return json.loads(path.read_text(encoding="utf-8"))
    return None


def output_stages(directory: Path, names: Collection[str] | None = None) -> set[str]:
    """The stages whose output a directory holds, by its manifest.json and its unfinished
    run's file (both name their stage). `names`: the directory's files, when known."""
    names = os.listdir(directory) if names is None else names
    found = [_json_file(directory / marker, names) for marker in (MANIFEST, RUN_FILE)]
    return {f["stage"] for f in found if isinstance(f, dict) and isinstance(f.get("stage"), str)}


def is_output_dir(directory: Path, names: Collection[str]) -> bool:
    """Whether a directory holding the files `names` is bertforge's: a stage at work (its
    lock), a stage's output (`output_stages`) or a `bertforge run` directory (run.json, a
    record per stage)."""
    if LOCK in names or output_stages(directory, names):
        return True
    state = _json_file(directory / RUN_STATE, names)
    records = state.values() if isinstance(state, dict) else ()
    return bool(records) and all(isinstance(r, dict) and "config" in r for r in records)


def holds_files(directory: Path) -> bool:
    """Whether a directory holds anything besides a lock file."""
    return any(p.name != LOCK for p in directory.iterdir())


@contextlib.contextmanager
def output_lock(directory: str | Path, stage: str, flag: str) -> Iterator[Path]:
    """Hold DIRECTORY/.bertforge.lock while a stage writes there (creating the directory).

    A second bertforge writing into the same directory (a job started twice, a second
    terminal) is refused, naming the first, instead of the two deleting or mixing each
    other's files. The lock is the kernel's (flock, which Linux's NFS client maps to NFS
    locks): it goes with its process, even on kill -9, so no stale lock ever blocks a rerun.
    The file is removed on the way out. On a file system without locks, runs go unguarded,
    with a warning."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise UserError(f"{flag}: {d} is a file; give a directory.")
    created = not d.exists()
    d.mkdir(parents=True, exist_ok=True)
    path = d / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 500, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise UserError(
                f"{flag}: {d} is being written by another bertforge ({holder or 'starting'}); "
                "wait for it to finish or stop it, or choose another directory."
            ) from None
        except OSError as e:  # no locks on this file system (ENOLCK, EOPNOTSUPP)
            print(
                f"bertforge: warning: cannot lock {d} ({e.strerror}); go on, but a second "
                "bertforge writing there at the same time would not be stopped.",
                file=sys.stderr,
            )
            break
        try:  # the holder before us may have removed the file: then lock the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        since = datetime.now().astimezone().isoformat(timespec="seconds")
        holder = f"{stage}, pid {os.getpid()} on {socket.gethostname()}, since {since}\n"
        with contextlib.suppress(OSError):  # only for the message of a refused second run
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.encode(), 0)
        yield d
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held: the next holder checks it locked this file
            if created:  # refused before writing anything: leave no empty directory (nor one
                # holding only the mark of a run begun, with nothing of it to resume)
                if [p.name for p in d.iterdir()] == [RUN_FILE]:
                    (d / RUN_FILE).unlink()
                d.rmdir()
        os.close(fd)


def locked_output(stage: str) -> Callable[[F], F]:
    """Decorate a stage function of a config with an `output` directory: it runs holding
    `output_lock` on that directory."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def locked(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            with output_lock(cfg.output, stage, "--output"):
                return fn(cfg, *args, **kwargs)

        return cast(F, locked)

    return wrap

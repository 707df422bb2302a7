"""File-system failures reach the user as one line naming the path and what to do."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bertforge import fileio
from bertforge.cli import main
from bertforge.errors import UserError
from bertforge.fileio import (
    LOCK,
    atomic_open,
    copy_file,
    os_error_message,
    output_lock,
    read_jsonl,
)
from tests.conftest import FullDisk


def test_os_errors_name_the_path_and_what_to_do():
    full = OSError(errno.ENOSPC, "No space left on device", "/data/in.txt", None, "/out/x")
    assert os_error_message(full) == (
        "/out/x: no space left on device; free some space and run the same command again "
        "(finished files are kept)."
    )  # a copy names its target, the file that did not fit
    assert os_error_message(OSError(errno.EROFS, "Read-only file system", "/ro/v")) == (
        "/ro/v: read-only file system; write the output to a writable file system."
    )
    assert os_error_message(PermissionError(errno.EACCES, "Permission denied", "/x")) == (
        "/x: permission denied; check its permissions and its directory's, or choose another path."
    )
    assert os_error_message(OSError(errno.ENOTDIR, "Not a directory", "/a/b")) == (
        "/a/b: not a directory; a file is where a directory is needed; choose another path."
    )
    assert os_error_message(FileExistsError(errno.EEXIST, "File exists", "/a")) == (
        "/a: file exists; a file is where a directory is needed; choose another path."
    )  # mkdir -p through a file


def test_the_command_line_prints_one_line_not_a_traceback(tmp_path, mixed_corpus, capsys):
    out = "/dev/null/vocab"  # a path no one can create, root included
    assert main(["vocab", "--input", str(mixed_corpus), "--output", out]) == 1
    assert capsys.readouterr().err == (
        f"bertforge: error: {out}: not a directory; a file is where a directory is needed; "
        "choose another path.\n"
    )


def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target, source = tmp_path / "t.bin", tmp_path / "s.bin"
    target.write_bytes(b"old")
    source.write_bytes(bytes(range(256)) * 100)
    disk = FullDisk(monkeypatch, 1000)
    with pytest.raises(UserError, match=f"{tmp_path}: no space left .* writing t.bin"):
        copy_file(source, target)
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [source, target]
    disk.room = None
    copy_file(source, target)
    assert target.read_bytes() == source.read_bytes()


def test_a_temporary_that_cannot_be_made_is_reported_as_its_directory(tmp_path, monkeypatch):
    def refuse(prefix: str, suffix: str, dir: Path) -> tuple[int, str]:
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}k2j4{suffix}")

    monkeypatch.setattr(fileio.tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError) as caught, atomic_open(tmp_path / "x.txt", "w"):
        pass
    assert caught.value.filename == str(tmp_path)  # not the temporary's name


def test_torn_lines_of_a_json_lines_file_are_skipped(tmp_path):
    path = tmp_path / "m.jsonl"
    assert read_jsonl(path) == []
    path.write_text('{"step": 1}\n\n[1, 2]\n{"step": 2, "lo\n{"step": 3}{"step": 4, "x"\n')
    assert read_jsonl(path) == [{"step": 1}]


def test_a_closed_pipe_ends_the_command_quietly(train_data: Path):
    """`bertforge data inspect DIR | head` exits as a command killed by SIGPIPE would."""
    proc = subprocess.run(
        f"{sys.executable} -m bertforge.cli data inspect {train_data} -n 200 | head -n 1; "
        "exit ${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
    )
    assert proc.stdout == "instance 0:\n" and proc.stderr == ""
    assert proc.returncode == 141


def test_a_second_writer_of_a_directory_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "out"
    with output_lock(out, "train", "--output"):
        assert (out / LOCK).read_text().startswith(f"train, pid {os.getpid()} on ")
        first = rf"\(train, pid {os.getpid()} on .*\)"
        refused = rf"--output: {out} is being written by another bertforge {first}; wait for it"
        with pytest.raises(UserError, match=refused), output_lock(out, "data", "--output"):
            pass
        (out / "result.txt").write_text("kept")
    assert sorted(p.name for p in out.iterdir()) == ["result.txt"]  # the lock file is gone
    with output_lock(out, "data", "--output"):
        pass
    with pytest.raises(UserError, match="no input"), output_lock(tmp_path / "new", "x", "--o"):
        raise UserError("no input")
    assert not (tmp_path / "new").exists()  # refused before writing: no empty directory left


def test_a_killed_holder_never_blocks_the_rerun(tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys, time; from bertforge.fileio import output_lock\n"
        f"with output_lock({str(out)!r}, 'data', '--output'):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    refused = f"another bertforge \\(data, pid {proc.pid} "
    with pytest.raises(UserError, match=refused), output_lock(out, "data", "--output"):
        pass
    proc.kill()
    proc.wait()
    proc.stdout.close()
    assert (out / LOCK).exists()  # kill -9 leaves the file, but not the lock
    with output_lock(out, "data", "--output"):
        pass


def test_a_file_system_without_locks_goes_on_with_a_warning(tmp_path, monkeypatch, capsys):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fileio.fcntl, "flock", no_locks)
    out = tmp_path / "out"
    with output_lock(out, "vocab", "--output"):
        (out / "vocab.txt").write_text("[PAD]\n")
    err = capsys.readouterr().err
    assert f"bertforge: warning: cannot lock {out} (No locks available); go on" in err
    assert sorted(p.name for p in out.iterdir()) == ["vocab.txt"]

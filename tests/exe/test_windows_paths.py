"""The Windows code paths, run here: job objects through a recording fake of the Win32 calls, and the decisions
that depend on ``os.name``/``sys.platform`` (monkeypatched), without a Windows machine."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from thalunix.qemu import process, winjob


class FakeJobs:
    """Records what Thalunix asks of kernel32, and can refuse like Windows does."""

    def __init__(self, refuse_assign: bool = False) -> None:
        self.calls: list[tuple] = []
        self.refuse_assign = refuse_assign
        self.next_handle = 100

    def create_job(self) -> int:
        self.next_handle += 1
        self.calls.append(("create", self.next_handle))
        return self.next_handle

    def set_limits(self, job: int, info: winjob.ExtendedLimitInformation) -> None:
        self.calls.append(("limits", job, info.BasicLimitInformation.LimitFlags))

    def assign(self, job: int, process_handle: int) -> None:
        if self.refuse_assign:
            raise OSError(5, "AssignProcessToJobObject failed")
        self.calls.append(("assign", job, process_handle))

    def open_process(self, pid: int) -> int:
        self.calls.append(("open", pid))
        return 7000 + pid

    def close(self, handle: int) -> None:
        self.calls.append(("close", handle))


KILL = winjob.JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
BREAKAWAY = winjob.JOB_OBJECT_LIMIT_BREAKAWAY_OK


def test_structure_layout_matches_win64() -> None:
    # JOBOBJECT_EXTENDED_LIMIT_INFORMATION is 144 bytes on x64; LimitFlags sits at offset 16.
    assert ctypes.sizeof(winjob.ExtendedLimitInformation) == 144
    assert winjob.BasicLimitInformation.LimitFlags.offset == 16
    assert winjob.limit_information(True).BasicLimitInformation.LimitFlags == KILL | BREAKAWAY
    assert winjob.limit_information(False).BasicLimitInformation.LimitFlags == BREAKAWAY


def test_only_windows_gets_a_job() -> None:
    assert isinstance(winjob.make_job("posix"), winjob.NoJob)
    job = winjob.make_job("nt", api=FakeJobs())
    assert isinstance(job, winjob.KillOnCloseJob) and job.kill_on_close


def test_adopt_creates_one_kill_on_close_job_and_assigns_each_qemu() -> None:
    fake = FakeJobs()
    job = winjob.KillOnCloseJob(fake)

    class Popen:   # what subprocess.Popen has on Windows: the process handle it already holds
        def __init__(self, pid: int, handle: int) -> None:
            self.pid, self._handle = pid, handle

    assert job.adopt(Popen(41, 5041)) and job.adopt(Popen(42, 5042))
    assert fake.calls == [("create", 101), ("limits", 101, KILL | BREAKAWAY), ("assign", 101, 5041),
                          ("assign", 101, 5042)]
    assert job.adopted == [41, 42]


def test_adopt_by_pid_opens_and_closes_its_own_handle() -> None:
    fake = FakeJobs()
    job = winjob.KillOnCloseJob(fake)
    assert job.adopt(43)
    assert fake.calls[-3:] == [("open", 43), ("assign", 101, 7043), ("close", 7043)]


def test_leave_running_clears_kill_on_close_and_stop_with_us_sets_it_again() -> None:
    fake = FakeJobs()
    job = winjob.KillOnCloseJob(fake)
    job.leave_running()                 # before any VM: no job yet, the choice is remembered
    assert fake.calls == [] and not job.kill_on_close
    job.adopt(44)
    assert ("limits", 101, BREAKAWAY) in fake.calls   # a VM started after the choice is not killed either
    job.stop_with_us()
    assert fake.calls[-1] == ("limits", 101, KILL | BREAKAWAY)
    job.leave_running()
    assert fake.calls[-1] == ("limits", 101, BREAKAWAY)


def test_a_refused_assignment_is_reported_not_raised() -> None:
    job = winjob.KillOnCloseJob(FakeJobs(refuse_assign=True))
    assert job.adopt(45) is False and job.adopted == []


@pytest.mark.skipif(os.name == "nt", reason="plays Windows on POSIX; on Windows the real job is used")
def test_spawn_adopts_on_windows_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """process.spawn puts QEMU into the job when os.name is nt (Popen's Windows-only flags are faked away)."""
    adopted: list[int] = []

    class Recorder(winjob.NoJob):
        def adopt(self, proc: object) -> bool:
            adopted.append(proc.pid)  # type: ignore[attr-defined]
            return True

    monkeypatch.setattr(winjob, "_default", Recorder())
    started: list[dict] = []
    real_popen = subprocess.Popen

    def popen(argv: list[str], **kwargs: object) -> subprocess.Popen:
        started.append(dict(kwargs))
        kwargs.pop("creationflags", None)
        return real_popen(argv, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200, raising=False)
    monkeypatch.setattr(subprocess, "CREATE_NO_WINDOW", 0x08000000, raising=False)
    with open(tmp_path / "log", "wb") as log:
        monkeypatch.setattr(process.os, "name", "nt")
        proc = process.spawn([sys.executable, "-c", "pass"], cwd=tmp_path, log=log)
        monkeypatch.setattr(process.os, "name", "posix")
        proc.wait(10)
        assert adopted == [proc.pid]
        assert started[-1]["creationflags"] == 0x200 | 0x08000000 and "start_new_session" not in started[-1]
        proc = process.spawn([sys.executable, "-c", "pass"], cwd=tmp_path, log=log)
        proc.wait(10)
    assert len(adopted) == 1 and started[-1]["start_new_session"] is True   # the POSIX spawn adopted nothing


def test_engine_close_leaves_vms_running_only_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from thalunix.engine import DirectEngine
    fake = FakeJobs()
    job = winjob.KillOnCloseJob(fake)
    monkeypatch.setattr(winjob, "_default", job)
    DirectEngine.open(tmp_path / "a").close(stop_vms=True)
    assert job.kill_on_close
    DirectEngine.open(tmp_path / "b").close(stop_vms=False)
    assert not job.kill_on_close


def test_frozen_data_folder_is_beside_the_exe_on_windows_paths(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    from thalunix import store
    exe = tmp_path / "E" / "Thalunix" / "thalunix.exe"
    exe.parent.mkdir(parents=True)
    exe.write_bytes(b"MZ")
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(exe))
    monkeypatch.delenv("THALUNIX_DATA", raising=False)
    assert store.default_data_dir() == exe.parent / "thalunix-data"


def test_portable_environment_on_windows_names(tmp_path: Path) -> None:
    """TEMP/TMP (what Windows programs read) and TMPDIR point into the data folder; the bootloader's library
    path is given back to children."""
    import tempfile

    from thalunix import bundle
    environ = {"TEMP": r"C:\Users\x\AppData\Local\Temp", "LD_LIBRARY_PATH": "/tmp/_MEI1",
               "LD_LIBRARY_PATH_ORIG": "/opt/lib", "GI_TYPELIB_PATH": "/tmp/_MEI1/gi_typelibs"}
    saved = tempfile.tempdir
    try:
        bundle.portable_environment(tmp_path / "tmp", environ)
        assert tempfile.gettempdir() == str(tmp_path / "tmp")
    finally:
        tempfile.tempdir = saved
    assert environ == {"TEMP": str(tmp_path / "tmp"), "TMP": str(tmp_path / "tmp"), "TMPDIR": str(tmp_path / "tmp"),
                       "LD_LIBRARY_PATH": "/opt/lib", "PYINSTALLER_RESET_ENVIRONMENT": "1"}

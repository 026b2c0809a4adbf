"""A training run's directory: held by one run at a time, never overwritten by mistake, never half-made.

What this module guarantees (the README's "Run directories" says the same to users):

* **A run directory is held by one run at a time.** The run takes an exclusive lock on
  ``RUN/.lock`` (``flock``) and holds it until it ends; the kernel drops the lock when the process
  ends however it ends (``kill -9`` included), so a crash leaves nothing to clean up. A second run
  on the same directory is refused in one line that names the holder (pid, host, start time).
  In a multi-host run process 0 takes the lock once, for all processes.
* **A new run appears whole.** It is built in a staging directory beside ``--out``
  (``.NAME.incomplete-XXXX``: tokenizer, token files, ``config.json``) and moved into place by one
  rename once its settings, data and tokenizer have all been checked. A run that fails before
  that (a missing corpus, a corpus too small for one batch, a bad model setting) leaves ``--out``
  exactly as it was. Staging directories left by a killed process are removed by the next run
  that stages beside them.
* **``--force`` replaces only a run**, never another directory, and only at that same moment:
  the old run is locked first (a run in use is not replaced), kept until the new one is ready, and
  deleted only after the new one has taken its place.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

from tfd_jax.train.config import TrainingError

try:
    import fcntl
except ImportError:  # not a POSIX system: runs are not locked
    fcntl = None

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"


class RunInUse(TrainingError):
    """Another process holds the run directory."""


def is_run(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a training run (its ``config.json`` marks it)."""
    return (Path(path) / CONFIG_FILE).is_file()


class RunLock:
    """An exclusive lock on ``DIRECTORY/.lock``, held until :meth:`release` or the end of the process."""

    def __init__(self, fd: int | None, directory: Path):
        self._fd, self.directory = fd, directory

    @classmethod
    def acquire(cls, directory: str | os.PathLike) -> "RunLock":
        """Take the lock, or raise :class:`RunInUse` naming the process that holds it."""
        directory = Path(directory)
        path = directory / LOCK_FILE
        if fcntl is None:
            return cls(None, directory)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise TrainingError(
                f"cannot create the lock file {path} ({e.strerror}); a run directory must be writable to train in it"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _describe_holder(fd)
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunInUse(
                    f"{directory} is in use by another run ({holder}); a run directory is trained by one "
                    "process at a time: wait for that run to end (or stop it), or choose another --out"
                ) from None
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return cls(fd, directory)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:  # a full or read-only disk: the lock itself is still released below
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "a process that is still starting"


def plan(out: str | os.PathLike, *, resume: bool, force: bool) -> str:
    """What a run asked for with these flags may do with ``out``: ``"new"``, ``"replace"`` or ``"resume"``.

    Read-only; raises ``TrainingError`` with the reason and the way forward when it may do nothing.
    """
    out = Path(out)
    if resume and force:
        raise TrainingError("use either --resume (continue the run) or --force (replace it with a new one), not both")
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a directory; choose another --out")
    if resume:
        if not is_run(out):
            raise TrainingError(f"--resume: {out} holds no run to continue (no {CONFIG_FILE}); start one without --resume")
        return "resume"
    if is_run(out):
        if not force:
            raise TrainingError(
                f"{out} already holds a run; pass --resume to continue it, --force to replace it with a new run, "
                "or choose another --out"
            )
        return "replace"
    if out.exists() and any(out.iterdir()):
        names = sorted(p.name for p in out.iterdir())
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        refuse = " (--force replaces only a training run, never other files)" if force else ""
        raise TrainingError(f"{out} is not empty and holds no training run ({shown}){refuse}; choose another --out")
    return "new"


class NewRun:
    """A new run being made in a staging directory beside ``out``; :meth:`commit` moves it into place.

    ``replacing``: the lock of the run at ``out`` that the new one replaces (``--force``), or None.
    The staging directory holds its own lock from the start, so after the rename the new run is
    already locked.
    """

    def __init__(self, out: str | os.PathLike, replacing: RunLock | None = None):
        self.out = Path(out)
        self.replacing = replacing
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(self.out)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.incomplete-", dir=self.out.parent))
        except OSError as e:
            raise TrainingError(f"cannot create the run directory {self.out} ({e.strerror}); choose another --out") from None
        self.lock = RunLock.acquire(self.path)

    def commit(self) -> RunLock:
        """Put the new run in place (replacing the old one, if any); returns its lock, still held."""
        if self.replacing is not None:
            trash = self.out.parent / f".{self.out.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, trash)
            try:
                os.rename(self.path, self.out)
            except BaseException:
                os.rename(trash, self.out)
                raise
            self.replacing.release()
            shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                os.rename(self.path, self.out)  # onto nothing, or onto an empty directory
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise TrainingError(
                        f"{self.out} was filled by another process while this run was being prepared; choose another --out"
                    ) from None
                raise
        self.lock.directory = self.out
        return self.lock

    def discard(self) -> None:
        """Remove the staging directory (the run at ``out``, if any, is left as it was)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.lock.release()
        if self.replacing is not None:
            self.replacing.release()


def remove_stale_staging(out: Path) -> None:
    """Delete staging and replaced directories of ``out`` that no live process holds."""
    for pattern in (f".{out.name}.incomplete-*", f".{out.name}.replaced-*"):
        for path in out.parent.glob(pattern):
            if not path.is_dir():
                continue
            try:
                lock = RunLock.acquire(path)
            except TrainingError:  # in use (another run is being prepared), or not writable
                continue
            shutil.rmtree(path, ignore_errors=True)
            lock.release()

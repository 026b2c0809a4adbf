"""Faults from outside the program (a full disk, a read-only directory, no permission), in words.

Such an error can surface far from where it happened: as an ``OSError`` from Python, or as the text
of an error raised by a library that wrote the file (orbax's background saves, TensorStore), often
wrapped in other exceptions. :func:`system_fault` looks through the whole chain and says in a few
words what happened and where; the command line and the training loop add what is safe and what to
do next. :func:`silence_orbax_aftermath` keeps the hundreds of follow-on lines that such a failure
inside a checkpoint save or restore leaves behind from burying that one line.
"""
from __future__ import annotations

import errno
import logging
import sys
import warnings

#: errno -> what happened, in words
_ERRNO = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file grew past the size limit",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EIO: "an input/output error (a failing disk or network file system)",
}
#: the same faults as other libraries spell them in their messages
_TEXT = {
    "no space left on device": errno.ENOSPC,
    "disk quota exceeded": errno.EDQUOT,
    "file too large": errno.EFBIG,
    "read-only file system": errno.EROFS,
    "permission denied": errno.EACCES,
}


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def system_fault(e: BaseException) -> str | None:
    """``"the disk is full (writing /path/file)"`` if ``e`` or its causes are such a fault, else None."""
    for link in _chain(e):
        if isinstance(link, OSError) and link.errno in _ERRNO:
            where = f" (at {link.filename})" if link.filename else ""
            return _ERRNO[link.errno] + where
    for link in _chain(e):
        text = str(link).lower()
        for needle, code in _TEXT.items():
            if needle in text:
                return _ERRNO[code]
    return None


#: how orbax words a tensor it could not read from a checkpoint
FAILED_READ = "Encountered error while reading array"


class _DropAbandonedTasks(logging.Filter):
    """asyncio's "exception was never retrieved" for orbax's TensorStore reads and writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (FAILED_READ in msg or ("never retrieved" in msg and ("OCDBT" in msg or "TensorStore" in msg)))


def silence_orbax_aftermath() -> None:
    """When a save or restore fails (a damaged checkpoint, a full disk), orbax's other read and
    write tasks are left behind: when they finish or are collected, later and in other threads,
    TensorStore and asyncio print each one's traceback ("Event loop is closed", the failed read
    with its TensorStore spec), hundreds of lines. The failure itself is reported in one line by
    this package, so these follow-on reports are dropped; every other error still prints."""
    if getattr(sys.unraisablehook, "_tfd_jax", False):
        return
    previous = sys.unraisablehook

    def unraisable_hook(unraisable):
        text = str(unraisable.exc_value)
        if not (FAILED_READ in text or (unraisable.exc_type is RuntimeError and text == "Event loop is closed")):
            previous(unraisable)

    unraisable_hook._tfd_jax = True
    sys.unraisablehook = unraisable_hook
    logging.getLogger("asyncio").addFilter(_DropAbandonedTasks())
    warnings.filterwarnings("ignore", message="coroutine '.*' was never awaited", category=RuntimeWarning)

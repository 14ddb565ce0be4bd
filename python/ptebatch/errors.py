"""The package's own exceptions.

Every error ptebatch raises is a ``ValueError`` or ``TypeError`` for a bad argument, or one of
these, all subclasses of :class:`PtebatchError`. A failed call leaves the simulation as it was.
"""

from __future__ import annotations


class PtebatchError(Exception):
    """Base class of ptebatch's own errors."""


class InvariantError(PtebatchError):
    """A kernel invariant does not hold; ``rule`` names it (e.g. ``"page-mapcount"``)."""

    def __init__(self, message: str, rule: str = "unknown") -> None:
        super().__init__(message)
        self.rule = rule

    def __reduce__(self):  # keeps ``rule`` through pickling (multiprocessing, Dask)
        return (type(self), (str(self), self.rule))


class SnapshotError(PtebatchError):
    """A snapshot file is corrupt, truncated, of another version, or not a snapshot."""


class CaptureError(PtebatchError):
    """Page tables could not be captured from /proc (no permission, no such process, or the
    process changed or exited while it was read)."""


class OutOfMemoryError(PtebatchError, MemoryError):
    """Memory ran out: the simulated machine's (``host`` is False: the kernel would fail the
    fault or fork with -ENOMEM), or the host's, which could not hold what the model needs
    (``host`` is True). Also a ``MemoryError``."""

    def __init__(self, message: str, host: bool = False) -> None:
        super().__init__(message)
        self.host = host

    def __reduce__(self):
        return (type(self), (str(self), self.host))


class AccessFault(PtebatchError):
    """An access the simulated process may not make: it would get SIGSEGV, or wait for a
    userfaultfd monitor."""


__all__ = ["AccessFault", "CaptureError", "InvariantError", "OutOfMemoryError", "PtebatchError", "SnapshotError"]

"""The exception classes the simulation raises: the package's own (``ptebatch.errors``), the
same classes the compiled core raises."""

from __future__ import annotations

from ptebatch.errors import AccessFault, InvariantError, OutOfMemoryError, PtebatchError

__all__ = ["AccessFault", "InvariantError", "OutOfMemoryError", "PtebatchError"]


def value_error(message: str) -> ValueError:
    return ValueError(message)


def out_of_memory(message: str = "out of memory: no free page for the allocation") -> Exception:
    return OutOfMemoryError(message)


def fault(message: str) -> Exception:
    return AccessFault(message)


def broken(rule: str, message: str) -> Exception:
    """An InvariantError "rule: message" with ``.rule`` set."""
    return InvariantError(f"{rule}: {message}", rule)

"""The exception classes the simulation raises, shared with the compiled core when it has them."""

from __future__ import annotations

try:
    from ptebatch import _core
except ImportError:  # pragma: no cover - the reference must work without the compiled core
    _core = None


def _exception(name: str, base: type) -> type:
    """``ptebatch._core.<name>`` if the compiled core defines it, else a stand-in class."""
    cls = getattr(_core, name, None)
    if cls is None:
        cls = type(name, (base,), {"__module__": "ptebatch.reference.sim"})
    return cls


PtebatchError = _exception("PtebatchError", Exception)
#: The simulated machine ran out of memory (Rust ErrorKind::OutOfMemory).
OutOfMemoryError = _exception("OutOfMemoryError", PtebatchError)
#: The access would kill or block the process (Rust ErrorKind::Fault).
AccessFault = _exception("AccessFault", PtebatchError)
#: A kernel invariant does not hold (Rust ErrorKind::Invariant); ``.rule`` names it.
InvariantError = _exception("InvariantError", PtebatchError)


def value_error(message: str) -> ValueError:
    return ValueError(message)


def out_of_memory(message: str = "out of memory: no free page for the allocation") -> Exception:
    return OutOfMemoryError(message)


def fault(message: str) -> Exception:
    return AccessFault(message)


def broken(rule: str, message: str) -> Exception:
    """An InvariantError "rule: message" with ``.rule`` set."""
    e = InvariantError(f"{rule}: {message}")
    e.rule = rule
    return e

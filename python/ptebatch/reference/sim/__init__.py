"""The pure-Python twin of the Rust simulation (rust/src/sim.rs and its modules).

Same calls, same results: the same pfns chosen, the same PTE values bit for bit, the same
tokens, counters and errors. Written for reading; each function models one kernel function
and says which. Modules mirror the Rust ones: :mod:`.memory` (pages and the buddy allocator),
:mod:`.rmap`, :mod:`.mm`, :mod:`.fault`, :mod:`.fork`, :mod:`.zap`, :mod:`.mprotect`,
:mod:`.procfs`, :mod:`.check`, :mod:`.stats`, :mod:`.kernel`; :mod:`.simulation` holds the
public :class:`Simulation`.
"""

from .errors import AccessFault, InvariantError, OutOfMemoryError
from .kernel import KernelProfile
from .simulation import Simulation

__all__ = ["Simulation", "KernelProfile", "OutOfMemoryError", "AccessFault", "InvariantError"]

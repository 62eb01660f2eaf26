"""Walking a stack of strategy wrappers (``Compressed(ClientLevelDP(FedAdam(...)))``).

Flower's DP wrappers and ours keep the wrapped strategy in a ``strategy`` attribute. These two
helpers are the one way the library and the apps look through such a stack.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def wrapper_chain(strategy: Any) -> Iterator[Any]:
    """Yield ``strategy``, then each strategy it wraps, outermost first.

    Only the instance attribute ``strategy`` is followed (``vars``), so a wrapper that forwards
    missing attributes with ``__getattr__`` (``Compressed``) does not loop.
    """
    seen: set[int] = set()
    while strategy is not None and id(strategy) not in seen:
        seen.add(id(strategy))
        yield strategy
        strategy = vars(strategy).get("strategy") if hasattr(strategy, "__dict__") else None


def innermost(strategy: Any) -> Any:
    """The strategy at the bottom of a wrapper stack (the one that holds e.g. FedAdam state)."""
    *_, last = wrapper_chain(strategy)
    return last


def find_in_chain(strategy: Any, predicate) -> Any | None:
    """The outermost strategy in the stack for which ``predicate(s)`` is true, else ``None``."""
    return next((s for s in wrapper_chain(strategy) if predicate(s)), None)

"""Values computed once per live object: the training loop reads the same sample arrays every epoch.

``ObjectMemo.get(owner, key, compute)`` returns ``compute()`` the first time it is asked about ``owner`` (an
array, a tensor, ...) and ``key``, and the stored value afterwards, for as long as that very object lives:
entries are keyed by ``id(owner)`` and checked against a weak reference, so an object created later at the
same address is never mistaken for it. Objects that take no weak reference are simply not memoised.
The samples are treated as immutable (nothing in the pipeline writes into them).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any


class ObjectMemo:
    """A bounded per-object memo (cleared when it holds ``max_items``); safe to share between threads."""

    def __init__(self, max_items: int = 200_000) -> None:
        self.max_items = max_items
        self._items: dict[tuple[int, Hashable], tuple[weakref.ref, Any]] = {}
        self._lock = threading.Lock()

    def get(self, owner: Any, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The value for (``owner``, ``key``), computed by ``compute`` when not known yet."""
        slot = (id(owner), key)
        hit = self._items.get(slot)
        if hit is not None and hit[0]() is owner:
            return hit[1]
        value = compute()
        try:
            ref = weakref.ref(owner)
        except TypeError:
            return value
        with self._lock:
            if len(self._items) >= self.max_items:
                self._items.clear()
            self._items[slot] = (ref, value)
        return value

"""Which item each labeller sees next: one shared queue, so two tabs or two people never rank the same item twice.

An item handed to a browser session is *leased* to it for a while: other sessions are
given the next free item instead, and the same session gets the same item back after
a page reload. Leases are only a courtesy that avoids double work; the guarantee of
one record per item is the store's, which refuses a second ranking of an item
(for instance after a lease ran out while a labeller was away).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from lmgym.label.items import LabelItem
from lmgym.label.store import RankingStore, ranking_record

__all__ = ["LabelQueue", "AlreadyRanked", "UnknownItem"]

MAX_SESSIONS = 1000
"""Sessions whose skips are remembered; the oldest is forgotten beyond this (bounds memory against junk ids)."""


class UnknownItem(KeyError):
    """The request names an item id this server does not serve."""


class AlreadyRanked(Exception):
    """The item was ranked already (by another tab, labeller or server process); nothing was written."""


class LabelQueue:
    """Hands out items to browser sessions and records their rankings in a :class:`RankingStore`.

    Args:
        items: the items to rank, in the order they are offered.
        store: where rankings go; items it already holds are skipped (resume).
        lease_seconds: how long an item handed to one session is withheld from the others.
    """

    def __init__(self, items: list[LabelItem], store: RankingStore, *, lease_seconds: float = 600.0,
                 clock=time.monotonic):
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds={lease_seconds!r} must be positive")
        self.items = list(items)
        self.by_id = {item.id: item for item in self.items}
        self.store, self.lease_seconds, self.clock = store, lease_seconds, clock
        self._lock = threading.Lock()
        self._leases: dict[str, tuple[str, float]] = {}  # item id -> (session, expiry)
        self._skips: OrderedDict[str, set[str]] = OrderedDict()  # session -> skipped item ids

    def progress(self, ranked: set[str] | None = None) -> dict:
        """``{"ranked", "total"}`` over this server's items (rankings by every labeller count)."""
        ranked = self.store.ranked_ids() if ranked is None else ranked
        return {"ranked": sum(1 for item in self.items if item.id in ranked), "total": len(self.items)}

    def _session_skips(self, session: str) -> set[str]:
        skips = self._skips.pop(session, set())
        self._skips[session] = skips  # most recently used last
        while len(self._skips) > MAX_SESSIONS:
            self._skips.popitem(last=False)
        return skips

    def next_for(self, session: str) -> tuple[LabelItem | None, dict, int]:
        """The item ``session`` should rank now (None when none is left), the progress, and how many of its
        skipped items are still unranked."""
        ranked = self.store.ranked_ids()
        now = self.clock()
        with self._lock:
            skips = self._session_skips(session)
            self._leases = {i: (s, t) for i, (s, t) in self._leases.items() if t > now and i not in ranked}
            mine = [i for i, (s, _) in self._leases.items() if s == session and i not in skips]
            choice = self.by_id[mine[0]] if mine else next(
                (item for item in self.items
                 if item.id not in ranked and item.id not in skips and item.id not in self._leases), None)
            if choice is not None:
                self._leases[choice.id] = (session, now + self.lease_seconds)
            return choice, self.progress(ranked), len(skips - ranked)

    def _item(self, item_id: str) -> LabelItem:
        if item_id not in self.by_id:
            raise UnknownItem(f"no item has id {item_id!r} on this server")
        return self.by_id[item_id]

    def skip(self, session: str, item_id: str) -> None:
        """Set the item aside for this session (others may take it); it returns after :meth:`unskip`."""
        self._item(item_id)
        with self._lock:
            self._session_skips(session).add(item_id)
            if self._leases.get(item_id, ("",))[0] == session:
                del self._leases[item_id]

    def unskip(self, session: str) -> None:
        """Offer this session's skipped items again."""
        with self._lock:
            self._session_skips(session).clear()

    def submit(self, session: str, item_id: str, tiers, labeller: str) -> dict:
        """Check and append a ranking; returns the record. Raises UnknownItem, ValueError or AlreadyRanked."""
        record = ranking_record(self._item(item_id), tiers, labeller)
        if not self.store.append(record):
            raise AlreadyRanked(f"item {item_id} was already ranked (in another tab or by another labeller); "
                                "nothing was written")
        with self._lock:
            self._leases.pop(item_id, None)
        return record

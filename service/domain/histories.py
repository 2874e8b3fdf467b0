"""The histories of chain responses kept in the process, so that a full-path turn continuing a response
this replica wrote or read renders its history without reading it from the database again.

A stored response's history does not change while the response can be continued: items are written
once, with their turn; retention deletes a lineage's rows only once every response of it has expired
(store/retention.py); and a turn reads its parent, live, before it looks here. So a history kept under
(tenant, response id) is what the database would return for as long as anybody can continue that
response. Kept by size (the JSON bytes of its items, counted whole for every entry although entries of
one lineage share their items), least recently used out first; a miss reads the database as before.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from service.domain.items import Item, Segment


@dataclass(frozen=True, slots=True)
class _Kept:
    segments: tuple[Segment, ...]
    size: int


def _size(items: Sequence[Item]) -> int:
    return sum(len(orjson.dumps(item)) for item in items)


class HistoryCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._kept: OrderedDict[tuple[str, str], _Kept] = OrderedDict()

    def get(self, tenant: str, response_id: str) -> tuple[Segment, ...] | None:
        """The history through the response (its own input and output last), if kept."""
        kept = self._kept.get((tenant, response_id))
        if kept is None:
            return None
        self._kept.move_to_end((tenant, response_id))
        return kept.segments

    def keep(self, tenant: str, response_id: str, segments: Sequence[Segment]) -> None:
        """The history through the response, as read from the database."""
        self._put((tenant, response_id), _Kept(tuple(segments), sum(_size(items) for _, items in segments)))

    def extend(
        self,
        tenant: str,
        parent_id: str | None,
        response_id: str,
        input_items: Sequence[Item],
        output_items: Sequence[Item],
    ) -> None:
        """The history through a response just stored: its parent's (none for a first turn), then its input
        and output. Nothing is kept if the parent's history is not (evicted meanwhile). Empty segments are
        left out, as the database's read leaves them out."""
        base = _Kept((), 0) if parent_id is None else self._kept.get((tenant, parent_id))
        if base is None:
            return
        own = [(False, input_items), (True, output_items)]
        added = tuple((is_output, tuple(items)) for is_output, items in own if items)
        size = base.size + _size(input_items) + _size(output_items)
        self._put((tenant, response_id), _Kept(base.segments + added, size))

    def _put(self, key: tuple[str, str], kept: _Kept) -> None:
        if self.max_bytes == 0 or kept.size > self.max_bytes:
            return
        previous = self._kept.pop(key, None)
        if previous is not None:
            self.size -= previous.size
        self._kept[key] = kept
        self.size += kept.size
        while self.size > self.max_bytes:
            _, evicted = self._kept.popitem(last=False)
            self.size -= evicted.size

"""Public ids: OpenAI's shape, a UUIDv7 inside (time-ordered), the rest random."""

from __future__ import annotations

import re
import time
import uuid

from service.domain import ids


def test_an_id_is_a_prefix_then_a_uuid7_then_random_hex() -> None:
    made = [ids.new_id(ids.RESPONSE) for _ in range(2000)]
    assert all(re.fullmatch("resp_[0-9a-f]{48}", value) for value in made)
    assert len(set(made)) == len(made)
    inner = uuid.UUID(made[0][5:37])
    assert (inner.version, inner.variant) == (7, uuid.RFC_4122)
    assert abs(int(made[0][5:17], 16) - time.time() * 1000) < 5000  # its first 48 bits: the time in ms
    # Every hex digit after the fixed version and variant bits varies between ids.
    fixed = {12, 16}
    for position in set(range(5, 53)) - {5 + digit for digit in fixed} - set(range(5, 17)):
        assert len({value[position] for value in made}) > 8, position


def test_ids_made_later_sort_later() -> None:
    first = ids.new_id(ids.RESPONSE)
    time.sleep(0.002)
    assert ids.new_id(ids.RESPONSE) > first

"""Message ids: unique, 32 hex digits, UUIDv7, ordered by the millisecond they were made in."""

from __future__ import annotations

import time
import uuid

from hypothesis import given
from hypothesis import strategies as st

from drpo.bus.envelope import Envelope, new_id


def test_an_id_is_a_version_7_uuid_of_now() -> None:
    before = time.time_ns() // 1_000_000
    made = new_id()
    after = time.time_ns() // 1_000_000
    parsed = uuid.UUID(hex=made)
    assert len(made) == 32 and made == parsed.hex
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert before <= int(made[:12], 16) <= after


def test_ids_are_unique() -> None:
    ids = [new_id() for _ in range(50_000)]
    assert len(set(ids)) == len(ids)


@given(st.lists(st.integers(0, 3), min_size=2, max_size=6))
def test_ids_made_in_later_milliseconds_sort_later(gaps: list[int]) -> None:
    made = []
    for gap in gaps:
        made.append(new_id())
        time.sleep(0.0011 * (gap + 1))
    assert made == sorted(made)


def test_an_envelope_gets_one() -> None:
    envelope = Envelope(topic="t", sender="s", payload=None)
    assert uuid.UUID(hex=envelope.message_id).version == 7

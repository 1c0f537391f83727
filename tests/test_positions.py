"""The bridge's replay guard (bridge/positions.py): a pure rule, no servers."""

from __future__ import annotations

import pytest

from bridge.positions import Mark, advance


def test_a_message_at_or_below_the_mark_is_a_replay() -> None:
    mark = advance(advance(None, 10, 1_000), 11, 1_010)
    assert mark == Mark(11, 1_010)
    assert mark.covers(10, 1_000)
    assert mark.covers(11, 1_010)
    assert not mark.covers(12, 1_010)


def test_a_recreated_topic_starts_its_offsets_again_with_newer_timestamps() -> None:
    mark = Mark(500, 1_000)
    assert not mark.covers(0, 5_000)
    mark = advance(mark, 0, 5_000)
    assert mark == Mark(0, 5_000)
    assert mark.covers(0, 5_000)
    assert not mark.covers(1, 5_001)


def test_the_mark_keeps_the_newest_timestamp_up_to_its_offset() -> None:
    # A producer's own timestamps (CreateTime) need not grow with the offset.
    mark = advance(Mark(100, 1_000), 101, 900)
    assert mark == Mark(101, 1_000)
    assert mark.covers(101, 900)


@pytest.mark.parametrize(
    ("raw", "mark"),
    [
        (None, None),
        (b"42 1700000000000", Mark(42, 1_700_000_000_000)),
        ("7 8", Mark(7, 8)),
        (b"garbage", None),
        (b"1 2 3", None),
        (b"x 2", None),
    ],
)
def test_what_redis_holds_decodes_to_a_mark_or_to_none(
    raw: bytes | str | None, mark: Mark | None
) -> None:
    assert Mark.decode(raw) == mark


def test_a_mark_round_trips() -> None:
    assert Mark.decode(Mark(3, 4).encode()) == Mark(3, 4)

"""The bridge's replay guard (bridge/positions.py): a pure rule, no servers."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from bridge.positions import Mark, split


class Record(NamedTuple):
    offset: int
    timestamp: int


def records(*pairs: tuple[int, int]) -> list[Record]:
    return [Record(*pair) for pair in pairs]


def test_a_partition_read_for_the_first_time_has_no_replays() -> None:
    assert split(None, records((10, 1_000), (11, 1_010))) == (0, Mark(11, 1_010))
    assert split(None, []) == (0, None)


def test_a_message_at_or_below_the_mark_is_a_replay() -> None:
    mark = Mark(11, 1_010)
    assert split(mark, records((10, 1_000), (11, 1_010))) == (2, None)
    assert split(mark, records((10, 1_000), (11, 1_010), (12, 1_020))) == (2, Mark(12, 1_020))
    assert split(mark, records((12, 1_020))) == (0, Mark(12, 1_020))


def test_a_recreated_topic_starts_its_offsets_again_with_newer_timestamps() -> None:
    mark = Mark(500, 1_000)
    assert split(mark, records((0, 5_000), (1, 5_001))) == (0, Mark(1, 5_001))
    assert split(Mark(1, 5_001), records((0, 5_000), (1, 5_001), (2, 5_002))) == (2, Mark(2, 5_002))


def test_the_mark_keeps_the_newest_timestamp_up_to_its_offset() -> None:
    # A producer's own timestamps (CreateTime) need not grow with the offset.
    assert split(Mark(100, 1_000), records((101, 900), (102, 950))) == (0, Mark(102, 1_000))
    assert split(Mark(102, 1_000), records((101, 900), (102, 950))) == (2, None)
    assert split(None, records((1, 900), (2, 800))) == (0, Mark(2, 900))


def test_only_a_prefix_is_ever_a_replay() -> None:
    # After the first message the mark does not cover, the mark that includes it covers
    # none of the later ones: their offsets are higher.
    mark = Mark(10, 1_000)
    assert split(mark, records((9, 999), (11, 900), (12, 800))) == (1, Mark(12, 1_000))


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

"""The chaos accounting itself: it must never call a loss a resync."""

from __future__ import annotations

from .harness import account


def test_everything_in_order_is_delivered() -> None:
    figures = account(3, [("e", 0), ("e", 1), ("e", 2)])
    assert (figures.delivered, figures.lost) == (3, 0)


def test_a_resync_covers_only_the_window_it_sits_in() -> None:
    # 2 and 3 missed, then a resync, then 4 onwards: 2 and 3 are covered.
    figures = account(6, [("e", 0), ("e", 1), ("r", 4), ("e", 4), ("e", 5)])
    assert (figures.delivered, figures.resynced, figures.lost) == (4, 2, 0)


def test_a_hole_before_the_resync_window_is_lost() -> None:
    # 1 skipped silently, 2 received, then a resync: 1 is lost, not resynced.
    figures = account(4, [("e", 0), ("e", 2), ("r", 3), ("e", 3)])
    assert (figures.resynced, figures.lost) == (0, 1)


def test_a_trailing_resync_covers_only_what_was_produced_before_it() -> None:
    figures = account(5, [("e", 0), ("r", 3)])
    assert (figures.resynced, figures.lost) == (2, 2)


def test_duplicates_and_reordering_are_counted() -> None:
    figures = account(3, [("e", 0), ("e", 2), ("e", 1), ("e", 2)])
    assert (figures.duplicates, figures.reordered, figures.lost) == (1, 1, 0)

"""The PostgreSQL store's batch helpers, without a server."""

from __future__ import annotations

from farmhand.store.postgres_rows import rounds


def test_rounds_of_distinct_keys_is_one_round_in_order() -> None:
    items = ["a", "b", "c"]
    assert rounds(items, str) == [[(0, "a"), (1, "b"), (2, "c")]]


def test_rounds_of_nothing_is_no_round() -> None:
    assert rounds([], str) == []


def test_rounds_put_each_repeat_in_the_next_round() -> None:
    items = [("x", 1), ("y", 2), ("x", 3), ("x", 4), ("y", 5)]
    found = rounds(items, lambda item: item[0])
    assert found == [
        [(0, ("x", 1)), (1, ("y", 2))],
        [(2, ("x", 3)), (4, ("y", 5))],
        [(3, ("x", 4))],
    ]

"""The containers kept invalidations live in: a dict split into shards, and a linked order."""

from __future__ import annotations

from commons.cache.pending_structures import UNLINKED, Node, Order, Shards


def test_shards_hold_every_entry_across_the_split() -> None:
    shards: Shards[str, int] = Shards()
    for n in range(2_000):  # well past the size at which it splits
        shards.put(f"k{n}", n)
    shards.put("k7", -7)  # a renewed key is not counted twice

    assert len(shards) == 2_000
    assert shards.get("k7") == -7
    assert "k1999" in shards
    assert shards.pop("k1999") == 1999
    assert shards.pop("k1999") is None
    assert len(shards) == 1_999
    assert sorted(shards) == sorted(f"k{n}" for n in range(1_999))


def test_a_detached_shards_is_empty_and_hands_back_what_it_held() -> None:
    shards: Shards[str, int] = Shards()
    for n in range(600):
        shards.put(str(n), n)

    held = shards.detach()

    assert len(shards) == 0
    assert sum(len(part) for part in held) == 600


def test_the_order_moves_a_renewed_item_to_the_end_and_unlinks_a_removed_one() -> None:
    order: Order[str] = Order()
    a, b, c = (Node(name, None, seq) for seq, name in enumerate("abc"))
    for node in (a, b, c):
        order.append(node)

    order.move_to_end(a)
    order.remove(b)
    order.discard(b)  # twice does nothing

    assert [node.item for node in order] == ["c", "a"]
    assert order.first() is c
    assert b.prev is UNLINKED
    assert b.next is UNLINKED


def test_an_empty_order_has_no_first_item() -> None:
    order: Order[str] = Order()
    node = Node("only", None, 1)
    order.append(node)
    order.remove(node)

    assert order.first() is None
    assert list(order) == []

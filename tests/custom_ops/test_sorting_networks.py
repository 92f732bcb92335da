"""The kernel's compare-exchange networks, run in plain Python against ``sorted``.

By the 0-1 principle a network of min/max steps selects correctly on every input
if it does on every input of zeros and ones: widths up to 16 are checked
exhaustively, wider ones on random inputs with many ties.
"""

from __future__ import annotations

import itertools
import random

import pytest

pytest.importorskip("triton")

from moe_compile.custom_ops import _routing_kernels  # noqa: E402


def run_network(steps, keys):
    keys = list(keys)
    for high, low, exchange in steps:
        larger, smaller = max(keys[high], keys[low]), min(keys[high], keys[low])
        keys[high] = larger
        if exchange:
            keys[low] = smaller
    return keys


@pytest.mark.parametrize(
    ("width", "heads"),
    [(w, h) for w in (1, 2, 4, 8, 16, 32, 64) for h in (1, 2, 4, 8, 16) if h <= w],
)
def test_heads_network_leaves_the_best_keys_first_in_descending_order(width, heads):
    steps = _routing_kernels._heads_network(width, heads)
    if width <= 16:
        inputs = itertools.product((0, 1), repeat=width)
    else:
        rng = random.Random(width * 100 + heads)
        inputs = (tuple(rng.randint(0, 3) for _ in range(width)) for _ in range(3000))
    for keys in inputs:
        assert run_network(steps, keys)[:heads] == sorted(keys, reverse=True)[:heads], keys


@pytest.mark.parametrize("width", [2, 4, 8, 16])
def test_bitonic_merge_sorts_the_larger_halves_of_two_sorted_lists(width):
    rng = random.Random(width)
    for _ in range(500):
        a = sorted((rng.randint(0, 5) for _ in range(width)), reverse=True)
        b = sorted((rng.randint(0, 5) for _ in range(width)), reverse=True)
        larger = [max(a[i], b[width - 1 - i]) for i in range(width)]
        merged = run_network(_routing_kernels._bitonic_merge_network(width), larger)
        assert merged == sorted(a + b, reverse=True)[:width]

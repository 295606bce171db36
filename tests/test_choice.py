"""Documents chosen by a hash of their position: fixed, and in the proportion asked for."""

from __future__ import annotations

import pytest

from palm.data.choice import in_validation, position_hash


def test_the_hash_of_a_position_is_fixed_and_tells_positions_apart():
    assert position_hash(3) == position_hash(3) == 0x4E07408562BEDB8B  # sha256("3"): the same on every machine
    assert len({position_hash(i) for i in range(1000)}) == 1000
    assert position_hash(1, 23) != position_hash(12, 3)  # the parts stay apart


@pytest.mark.parametrize("fraction", [0.05, 0.2])
def test_the_validation_share_follows_the_fraction(fraction):
    held = [in_validation(i, fraction) for i in range(20_000)]
    assert sum(held) / len(held) == pytest.approx(fraction, abs=0.01)
    assert held == [in_validation(i, fraction) for i in range(20_000)]
    assert not any(in_validation(i, 0.0) for i in range(1000))

"""The quality guards of the slow tests (conftest.SEED_SPREADS, seed_bound): each bound is the measured seed spread
(mean + 3 std), and a run 20% worse than the mean fails it -- a guard loose enough to let that pass guards nothing."""

from __future__ import annotations

import statistics

import pytest

from conftest import SEED_SPREADS, seed_bound


@pytest.mark.parametrize("name", sorted(SEED_SPREADS))
def test_a_20_percent_regression_fails_the_guard_and_every_seed_passes(name):
    values = SEED_SPREADS[name]
    assert len(values) >= 3, f"{name}: a spread needs at least 3 seeds"
    assert max(values) <= seed_bound(name)
    assert 1.2 * statistics.mean(values) > seed_bound(name), (name, statistics.mean(values), seed_bound(name))

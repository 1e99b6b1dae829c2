"""Rewards: every cell of the difficulty-aware table (docs/protocol.md), per prompt group."""

import numpy as np
import pytest

from relax.train import rewards

# One group per case, G = 4. Columns: correct, called, rho.
SOLVABLE = ([1, 1, 0, 0], [0, 1, 0, 1], [0.0, 0.2, 0.0, 0.5])
SOLVABLE_EXPECTED = [1.5, 0.8, 0.0, 0.0]  # 1.5 | 1 - rho | 0 | 0
DEPENDENT = ([1, 0, 0, 0], [1, 0, 1, 0], [0.25, 0.0, 0.4, 0.0])
DEPENDENT_EXPECTED = [0.75, -1.0, 0.0, -1.0]  # 1 - rho | -1 | 0 | -1
UNSOLVABLE = ([0, 0, 0, 0], [0, 1, 1, 0], [0.0, 0.3, 0.1, 0.0])
UNSOLVABLE_EXPECTED = [0.0, 0.3, 0.1, 0.0]  # 0 | rho | rho | 0


def _da(group):
    c, k, r = (np.asarray(x) for x in group)
    return np.asarray(rewards.difficulty_aware(c.astype(bool), k.astype(bool), r, 4))


@pytest.mark.parametrize(
    "group,expected",
    [
        (SOLVABLE, SOLVABLE_EXPECTED),
        (DEPENDENT, DEPENDENT_EXPECTED),
        (UNSOLVABLE, UNSOLVABLE_EXPECTED),
    ],
    ids=["student-solvable", "teacher-dependent", "teacher-unsolvable"],
)
def test_each_case_alone(group, expected):
    np.testing.assert_allclose(_da(group), expected, rtol=0, atol=1e-7)


def test_mixed_batch_is_classified_per_group():
    """The three cases in one batch (in two orders) score exactly as they do alone.

    The official code classifies over the whole batch: with SOLVABLE present,
    the wrong no-call rows of DEPENDENT would get 0 instead of -1 and the
    called rows of UNSOLVABLE 0 instead of rho. Here they must not.
    """
    for order in [(SOLVABLE, DEPENDENT, UNSOLVABLE), (UNSOLVABLE, DEPENDENT, SOLVABLE)]:
        batch = tuple(np.concatenate([g[i] for g in order]) for i in range(3))
        got = _da(batch)
        want = np.concatenate(
            [
                {
                    id(SOLVABLE): SOLVABLE_EXPECTED,
                    id(DEPENDENT): DEPENDENT_EXPECTED,
                    id(UNSOLVABLE): UNSOLVABLE_EXPECTED,
                }[id(g)]
                for g in order
            ]
        )
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)


def test_solvable_group_with_only_correct_called_and_wrong_called():
    """Remaining solvable cells: correct&called = 1 - rho even next to a 1.5; wrong&called = 0."""
    got = _da(([1, 1, 0, 0], [0, 1, 1, 1], [0.0, 0.6, 0.9, 0.1]))
    np.testing.assert_allclose(got, [1.5, 0.4, 0.0, 0.0], atol=1e-7)


def test_simple_and_accuracy():
    c = np.array([1, 1, 0, 0], bool)
    k = np.array([0, 1, 0, 1], bool)
    r = np.array([0.0, 0.25, 0.0, 0.5], np.float32)
    np.testing.assert_allclose(rewards.simple(c, k, r, 2), [1.0, 0.75, 0.0, -0.5], atol=1e-7)
    np.testing.assert_allclose(rewards.accuracy(c, k, r, 2), [1.0, 1.0, 0.0, 0.0])


def test_call_ratio_and_group_size_check():
    np.testing.assert_allclose(rewards.call_ratio([0, 5, 3], [10, 20, 0]), [0.0, 0.25, 0.0])
    with pytest.raises(ValueError):
        rewards.difficulty_aware(np.ones(6, bool), np.ones(6, bool), np.zeros(6), 4)

"""pipeline.methods.metrics on fixed inputs whose values are worked out by hand."""

from __future__ import annotations

import pytest

from pipeline.methods.metrics import auroc, average_precision, brier, expected_calibration_error, reliability_bins


def test_ece_by_hand():
    # bin [0.9, 1.0]: confidences 0.95, 1.0 (mean 0.975), both right -> |1 - 0.975| = 0.025, weight 2/4
    # bin [0.2, 0.3): 0.25, 0.25, one right -> |0.5 - 0.25| = 0.25, weight 2/4
    ece = expected_calibration_error([1, 1, 1, 0], [0.95, 1.0, 0.25, 0.25])
    assert ece == pytest.approx(0.5 * 0.025 + 0.5 * 0.25)


def test_ece_perfect_and_worst():
    assert expected_calibration_error([1, 0], [1.0, 0.0]) == pytest.approx(0.0)
    assert expected_calibration_error([0, 1], [1.0, 0.0]) == pytest.approx(1.0)
    assert expected_calibration_error([], []) == 0.0


def test_bins_are_equal_width_and_edges_go_up():
    bins = reliability_bins([1, 0, 1], [0.1, 0.0999, 1.0], n_bins=10)
    assert [b["count"] for b in bins] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert bins[1]["lo"] == pytest.approx(0.1) and bins[1]["accuracy"] == 1.0
    assert bins[2]["accuracy"] is None


def test_ap_auroc_brier():
    # ranked by confidence: right, wrong, right -> precision at the hits 1 and 2/3 -> AP = (1 + 2/3) / 2
    assert average_precision([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([0, 0], [0.4, 0.6]) is None
    assert auroc([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(0.5)
    assert auroc([1, 1], [0.9, 0.8]) is None
    assert brier([1, 0], [0.8, 0.4]) == pytest.approx((0.04 + 0.16) / 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="confidence"):
        expected_calibration_error([1], [1.5])
    with pytest.raises(ValueError, match="items"):
        expected_calibration_error([1, 0], [0.5])

"""The default simulator lands inside every band of the design's calibration table.

Full-size cohorts (20,000 STAR*D patients, ~12,000 enrolled per trial arm),
so the binomial standard error of every rate is under 1 percentage point,
and two seeds other than the one the fit used: the bands are not luck.
"""

import pytest

from evaluation.calibration import CalibrationSizes, calibrate, format_table


@pytest.fixture(scope="module", params=[11, 12345])
def table(request, params):
    return calibrate(params, CalibrationSizes(), seed=request.param)


def test_every_target_is_inside_its_band(table):
    outside = [t for t in table if not t.inside]
    assert not outside, "outside their bands:\n" + format_table(table)


def test_rates_rest_on_enough_patients(table):
    for t in table:
        if t.unit == "%":
            p = min(max(t.value / 100, 0.05), 0.95)
            standard_error = 100 * (p * (1 - p) / t.n) ** 0.5
            assert standard_error < 0.25 * (t.high - t.low), t.key


def test_table_is_reproducible(params):
    small = CalibrationSizes(stard=600, rct=800, digital=300)
    assert calibrate(params, small, seed=3) == calibrate(params, small, seed=3)

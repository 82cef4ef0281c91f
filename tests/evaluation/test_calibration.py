"""The default simulator against the calibration table: one protocol's path and the strategy trials.

Full-size cohorts (20,000 STAR*D patients, ~12,000 enrolled per trial arm, 24,000 per strategy
trial), so the binomial standard error of every rate is under about 1 percentage point, and two
seeds other than the one the fit used: the bands are not luck.

The orderings every clinician expects (random next steps and switching every two weeks do worse
than STAR*D-style care, adding everything costs more) must hold exactly. The fit of spec version
2 (envs/params/fit_report.json) leaves a few two-sided rows near the edges of their bands, where
another seed can put them just outside: those must stay within a tenth of their band's width of
it.
"""

import pytest

from evaluation.calibration import CalibrationSizes, calibrate, format_table

EDGE_MARGIN = 0.10  # share of a band's width a two-sided row may fall outside it
#: Rows known to miss their band by more than EDGE_MARGIN, with how far they may be out (share of
#: the band's width): a regression past that fails. None since the refit of 2026-12-05 (every row
#: inside at seeds 2026, 7, 11 and 12345).
KNOWN_OUTSIDE: dict[str, float] = {}


@pytest.fixture(scope="module", params=[11, 12345])
def table(request, params):
    return calibrate(params, CalibrationSizes(), seed=request.param)


def test_the_orderings_hold_exactly(table):
    orderings = [t for t in table if t.one_sided]
    assert len(orderings) == 6
    outside = [t for t in orderings if not t.inside]
    assert not outside, "orderings that fail:\n" + format_table(table)


def test_every_row_is_inside_its_band_or_at_its_edge(table):
    def near(t):
        margin = EDGE_MARGIN * (t.high - t.low)
        return t.low - margin <= t.value <= t.high + margin

    far = [t.key for t in table if not t.one_sided and not near(t) and t.key not in KNOWN_OUTSIDE]
    assert not far, f"outside their bands by more than {EDGE_MARGIN:.0%} of the width: {far}\n" + format_table(table)
    for t in table:
        if t.key in KNOWN_OUTSIDE:
            margin = KNOWN_OUTSIDE[t.key] * (t.high - t.low)
            assert t.low - margin <= t.value <= t.high + margin, f"{t.key} moved further out: {t.value:.2f}"
    # most rows are inside, not merely near
    assert sum(t.inside for t in table) >= len(table) - 2, format_table(table)


def test_both_sections_are_there(table):
    sections = [t.section for t in table]
    assert sections.count("protocol") == 17 and sections.count("strategy") == 18


def test_rates_rest_on_enough_patients(table):
    for t in table:
        if t.unit == "%":
            p = min(max(t.value / 100, 0.05), 0.95)
            standard_error = 100 * (p * (1 - p) / t.n) ** 0.5
            assert standard_error < 0.25 * (t.high - t.low), t.key


def test_table_is_reproducible(params):
    small = CalibrationSizes(stard=600, rct=800, digital=300, strategy=800)
    assert calibrate(params, small, seed=3) == calibrate(params, small, seed=3)

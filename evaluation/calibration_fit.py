"""Fit the simulator's free parameters to the calibration table.

A bounded Nelder-Mead search over the parameters marked "fitted" in
``envs/params/default.yaml``. Every evaluation reruns the calibration
protocols with the same seeds (common random numbers), so the objective
changes only through the parameters and the search does not chase noise.
The objective is the sum over targets of the squared distance from the
band's centre in units of its half-width (inside a band: below 1), plus a
steep penalty for coming within 30 % of a band's edge or leaving it, so
the search trades centrality for being inside every band.

Run ``python -m evaluation.calibration_fit --help``. It prints the fitted
values and writes a report (``envs/params/fit_report.json``); copy the
values into the YAML by hand so that every change to the model is reviewed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize

from envs.params import DEFAULT_PARAMS_PATH, SimParams, load_params
from evaluation.calibration import CalibrationSizes, Target, calibrate

#: parameter -> (low, high) bounds of the search
FREE_PARAMETERS: dict[str, tuple[float, float]] = {
    "response.drug_responder_prob": (0.15, 0.75),
    "response.drug_effect_responder": (0.4, 0.99),
    "response.drug_effect_partial": (0.0, 0.35),
    "response.nonspecific_responder_prob": (0.15, 0.75),
    "response.nonspecific_effect_responder": (0.2, 0.95),
    "response.nonspecific_effect_partial": (0.0, 0.3),
    "response.nonspecific_chronic_factor": (0.0, 1.0),
    "response.treatment_resistant_share": (0.0, 0.4),
    "response.resistance_per_failed_step": (0.0, 2.0),
    "response.augment_responder_prob": (0.1, 0.9),
    "response.augment_effect_responder": (0.3, 0.95),
    "response.psychotherapy_responder_prob": (0.15, 0.75),
    "response.psychotherapy_effect_responder": (0.2, 0.8),
    "response.onset_tau_drug": (1.0, 5.0),
    "response.onset_tau_nonspecific": (1.0, 8.0),
    "course.spontaneous_remission_hazard": (0.0, 0.02),
    "course.approach_rate": (0.15, 0.95),
    "dropout.base_logit": (-9.0, -3.0),
    "population.dropout_propensity_sd": (0.1, 2.5),
    "dropout.disengagement_coef": (0.5, 8.0),
    "engagement.human_support": (0.0, 0.4),
    "engagement.psychotherapy_support_share": (0.0, 1.0),
    "dropout.failed_step_coef": (0.0, 1.5),
    "engagement.digital_dropout_base_unguided": (0.005, 0.15),
    "engagement.digital_dropout_base_guided": (0.0005, 0.04),
    "engagement.habituation_unguided": (0.0, 0.25),
    # long-term course and the cost of doing more (strategy rows)
    "course.relapse_hazard": (0.001, 0.05),
    "course.relapse_hazard_on_treatment": (0.0005, 0.03),
    "course.relapse_per_failed_step": (0.0, 1.0),
    "course.relapse_residual_coef": (0.0, 0.4),
    "course.relapse_unresolved_coef": (0.0, 5.0),
    "course.relapse_hazard_per_prior_episode": (0.0, 0.6),
    "course.episode_resolution_rate": (0.01, 0.3),
    "response.nondrug_resistance_weight": (0.3, 2.5),
    "dropout.change_coef": (0.0, 2.0),
    "dropout.burden_coef": (0.0, 1.0),
    "tolerability.complexity_adherence_loss": (0.0, 0.15),
    "tolerability.adherence_decline_when_well": (0.0, 0.05),
}

DEFAULT_REPORT = DEFAULT_PARAMS_PATH.with_name("fit_report.json")


def _to_unit(value: float, low: float, high: float) -> float:
    p = min(max((value - low) / (high - low), 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def _from_unit(x: float, low: float, high: float) -> float:
    return low + (high - low) / (1.0 + math.exp(-x))


def objective(targets: list[Target]) -> float:
    total = 0.0
    for t in targets:
        if not math.isfinite(t.value):  # e.g. a trial that enrolled nobody at these parameters
            total += 1000.0
            continue
        if t.one_sided:
            # only the edge counts: no pull toward the middle of an open band
            margin = (t.value - t.low) if t.one_sided == "low" else (t.high - t.value)
            total += 20.0 * max(0.0, 1.0 - margin / t.scale) ** 2
            continue
        centre, half = (t.low + t.high) / 2, (t.high - t.low) / 2
        distance = abs(t.value - centre) / half
        total += distance**2 + 20.0 * max(0.0, distance - 0.7) ** 2
    return total


def _current(params: SimParams, name: str) -> float:
    section, field = name.split(".")
    return float(getattr(getattr(params, section), field))


def write_report(path: Path, values: dict[str, float], targets: list[Target], loss: float,
                 sizes: CalibrationSizes, evals: int) -> None:
    """The fit report, written atomically (temporary name, then rename)."""
    report = {
        "objective": loss,
        "evaluations": evals,
        "sizes": dataclasses.asdict(sizes),
        "fitted": {n: round(v, 4) for n, v in values.items()},
        "bounds": FREE_PARAMETERS,
        "targets": [t.as_dict() for t in targets],
    }
    text = json.dumps(report, indent=2)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def fit(
    base: SimParams, sizes: CalibrationSizes, max_evals: int, seeds: tuple[int, ...] = (2026,),
    verbose: bool = True, report: Path | None = None, free: list[str] | None = None,
) -> tuple[dict[str, float], list[Target], float]:
    """Nelder-Mead over ``free`` (default: all of FREE_PARAMETERS).

    With several ``seeds`` the objective is the mean over them and a target
    counts as inside only when it is inside at every seed: a fit to one seed's
    noise lands on band edges that the next seed crosses.
    """
    if not seeds:
        raise ValueError("fit needs at least one seed")
    names = list(free) if free else list(FREE_PARAMETERS)
    unknown = [n for n in names if n not in FREE_PARAMETERS]
    if unknown:
        raise ValueError(f"not free parameters: {unknown}; expected some of {sorted(FREE_PARAMETERS)}")
    x0 = np.array([_to_unit(_current(base, n), *FREE_PARAMETERS[n]) for n in names])
    best: dict[str, Any] = {"loss": math.inf}
    evals = 0
    started = time.perf_counter()

    def loss(x: np.ndarray) -> float:
        nonlocal evals
        evals += 1
        values = {n: _from_unit(float(v), *FREE_PARAMETERS[n]) for n, v in zip(names, x, strict=True)}
        params = base.replace(values)
        runs = [calibrate(params, sizes, s) for s in seeds]
        value = float(np.mean([objective(targets) for targets in runs]))
        if value < best["loss"]:
            targets = runs[0]
            best.update(loss=value, values=values, targets=targets)
            if report is not None:  # every improvement is saved: an interrupted fit loses nothing
                write_report(report, values, targets, value, sizes, evals)
            if verbose:
                inside = sum(all(run[i].inside for run in runs) for i in range(len(targets)))
                print(f"eval {evals:4d}  loss {value:8.3f}  inside {inside}/{len(targets)}  "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
        return value

    # A wide initial simplex (one logit unit per parameter): the default 5 %
    # steps crawl in this many dimensions.
    simplex = np.vstack([x0, x0 + np.eye(len(x0))])
    minimize(loss, x0, method="Nelder-Mead",
             options={"maxfev": max_evals, "xatol": 1e-3, "fatol": 1e-3, "adaptive": True,
                      "initial_simplex": simplex})
    return best["values"], best["targets"], best["loss"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evals", type=int, default=300, help="maximum objective evaluations (default 300)")
    parser.add_argument("--stard", type=int, default=8000, help="patients in the STAR*D protocol per evaluation")
    parser.add_argument("--rct", type=int, default=12000, help="patients screened per trial arm per evaluation")
    parser.add_argument("--digital", type=int, default=4000, help="patients per digital arm per evaluation")
    parser.add_argument("--strategy", type=int, default=8000, help="patients per strategy trial per evaluation")
    parser.add_argument("--free", nargs="+", default=None, metavar="SECTION.NAME",
                        help="fit only these free parameters (default: all of FREE_PARAMETERS)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2026], metavar="SEED",
                        help="calibration seeds; the objective is their mean (default: 2026)")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="where to write the fit report")
    args = parser.parse_args(argv)
    base = load_params()
    sizes = CalibrationSizes(args.stard, args.rct, args.digital, args.strategy)
    values, _, _ = fit(base, sizes, args.evals, seeds=tuple(args.seeds), report=args.report, free=args.free)
    for n, v in values.items():
        print(f"{n} = {v:.4f}")
    print(f"report written to {args.report}")


if __name__ == "__main__":
    main()

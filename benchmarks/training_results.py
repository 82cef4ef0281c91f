"""Simulator ground truth of trained policies against their behaviour policy, per agent over seeds.

Reads every ``metrics.json`` under the given folders (single runs or sweeps of
``train.py``), prints one line per run and one per agent, and writes
``benchmarks/results/training_results.json``. The issue's bar: discrete CQL and
BCQ beat the behaviour policy's true remission rate by >= 10 % relative, the behaviour
policy's rate lies inside behaviour cloning's 95 % interval, MaskablePPO beats STAR*D.

    python train.py -m agent=bc,cql,bcq seed=0,1,2
    python benchmarks/training_results.py runs/multirun
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def collect(folders: list[Path]) -> list[dict[str, Any]]:
    runs = []
    for folder in folders:
        if not folder.exists():
            raise SystemExit(f"training_results: no such folder {folder}")
        for path in sorted(folder.rglob("metrics.json")):
            metrics = json.loads(path.read_text())
            policy, behaviour = metrics["evaluation"]["policy"], metrics["evaluation"]["behaviour"]
            cert = (metrics.get("certification") or {}).get("certificate")
            certified_truth = (metrics.get("certification") or {}).get("certified_policy_ground_truth")
            runs.append({
                "agent": metrics["agent"], "seed": metrics["seed"], "run": str(path.parent),
                "remission": policy["remission"], "behaviour_remission": behaviour["remission"],
                "behaviour": behaviour["policy"], "value": policy["value"]["value"],
                "dropout": policy["dropout"]["value"], "blocked_actions_chosen": policy["blocked_actions_chosen"],
                # GBP per patient in remission at the horizon (None: no one remitted; absent before spec 2)
                "cost_per_remission": policy.get("cost_per_remission"),
                "behaviour_cost_per_remission": behaviour.get("cost_per_remission"),
                "relative_gain": policy["remission"]["value"] / behaviour["remission"]["value"] - 1.0,
                # the behaviour policy's true rate inside this policy's 95 % interval
                "behaviour_inside_interval": policy["remission"]["low"] <= behaviour["remission"]["value"]
                <= policy["remission"]["high"],
                # certification on held-out logged patients (offline runs; None: not certified by train.py)
                "certified": None if cert is None else bool(cert["certified"]),
                "certificate_lower_bound_pp": None if cert is None else cert["lower_bound"],
                "certificate_estimate_pp": None if cert is None else cert["improvement"],
                "certified_candidate": None if cert is None else cert["candidate"].get("description"),
                "vignettes": None if cert is None else cert.get("vignettes"),
                "certified_policy_remission": None if certified_truth is None
                else certified_truth["remission"]["value"],
            })
    if not runs:
        raise SystemExit(f"training_results: no metrics.json under {', '.join(map(str, folders))}")
    return runs


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    agents: dict[str, dict[str, Any]] = {}
    for agent in sorted({r["agent"] for r in runs}):
        mine = [r for r in runs if r["agent"] == agent]
        agents[agent] = {
            "seeds": sorted(r["seed"] for r in mine),
            "remission_mean": sum(r["remission"]["value"] for r in mine) / len(mine),
            "behaviour_remission": mine[0]["behaviour_remission"]["value"],
            "relative_gain_min": min(r["relative_gain"] for r in mine),
            "relative_gain_mean": sum(r["relative_gain"] for r in mine) / len(mine),
            "behaviour_inside_every_interval": all(r["behaviour_inside_interval"] for r in mine),
            "blocked_actions_chosen": sum(r["blocked_actions_chosen"] for r in mine),
            "cost_per_remission_mean": _mean([r["cost_per_remission"] for r in mine]),
            "behaviour_cost_per_remission": mine[0]["behaviour_cost_per_remission"],
            "certified_runs": sum(bool(r["certified"]) for r in mine),
        }
    return agents


def _gbp(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} GBP"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="folders holding train.py runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "training_results.json")
    args = parser.parse_args()
    runs = collect(args.folders)
    for r in sorted(runs, key=lambda r: (r["agent"], r["seed"])):
        rem, beh = r["remission"], r["behaviour_remission"]
        print(f"{r['agent']:14s} seed {r['seed']}: remission {100 * rem['value']:.1f} % "
              f"[{100 * rem['low']:.1f}, {100 * rem['high']:.1f}] vs {r['behaviour']} {100 * beh['value']:.1f} % "
              f"[{100 * beh['low']:.1f}, {100 * beh['high']:.1f}]  {100 * r['relative_gain']:+.0f} %  "
              f"blocked {r['blocked_actions_chosen']}")
        if r["certified"] is not None:
            vig = r["vignettes"] or {}
            print(f"{'':14s}   certificate: {'certified' if r['certified'] else 'not certified'}, remission bound "
                  f"{r['certificate_lower_bound_pp']:+.2f} pp (estimate {r['certificate_estimate_pp']:+.2f}), "
                  f"{r['certified_candidate']}; vignettes first {100 * vig.get('first_share', float('nan')):.0f} % "
                  f"top-3 {100 * vig.get('top3_share', float('nan')):.0f} %, critical failures "
                  f"{', '.join(vig.get('critical_failures', [])) or 'none'}")
    agents = summarise(runs)
    for name, s in agents.items():
        print(f"{name:14s} seeds {s['seeds']}: mean remission {100 * s['remission_mean']:.1f} % vs "
              f"{100 * s['behaviour_remission']:.1f} %, relative gain min {100 * s['relative_gain_min']:+.0f} % "
              f"mean {100 * s['relative_gain_mean']:+.0f} %, behaviour inside every interval: "
              f"{s['behaviour_inside_every_interval']}, blocked actions {s['blocked_actions_chosen']}, "
              f"cost per remission {_gbp(s['cost_per_remission_mean'])} vs {_gbp(s['behaviour_cost_per_remission'])}")
    from evaluation.cli import write_json_atomic  # atomic: never a half-written result

    write_json_atomic(args.out, {"runs": runs, "agents": agents})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

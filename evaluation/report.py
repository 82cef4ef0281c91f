"""The comparison report: ``report.json``, ``report.md``, ``report.html``, plots and TensorBoard scalars.

:func:`write_report` builds everything in a temporary folder beside the
destination and renames it into place only when complete, so a failure
leaves no half-written report (and an earlier report at the same place stays
as it was). The report labels itself as decision support, states the level
and the interval behind every row, prints unidentifiable estimates as such
(with the reason, never as a number) and lists the effective-sample-size and
other warnings.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np

from evaluation.fairness import CARE_CLASSES, DIGITAL_ACTIONS

if TYPE_CHECKING:
    from evaluation.compare import Comparison, PolicyResult
    from evaluation.ope.estimators import Estimate

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOTS = "plots"
TENSORBOARD = "tensorboard"

DECISION_SUPPORT = (
    "**Decision support, not a decision.** This report compares candidate care policies for reviewers. Its "
    "numbers are estimates of how each policy would have done for the logged patients, with uncertainty; "
    "they do not act on any patient, and no row is a treatment recommendation for an individual. "
    "Clinicians decide.")

INTERVAL_NAMES = {
    "bootstrap": "percentile bootstrap over episodes",
    "bca": "bias-corrected and accelerated (BCa) bootstrap over episodes",
    "t": "Student t (delta-method standard error for self-normalised estimators)",
}


# ----------------------------------------------------------------------------- output folder


def check_output_folder(out: str | Path) -> Path:
    """Refuse a destination that is a file, or a non-empty folder that is not an earlier report.

    Call before the (long) computation so that a bad ``--out`` fails fast.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; expected a folder for the report")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT_JSON).is_file():
        raise ValueError(f"{out}: a folder that holds other files and no {REPORT_JSON}; refusing to replace it "
                         "(choose a new or empty folder, or an earlier report's folder)")
    return out


def write_report(result: Comparison, out: str | Path, *, tensorboard: bool = True) -> Path:
    """Write the report folder ``out`` (replacing an earlier report there) and return it."""
    out = check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the report is an ordinary folder
        plots_dir = tmp / PLOTS
        plots_dir.mkdir()
        plots: dict[str, str] = {}
        for key, draw in (("estimates", plot_estimates), ("subgroups", plot_subgroups),
                          ("care_classes", plot_care_classes)):
            path = draw(result, plots_dir / f"{key}.png")
            if path is not None:
                plots[key] = f"{PLOTS}/{path.name}"
        files = [REPORT_JSON, REPORT_MD, REPORT_HTML, *plots.values()]
        if tensorboard:
            from evaluation.compare import write_tensorboard

            folders = write_tensorboard(result, tmp / TENSORBOARD)
            files += [str(f.relative_to(tmp)) for f in folders.values()]
        payload = result.to_json()
        payload["files"] = files
        (tmp / REPORT_JSON).write_text(json.dumps(payload, indent=2, allow_nan=False))
        text = render_markdown(result, plots, tensorboard=tensorboard)
        (tmp / REPORT_MD).write_text(text)
        (tmp / REPORT_HTML).write_text(render_html(text, "carepath policy comparison"))
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- text


def _text(value: Any) -> str:
    """Text safe in Markdown tables and HTML (names come from bundles and data)."""
    return html.escape(str(value), quote=False).replace("|", "&#124;").replace("\n", " ")


def _num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{100 * x:.{digits}f} %"


def _interval(est: Estimate) -> str:
    if not est.identifiable or est.low is None or est.high is None:
        return "—"
    return f"[{_num(est.low)}, {_num(est.high)}]"


def _method(est: Estimate) -> str:
    if est.interval is None or est.level is None:
        return "none"
    return f"{est.interval} {est.level:.0%}"


def _cell(est: Estimate | None) -> str:
    """Value and interval in one cell; 'not identifiable' without a number."""
    if est is None:
        return "—"
    if not est.identifiable:
        return "not identifiable"
    interval = _interval(est)
    return _num(est.value) + ("" if interval == "—" else f" {interval}")


def _short_notes(est: Estimate) -> str:
    if not est.identifiable:
        return f"not identifiable: {_text(est.reason)}"
    notes = []
    if any("effective sample size" in w for w in est.warnings):
        notes.append("low ESS")
    if any("clip=" in w for w in est.warnings):
        notes.append("clipped")
    if any("extrapolates" in w for w in est.warnings):
        notes.append("no overlap: extrapolation")
    if any("iterations" in w for w in est.warnings):
        notes.append("FQE horizon short")
    return ", ".join(notes)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def render_markdown(result: Comparison, plots: Mapping[str, str] | None = None, *, tensorboard: bool = False) -> str:
    """The report as Markdown (``plots``: key -> relative path of each written figure)."""
    plots = plots or {}
    level = f"{result.level:.0%}"
    interval_name = INTERVAL_NAMES.get(result.interval, result.interval)
    lines = ["# Policy comparison", "", f"> {DECISION_SUPPORT}", ""]

    data = result.data
    lines += ["## Data and method", ""]
    source = data.get("source")
    behaviour = data.get("behavior_policy") or {}
    lines.append(f"- Data: {_text(source) if source else 'episodes in memory'}: {data.get('episodes')} episodes of "
                 f"{data.get('patients')} patients, {data.get('steps')} logged weeks (longest episode "
                 f"{data.get('horizon')} weeks).")
    if behaviour:
        eps = behaviour.get("epsilon")
        lines.append(f"- Behaviour (logging) policy: {_text(behaviour.get('name'))}"
                     + (f", epsilon {eps:g}" if isinstance(eps, int | float) else "")
                     + ("; its probabilities were **estimated**, not logged." if data.get("behavior_prob_estimated")
                        else "; its probabilities were logged."))
    lines.append(f"- Estimators: {', '.join(result.estimators)}. Value = expected total reward per patient over "
                 "the logged horizon.")
    lines.append(f"- Intervals: level **{level}**. Importance-sampling and doubly robust rows: {interval_name}"
                 + (f" ({result.n_boot} resamples, seed {result.seed})" if result.interval in ("bootstrap", "bca")
                    else "") + ".")
    if "fqe" in result.estimators and result.fqe_refits:
        lines.append(f"- FQE rows: value +- t * sd of **{result.fqe_refits} FQE refits** on bootstrap resamples of "
                     "episodes. It carries the Q-model's sampling and fitting error, but not a bias every refit "
                     "shares (extrapolation to actions the log rarely took).")
    elif "fqe" in result.estimators:
        lines.append(f"- FQE rows: percentile bootstrap of FQE's per-episode initial values ({result.n_boot} "
                     "resamples). **It ignores model error** (the fitted Q-function is treated as exact), so it is "
                     "too narrow; `--fqe-refits N` gives an interval that carries it.")
    lines.append("- Unidentifiable estimates (no logged episode with a non-zero importance weight) are shown as "
                 "*not identifiable* with the reason, never as a number.")
    lines.append(f"- The interval method of each row is in its *interval* column; ESS is Kish's effective sample "
                 f"size of the importance weights (of {data.get('episodes')} episodes; FQE has none).")
    for note in result.notes:
        if "FQE's interval" not in note:  # said above
            lines.append(f"- Note: {_text(note)}")
    lines.append("")

    headline = result.headline
    lines += ["## Summary", ""]
    header = ["policy", f"{headline} ({level})"]
    if result.truth is not None:
        header += ["simulator value (95 %)", "simulator remission (95 %)"]
    rows = []
    for p in result.policies:
        row = [_text(p.label), _cell(p.estimates.get(headline))]
        if result.truth is not None and p.truth is not None:
            t = p.truth
            row += [f"{_num(t.value.value)} [{_num(t.value.low)}, {_num(t.value.high)}]",
                    f"{_pct(t.remission.value)} [{_pct(t.remission.low)}, {_pct(t.remission.high)}]"]
        rows.append(row)
    lines += _table(header, rows)

    lines += ["## Estimates", ""]
    rows = []
    for p in result.policies:
        for name, est in p.estimates.items():
            value = "not identifiable" if not est.identifiable else _num(est.value)
            ess = "—" if not np.isfinite(est.ess) else f"{est.ess:.1f}"
            rows.append([_text(p.label), name, value, _interval(est), _method(est), ess, _short_notes(est)])
    lines += _table(["policy", "estimator", "value", f"interval ({level})", "interval", "ESS", "notes"], rows)
    if "estimates" in plots:
        lines += [f"![Estimates with {level} intervals per policy and estimator"
                  + (", simulator truth in grey" if result.truth is not None else "") + f"]({plots['estimates']})",
                  ""]

    if result.truth is not None:
        lines += _truth_section(result)
    lines += _fairness_section(result, plots)
    lines += _warnings_section(result)
    if tensorboard:
        lines += ["## TensorBoard", "",
                  f"Scalars `ope/<estimator>/{{value,lo,hi}}`, `eval/*` and `fairness/*` per policy under "
                  f"`{TENSORBOARD}/<policy>/`: `tensorboard --logdir {TENSORBOARD}`.", ""]
    lines += ["---", "", "Generated by carepath (evaluation.report). Decision support for reviewers: the estimates "
              "inform, clinicians decide.", ""]
    return "\n".join(lines)


def _truth_section(result: Comparison) -> list[str]:
    info = result.truth or {}
    lines = ["## Simulator ground truth", "",
             f"{info.get('patients')} simulated patients per policy (seed {info.get('seed')}, the same for every "
             f"policy), {info.get('horizon')} weeks. Intervals are 95 % (normal approximation for means, Wilson for "
             "rates), whatever the level above.", ""]
    for note in info.get("notes") or []:
        lines.append(f"- Note: {_text(note)}")
    if info.get("notes"):
        lines.append("")
    rows = []
    for p in result.policies:
        t = p.truth
        if t is None:
            continue
        rows.append([_text(p.label), f"{_num(t.value.value)} [{_num(t.value.low)}, {_num(t.value.high)}]",
                     f"{_pct(t.remission.value)} [{_pct(t.remission.low)}, {_pct(t.remission.high)}]",
                     f"{_pct(t.dropout.value)} [{_pct(t.dropout.low)}, {_pct(t.dropout.high)}]",
                     f"{t.cost.value:.0f}", "—" if t.cost_per_remission is None else f"{t.cost_per_remission:.0f}",
                     str(t.blocked_actions_chosen)])
    return lines + _table(["policy", "value", "remission", "left care", "cost per patient (GBP)",
                           "cost per remission (GBP)", "blocked actions chosen"], rows)


def _fairness_section(result: Comparison, plots: Mapping[str, str]) -> list[str]:
    with_fairness = [p for p in result.policies if p.fairness is not None]
    if not with_fairness:
        return []
    level = f"{result.level:.0%}"
    lines = ["## Fairness", "",
             "A patient's group is the feature's value at the first logged week of the episode. Values per "
             f"subgroup use the same estimators and intervals ({level}) on that group's episodes; groups with too "
             "few episodes are flagged and left out of the gaps. Recommendation rates are the policy's mean "
             "probability of each class of care over the group's logged weeks (demographic parity of "
             "recommendations).", ""]
    for key, caption in (("subgroups", f"Values per subgroup ({result.headline}, {level} intervals; hollow: too "
                                       "few episodes)"),
                         ("care_classes", "Recommended classes of care by subgroup")):
        if key in plots:
            lines += [f"![{caption}]({plots[key]})", ""]
    for p in with_fairness:
        assert p.fairness is not None
        lines += [f"### {_text(p.label)}", ""]
        values = p.fairness.values
        if values is not None:
            names = list(values.estimators)
            rows = []
            for g in values.groups:
                flag = f"too few (< {values.min_episodes})" if g.too_few else ""
                rows.append([_text(g.column), _text(g.group), str(g.n_episodes),
                             *[_cell(g.estimates.get(n)) for n in names], flag])
            lines += ["Values per subgroup:", ""]
            lines += _table(["subgroup", "group", "episodes", *[f"{n} ({level})" for n in names], "flag"], rows)
            columns = list(dict.fromkeys(g.column for g in values.gaps))
            rows = []
            for column in columns:
                cells = []
                for n in names:
                    gap = values.gap(column, n)
                    if gap.gap is None:
                        cells.append("—")
                    else:
                        overlap = "" if gap.intervals_overlap is None else (
                            ", intervals overlap" if gap.intervals_overlap else ", intervals apart")
                        cells.append(f"{_num(gap.gap)} ({_text(gap.highest)} > {_text(gap.lowest)}{overlap})")
                rows.append([_text(column), *cells])
            lines += ["Gap between the best- and worst-served groups:", ""]
            lines += _table(["subgroup", *names], rows)
            left_out: dict[tuple[str, str], list[str]] = {}
            for gap in values.gaps:
                for why in gap.excluded:
                    left_out.setdefault((gap.column, why), []).append(gap.estimator)
            if left_out:
                lines += ["Left out of the gaps:", ""]
                lines += [f"- {_text(column)}: {_text(why)}, for {', '.join(est)}"
                          for (column, why), est in left_out.items()]
                lines.append("")
        parity = p.fairness.parity
        rows = [[_text(r.column), _text(r.group), str(r.n_steps), *[_pct(r.recommended[c]) for c in parity.classes],
                 "too few" if r.too_few else ""] for r in parity.rows]
        lines += ["Recommended classes of care (share of the policy's probability over the group's logged weeks):",
                  ""]
        lines += _table(["subgroup", "group", "weeks", *parity.classes, "flag"], rows)
        if parity.gaps:
            columns = list(dict.fromkeys(g.column for g in parity.gaps))
            rows = []
            for c in parity.classes:
                cells = []
                for column in columns:
                    found = next((g for g in parity.gaps if g.column == column and g.care_class == c), None)
                    cells.append("—" if found is None else
                                 f"{100 * found.gap:.1f} pp ({_text(found.highest)} > {_text(found.lowest)})")
                rows.append([c, *cells])
            lines += ["Largest gap in recommendation rate per class of care:", ""]
            lines += _table(["class of care", *[_text(c) for c in columns]], rows)
        d = parity.digital
        lines.append(f"Digital-only care ({', '.join(DIGITAL_ACTIONS)}): recommended on **{_pct(d.no_access)}** of "
                     f"the weeks of patients without digital access ({d.no_access_steps} weeks; the action mask "
                     f"allowed it on {_pct(d.no_access_allowed)} of them) and on **{_pct(d.access)}** of the weeks "
                     f"of patients with access ({d.access_steps} weeks; allowed on {_pct(d.access_allowed)}).")
        lines.append("")
    return lines


def _policy_warnings(p: PolicyResult) -> list[str]:
    notes: list[str] = []
    for name, est in p.estimates.items():
        for w in est.warnings:
            notes.append(f"{name}: {w}")
    if p.fairness is not None:
        notes += list(p.fairness.warnings)
    notes += [w for w in p.warnings if not any(w.endswith(n) or w == n for n in notes)]
    return list(dict.fromkeys(notes))


def _warnings_section(result: Comparison) -> list[str]:
    lines = ["## Warnings", ""]
    any_warning = False
    for p in result.policies:
        notes = _policy_warnings(p)
        if not notes:
            continue
        any_warning = True
        lines += [f"**{_text(p.label)}**", ""]
        lines += [f"- {_text(n)}" for n in notes]
        lines.append("")
    if not any_warning:
        lines += ["None.", ""]
    return lines


def render_html(markdown_text: str, title: str) -> str:
    """A standalone HTML page from the report's Markdown (the ``markdown`` package, a TensorBoard dependency)."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}"
             "th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:left}th{background:#f3f3f3}"
             "blockquote{border-left:4px solid #c60;background:#fff6ee;margin:1em 0;padding:0.5em 1em}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{style}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


# ----------------------------------------------------------------------------- plots


def _colours(n: int) -> list[Any]:
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def plot_estimates(result: Comparison, path: Path) -> Path:
    """Each policy's estimates with intervals, one colour per estimator; the simulator truth as a grey band."""
    labels = [p.label for p in result.policies]
    names = list(result.estimators)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(labels) + 2), 4.8), dpi=110)
    width = 0.7
    offsets = np.linspace(-width / 2, width / 2, len(names)) if len(names) > 1 else np.zeros(1)
    unidentified: list[float] = []
    for i, p in enumerate(result.policies):
        if p.truth is not None:
            t = p.truth.value
            ax.fill_between([i - 0.45, i + 0.45], t.low, t.high, color="0.85", zorder=0,
                            label="simulator truth (95 %)" if i == 0 else None)
            ax.plot([i - 0.45, i + 0.45], [t.value, t.value], color="0.4", lw=1.5, zorder=1)
        for k, (name, colour) in enumerate(zip(names, _colours(len(names)), strict=True)):
            est = p.estimates.get(name)
            x = i + offsets[k]
            if est is None or not est.identifiable:
                unidentified.append(x)
                continue
            if est.low is not None and est.high is not None:
                ax.errorbar([x], [est.value], yerr=[[est.value - est.low], [est.high - est.value]], fmt="o",
                            color=colour, capsize=3, ms=5, label=name if i == 0 else None)
            else:
                ax.plot([x], [est.value], "o", color=colour, ms=5, label=name if i == 0 else None)
    bottom = ax.get_ylim()[0]
    for x in unidentified:
        ax.text(x, bottom, "not identifiable", rotation=90, ha="center", va="bottom", fontsize=7, color="0.3")
    ax.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 3 else 0, ha="right"
                  if len(labels) > 3 else "center")
    ax.set_ylabel("value (expected total reward per patient)")
    ax.set_title(f"Off-policy estimates, {result.level:.0%} intervals (decision support)")
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_subgroups(result: Comparison, path: Path) -> Path | None:
    """The headline estimator per subgroup, one panel per subgroup column, one colour per policy."""
    policies = [p for p in result.policies if p.fairness is not None and p.fairness.values is not None]
    if not policies:
        return None
    headline = result.headline
    columns = list(result.subgroup_columns)
    if not columns:
        return None
    ncols = min(3, len(columns))
    nrows = int(np.ceil(len(columns) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), dpi=110, squeeze=False)
    colours = _colours(len(policies))
    for j, column in enumerate(columns):
        ax = axes[j // ncols][j % ncols]
        groups = result.subgroup_columns[column]
        offsets = np.linspace(-0.3, 0.3, len(policies)) if len(policies) > 1 else np.zeros(1)
        for k, (p, colour) in enumerate(zip(policies, colours, strict=True)):
            assert p.fairness is not None and p.fairness.values is not None
            by_group = {g.group: g for g in p.fairness.values.of(column)}
            for i, group in enumerate(groups):
                g = by_group.get(group)
                est = None if g is None else g.estimates.get(headline)
                if g is None or est is None or not est.identifiable:
                    continue
                x = i + offsets[k]
                face = "none" if g.too_few else colour
                yerr = None if est.low is None or est.high is None else [[est.value - est.low],
                                                                          [est.high - est.value]]
                ax.errorbar([x], [est.value], yerr=yerr, fmt="o", color=colour, mfc=face, capsize=3, ms=5,
                            label=p.label if (j == 0 and i == 0) else None)
        ax.set_xticks(range(len(groups)), groups, fontsize=8, rotation=15 if len(groups) > 3 else 0)
        ax.set_title(column, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for j in range(len(columns), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    axes[0][0].set_ylabel(f"{headline} value")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle(f"Value per subgroup ({headline}, {result.level:.0%} intervals; hollow: too few episodes)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.88 if handles else 1, 0.95))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_care_classes(result: Comparison, path: Path) -> Path | None:
    """Stacked recommendation rates per class of care, per subgroup (rows: policies, columns: subgroups)."""
    policies = [p for p in result.policies if p.fairness is not None]
    columns = list(result.subgroup_columns)
    if not policies or not columns:
        return None
    nrows, ncols = len(policies), len(columns)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 1.6, 2.6 * nrows + 0.6), dpi=100, squeeze=False)
    colours = _colours(len(CARE_CLASSES))
    for r, p in enumerate(policies):
        assert p.fairness is not None
        for c, column in enumerate(columns):
            ax = axes[r][c]
            rows = p.fairness.parity.of(column)
            x = np.arange(len(rows))
            bottom = np.zeros(len(rows))
            for care, colour in zip(CARE_CLASSES, colours, strict=True):
                heights = np.array([row.recommended[care] for row in rows])
                ax.bar(x, heights, bottom=bottom, color=colour, label=care if (r == 0 and c == 0) else None,
                       width=0.7)
                bottom += heights
            ax.set_xticks(x, [row.group for row in rows], fontsize=7, rotation=15 if len(rows) > 3 else 0)
            ax.set_ylim(0, 1)
            if r == 0:
                ax.set_title(column, fontsize=10)
            if c == 0:
                ax.set_ylabel(p.label, fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, title="class of care", title_fontsize=8)
    fig.suptitle("Share of recommendations by class of care and subgroup", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.84, 0.96))
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["DECISION_SUPPORT", "REPORT_HTML", "REPORT_JSON", "REPORT_MD", "check_output_folder",
           "plot_care_classes", "plot_estimates", "plot_subgroups", "render_html", "render_markdown",
           "write_report"]

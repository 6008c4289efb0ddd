"""Rendering outcomes: terminal table, markdown, CSV, JSON and the slide-ready plot."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ruxo_fhir.errors import RuxoError
from ruxo_fhir.outcomes import CohortOutcomes

CASE_COLUMNS = ("case_id", "indication", "group", "site", "improvement_pct", "category",
                "months_to_evaluation", "evaluation_date", "not_evaluable_reason")


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _grid(headers: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return out
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return out


def summary_line(result: CohortOutcomes) -> str:
    s = result.summary
    rate = s["response_rate"]
    ci = s["response_rate_ci95"]
    responders = s["complete"] + s["partial"]
    rate_text = (f"response rate {responders}/{s['evaluable']} = {rate:.1%} "
                 f"(95 % CI {ci[0]:.1%}-{ci[1]:.1%}, Clopper-Pearson)") if rate is not None else "response rate n/a"
    months = s["mean_months_to_evaluation"]
    return (f"n={s['n']}: complete {s['complete']}, partial {s['partial']}, none {s['none']}, "
            f"not evaluable {s['not_evaluable']}; {rate_text}; mean time to evaluation "
            f"{_fmt(months)} months; rule {result.rule_version}")


def render_text(result: CohortOutcomes, *, markdown: bool = False) -> str:
    """Table I (groups, n) and Table II (per case), then the summary and the warnings."""
    h = "## " if markdown else ""
    lines = [f"{h}Table I: indications", ""]
    lines += _grid(["indication group", "n"], [[g, str(n)] for g, n in result.by_group.items()], markdown)
    lines += ["", f"{h}Table II: response per case", ""]
    rows = [[c.case_id, c.indication, _fmt(c.site), _fmt(c.months_to_evaluation), _fmt(c.improvement_pct),
             c.category] for c in result.cases]
    lines += _grid(["case", "indication", "site", "months", "improvement %", "response"], rows, markdown)
    lines += ["", summary_line(result)]
    if result.warnings:
        lines += ["", f"{h}Data-quality warnings" if markdown else "warnings:"]
        lines += [f"- {w}" for w in result.warnings]
    return "\n".join(lines) + "\n"


def render_csv(result: CohortOutcomes) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CASE_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for case in result.cases:
        row = case.public()
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CASE_COLUMNS})
    return buf.getvalue()


def render_json(result: CohortOutcomes) -> str:
    return json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n"


def render(result: CohortOutcomes, fmt: str) -> str:
    if fmt == "json":
        return render_json(result)
    if fmt == "csv":
        return render_csv(result)
    return render_text(result, markdown=fmt == "markdown")


_COLOURS = {"complete": "#1b7837", "partial": "#e08214", "none": "#b2182b", "not_evaluable": "#999999"}


def plot(result: CohortOutcomes, path: Path) -> None:
    """Improvement % per case grouped by indication, 40/80 thresholds drawn (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuxoError("--plot needs matplotlib: pip install 'ruxo-fhir[plot]'") from None
    import textwrap

    order = {g: i for i, g in enumerate(sorted(result.by_group, key=lambda g: (-result.by_group[g], g)))}
    cases = sorted(result.cases, key=lambda c: (order[c.group], -(c.improvement_pct or -1000), c.case_id))
    fig, ax = plt.subplots(figsize=(11, 6), dpi=120)
    xs = list(range(len(cases)))
    values = [c.improvement_pct if c.improvement_pct is not None else 0.0 for c in cases]
    colours = [_COLOURS[c.category] for c in cases]
    bars = ax.bar(xs, values, color=colours, edgecolor="black", linewidth=0.5)
    for bar, case in zip(bars, cases):
        if case.improvement_pct is None:
            bar.set_hatch("//")
            ax.text(bar.get_x() + bar.get_width() / 2, 2, "n/e", ha="center", va="bottom", fontsize=8)
    ax.axhline(80, color="#1b7837", linestyle="--", linewidth=1)
    ax.axhline(40, color="#e08214", linestyle="--", linewidth=1)
    ax.text(len(cases) - 0.4, 80, " complete > 80 %", ha="left", va="center", fontsize=8, color="#1b7837",
            clip_on=False)
    ax.text(len(cases) - 0.4, 40, " partial 40-80 %", ha="left", va="center", fontsize=8, color="#e08214",
            clip_on=False)
    ax.set_xticks(xs, [c.case_id for c in cases], rotation=0, fontsize=8)
    # group labels under the case ids
    start = 0
    for i in range(1, len(cases) + 1):
        if i == len(cases) or cases[i].group != cases[start].group:
            mid = (start + i - 1) / 2
            label = textwrap.fill(cases[start].group, 14, break_long_words=False)
            ax.annotate(label, xy=(mid, 0), xycoords=("data", "axes fraction"),
                        xytext=(0, -22), textcoords="offset points", ha="center", va="top", fontsize=8)
            if i < len(cases):
                ax.axvline(i - 0.5, color="#cccccc", linewidth=0.8)
            start = i
    low = min([0.0, *values]) - 5
    ax.set_ylim(low, 105)
    ax.set_xlim(-0.6, len(cases) - 0.4)
    ax.set_ylabel("improvement of lesions (%)")
    s = result.summary
    ci = s["response_rate_ci95"]
    title = "Topical ruxolitinib: improvement per case by indication"
    if s["response_rate"] is not None:
        title += f"\nresponse {s['complete'] + s['partial']}/{s['evaluable']} (95 % CI {ci[0]:.0%}-{ci[1]:.0%})"
    ax.set_title(title, fontsize=11)
    from matplotlib.patches import Rectangle

    handles = [Rectangle((0, 0), 1, 1, color=c) for c in _COLOURS.values()]
    ax.legend(handles, ["complete", "partial", "none", "not evaluable"], loc="upper center",
              bbox_to_anchor=(0.5, -0.2), fontsize=8, ncol=4, frameon=False)
    fig.subplots_adjust(bottom=0.27, right=0.86)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)

"""Rendering outcomes: terminal table, markdown, CSV, JSON and the slide-ready plot."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from ruxo_fhir.csvsafe import SafeDictWriter
from ruxo_fhir.errors import RuxoError
from ruxo_fhir.mapping.spec import ReportSpec
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
    writer = SafeDictWriter(buf, fieldnames=CASE_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for case in result.cases:
        row = case.public()
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CASE_COLUMNS})
    return buf.getvalue()


def render_json(result: CohortOutcomes) -> str:
    return json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n"


def render(result: CohortOutcomes, fmt: str, *, title: str = "", displays: dict[str, str] | None = None,
           texts: ReportSpec | None = None) -> str:
    if fmt == "json":
        return render_json(result)
    if fmt == "csv":
        return render_csv(result)
    if fmt == "html":
        return render_html(result, title=title, displays=displays, texts=texts)
    return render_text(result, markdown=fmt == "markdown")


# --- the HTML report ----------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:2rem auto;
max-width:62rem;color:#222;line-height:1.45;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6rem 0;font-size:.93rem}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right}
.rate{font-size:1.2rem;font-weight:600;margin:1rem 0}
.complete{color:#1b7837}.partial{color:#b35806}.none{color:#b2182b}.not_evaluable{color:#666}
.seed td{width:50%}.seed ul{margin:.2rem 0;padding-left:1.1rem}
.warn{background:#fff7e0;border:1px solid #e0c060;padding:.6rem 1rem}
img.plot{max-width:100%;height:auto;border:1px solid #eee}
.meta{color:#555;font-size:.88rem}
"""


def _months_text(months: float | None) -> str:
    if months is None:
        return "time to evaluation unknown"
    value = f"{months:g}"
    return f"after {value} month" + ("" if months == 1 else "s")


def seed_table_lines(result: CohortOutcomes, displays: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Table II as the seed lays it out: one line per indication, site and time, with (n=k).

    Keys: `complete`, `partial_none` (partial first, then none) and `not_evaluable`.
    """
    names = displays or {}
    groups: dict[tuple[str, str, str, float | None], int] = {}
    rank = {"complete": 0, "partial": 1, "none": 2, "not_evaluable": 3}
    for case in sorted(result.cases, key=lambda c: rank[c.category]):
        key = (case.category, names.get(case.indication) or case.indication.replace("_", " ") or "indication unknown",
               case.site or "", case.months_to_evaluation)
        groups[key] = groups.get(key, 0) + 1
    out: dict[str, list[str]] = {"complete": [], "partial_none": [], "not_evaluable": []}
    for (category, indication, site, months), n in groups.items():
        where = f" ({site})" if site else ""
        line = f"{indication}{where} {_months_text(months)} (n={n})"
        if category == "none":
            line += " \u2014 no response"
        column = "complete" if category == "complete" else "not_evaluable" if category == "not_evaluable" \
            else "partial_none"
        out[column].append(line)
    return out


def render_html(result: CohortOutcomes, *, title: str = "", displays: dict[str, str] | None = None,
                png: bytes | None = None, texts: ReportSpec | None = None) -> str:
    """One self-contained page: Tables I and II, the response rate with its CI, the plot, the rule, the warnings.

    No external resource (styles inline, the plot a PNG data URI), so it can be mailed or archived.
    """
    import base64
    from html import escape

    from ruxo_fhir import __version__

    s = result.summary
    warnings = list(result.warnings)
    if png is None:
        try:
            png = plot_png(result, texts)
        except RuxoError as exc:
            warnings.append(f"no plot in this report: {exc}")
    heading = title or (texts or ReportSpec()).title
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{escape(heading)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           f"<h1>{escape(heading)}</h1>",
           f'<p class="meta">{s["n"]} case(s); outcome rule <code>{escape(result.rule_version)}</code>: '
           f"complete &gt; 80 %, partial 40\u201380 %, none &lt; 40 % improvement; the latest evaluation of a "
           f"case counts. ruxo-fhir {escape(__version__)}.</p>"]
    rate = ci_text(result) if s["response_rate"] is not None else "n/a (no evaluable case)"
    out.append(f'<p class="rate" id="response-rate">Response rate (complete + partial): {escape(rate)}, '
               "exact Clopper\u2013Pearson</p>")
    # a rate over a few evaluable cases must not be read without how many were left out
    out += [f'<p class="warn" id="not-evaluable">{escape(w)}</p>' for w in warnings if "case(s) not evaluable" in w]
    months = s["mean_months_to_evaluation"]
    out.append(f'<p>Complete {s["complete"]}, partial {s["partial"]}, none {s["none"]}, not evaluable '
               f'{s["not_evaluable"]}; mean time to evaluation {escape(_fmt(months))} months.</p>')

    out += ["<h2>Table I: indications</h2>", '<table id="table-1"><thead><tr><th>Indication</th>'
            "<th>Number of patients</th></tr></thead><tbody>"]
    out += [f'<tr><td>{escape(g)}</td><td class="num">{n}</td></tr>' for g, n in result.by_group.items()]
    out.append(f'<tr><th>Total</th><th class="num">{s["n"]}</th></tr></tbody></table>')

    lines = seed_table_lines(result, displays)
    out += ["<h2>Table II: outcome under treatment</h2>", '<table id="table-2" class="seed"><thead><tr>',
            f'<th class="complete">Complete remission (n={s["complete"]})</th>',
            f'<th class="partial">Partial remission (n={s["partial"]}) or none (n={s["none"]})</th>',
            "</tr></thead><tbody><tr>"]
    for column in ("complete", "partial_none"):
        items = "".join(f"<li>{escape(x)}</li>" for x in lines[column]) or "<li>\u2014</li>"
        out.append(f"<td><ul>{items}</ul></td>")
    out.append("</tr></tbody></table>")
    if lines["not_evaluable"]:
        out.append(f"<p>Not evaluable (n={s['not_evaluable']}): "
                   + "; ".join(escape(x) for x in lines["not_evaluable"]) + "</p>")

    out += ["<h2>Outcome per case</h2>", '<table id="cases"><thead><tr><th>Case</th><th>Indication</th>'
            "<th>Group</th><th>Site</th><th>Months</th><th>Improvement %</th><th>Response</th></tr></thead><tbody>"]
    for c in result.cases:
        label = c.category.replace("_", " ")
        if c.not_evaluable_reason:
            label += f" ({c.not_evaluable_reason})"
        out.append(f"<tr><td>{escape(c.case_id)}</td><td>{escape(c.indication)}</td><td>{escape(c.group)}</td>"
                   f"<td>{escape(c.site or '')}</td><td class=\"num\">{escape(_fmt(c.months_to_evaluation))}</td>"
                   f"<td class=\"num\">{escape(_fmt(c.improvement_pct))}</td>"
                   f'<td class="{c.category}">{escape(label)}</td></tr>')
    out.append("</tbody></table>")

    if png:
        data = base64.b64encode(png).decode("ascii")
        out += ["<h2>Improvement per case</h2>",
                f'<img class="plot" id="plot" alt="Improvement of lesions per case by indication, with the 40 % '
                f'and 80 % thresholds; response {escape(rate)}" src="data:image/png;base64,{data}">']
    out.append("<h2>Data-quality warnings</h2>")
    if warnings:
        out.append('<div class="warn" id="warnings"><ul>' + "".join(f"<li>{escape(w)}</li>" for w in warnings)
                   + "</ul></div>")
    else:
        out.append('<p id="warnings">None.</p>')
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


_COLOURS = {"complete": "#1b7837", "partial": "#e08214", "none": "#b2182b", "not_evaluable": "#999999"}


def ci_text(result: CohortOutcomes) -> str:
    """`11/12 = 91.7 % (95 % CI 61.5–99.8 %)`: percentages to one decimal, as the seed reports them."""
    s = result.summary
    if s["response_rate"] is None:
        return "response rate n/a (no evaluable case)"
    lo, hi = s["response_rate_ci95"]
    return (f"{s['complete'] + s['partial']}/{s['evaluable']} = {s['response_rate'] * 100:.1f} % "
            f"(95 % CI {lo * 100:.1f}\u2013{hi * 100:.1f} %)")


def _matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuxoError("the plot needs matplotlib: pip install 'ruxo-fhir[plot]'") from None
    return plt


def figure(result: CohortOutcomes, texts: ReportSpec | None = None) -> tuple[Any, list[Any]]:
    """The outcomes figure and its group labels (placed on as many rows as needed never to overlap)."""
    import textwrap

    plt = _matplotlib()
    order = {g: i for i, g in enumerate(sorted(result.by_group, key=lambda g: (-result.by_group[g], g)))}
    cases = sorted(result.cases, key=lambda c: (order[c.group], -(c.improvement_pct or -1000), c.case_id))
    fig, ax = plt.subplots(figsize=(11, 6), dpi=120)
    n = max(len(cases), 1)
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
    ax.text(n - 0.4, 80, " complete > 80 %", ha="left", va="center", fontsize=8, color="#1b7837", clip_on=False)
    ax.text(n - 0.4, 40, " partial 40-80 %", ha="left", va="center", fontsize=8, color="#e08214", clip_on=False)
    ax.set_xticks(xs, [c.case_id for c in cases], rotation=0, fontsize=8)
    low = min([0.0, *values]) - 5
    ax.set_ylim(low, 105)
    ax.set_xlim(-0.6, n - 0.4)
    texts = texts or ReportSpec()
    ax.set_ylabel(texts.improvement_axis)
    s = result.summary
    title = texts.plot_title
    if s["response_rate"] is not None:
        title += f"\nresponse {ci_text(result)}"
    ax.set_title(title, fontsize=11)
    fig.subplots_adjust(bottom=0.27, right=0.86)

    # group labels under the case ids, wrapped to the width of their bars
    fig.canvas.draw()
    slot_pt = ax.get_window_extent().width / n * 72 / fig.dpi
    spans: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(cases) + 1):
        if i == len(cases) or cases[i].group != cases[start].group:
            spans.append((start, i))
            if i < len(cases):
                ax.axvline(i - 0.5, color="#cccccc", linewidth=0.8)
            start = i
    labels: list[Any] = []
    renderer = fig.canvas.get_renderer()
    placed: list[list[Any]] = []  # rows of labels, each row left to right
    for a, b in spans:
        width_chars = max(8, int((b - a) * slot_pt * 0.95 / (8 * 0.55)))
        text = textwrap.fill(cases[a].group, width_chars, break_long_words=False)
        mid = (a + b - 1) / 2
        for level in range(len(placed) + 1):
            label = ax.annotate(text, xy=(mid, 0), xycoords=("data", "axes fraction"),
                                xytext=(0, -20 - 34 * level), textcoords="offset points",
                                ha="center", va="top", fontsize=8)
            box = label.get_window_extent(renderer).expanded(1.04, 1.0)
            if level == len(placed):
                placed.append([])
            if not any(box.overlaps(other.get_window_extent(renderer)) for other in placed[level]):
                placed[level].append(label)
                labels.append(label)
                break
            label.remove()
    rows = len(placed)
    from matplotlib.patches import Rectangle

    handles = [Rectangle((0, 0), 1, 1, color=c) for c in _COLOURS.values()]
    ax.legend(handles, ["complete", "partial", "none", "not evaluable"], loc="upper center",
              bbox_to_anchor=(0.5, -0.2 - 0.09 * (rows - 1)), fontsize=8, ncol=4, frameon=False)
    fig.subplots_adjust(bottom=0.27 + 0.07 * (rows - 1), right=0.86)
    return fig, labels


def plot_png(result: CohortOutcomes, texts: ReportSpec | None = None) -> bytes:
    """The figure as PNG bytes (the HTML report embeds these)."""
    plt = _matplotlib()
    fig, _labels = figure(result, texts)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot(result: CohortOutcomes, path: Path, texts: ReportSpec | None = None) -> None:
    """Improvement % per case grouped by indication, 40/80 thresholds drawn (needs matplotlib).

    `texts`: the title and axis words, from the mapping's `report` block."""
    data = plot_png(result, texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)

"""report.html: one self-contained page (figures inlined as base64 PNG) with the key numbers."""

from __future__ import annotations

import base64
import html
import io

import pandas as pd
from matplotlib.figure import Figure

from prunecxr.analysis.replication import SYNTHETIC_NOTE
from prunecxr.analysis.study_analysis import Analysis

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 4px 10px; border: 1px solid #ddd; }
.seen { color: #137333; font-weight: bold; } .partly { color: #b06000; font-weight: bold; } .not-seen { color: #b3261e; font-weight: bold; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
"""


def figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def render_report(analysis: Analysis, *, title: str, context: dict[str, str]) -> str:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        _table_html(context),
    ]
    replication = analysis.tables.get("tables/replication.csv")
    if replication is not None:
        parts += ["<h2>Did it replicate? The paper's numbers beside ours</h2>"]
        parts += [_replication(replication)]
    parts += [
        "<h2>Findings of the paper, checked on this data</h2>",
        _findings(analysis.findings),
        "<h2>Our tests of the paper's PIE claims</h2>",
        "<p>The paper shows who the PIEs are (Fig. 5); these two tests of its claims are ours.</p>",
        _findings(analysis.pie_tests),
    ]
    thresholds = analysis.tables.get("tables/thresholds.csv")
    if thresholds is not None:
        parts += [
            "<h2>Forgetting thresholds (k20) by class</h2>",
            thresholds.to_html(index=False, na_rep="never", float_format="%g"),
        ]
    for path, figure in analysis.figures.items():
        data = base64.b64encode(figure_png(figure)).decode()
        caption = html.escape(path.removeprefix("figures/").removesuffix(".png").replace("_", " "))
        parts.append(
            f"<figure><img alt='{caption}' src='data:image/png;base64,{data}'><figcaption>{caption}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _table_html(context: dict[str, str]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in context.items()
    )
    return f"<table>{rows}</table>"


def _findings(findings: list[tuple[str, bool | None, str]]) -> str:
    rows = []
    for claim, seen, numbers in findings:
        verdict = {
            True: "<span class='seen'>appears</span>",
            False: "<span class='not-seen'>did not appear</span>",
            None: "not testable (too few classes)",
        }[seen]
        rows.append(
            f"<tr><td>{html.escape(claim)}</td><td>{verdict}</td><td>{html.escape(numbers)}</td></tr>"
        )
    return (
        "<table><tr><th>finding</th><th>here</th><th>numbers</th></tr>" + "".join(rows) + "</table>"
    )


VERDICT_CLASS = {"consistent": "seen", "same direction": "partly", "differs": "not-seen"}


def _replication(table: pd.DataFrame) -> str:
    """Paper, ours [95 % interval], verdict; the synthetic-data warning above the table."""
    notes = set(table.note)
    warning = ""
    if any(SYNTHETIC_NOTE in note for note in notes):
        warning = f"<p class='not-seen'>{html.escape(SYNTHETIC_NOTE)}.</p>"
    counts = table.verdict.value_counts()
    summary = ", ".join(f"{n} {verdict}" for verdict, n in counts.items())
    rows = []
    for row in table.itertuples():
        interval = "—" if pd.isna(row.ci_low) else f"[{row.ci_low:.3g}, {row.ci_high:.3g}]"
        what = " ".join(str(v) for v in (row.statistic, row.x, row.y, row.subject) if v)
        cells = [row.figure, what, f"{row.paper:g}", f"{row.ours:.3g}", interval]
        verdict = f"<span class='{VERDICT_CLASS.get(row.verdict, '')}'>{row.verdict}</span>"
        note = row.note.replace(SYNTHETIC_NOTE, "").strip("; ")
        rows.append(
            "<tr>"
            + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
            + f"<td>{verdict}</td><td>{html.escape(note)}</td></tr>"
        )
    header = "".join(
        f"<th>{h}</th>"
        for h in ("figure", "statistic", "paper", "ours", "95 % interval", "verdict", "note")
    )
    return (
        f"{warning}<p>{html.escape(summary)} (tables/replication.csv)</p>"
        f"<table><tr>{header}</tr>{''.join(rows)}</table>"
    )

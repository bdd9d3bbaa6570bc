"""The reader study's answers (Holste et al. 2023, Fig. 6): reading VIA 2 CSV exports or plain
CSVs, checking every response against the key, the PIE vs non-PIE statistics and the figure.

A response is rejected whole, with one line naming its file, line and value, when its file is
not in the key, it repeats an earlier response of the same reader and file, or an answer is
missing or out of range (agree: yes/no; quality and difficulty: 1-5)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy import stats  # noqa: E402

from prunecxr import PrunecxrError  # noqa: E402
from prunecxr.analysis.reader_study import QUESTIONS  # noqa: E402

NAMES = [q.name for q in QUESTIONS]
PLAIN_COLUMNS = ["reader", "filename", *NAMES]
RAW_COLUMNS = ["source", "line", "reader", "filename", *NAMES, "problem"]
REJECTED_COLUMNS = ["source", "line", "reader", "filename", "problem", "message"]


@dataclass(frozen=True)
class Responses:
    """valid: source, line, reader, filename, the answers as numbers (agree: yes = 1, no = 0),
    the key's image, row, is_pie, and z_<question> (z-score within the reader);
    rejected: REJECTED_COLUMNS, `message` the one line that reports it."""

    valid: pd.DataFrame
    rejected: pd.DataFrame


def read_responses(path: Path) -> pd.DataFrame:
    """RAW_COLUMNS (answers as text, "" when missing; reader None for VIA exports) of a VIA 2 CSV
    export (a file_attributes column) or a plain CSV (PLAIN_COLUMNS)."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise PrunecxrError(f"{path}: not a readable CSV ({error})") from None
    frame["line"] = np.arange(len(frame)) + 2  # the header is line 1
    if "file_attributes" in frame.columns:
        return _from_via(frame, path)
    missing = [c for c in PLAIN_COLUMNS if c not in frame.columns]
    if missing:
        raise PrunecxrError(
            f"{path}: neither a VIA export (no file_attributes column) nor a plain CSV "
            f"(missing {', '.join(missing)})"
        )
    return frame.assign(source=str(path), problem="")[RAW_COLUMNS]


def _from_via(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    # VIA writes a row per region, each repeating the file's attributes: keep each file's first.
    if "region_id" in frame.columns:
        frame = frame[frame.region_id.isin(["", "0"])]
    rows = []
    for line, filename, text in zip(frame.line, frame.filename, frame.file_attributes):
        row = {"source": str(path), "line": line, "reader": None, "filename": filename}
        try:
            answers = json.loads(text or "{}")
            row["problem"] = "" if isinstance(answers, dict) else "file_attributes is no object"
        except json.JSONDecodeError:
            answers, row["problem"] = {}, f"file_attributes {text!r} is not JSON"
        for q in QUESTIONS:  # our attribute names, or the original study's question texts
            value = answers.get(q.name, answers.get(q.original, "")) if row["problem"] == "" else ""
            row[q.name] = value if isinstance(value, str) else json.dumps(value)
        rows.append(row)
    return pd.DataFrame(rows, columns=RAW_COLUMNS)


def check_responses(raw: pd.DataFrame, key: pd.DataFrame) -> Responses:
    """Every response checked against the key (KEY_COLUMNS); VIA responses (and plain ones
    without a reader) take their reader from the key: the reader whose folder holds the file."""
    owner = dict(zip(key.filename, key.reader.astype(str)))
    readers = [
        owner.get(f, "") if pd.isna(r) or r == "" else str(r)
        for r, f in zip(raw.reader, raw.filename)
    ]
    raw = raw.assign(reader=readers, **{q.name: raw[q.name].map(_canonical) for q in QUESTIONS})
    seen: dict[tuple[str, str], str] = {}
    raw["problem"] = [_problems(row, owner, seen) for row in raw.itertuples(index=False)]
    bad = raw.problem != ""
    messages = [
        f"{r.source}: line {r.line}: {r.filename}: {r.problem}" for r in raw[bad].itertuples()
    ]
    rejected = raw[bad].assign(message=messages)[REJECTED_COLUMNS].reset_index(drop=True)
    valid = raw[~bad].drop(columns="problem")
    valid["agree"] = (valid.agree == "yes").astype(float)
    valid = valid.astype({name: float for name in NAMES[1:]})
    valid = valid.merge(key[["filename", "image", "row", "is_pie"]], on="filename")
    return Responses(standardize(valid), rejected)


def _canonical(value: str) -> str:
    """An answer as its option: stripped, lower case, a whole number without ".0"."""
    text = str(value).strip().lower()
    try:
        number = float(text)
        return str(int(number)) if number.is_integer() else text
    except ValueError:
        return text


def _problems(row, owner: dict[str, str], seen: dict[tuple[str, str], str]) -> str:
    """What is wrong with one response ("" if nothing); notes it in `seen`."""
    if row.filename not in owner:
        return f"file {row.filename!r} is not in the key (not a file of this study)"
    where = (str(row.reader), row.filename)
    if where in seen:
        return f"duplicate of {seen[where]} (reader {row.reader}, {row.filename})"
    seen[where] = f"{row.source} line {row.line}"
    if row.problem:
        return row.problem
    found = []
    for q in QUESTIONS:
        value = getattr(row, q.name)
        if value == "":
            found.append(f"{q.name} missing")
        elif value not in q.options:
            found.append(f"{q.name} {value!r} is not {'/'.join(q.options)}")
    return "; ".join(found)


def standardize(valid: pd.DataFrame) -> pd.DataFrame:
    """Adds z_<question>: the answer as a z-score among its reader's answers (NaN where the
    reader gave one value only)."""
    by_reader = valid.groupby("reader")
    for name in NAMES:
        mean, sd = by_reader[name].transform("mean"), by_reader[name].transform("std")
        valid[f"z_{name}"] = (valid[name] - mean) / sd.where(sd > 0)
    return valid


def compare(pie: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """n, mean, sd (ddof 1) of both groups, and Kruskal-Wallis (the original's test),
    Mann-Whitney U (two-sided) and Welch's t: statistic and p (NaN below two per group)."""
    pie, other = pie[np.isfinite(pie)], other[np.isfinite(other)]
    row = {"pie_n": len(pie), "pie_mean": np.mean(pie) if len(pie) else np.nan}
    row["pie_sd"] = np.std(pie, ddof=1) if len(pie) > 1 else np.nan
    row["other_n"], row["other_mean"] = len(other), np.mean(other) if len(other) else np.nan
    row["other_sd"] = np.std(other, ddof=1) if len(other) > 1 else np.nan
    tests = {
        "kruskal": stats.kruskal,
        "mannwhitney": lambda a, b: stats.mannwhitneyu(a, b, alternative="two-sided"),
        "welch": lambda a, b: stats.ttest_ind(a, b, equal_var=False),
    }
    for name, test in tests.items():
        result = (np.nan, np.nan)
        if len(pie) > 1 and len(other) > 1:
            with warnings.catch_warnings():  # all answers equal: NaN, said by the NaN itself
                warnings.simplefilter("ignore", RuntimeWarning)
                found = test(pie, other)
            result = (float(found.statistic), float(found.pvalue))
        row[f"{name}_statistic"], row[f"{name}_p"] = result
    return row


def statistics(valid: pd.DataFrame) -> pd.DataFrame:
    """Per question and scale (raw answers; z within reader): compare(PIEs, non-PIEs)."""
    rows = []
    for name in NAMES:
        for scale, column in (("raw", name), ("z", f"z_{name}")):
            values = valid[column].to_numpy(float)
            is_pie = valid.is_pie.to_numpy(bool)
            rows.append(
                {"question": name, "scale": scale, **compare(values[is_pie], values[~is_pie])}
            )
    return pd.DataFrame(rows)


def figure(table: pd.DataFrame) -> Figure:
    """Fig. 6 of the paper: per question, mean ± sd of the raw answers of PIEs and non-PIEs,
    with the Kruskal-Wallis p."""
    fig, axes = plt.subplots(
        1, len(QUESTIONS), figsize=(12, 3.4), sharey=True, layout="constrained"
    )
    raw = table[table.scale == "raw"].set_index("question")
    for ax, q in zip(axes, QUESTIONS):
        row = raw.loc[q.name]
        means, sds = [row.pie_mean, row.other_mean], [row.pie_sd, row.other_sd]
        ax.errorbar(means, [1, 0], xerr=np.nan_to_num(sds), fmt="o", capsize=6, markersize=9)
        ax.set(
            yticks=[1, 0],
            yticklabels=[f"PIE (n={row.pie_n})", f"non-PIE (n={row.other_n})"],
            ylim=(-0.5, 1.5),
            xlim=(-0.25, 1.25) if q.name == "agree" else (0.5, 5.5),
            xlabel=q.scale,
            title=f"{q.name}: Kruskal-Wallis p = {row.kruskal_p:.3g}",
        )
    fig.suptitle("Reader study: PIEs vs non-PIEs (mean ± sd)")
    return fig

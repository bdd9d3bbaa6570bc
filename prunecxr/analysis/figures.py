"""Figures of the analysis: each function takes tables and returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from adjustText import adjust_text  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from prunecxr.analysis.cooccurrence import LEGACY_IOU_POWER, SPLIT_OF_MODE  # noqa: E402
from prunecxr.analysis.forgetting import correlate  # noqa: E402

METHOD_COLORS = {"l1": "tab:blue", "random": "tab:orange", "structured": "tab:green"}


def mean_ap_vs_sparsity(curves: pd.DataFrame) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for method, rows in curves.groupby("method"):
        color = METHOD_COLORS.get(method)
        ax.plot(rows.sparsity, rows["median"], marker="o", color=color, label=method)
        ax.fill_between(rows.sparsity, rows.q25, rows.q75, color=color, alpha=0.2)
    ax.set(
        xlabel="sparsity (fraction of weights pruned)",
        ylabel="test mAP (median over seeds)",
        title="Mean AP vs sparsity (band: interquartile range over seeds)",
    )
    ax.legend(title="method")
    return fig


def forgettability_curves(curves: pd.DataFrame, k20: pd.DataFrame, method: str) -> Figure:
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    log_freq = np.log10(k20.set_index("class").train_freq.clip(lower=1))
    norm = plt.Normalize(log_freq.min(), log_freq.max())
    for name, rows in curves.groupby("class", sort=False):
        ax.plot(rows.sparsity, 100 * rows.rel_ap_change, color=plt.cm.viridis(norm(log_freq[name])))
    ax.axhline(-20, color="grey", linestyle="--", linewidth=1)
    ax.set(
        xlabel="sparsity",
        ylabel="relative AP change (%)",
        title=f"Forgettability curves ({method}; median over seeds)",
    )
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax)
    bar.set_label("log10 training frequency")
    return fig


def correlation_scatter(
    x: np.ndarray,
    y: np.ndarray,
    labels,
    *,
    axes_labels: tuple[str, str],
    title: str,
    highlight=(),
    label_all: bool = True,
    ax=None,
) -> Figure:
    """As the paper draws its correlations: points, the least-squares line, Pearson r and
    Spearman ρ on the plot; `highlight` (the paper's call-outs) ringed in red and always
    labelled; labels moved apart so that none overlaps another (adjustText)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    ax.scatter(x[keep], y[keep], s=14 if label_all else 8, color="tab:blue", alpha=0.8)
    stats = correlate(x, y, "", "")
    if stats["n"] >= 3 and np.isfinite(stats["pearson_r"]):
        slope, intercept = np.polyfit(x[keep], y[keep], 1)
        line = np.array([x[keep].min(), x[keep].max()])
        ax.plot(line, slope * line + intercept, color="black", linewidth=1)
    ax.text(
        0.02,
        0.97,
        f"r = {stats['pearson_r']:.2f}\nρ = {stats['spearman_rho']:.2f}\nn = {stats['n']}",
        transform=ax.transAxes,
        va="top",
        fontsize=9,
        bbox={"facecolor": "white", "edgecolor": "#ccc", "alpha": 0.9},
    )
    texts = []
    for xi, yi, label, ok in zip(x, y, labels, keep):
        called_out = label in highlight
        if ok and called_out:
            ax.scatter([xi], [yi], s=80, facecolors="none", edgecolors="tab:red", linewidths=1.5)
        if ok and (label_all or called_out):
            weight = "bold" if called_out else "normal"
            texts.append(ax.text(xi, yi, label, fontsize=7, fontweight=weight))
    ax.set(xlabel=axes_labels[0], ylabel=axes_labels[1], title=title)
    if texts:
        ax.figure.canvas.draw()  # settle the layout first: adjustText works in display units
        adjust_text(
            texts,
            ax=ax,
            expand=(1.2, 1.5),  # room around each label, so that none merely touches another
            arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5},
        )
    return ax.figure


def fcd_figure(fcd: pd.DataFrame, definition: str, highlight_pairs=()) -> Figure:
    """FCD of one definition against |Δ log frequency| and against IoU (IoU^¼ for legacy, as
    the original figure); the paper's highlighted pairs ringed and labelled."""
    split = SPLIT_OF_MODE[definition]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    pairs = [f"{a}|{b}" for a, b in zip(fcd.class_a, fcd.class_b)]
    either_order = {f"{b}|{a}" for a, _, b in (p.partition("|") for p in highlight_pairs)}
    highlight_pairs = set(highlight_pairs) | either_order
    power = LEGACY_IOU_POWER if definition == "legacy" else 1.0
    iou_label = f"IoU on the {split} split" + ("$^{1/4}$" if power != 1 else "")
    panels = (
        (fcd.log_freq_diff, f"|Δ log {split} frequency|", "FCD vs frequency gap"),
        (fcd.iou**power, iou_label, "FCD vs label overlap"),
    )
    for ax, (x, xlabel, title) in zip(axes, panels):
        correlation_scatter(
            x.to_numpy(float),
            fcd.fcd.to_numpy(float),
            pairs,
            axes_labels=(xlabel, "FCD"),
            title=title,
            highlight=highlight_pairs,
            label_all=False,
            ax=ax,
        )
    fig.suptitle(f"Forgettability curve distance ({definition} definition)")
    return fig


def ratio_bars(frame: pd.DataFrame, category: str, title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    ax.bar(frame[category].astype(str), frame.ratio, color="tab:purple")
    ax.axhline(1, color="grey", linestyle="--", linewidth=1)
    ax.set(ylabel="PIE share / non-PIE share", title=title)
    ax.tick_params(axis="x", rotation=60 if len(frame) > 6 else 0)
    return fig


def image_gallery(images: list[np.ndarray], captions: list[str], title: str) -> Figure:
    columns = min(len(images), 6)
    rows = int(np.ceil(len(images) / columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image, cmap="gray")
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title)
    return fig


def weight_histograms(magnitudes: np.ndarray, thresholds: dict[float, float], arch: str) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    ax.hist(magnitudes, bins=200, color="tab:gray", log=True)
    for (sparsity, threshold), color in zip(
        sorted(thresholds.items()), plt.cm.autumn(np.linspace(0, 0.8, len(thresholds)))
    ):
        ax.axvline(threshold, color=color, label=f"L1 cut at sparsity {sparsity:g}")
    ax.set(
        xlabel="|weight| (all Conv2d and Linear weights)",
        ylabel="count (log)",
        title=f"Weight magnitudes of the unpruned {arch}",
    )
    ax.legend()
    return fig


def close(figs) -> None:
    for fig in figs:
        plt.close(fig)

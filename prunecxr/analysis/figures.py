"""Figures of the analysis: each function takes tables and returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from prunecxr.analysis.cooccurrence import LEGACY_IOU_POWER

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


def scatter_with_labels(x, y, labels, *, xlabel: str, ylabel: str, title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    ax.scatter(x, y, color="tab:blue")
    for xi, yi, label in zip(x, y, labels):
        if np.isfinite(xi) and np.isfinite(yi):
            ax.annotate(label, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return fig


def fcd_scatter(fcd: pd.DataFrame, mode: str, split: str) -> Figure:
    """FCD against |Δ log frequency| and IoU; legacy plots IoU^¼ as the original figure."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    axes[0].scatter(fcd.log_freq_diff, fcd.fcd, s=10)
    axes[0].set(xlabel=f"|Δ log {split} frequency|", ylabel="FCD", title="FCD vs frequency gap")
    power = LEGACY_IOU_POWER if mode == "legacy" else 1.0
    axes[1].scatter(fcd.iou**power, fcd.fcd, s=10, color="tab:red")
    iou_label = f"(IoU on the {split} split)" + ("$^{1/4}$" if power != 1 else "")
    axes[1].set(xlabel=iou_label, ylabel="FCD", title="FCD vs label overlap")
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

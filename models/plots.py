"""Figures written by the training commands (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from bnserve.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[dict[str, float]], path: str | os.PathLike[str]) -> None:
    """Loss and accuracy per epoch, training and validation, side by side."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", ax_loss), ("accuracy", ax_acc)):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], label=f"train {key}")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], label=f"validation {key}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set_yscale("log")
    fig.tight_layout()
    _save(fig, path)


def plot_search(rows: Sequence[dict], path: str | os.PathLike[str]) -> None:
    """Validation accuracy against learning rate (log axis), one colour per round."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rnd in sorted({r["round"] for r in rows}):
        pts = [r for r in rows if r["round"] == rnd and r["status"] == "ok"]
        ax.scatter(
            [r["lr"] for r in pts],
            [r["val_accuracy"] for r in pts],
            label=f"round {rnd + 1}",
            alpha=0.8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_compare(rows: Sequence[dict], path: str | os.PathLike[str]) -> None:
    """Validation accuracy (top) and training loss (bottom) per epoch, one column per learning rate."""
    plt = _pyplot()
    lrs = sorted({r["lr"] for r in rows})
    fig, axes = plt.subplots(2, len(lrs), figsize=(4.5 * len(lrs), 7), squeeze=False)
    for col, lr in enumerate(lrs):
        for r in (r for r in rows if r["lr"] == lr):
            epochs = [h["epoch"] for h in r["history"]]
            label = f"BN {r['bn']}" if r["bn"] != "none" else "no BN"
            axes[0][col].plot(epochs, [h["val_accuracy"] for h in r["history"]], label=label)
            axes[1][col].plot(epochs, [h["train_loss"] for h in r["history"]], label=label)
        axes[0][col].set_title(f"learning rate {lr:g}")
        axes[0][col].set_ylabel("validation accuracy")
        axes[1][col].set_ylabel("training loss")
        axes[1][col].set_yscale("log")
        for ax in axes[:, col]:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(report: dict, path: str | os.PathLike[str]) -> None:
    """The confusion matrix as a heat map with counts."""
    import numpy as np

    plt = _pyplot()
    cm = np.array(report["confusion_matrix"])
    names = report["labels"]
    size = max(4.0, 0.6 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(
            j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black"
        )
    ax.set_title(f"accuracy {report['accuracy']:.4f}")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str | os.PathLike[str]) -> None:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

"""Classification metrics as pure functions of labels and probabilities."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """`[true, predicted]` counts."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_report(
    y_true: np.ndarray, proba: np.ndarray, class_names: list[str]
) -> dict[str, Any]:
    """Accuracy, mean cross-entropy, per-class precision/recall/F1/support and the confusion matrix.

    A class that is never predicted has precision 0 (and never present: recall 0), as in
    scikit-learn's `zero_division=0`.
    """
    n = len(y_true)
    y_pred = proba.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, len(class_names))
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    pr = precision + recall
    f1 = np.divide(2 * precision * recall, pr, out=np.zeros_like(tp), where=pr > 0)
    eps = np.finfo(np.float64).tiny  # log(0) would be -inf for a confident wrong answer
    # 0.0 - mean, not -mean: a perfectly confident model's loss is 0.0, never -0.0
    loss = 0.0 - float(np.log(np.maximum(proba[np.arange(n), y_true], eps)).mean())
    return {
        "n": int(n),
        "accuracy": float((y_pred == y_true).mean()),
        "loss": loss,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(actual[i]),
            }
            for i, name in enumerate(class_names)
        },
        "macro_f1": float(f1.mean()),
        "labels": list(class_names),
        "confusion_matrix": cm.tolist(),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a text table: per-class figures, then the confusion matrix."""
    names = report["labels"]
    width = max(8, *(len(n) for n in names))
    lines = [
        f"accuracy {report['accuracy']:.4f}   loss {report['loss']:.4f}   "
        f"macro F1 {report['macro_f1']:.4f}   n {report['n']}",
        "",
        f"{'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}",
    ]
    for name in names:
        c = report["per_class"][name]
        lines.append(
            f"{name:<{width}} {c['precision']:>9.4f} {c['recall']:>9.4f} {c['f1']:>9.4f} "
            f"{c['support']:>8d}"
        )
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    cell = max(5, *(len(n) for n in names)) + 1
    lines.append(" " * width + "".join(f"{n:>{cell}}" for n in names))
    for name, row in zip(names, report["confusion_matrix"], strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{cell}d}" for v in row))
    return "\n".join(lines)

"""Task metrics (scikit-learn): one definition shared by training, the gate and the search."""
from __future__ import annotations

from sklearn.metrics import accuracy_score, f1_score


def classification_metrics(labels, preds, num_labels: int) -> dict:
    """Accuracy and F1 (binary for two labels, macro-averaged over classes otherwise)."""
    return {"accuracy": float(accuracy_score(labels, preds)),
            "f1": float(f1_score(labels, preds, average="binary" if num_labels == 2 else "macro",
                                 zero_division=0))}

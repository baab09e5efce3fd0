"""Task metrics against hand-computed values."""
import pytest

from kdlab.eval.metrics import classification_metrics


def test_binary_accuracy_and_f1_by_hand():
    # labels 1 1 0 0, preds 1 0 0 0: accuracy 3/4; positive class: P = 1/1, R = 1/2, F1 = 2/3
    m = classification_metrics([1, 1, 0, 0], [1, 0, 0, 0], num_labels=2)
    assert m["accuracy"] == pytest.approx(0.75) and m["f1"] == pytest.approx(2 / 3)


def test_multiclass_f1_is_macro():
    # class 0: P 1, R 1 -> 1; class 1: P 1/2, R 1 -> 2/3; class 2: P 0, R 0 -> 0; mean 5/9
    m = classification_metrics([0, 1, 2], [0, 1, 1], num_labels=3)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(5 / 9)

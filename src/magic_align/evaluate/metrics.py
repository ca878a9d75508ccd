"""Classification metrics as small pure functions, and their bootstrap intervals.

Macro averages follow the usual convention (scikit-learn's): the mean over the classes that occur in the
true labels or in the predictions; a class that is never predicted has precision 0, one that never occurs has
recall 0, and F1 is 0 when precision + recall is 0. Intervals come from `magic_align.stats.bootstrap`, over
test images for one run and over seeds for the mean of several runs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from magic_align.stats import Estimate, bootstrap

UNKNOWN_SKIN_TYPE = -1


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] counts; row = true class, column = predicted class."""
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def per_class_precision_recall(y_true: Sequence[int], y_pred: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes, precision, recall) over the classes present in y_true or y_pred."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes, index = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    # counted with bincount over class positions: the bootstrap calls this thousands of times
    true_index, pred_index = index[: len(y_true)], index[len(y_true) :]
    true_positive = np.bincount(true_index[true_index == pred_index], minlength=len(classes)).astype(float)
    predicted = np.bincount(pred_index, minlength=len(classes)).astype(float)
    actual = np.bincount(true_index, minlength=len(classes)).astype(float)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros_like(true_positive), where=actual > 0)
    return classes, precision, recall


def macro_precision(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    _, precision, _ = per_class_precision_recall(y_true, y_pred)
    return float(precision.mean()) if len(precision) else float("nan")


def macro_recall(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    _, _, recall = per_class_precision_recall(y_true, y_pred)
    return float(recall.mean()) if len(recall) else float("nan")


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean over classes of the per-class F1 (not the F1 of the macro precision and recall)."""
    _, precision, recall = per_class_precision_recall(y_true, y_pred)
    if not len(precision):
        return float("nan")
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return float(f1.mean())


METRICS = {"accuracy": accuracy, "f1": macro_f1, "precision": macro_precision, "recall": macro_recall}


def accuracy_by_skin_type(y_true: Sequence[int], y_pred: Sequence[int], skin_types: Sequence[int]) -> dict[int, dict]:
    """{skin type: {"accuracy", "n"}} for every skin type present (-1 = unknown)."""
    y_true, y_pred, skin_types = np.asarray(y_true), np.asarray(y_pred), np.asarray(skin_types, int)
    result = {}
    for skin_type in sorted(set(skin_types.tolist())):
        mask = skin_types == skin_type
        result[int(skin_type)] = {"accuracy": accuracy(y_true[mask], y_pred[mask]), "n": int(mask.sum())}
    return result


def classification_metrics(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    num_classes: int,
    skin_types: Sequence[int] | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Every metric of one run on one test set: point values with bootstrap intervals over test images, the
    confusion matrix and (with skin types) accuracy per Fitzpatrick type and per group of types (1-2, 3-4, 5-6),
    each with its interval."""
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    result: dict = {
        name: bootstrap(function, y_true, y_pred, resamples=resamples, seed=seed).as_dict()
        for name, function in METRICS.items()
    }
    result["n"] = int(len(y_true))
    result["confusion"] = confusion_matrix(y_true, y_pred, num_classes).tolist()
    if skin_types is not None:
        skin_types = np.asarray(skin_types, int)
        by_type = {}
        for skin_type, entry in accuracy_by_skin_type(y_true, y_pred, skin_types).items():
            mask = skin_types == skin_type
            estimate = bootstrap(accuracy, y_true[mask], y_pred[mask], resamples=resamples, seed=seed)
            by_type[str(skin_type)] = {**estimate.as_dict(), "n": entry["n"]}
        result["by_skin_type"] = by_type
        by_group = {}
        for name, entry in accuracy_by_skin_group(y_true, y_pred, skin_types).items():
            mask = np.isin(skin_types, SKIN_TYPE_GROUPS[name])
            estimate = bootstrap(accuracy, y_true[mask], y_pred[mask], resamples=resamples, seed=seed)
            by_group[name] = {**estimate.as_dict(), "n": entry["n"]}
        result["by_skin_group"] = by_group
    return result


def mean_over_seeds(values: Sequence[float], resamples: int = 1000, seed: int = 0) -> dict:
    """Mean of one metric over seeds, its bootstrap interval over the seeds, and the standard deviation."""
    array = np.asarray(values, float)
    estimate: Estimate = bootstrap(np.mean, array, resamples=resamples if len(array) > 1 else 0, seed=seed)
    return {**estimate.as_dict(), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0, "seeds": int(len(array))}


# Fitzpatrick skin-type groups as Fitzpatrick17k studies report them (light, medium, dark)
SKIN_TYPE_GROUPS = {"1-2": (1, 2), "3-4": (3, 4), "5-6": (5, 6)}


def skin_group(skin_type: int) -> str:
    """The SKIN_TYPE_GROUPS name of a Fitzpatrick type, "unknown" for -1 (or anything outside 1-6)."""
    return next((name for name, members in SKIN_TYPE_GROUPS.items() if skin_type in members), "unknown")


def accuracy_by_skin_group(y_true: Sequence[int], y_pred: Sequence[int], skin_types: Sequence[int]) -> dict[str, dict]:
    """{group: {"accuracy", "n"}} for every group of SKIN_TYPE_GROUPS with at least one image."""
    y_true, y_pred, skin_types = np.asarray(y_true), np.asarray(y_pred), np.asarray(skin_types, int)
    result = {}
    for name, members in SKIN_TYPE_GROUPS.items():
        mask = np.isin(skin_types, members)
        if mask.any():
            result[name] = {"accuracy": accuracy(y_true[mask], y_pred[mask]), "n": int(mask.sum())}
    return result


def paired_difference(values: Sequence[float], baseline: Sequence[float], resamples: int = 1000,
                      seed: int = 0) -> dict:
    """A setting against the baseline trained with the same seeds: the mean over seeds of the per-seed difference
    (values[k] - baseline[k]), its bootstrap interval over seeds and standard deviation (as `mean_over_seeds`).
    Pairing removes what the seeds share (the same test images, the same batch order)."""
    values, baseline = np.asarray(values, float), np.asarray(baseline, float)
    if values.shape != baseline.shape:
        raise ValueError(f"paired difference needs one baseline value per seed: {len(values)} values, "
                         f"{len(baseline)} baseline values")
    return mean_over_seeds(values - baseline, resamples, seed)

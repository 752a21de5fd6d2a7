"""The 8x8 digits and their fixed train/test split, shipped with p2pfl as ``data/digits.npz``.

The images are scikit-learn's ``load_digits()`` (1,797 real handwritten digits, UCI ML hand-written
digits test set, bundled inside scikit-learn); the split is
``train_test_split(test_size=0.2, stratify=labels, random_state=0)``, the one the digits task has
always used. Reading them from our own file means a node never imports scikit-learn (0.8 s and
80 MB per daemon, with scipy behind it) and nothing is downloaded at run time.

``digits.npz`` holds the pixels as uint8 (0..16), the labels, and the split as row indices in the
order ``train_test_split`` returned them, so :func:`load_split` gives exactly the arrays the task
built from scikit-learn before (``tests/ml/test_digits_data.py`` checks that wherever scikit-learn
is installed). To regenerate the file (it never needs to change):

    python -m p2pfl.ml.digits          # needs scikit-learn
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DATA_FILE", "DigitsSplit", "load_split", "split_from_sklearn", "write_data_file"]

DATA_FILE = Path(__file__).parent / "data" / "digits.npz"


@dataclass(frozen=True, slots=True)
class DigitsSplit:
    """Features scaled to [0, 1] (float64, pixel / 16) and int64 labels, train then test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _split(
    images: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray
) -> DigitsSplit:
    x = images.astype(np.float64) / 16.0
    y = labels.astype(np.int64)
    return DigitsSplit(x[train], y[train], x[test], y[test])


def load_split(path: Path = DATA_FILE) -> DigitsSplit:
    """The digits split from the shipped file (numpy only)."""
    with np.load(path) as data:
        return _split(data["images"], data["labels"], data["train"], data["test"])


def split_from_sklearn() -> DigitsSplit:
    """The same split computed by scikit-learn, as the digits task did before the file existed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x / 16.0, y, test_size=0.2, stratify=y, random_state=0
    )
    return DigitsSplit(x_train, y_train, x_test, y_test)


def write_data_file(path: Path = DATA_FILE) -> None:
    """Write ``digits.npz`` from scikit-learn's bundled copy of the data set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    images = x.astype(np.uint8)
    if not np.array_equal(images, x) or images.max() > 16:
        raise ValueError("scikit-learn's digits are no longer integer pixels 0..16")
    # Splitting the row numbers gives the rows train_test_split picks for the data itself.
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    np.savez_compressed(
        path,
        images=images,
        labels=y.astype(np.uint8),
        train=train.astype(np.int16),
        test=test.astype(np.int16),
    )


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DATA_FILE
    write_data_file(target)
    print(f"wrote {target} ({target.stat().st_size:,} bytes)")

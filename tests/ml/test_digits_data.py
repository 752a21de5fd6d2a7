"""The shipped digits file is scikit-learn's digits and split; a node reads it without sklearn."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from p2pfl.ml.digits import DATA_FILE, load_split, split_from_sklearn, write_data_file


def test_shipped_split_equals_the_one_scikit_learn_computes() -> None:
    pytest.importorskip("sklearn")
    shipped, computed = load_split(), split_from_sklearn()
    for field in ("x_train", "y_train", "x_test", "y_test"):
        a, b = getattr(shipped, field), getattr(computed, field)
        assert a.dtype == b.dtype and a.shape == b.shape, field
        assert np.array_equal(a, b), field


def test_regenerating_the_file_gives_the_same_bytes(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    write_data_file(tmp_path / "digits.npz")
    assert (tmp_path / "digits.npz").read_bytes() == DATA_FILE.read_bytes()


def test_split_is_stratified_and_uses_every_image_once() -> None:
    with np.load(DATA_FILE) as data:
        rows = np.concatenate([data["train"], data["test"]])
        assert sorted(rows.tolist()) == list(range(1797))
    split = load_split()
    assert split.x_train.shape == (1437, 64) and split.x_test.shape == (360, 64)
    assert split.x_train.min() == 0.0 and split.x_train.max() == 1.0
    train_share = np.bincount(split.y_train, minlength=10) / 1437
    test_share = np.bincount(split.y_test, minlength=10) / 360
    assert np.abs(train_share - test_share).max() < 0.01


def test_a_digits_node_trains_without_scikit_learn() -> None:
    # A fresh interpreter doing what the daemon's prepare() does: task, one training step, score.
    code = (
        "import sys; from p2pfl.ml import load_task;"
        "t = load_task('digits', n_nodes=4, partition='dirichlet');"
        "m = t.make_model(); t.train(m, t.node_data(1, 4), epochs=1e-9); t.evaluate(m);"
        "print(','.join(n for n in ('sklearn', 'scipy')"
        " if n in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

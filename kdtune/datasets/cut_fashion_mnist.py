"""Cut the embedded default dataset from the official Fashion-MNIST IDX files.

    python -m kdtune.datasets.cut_fashion_mnist /usr/share/datasets/fashion-mnist

Takes N_TRAIN_PER_CLASS training and N_TEST_PER_CLASS test images of every class, chosen with a fixed
seed, and writes fashion-mnist-small.npz beside this file.
"""

import sys
from pathlib import Path

import numpy as np

from kdtune.readers import read_idx

N_TRAIN_PER_CLASS, N_TEST_PER_CLASS, SEED = 600, 100, 0


def balanced_subset(labels: np.ndarray, n_per_class: int, rng: np.random.Generator) -> np.ndarray:
    picks = [rng.choice(np.flatnonzero(labels == c), n_per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def main(folder: str) -> None:
    full = read_idx(Path(folder))
    rng = np.random.default_rng(SEED)
    train = balanced_subset(full.y_train, N_TRAIN_PER_CLASS, rng)
    test = balanced_subset(full.y_test, N_TEST_PER_CLASS, rng)
    out = Path(__file__).with_name("fashion-mnist-small.npz")
    np.savez_compressed(out, x_train=full.x_train[train], y_train=full.y_train[train].astype(np.uint8),
                        x_test=full.x_test[test], y_test=full.y_test[test].astype(np.uint8))
    print(f"wrote {out}: {len(train)} train, {len(test)} test images")


if __name__ == "__main__":
    main(sys.argv[1])

"""Write a CSV table of features and an integer label column to try bcpkd on.

    python recipes/examples/make_table.py FILE.csv [--rows N]

Columns f0..f11 and `label` (3 classes whose feature means differ). It stands in for your own table.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--rows", type=int, default=3000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, args.rows)
    means = rng.normal(0, 1, size=(3, 12))
    features = means[labels] + rng.normal(0, 1.5, size=(args.rows, 12))
    args.file.parent.mkdir(parents=True, exist_ok=True)
    with open(args.file, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*(f"f{j}" for j in range(12)), "label"])
        writer.writerows([*(f"{v:.5f}" for v in row), int(y)] for row, y in zip(features, labels))
    print(args.file)


if __name__ == "__main__":
    main()

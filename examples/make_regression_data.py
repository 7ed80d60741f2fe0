"""Write a small regression data set (y = 3x + 2 + noise) as CSV shards, for the quick start and the examples.

    python examples/make_regression_data.py data/regression --files 4 --rows 2000

makes data/regression/train-00000.csv … train-00003.csv, each with the header ``x,y``. Standard library only.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--rows", type=int, default=2000, help="per file")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.folder.mkdir(parents=True, exist_ok=True)
    for index in range(args.files):
        with (args.folder / f"train-{index:05d}.csv").open("w") as out:
            out.write("x,y\n")
            for _ in range(args.rows):
                x = rng.uniform(-1.0, 1.0)
                out.write(f"{x:.6f},{3.0 * x + 2.0 + rng.gauss(0.0, 0.1):.6f}\n")


if __name__ == "__main__":
    main()

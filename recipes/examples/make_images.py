"""Write a small image folder of mixed sizes and kinds (RGB JPEG, grayscale and RGBA PNG) to try bcpkd on.

    python recipes/examples/make_images.py DIR [--per-class N]

DIR/train/<class>/* and DIR/test/<class>/*: 4 classes told apart by their colour and stripes, sizes from
40 to 120 pixels a side. It stands in for your own folder; bcpkd reads yours the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(200, 60, 60), (60, 160, 60), (60, 80, 200), (200, 180, 40)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--per-class", type=int, default=60, help="training images per class (test: a quarter)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for split, count in (("train", args.per_class), ("test", max(1, args.per_class // 4))):
        for label, colour in enumerate(COLOURS):
            folder = args.folder / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = rng.integers(40, 121, size=2)
                pixels = rng.normal(colour, 50, size=(h, w, 3))
                pixels[:, :: 2 + label] *= 0.6  # stripes whose spacing tells the class too
                image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
                kind = i % 3
                if kind == 0:
                    image.save(folder / f"{i}.jpg", quality=90)
                else:
                    (image.convert("L") if kind == 1 else image.convert("RGBA")).save(folder / f"{i}.png")
    print(args.folder)


if __name__ == "__main__":
    main()

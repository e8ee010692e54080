"""A 100-class, 32 px RGB data set built from what ships with the installed packages: glyphs (digits,
Latin and Greek letters, symbols) rendered in matplotlib's bundled DejaVu and STIX fonts, each in a random
font, size, rotation, position and colour over a random gradient with noise. Nothing is downloaded.

Written as cpsc-ray's ``imagefolder`` layout (``train/<class>/*.png``, ``test/<class>/*.png``), so a run
reads it with ``data.dataset=imagefolder data.root=DIR data.image_size=32``. The same seed writes the same
files. Many classes is where conditional generation matters most (CIFAR-100 has 100): this is the zoo's
many-class row.

    python benchmarks/glyphs.py --out /tmp/zoo/glyphs100 [--train-per-class 100 --test-per-class 30]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

# 100 glyphs; mirror images of each other (b/d, p/q) and lower/upper pairs of one shape (c/C, o/O, s/S, ...)
# are left out, since cpsc-ray's imagefolder augmentation flips images and rescales them.
GLYPHS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabefghijkmnqrtuyαβγδεζηθκλμξπρστφχψωΓΔΘΛΞΠΣΦΨΩ&@#$%?!+=§¶€£¥©∞√∫"
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
)
SIZE = 32
RENDER = 4 * SIZE  # drawn large, then downsampled: anti-aliased edges


def font_dir() -> Path:
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def background(rng: np.random.Generator) -> np.ndarray:
    """A linear gradient between two random colours, in a random direction, plus pixel noise."""
    start, end = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:RENDER, 0:RENDER] / (RENDER - 1) - 0.5
    t = np.clip(xs * np.cos(angle) + ys * np.sin(angle) + 0.5, 0, 1)[..., None]
    return start * (1 - t) + end * t


def render(glyph: str, rng: np.random.Generator, fonts: list[ImageFont.FreeTypeFont]) -> Image.Image:
    canvas = background(rng)
    base = canvas.mean(axis=(0, 1))
    while True:  # a glyph colour that stands out from its background
        colour = rng.uniform(0, 1, 3)
        if abs(luminance(colour) - luminance(base)) > 0.3:
            break
    font = fonts[rng.integers(len(fonts))].font_variant(size=int(RENDER * rng.uniform(0.5, 0.8)))
    mask = Image.new("L", (RENDER, RENDER))
    draw = ImageDraw.Draw(mask)
    left, top, right, bottom = draw.textbbox((0, 0), glyph, font=font)
    shift = rng.uniform(-0.1, 0.1, 2) * RENDER
    position = ((RENDER - (right - left)) / 2 - left + shift[0], (RENDER - (bottom - top)) / 2 - top + shift[1])
    draw.text(position, glyph, fill=255, font=font)
    mask = mask.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR)
    alpha = (np.asarray(mask, dtype=np.float64) / 255)[..., None]
    image = canvas * (1 - alpha) + colour * alpha + rng.normal(0, 0.03, canvas.shape)
    pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(pixels).resize((SIZE, SIZE), Image.LANCZOS)


def write(out: Path, per_class: dict[str, int], seed: int) -> None:
    fonts = [ImageFont.truetype(str(font_dir() / name), size=RENDER // 2) for name in FONTS]
    for split_index, (split, count) in enumerate(per_class.items()):
        for label, glyph in enumerate(GLYPHS):
            folder = out / split / f"{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, split_index, label])
            for i in range(count):
                render(glyph, rng, fonts).save(folder / f"{i:04d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    assert len(GLYPHS) == len(set(GLYPHS)) == 100, "100 distinct glyphs"
    write(args.out, {"train": args.train_per_class, "test": args.test_per_class}, args.seed)
    print(f"{args.out}: {len(GLYPHS)} classes, {args.train_per_class} train and {args.test_per_class} test each")


if __name__ == "__main__":
    main()

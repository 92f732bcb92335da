"""A tiny log-log line plotter that writes PNG with numpy and zlib only.

The benchmarks must not depend on matplotlib, so this draws what they need:
panels with log-scaled axes, decade grid lines and labels, solid or dashed
polylines, markers, a legend and titles, in a built-in 5x7 pixel font
(upper case, digits and some punctuation; lower case is drawn as upper case).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_FONT_ROWS = {
    "A": ".###.|#...#|#...#|#####|#...#|#...#|#...#",
    "B": "####.|#...#|#...#|####.|#...#|#...#|####.",
    "C": ".###.|#...#|#....|#....|#....|#...#|.###.",
    "D": "####.|#...#|#...#|#...#|#...#|#...#|####.",
    "E": "#####|#....|#....|####.|#....|#....|#####",
    "F": "#####|#....|#....|####.|#....|#....|#....",
    "G": ".###.|#...#|#....|#.###|#...#|#...#|.####",
    "H": "#...#|#...#|#...#|#####|#...#|#...#|#...#",
    "I": ".###.|..#..|..#..|..#..|..#..|..#..|.###.",
    "J": "..###|...#.|...#.|...#.|...#.|#..#.|.##..",
    "K": "#...#|#..#.|#.#..|##...|#.#..|#..#.|#...#",
    "L": "#....|#....|#....|#....|#....|#....|#####",
    "M": "#...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#",
    "N": "#...#|#...#|##..#|#.#.#|#..##|#...#|#...#",
    "O": ".###.|#...#|#...#|#...#|#...#|#...#|.###.",
    "P": "####.|#...#|#...#|####.|#....|#....|#....",
    "Q": ".###.|#...#|#...#|#...#|#.#.#|#..#.|.##.#",
    "R": "####.|#...#|#...#|####.|#.#..|#..#.|#...#",
    "S": ".####|#....|#....|.###.|....#|....#|####.",
    "T": "#####|..#..|..#..|..#..|..#..|..#..|..#..",
    "U": "#...#|#...#|#...#|#...#|#...#|#...#|.###.",
    "V": "#...#|#...#|#...#|#...#|#...#|.#.#.|..#..",
    "W": "#...#|#...#|#...#|#.#.#|#.#.#|#.#.#|.#.#.",
    "X": "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#",
    "Y": "#...#|#...#|.#.#.|..#..|..#..|..#..|..#..",
    "Z": "#####|....#|...#.|..#..|.#...|#....|#####",
    "0": ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.",
    "1": "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
    "2": ".###.|#...#|....#|...#.|..#..|.#...|#####",
    "3": "#####|...#.|..#..|...#.|....#|#...#|.###.",
    "4": "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.",
    "5": "#####|#....|####.|....#|....#|#...#|.###.",
    "6": "..##.|.#...|#....|####.|#...#|#...#|.###.",
    "7": "#####|....#|...#.|..#..|.#...|.#...|.#...",
    "8": ".###.|#...#|#...#|.###.|#...#|#...#|.###.",
    "9": ".###.|#...#|#...#|.####|....#|...#.|.##..",
    " ": ".....|.....|.....|.....|.....|.....|.....",
    ".": ".....|.....|.....|.....|.....|.##..|.##..",
    ",": ".....|.....|.....|.....|.##..|..#..|.#...",
    ":": ".....|.##..|.##..|.....|.##..|.##..|.....",
    "_": ".....|.....|.....|.....|.....|.....|#####",
    "-": ".....|.....|.....|#####|.....|.....|.....",
    "+": ".....|..#..|..#..|#####|..#..|..#..|.....",
    "=": ".....|.....|#####|.....|#####|.....|.....",
    "/": "....#|....#|...#.|..#..|.#...|#....|#....",
    "(": "...#.|..#..|.#...|.#...|.#...|..#..|...#.",
    ")": ".#...|..#..|...#.|...#.|...#.|..#..|.#...",
    "%": "##..#|##..#|...#.|..#..|.#...|#..##|#..##",
    "<": "...#.|..#..|.#...|#....|.#...|..#..|...#.",
    ">": ".#...|..#..|...#.|....#|...#.|..#..|.#...",
    "*": ".....|..#..|#.#.#|.###.|#.#.#|..#..|.....",
    "^": "..#..|.#.#.|#...#|.....|.....|.....|.....",
    "?": ".###.|#...#|....#|...#.|..#..|.....|..#..",
}
_GLYPHS = {
    char: np.array([[c == "#" for c in row] for row in rows.split("|")], dtype=bool)
    for char, rows in _FONT_ROWS.items()
}
GLYPH_W, GLYPH_H = 5, 7

# Colour-blind-friendly palette (Okabe-Ito), then greys.
PALETTE = [
    (0, 114, 178),
    (213, 94, 0),
    (0, 158, 115),
    (204, 121, 167),
    (230, 159, 0),
    (86, 180, 233),
    (0, 0, 0),
    (120, 120, 120),
]


def encode_png(pixels: np.ndarray) -> bytes:
    """RGB ``uint8 [H, W, 3]`` -> PNG bytes (8-bit truecolour, no filtering)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] pixels, got {pixels.dtype} {pixels.shape}")
    height, width, _ = pixels.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


def decode_png(data: bytes) -> np.ndarray:
    """The inverse of :func:`encode_png` (for tests): only what it writes is read."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    position, idat, width, height = 8, b"", 0, 0
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"bad CRC in chunk {kind!r}")
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            if (depth, colour) != (8, 2):
                raise ValueError("only 8-bit RGB is supported")
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
    if raw[:, 0].any():
        raise ValueError("only unfiltered rows are supported")
    return raw[:, 1:].reshape(height, width, 3).copy()


class Canvas:
    def __init__(self, width: int, height: int, background=(255, 255, 255)):
        self.pixels = np.empty((height, width, 3), np.uint8)
        self.pixels[:] = background
        self.width, self.height = width, height

    def fill_rect(self, x0: int, y0: int, x1: int, y1: int, colour) -> None:
        x0, x1 = sorted((max(0, int(x0)), min(self.width, int(x1))))
        y0, y1 = sorted((max(0, int(y0)), min(self.height, int(y1))))
        self.pixels[y0:y1, x0:x1] = colour

    def dot(self, x: float, y: float, colour, radius: int = 1) -> None:
        self.fill_rect(
            round(x) - radius,
            round(y) - radius,
            round(x) + radius + 1,
            round(y) + radius + 1,
            colour,
        )

    def line(self, x0, y0, x1, y1, colour, width: int = 1, dash: int = 0) -> None:
        """A straight line; ``dash > 0`` draws ``dash`` pixels on, ``dash`` off."""
        steps = max(1, int(math.ceil(max(abs(x1 - x0), abs(y1 - y0)))))
        radius = (width - 1) // 2
        for i in range(steps + 1):
            if dash and (i // dash) % 2:
                continue
            t = i / steps
            x, y = round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t)
            self.fill_rect(x - radius, y - radius, x - radius + width, y - radius + width, colour)

    def text(self, x: int, y: int, text: str, colour=(0, 0, 0), scale: int = 1) -> int:
        """Draw ``text`` with its top-left corner at (x, y); returns the x after it."""
        for char in text.upper():
            glyph = _GLYPHS.get(char, _GLYPHS["?"])
            ys, xs = np.nonzero(glyph)
            for gy, gx in zip(ys, xs, strict=True):
                self.fill_rect(
                    x + gx * scale,
                    y + gy * scale,
                    x + (gx + 1) * scale,
                    y + (gy + 1) * scale,
                    colour,
                )
            x += (GLYPH_W + 1) * scale
        return x

    def text_width(self, text: str, scale: int = 1) -> int:
        return len(text) * (GLYPH_W + 1) * scale

    def save(self, path: Path | str) -> None:
        Path(path).write_bytes(encode_png(self.pixels))


@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    dashed: bool = False
    colour: tuple[int, int, int] | None = None


@dataclass
class Panel:
    title: str
    series: list[Series] = field(default_factory=list)
    x_label: str = ""
    y_label: str = ""


def _decades(low: float, high: float) -> list[int]:
    return list(range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1))


def _tick_label(exponent: int) -> str:
    value = 10.0**exponent
    if 0 <= exponent <= 5:
        return str(int(value))
    if -3 <= exponent < 0:
        return f"{value:g}"
    return f"1E{exponent}"


def draw_loglog_panel(canvas: Canvas, box: tuple[int, int, int, int], panel: Panel) -> None:
    """One log-log panel inside ``box = (x0, y0, x1, y1)``: axes, grid, lines, legend."""
    x0, y0, x1, y1 = box
    # The legend is a column right of the plot area, so it never hides a line.
    legend_width = max((canvas.text_width(s.label) for s in panel.series), default=0) + 34
    left, right, top, bottom = x0 + 52, x1 - 24 - legend_width, y0 + 34, y1 - 36
    canvas.text(x0 + 4, y0 + 4, panel.title, scale=1)
    points = [
        (x, y)
        for s in panel.series
        for x, y in zip(s.xs, s.ys, strict=True)
        if x is not None and y is not None and x > 0 and y > 0
    ]
    canvas.line(left, top, left, bottom, (0, 0, 0))
    canvas.line(left, bottom, right, bottom, (0, 0, 0))
    if not points:
        canvas.text(left + 10, (top + bottom) // 2, "no data")
        return
    x_decades = _decades(min(p[0] for p in points), max(p[0] for p in points))
    y_decades = _decades(min(p[1] for p in points), max(p[1] for p in points))
    if len(x_decades) < 2:
        x_decades.append(x_decades[-1] + 1)
    if len(y_decades) < 2:
        y_decades.append(y_decades[-1] + 1)
    lx0, lx1 = x_decades[0], x_decades[-1]
    ly0, ly1 = y_decades[0], y_decades[-1]

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = left + (math.log10(x) - lx0) / (lx1 - lx0) * (right - left)
        py = bottom - (math.log10(y) - ly0) / (ly1 - ly0) * (bottom - top)
        return px, py

    grid = (225, 225, 225)
    for exponent in x_decades:
        px, _ = to_pixel(10.0**exponent, 10.0**ly0)
        canvas.line(px, top, px, bottom, grid)
        label = _tick_label(exponent)
        canvas.text(round(px - canvas.text_width(label) / 2), bottom + 5, label)
    for exponent in y_decades:
        _, py = to_pixel(10.0**lx0, 10.0**exponent)
        canvas.line(left, py, right, py, grid)
        label = _tick_label(exponent)
        canvas.text(left - 4 - canvas.text_width(label), round(py - 3), label)
    canvas.line(left, top, left, bottom, (0, 0, 0))
    canvas.line(left, bottom, right, bottom, (0, 0, 0))
    if panel.x_label:
        canvas.text(
            round((left + right) / 2 - canvas.text_width(panel.x_label) / 2),
            bottom + 18,
            panel.x_label,
        )
    if panel.y_label:
        canvas.text(x0 + 4, y0 + 18, panel.y_label, colour=(80, 80, 80))

    colours = [s.colour or PALETTE[i % len(PALETTE)] for i, s in enumerate(panel.series)]
    for series, colour in zip(panel.series, colours, strict=True):
        valid = [
            to_pixel(x, y)
            for x, y in zip(series.xs, series.ys, strict=True)
            if x is not None and y is not None and x > 0 and y > 0
        ]
        for (ax, ay), (bx, by) in zip(valid, valid[1:], strict=False):
            canvas.line(ax, ay, bx, by, colour, width=2, dash=5 if series.dashed else 0)
        if not series.dashed:
            for px, py in valid:
                canvas.dot(px, py, colour, radius=2)
    legend_x, legend_y = right + 24, top + 4
    for series, colour in zip(panel.series, colours, strict=True):
        canvas.line(
            legend_x,
            legend_y + 3,
            legend_x + 16,
            legend_y + 3,
            colour,
            2,
            4 if series.dashed else 0,
        )
        canvas.text(legend_x + 22, legend_y, series.label, colour=colour)
        legend_y += 11


def plot_panels(
    panels: list[Panel],
    path: Path | str,
    title: str = "",
    columns: int = 2,
    panel_size: tuple[int, int] = (560, 300),
) -> None:
    """Lay ``panels`` out in a grid and write one PNG."""
    if not panels:
        raise ValueError("plot_panels needs at least one panel")
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    header = 24 if title else 0
    width, height = panel_size
    canvas = Canvas(columns * width, header + rows * height)
    if title:
        canvas.text(8, 8, title, scale=1)
    for index, panel in enumerate(panels):
        row, column = divmod(index, columns)
        x, y = column * width, header + row * height
        draw_loglog_panel(canvas, (x, y, x + width, y + height), panel)
    canvas.save(path)

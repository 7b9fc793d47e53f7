"""The loss curve of a run as a small PNG, written with zlib alone (no plotting library).

    write_curve_png(path, train=[(step, loss), …], val=[(step, loss), …], best_step=120)

Blue: training loss, orange: validation loss, a red square: the validation point whose
checkpoint was kept. Both curves share one y axis from 0 to the highest loss; the grey
lines mark 25/50/75% of it. The numbers themselves are in `metrics.jsonl` and the lineage;
the picture is for seeing the shape (still falling, flat, rising) at a glance.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

W, H, PAD = 480, 240, 16
WHITE, GREY, BLACK = (255, 255, 255), (225, 225, 225), (60, 60, 60)
BLUE, ORANGE, RED = (31, 119, 180), (255, 127, 14), (214, 39, 40)


def _png(pixels: list[bytearray]) -> bytes:
    """An 8-bit RGB PNG of `pixels` (rows of W*3 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    raw = b"".join(b"\x00" + bytes(row) for row in pixels)  # filter type 0 per row
    header = struct.pack(">IIBBBBB", len(pixels[0]) // 3, len(pixels), 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


class _Canvas:
    def __init__(self) -> None:
        self.rows = [bytearray(WHITE * W) for _ in range(H)]

    def dot(self, x: int, y: int, rgb: tuple[int, int, int], size: int = 1) -> None:
        for dy in range(-(size // 2), size - size // 2):
            for dx in range(-(size // 2), size - size // 2):
                px, py = x + dx, y + dy
                if 0 <= px < W and 0 <= py < H:
                    self.rows[py][3 * px:3 * px + 3] = bytes(rgb)

    def line(self, x0: int, y0: int, x1: int, y1: int, rgb: tuple[int, int, int],
             size: int = 2) -> None:
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(n + 1):
            self.dot(round(x0 + (x1 - x0) * i / n), round(y0 + (y1 - y0) * i / n), rgb, size)


def render_curve(train: list[tuple[int, float]], val: list[tuple[int, float]],
                 best_step: int | None = None) -> bytes:
    """PNG bytes of the two curves over steps."""
    c = _Canvas()
    points = train + val
    last = max((s for s, _ in points), default=1) or 1
    top = max((v for _, v in points), default=1.0) or 1.0

    def xy(step: int, loss: float) -> tuple[int, int]:
        x = PAD + round((W - 2 * PAD) * step / last)
        y = H - PAD - round((H - 2 * PAD) * min(max(loss, 0.0), top) / top)
        return x, y

    for frac in (0.25, 0.5, 0.75):
        y = H - PAD - round((H - 2 * PAD) * frac)
        c.line(PAD, y, W - PAD, y, GREY, 1)
    c.line(PAD, H - PAD, W - PAD, H - PAD, BLACK, 1)  # x axis: steps
    c.line(PAD, PAD, PAD, H - PAD, BLACK, 1)  # y axis: loss from 0
    for series, rgb in ((train, BLUE), (val, ORANGE)):
        pts = [xy(s, v) for s, v in series]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
            c.line(x0, y0, x1, y1, rgb)
        for x, y in pts if len(pts) == 1 or rgb == ORANGE else ():
            c.dot(x, y, rgb, 4)
    for s, v in val:
        if s == best_step:
            x, y = xy(s, v)
            c.dot(x, y, RED, 9)
    return _png(c.rows)


def write_curve_png(path: str | Path, train: list[tuple[int, float]],
                    val: list[tuple[int, float]], best_step: int | None = None) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(render_curve(train, val, best_step))
    return p

"""Embedded default dataset: a deterministic procedural generator of two domains of street scenes.

The *source* domain looks rendered (flat shading, clean edges, a saturated game palette) and is written in
the GTA5 layout; the *target* domain looks photographed (textures, shifted palette, colour cast, gamma,
blur, sensor noise, another camera height, other object frequencies and sizes) and is written in the
Cityscapes layout with disjoint train/val cities. Both hold all 19 Cityscapes training classes plus a few
ignored ones (ego vehicle, static clutter), with labels as Cityscapes *label IDs* from ``cityscapesscripts``.

Scenes are built in a small 3D world (ground plane, facades along both kerbs, billboard objects) projected
with a pinhole camera, so that class identity is carried by shape, position and context as well as colour:
a model can transfer across the colour gap, which is what self-training needs.

Image ``i`` of a split depends only on ``(seed, domain, split, i)``: growing a split keeps its first images
byte-identical, and the same config always gives the same PNG bytes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from cityscapesscripts.helpers.labels import labels as CS_LABELS
from PIL import Image, ImageDraw, ImageFilter

from pipeline.data.synth_style import (  # noqa: F401  (re-exported: the generator's public names)
    BASE_RATES,
    PERSON_CLASSES,
    VEHICLE_CLASSES,
    SynthConfig,
    SynthStyle,
    source_style,
    target_style,
)

# Label ids come from the cityscapesscripts table, never typed by hand.
ID: dict[str, int] = {lab.name: lab.id for lab in CS_LABELS if lab.id >= 0}
TRAIN_CLASSES: list[str] = [
    lab.name for lab in sorted((x for x in CS_LABELS if 0 <= x.trainId < 255), key=lambda x: x.trainId)
]
# Every id the generator may write (19 classes + ignored ones it draws on purpose).
WRITTEN_IDS: frozenset[int] = frozenset(
    [ID[n] for n in TRAIN_CLASSES] + [ID["unlabeled"], ID["ego vehicle"], ID["static"]]
)

# One class per image is forced near the camera, in rotation, so every class shows up within a few images
# even at tiny resolutions.
FORCED_ROTATION: tuple[str, ...] = (
    "train",
    "bus",
    "truck",
    "motorcycle",
    "rider",
    "bicycle",
    "traffic light",
    "traffic sign",
    "wall",
    "fence",
    "terrain",
    "person",
    "pole",
    "car",
)

DOMAIN_CODE = {"source": 1, "target": 2}
SPLIT_CODE = {"train": 1, "val": 2}
SUMMARY_NAME = "synth_summary.json"


# --------------------------------------------------------------------------------------------- palette
RGB = tuple[int, int, int]
# The "game" palette: a few base colours per class; instances pick one and jitter it.
PALETTE: dict[str, list[RGB]] = {
    "road": [(88, 86, 98), (100, 96, 104), (78, 80, 88)],
    "road marking": [(235, 235, 225)],
    "sidewalk": [(196, 178, 168), (180, 176, 190), (204, 190, 150)],
    "building": [
        (188, 122, 84),
        (206, 194, 160),
        (150, 152, 166),
        (176, 84, 72),
        (226, 214, 190),
        (120, 110, 100),
    ],
    "window": [(60, 74, 96), (40, 48, 60), (150, 178, 200)],
    "wall": [(168, 160, 136), (140, 140, 150), (186, 170, 150)],
    "fence": [(128, 92, 58), (96, 112, 112), (150, 150, 150)],
    "pole": [(122, 124, 136), (80, 84, 92)],
    "traffic light": [(36, 38, 30), (54, 56, 40)],
    "lamp": [(240, 40, 30), (250, 200, 30), (40, 230, 80)],
    "traffic sign": [(220, 30, 30), (30, 80, 200), (240, 200, 20), (235, 235, 235)],
    "vegetation": [(56, 138, 38), (84, 150, 34), (40, 110, 50)],
    "trunk": [(96, 70, 44)],
    "terrain": [(150, 176, 70), (170, 160, 90), (120, 160, 60)],
    # Game weather: clear blue, hazy and overcast skies.
    "sky": [
        (96, 160, 236),
        (120, 176, 240),
        (80, 140, 220),
        (168, 188, 212),
        (200, 204, 214),
        (180, 180, 190),
    ],
    "person": [(200, 40, 40), (40, 60, 160), (30, 30, 34), (220, 200, 60), (60, 140, 80), (230, 230, 230)],
    "skin": [(232, 190, 150), (190, 140, 100), (120, 84, 60)],
    "trousers": [(40, 44, 70), (30, 30, 30), (110, 100, 80), (70, 80, 110)],
    "car": [(200, 30, 30), (30, 70, 190), (235, 235, 235), (30, 30, 30), (170, 174, 180), (240, 200, 30)],
    "glass": [(44, 56, 70)],
    "tyre": [(22, 22, 24)],
    "truck": [(230, 230, 226), (40, 110, 60), (200, 120, 30), (60, 80, 150)],
    "bus": [(220, 40, 40), (250, 200, 40), (40, 120, 200), (236, 236, 236)],
    "train": [(210, 40, 50), (236, 220, 60), (236, 236, 236)],
    "motorcycle": [(20, 20, 26), (200, 30, 30), (40, 60, 180), (200, 200, 200)],
    "bicycle": [(30, 30, 30), (200, 40, 40), (40, 120, 200), (220, 220, 220)],
    "static": [(90, 110, 70), (120, 110, 100)],
    "ego vehicle": [(34, 34, 40)],
}
PALETTE_KEYS = sorted(PALETTE)


def _domain_offsets(style: SynthStyle) -> dict[str, np.ndarray]:
    """Fixed per-class colour offsets of a domain (the palette gap)."""
    rng = np.random.default_rng(np.random.SeedSequence([style.palette_seed, 7919]))
    table = rng.normal(0.0, 1.0, size=(len(PALETTE_KEYS), 3))
    # Unit directions: every class moves by exactly palette_shift, so no class is left unchanged by luck.
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    return {k: style.palette_shift * table[i] for i, k in enumerate(PALETTE_KEYS)}


# Texture mixture per label id: weights of (fine grain, mid blotches, low-frequency shading).
_TEX = np.zeros((256, 3), dtype=np.float32)
_TEX[:] = (0.15, 0.1, 0.1)
for _name, _w in {
    "road": (0.45, 0.35, 0.5),
    "sidewalk": (0.35, 0.5, 0.3),
    "building": (0.3, 0.6, 0.4),
    "wall": (0.45, 0.5, 0.2),
    "fence": (0.3, 0.2, 0.2),
    "vegetation": (1.0, 0.8, 0.4),
    "terrain": (0.8, 0.6, 0.5),
    "sky": (0.0, 0.1, 0.2),
}.items():
    _TEX[ID[_name]] = _w


# ----------------------------------------------------------------------------------------------- scene
class _Scene:
    """Draws one image: a label canvas (label ids) and a colour canvas, in lock-step."""

    Z_NEAR = 1.0
    Z_FAR = 70.0

    def __init__(
        self, h: int, w: int, style: SynthStyle, offsets: dict[str, np.ndarray], rng: np.random.Generator
    ) -> None:
        self.h, self.w, self.style, self.offsets, self.rng = h, w, style, offsets, rng
        self.lab = Image.new("L", (w, h), ID["unlabeled"])
        self.rgb = Image.new("RGB", (w, h), (0, 0, 0))
        self.dl = ImageDraw.Draw(self.lab)
        self.dc = ImageDraw.Draw(self.rgb)
        self.f = 1.1 * h  # focal length in pixels: scenes look alike at any resolution of the same aspect
        self.yh = h * (style.horizon + style.horizon_jitter * rng.uniform(-1, 1))
        self.xv = w / 2 + 0.06 * w * rng.uniform(-1, 1)
        self.ch = style.camera_height
        self.s = style.object_scale

    # -- colours
    def colour(self, key: str, jitter: float | None = None, shade: float = 1.0) -> RGB:
        """A palette colour of ``key`` with the domain offset and a per-instance jitter."""
        base = np.asarray(PALETTE[key][self.rng.integers(len(PALETTE[key]))], dtype=np.float64)
        j = self.style.colour_jitter if jitter is None else jitter
        c = (base + self.offsets[key] + self.rng.normal(0, j, 3)) * shade
        return tuple(int(v) for v in np.clip(c, 0, 255))  # type: ignore[return-value]

    @staticmethod
    def tint(c: RGB, f: float) -> RGB:
        return tuple(int(min(255, max(0, v * f))) for v in c)  # type: ignore[return-value]

    # -- projection
    def p(self, x: float, y: float, z: float) -> tuple[float, float]:
        """World (lateral x, height y, depth z) in metres -> pixel (column, row)."""
        return (self.xv + self.f * x / z, self.yh + self.f * (self.ch - y) / z)

    def bb(self, x: float, z: float, pts: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        """Billboard points (u lateral, v up, metres, scaled by object_scale) of an object at (x, z)."""
        k = self.f / z
        return [(self.xv + k * (x + u * self.s), self.yh + k * (self.ch - v * self.s)) for u, v in pts]

    # -- primitives (label + colour together)
    def poly(self, name: str, c: RGB, pts: Sequence[tuple[float, float]]) -> None:
        if len(pts) >= 3:
            self.dl.polygon(pts, fill=ID[name])
            self.dc.polygon(pts, fill=c)

    def ellipse(self, name: str, c: RGB, cx: float, cy: float, rx: float, ry: float, width: int = 0) -> None:
        rx, ry = max(rx, 0.5), max(ry, 0.5)
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        if width > 0 and min(rx, ry) > width + 1:
            self.dl.ellipse(box, outline=ID[name], width=width)
            self.dc.ellipse(box, outline=c, width=width)
        else:
            self.dl.ellipse(box, fill=ID[name])
            self.dc.ellipse(box, fill=c)

    def line(self, name: str, c: RGB, pts: Sequence[tuple[float, float]], width: float) -> None:
        wpx = max(1, int(round(width)))
        self.dl.line(pts, fill=ID[name], width=wpx)
        self.dc.line(pts, fill=c, width=wpx)

    def rect_bb(self, name: str, c: RGB, x: float, z: float, u0: float, u1: float, v0: float, v1: float) -> None:
        self.poly(name, c, self.bb(x, z, [(u0, v0), (u1, v0), (u1, v1), (u0, v1)]))

    def circle_bb(
        self, name: str, c: RGB, x: float, z: float, u: float, v: float, r: float, width_m: float = 0.0
    ) -> None:
        ((cx, cy),) = self.bb(x, z, [(u, v)])
        rp = self.f * r * self.s / z
        wpx = int(round(self.f * width_m * self.s / z)) if width_m > 0 else 0
        self.ellipse(name, c, cx, cy, rp, rp, width=max(1, wpx) if width_m > 0 else 0)

    def ground_quad(self, name: str, c: RGB, x0: float, x1: float, z0: float, z1: float) -> None:
        self.poly(name, c, [self.p(x0, 0, z0), self.p(x1, 0, z0), self.p(x1, 0, z1), self.p(x0, 0, z1)])

    def facade_quad(self, name: str, c: RGB, x: float, z0: float, z1: float, y0: float, y1: float) -> None:
        self.poly(name, c, [self.p(x, y0, z0), self.p(x, y0, z1), self.p(x, y1, z1), self.p(x, y1, z0)])


class _Painter:
    """Lays out and draws a street scene into a ``_Scene``."""

    def __init__(self, sc: _Scene, forced: str) -> None:
        self.sc = sc
        self.rng = sc.rng
        self.forced = forced
        self.items: list[tuple[float, Callable[[], None]]] = []  # (depth, draw) painted far -> near

    def count(self, name: str) -> int:
        n = int(self.rng.poisson(self.sc.style.rate(name)))
        return n + (1 if self.forced == name else 0)

    def z_for(self, name: str, lo: float, hi: float, i: int, n: int) -> float:
        # The forced item (the last one) is placed near the camera so it is visible at any resolution.
        if self.forced == name and i == n - 1:
            return float(self.rng.uniform(lo, min(hi, lo + 6.0)))
        return float(lo + (hi - lo) * self.rng.uniform() ** 1.5)  # more items near: bigger on screen

    def paint(self) -> None:
        sc, rng = self.sc, self.rng
        # Street geometry (metres).
        self.rl, self.rr = rng.uniform(3.5, 7.0, 2)
        self.sl, self.sr = rng.uniform(1.8, 4.0, 2)
        tw = self.sc.style.rate("terrain") / (1.0 + self.sc.style.rate("terrain"))
        self.tl, self.tr = [
            (rng.uniform(1.0, 3.5) if (rng.uniform() < tw or (self.forced == "terrain" and k == 0)) else 0.0)
            for k in range(2)
        ]
        self.sky()
        self.backdrop()
        self.ground()
        for side in (-1, 1):
            self.facades(side)
        self.place_objects()
        for _, draw in sorted(self.items, key=lambda t: -t[0]):
            draw()
        if sc.style.ego_vehicle > 0:
            self.ego()

    # -- background
    def sky(self) -> None:
        sc = self.sc
        sc.poly("sky", sc.colour("sky", jitter=8), [(0, 0), (sc.w, 0), (sc.w, sc.yh + 2), (0, sc.yh + 2)])

    def backdrop(self) -> None:
        """Skyline at the end of the street: buildings and trees at Z_FAR, sky showing through gaps."""
        sc, rng = self.sc, self.rng
        z = sc.Z_FAR
        x = -z * (sc.xv + 5) / sc.f
        x_end = z * (sc.w - sc.xv + 5) / sc.f
        while x < x_end:
            wd = rng.uniform(6, 20)
            r = rng.uniform()
            if r < 0.6:
                hgt = rng.uniform(8, 35)
                sc.poly(
                    "building",
                    sc.colour("building", shade=0.9),
                    [sc.p(x, 0, z), sc.p(x + wd, 0, z), sc.p(x + wd, hgt, z), sc.p(x, hgt, z)],
                )
            elif r < 0.85:
                hgt = rng.uniform(5, 14)
                cx, cy = sc.p(x + wd / 2, hgt * 0.6, z)
                rx, ry = sc.f * wd * 0.6 / z, sc.f * hgt * 0.45 / z
                sc.ellipse("vegetation", sc.colour("vegetation"), cx, cy, rx, ry)
                sc.poly(
                    "vegetation",
                    sc.colour("vegetation"),
                    [sc.p(x, 0, z), sc.p(x + wd, 0, z), sc.p(x + wd, hgt * 0.4, z), sc.p(x, hgt * 0.4, z)],
                )
            x += wd

    def ground(self) -> None:
        sc, rng = self.sc, self.rng
        zn, zf = sc.Z_NEAR, sc.Z_FAR + 1
        # Far ground (seen under low walls/fences and through gaps): terrain.
        sc.poly("terrain", sc.colour("terrain"), [(0, sc.yh), (sc.w, sc.yh), (sc.w, sc.h), (0, sc.h)])
        side_w = 60.0
        sw_col = sc.colour("sidewalk")
        sc.ground_quad("sidewalk", sw_col, -side_w, -self.rl, zn, zf)
        sc.ground_quad("sidewalk", sw_col, self.rr, side_w, zn, zf)
        for side, r, s, t in ((-1, self.rl, self.sl, self.tl), (1, self.rr, self.sr, self.tr)):
            if t > 0:  # grass strip between sidewalk and facade
                a, b = sorted((side * (r + s), side * (r + s + t)))
                sc.ground_quad("terrain", sc.colour("terrain"), a, b, zn, zf)
            # kerb: a lighter strip along the road edge
            a, b = sorted((side * r, side * (r + 0.25)))
            sc.ground_quad("sidewalk", sc.tint(sw_col, 1.18), a, b, zn, zf)
        road = sc.colour("road", jitter=6)
        sc.ground_quad("road", road, -self.rl, self.rr, zn, zf)
        # Lane markings (dashed) and, sometimes, a zebra crossing: road texture with a shape.
        mark = sc.colour("road marking", jitter=6)
        lanes = [0.0] if rng.uniform() < 0.8 else []
        for xl in lanes:
            z = zn + rng.uniform(0, 4)
            while z < zf:
                sc.ground_quad("road", mark, xl - 0.08, xl + 0.08, z, z + 3.0)
                z += 9.0
        if rng.uniform() < 0.35:
            zc = rng.uniform(6, 25)
            x = -self.rl + 0.3
            while x < self.rr - 0.5:
                sc.ground_quad("road", mark, x, x + 0.5, zc, zc + 3.0)
                x += 1.0
        self.rails = False

    def facades(self, side: int) -> None:
        """Facade segments along one side, from the camera to the end of the street."""
        sc, rng = self.sc, self.rng
        st = sc.style
        r, s, t = (self.rl, self.sl, self.tl) if side < 0 else (self.rr, self.sr, self.tr)
        xf = side * (r + s + t)
        kinds = ["building", "vegetation", "wall", "fence"]
        w = np.array([st.rate(k) for k in kinds])
        w = w / w.sum()
        segs = []
        z = sc.Z_NEAR
        first = True
        while z < sc.Z_FAR:
            ln = rng.uniform(6, 22)
            kind = kinds[rng.choice(len(kinds), p=w)]
            if first and side == -1 and self.forced in ("wall", "fence"):
                kind = self.forced
                ln = max(ln, 14.0)
            first = False
            segs.append((kind, z, min(z + ln, sc.Z_FAR)))
            z += ln
        shade = 1.0 + 0.12 * side * rng.uniform(-1, 1)  # sun from one side: one facade row brighter
        for kind, z0, z1 in reversed(segs):  # far first
            if kind == "building":
                self.building(xf, z0, z1, shade)
            elif kind == "vegetation":
                self.hedge(xf, z0, z1, rng.uniform(1.5, 5.0))
            else:
                behind = xf + side * rng.uniform(2, 6)
                if rng.uniform() < 0.6:
                    self.building(behind, z0, z1, shade * 0.95)
                else:
                    self.hedge(behind, z0, z1, rng.uniform(3, 8))
                if kind == "wall":
                    self.wall(xf, z0, z1, shade)
                else:
                    self.fence(xf, z0, z1, shade)

    def building(self, x: float, z0: float, z1: float, shade: float) -> None:
        sc, rng = self.sc, self.rng
        hgt = rng.uniform(7, 28)
        col = sc.colour("building", shade=shade)
        sc.facade_quad("building", col, x, z0, z1, 0, hgt)
        # Floors of windows: the building's texture with a shape (both domains).
        win = sc.colour("window", jitter=10)
        floor_h = rng.uniform(2.8, 3.6)
        pitch = rng.uniform(2.0, 3.5)
        px_per_m = sc.f * abs(x) / max(z0, 1.0) ** 2  # on-screen size of a metre along z near z0
        if px_per_m * pitch * 0.5 < 0.7 and sc.f * floor_h / z0 < 3:
            return
        y = rng.uniform(0.8, 1.5)
        while y + 1.6 < hgt:
            zz = z0 + 0.4 * pitch
            while zz + pitch * 0.5 < z1:
                sc.facade_quad("building", win, x, zz, zz + pitch * 0.5, y, y + 1.5)
                zz += pitch
            y += floor_h
        # A roof cornice line.
        sc.facade_quad("building", sc.tint(col, 0.75), x, z0, z1, hgt - 0.4, hgt)

    def hedge(self, x: float, z0: float, z1: float, hgt: float) -> None:
        sc, rng = self.sc, self.rng
        n = max(2, int((z1 - z0) / 1.5))
        zs = np.linspace(z0, z1, n + 1)
        top = [sc.p(x, hgt * rng.uniform(0.75, 1.15), float(zz)) for zz in zs]
        pts = [sc.p(x, 0, z0)] + top + [sc.p(x, 0, z1)]
        sc.poly("vegetation", sc.colour("vegetation"), pts)

    def wall(self, x: float, z0: float, z1: float, shade: float) -> None:
        sc, rng = self.sc, self.rng
        hgt = rng.uniform(1.0, 2.6)
        col = sc.colour("wall", shade=shade)
        sc.facade_quad("wall", col, x, z0, z1, 0, hgt)
        sc.facade_quad("wall", sc.tint(col, 1.15), x, z0, z1, hgt - 0.15, hgt)  # coping
        if rng.uniform() < 0.5:  # block joints
            for yy in np.arange(0.5, hgt - 0.2, 0.5):
                sc.facade_quad("wall", sc.tint(col, 0.85), x, z0, z1, yy, yy + 0.06)

    def fence(self, x: float, z0: float, z1: float, shade: float) -> None:
        """A see-through fence: posts, rails and slats with the background showing between them."""
        sc, rng = self.sc, self.rng
        hgt = rng.uniform(1.0, 2.2)
        col = sc.colour("fence", shade=shade)
        t = sc.style.thin_scale
        for yy in (hgt * 0.3, hgt * 0.9):
            sc.facade_quad("fence", col, x, z0, z1, yy - 0.08 * t, yy + 0.08 * t)
        step = rng.uniform(0.25, 0.6)
        zz = z0
        while zz < z1:
            a, b = sc.p(x, 0, zz), sc.p(x, hgt, zz)
            if abs(a[0] - sc.p(x, 0, zz + step)[0]) < 1.5 and zz > z0 + 4 * step:
                step *= 2  # far away the slats merge: thin them out instead of drawing sub-pixel lines
            sc.line("fence", col, [a, b], sc.f * 0.06 * t / zz)
            zz += step

    # -- objects
    def add(self, z: float, draw: Callable[[], None]) -> None:
        self.items.append((z, draw))

    def lane_x(self, margin: float = 1.2) -> float:
        return float(self.rng.uniform(-self.rl + margin, self.rr - margin))

    def walk_x(self) -> float:
        side = -1 if self.rng.uniform() < 0.5 else 1
        r, s = (self.rl, self.sl) if side < 0 else (self.rr, self.sr)
        return float(side * self.rng.uniform(r + 0.4, r + s - 0.3))

    def place_objects(self) -> None:
        rng = self.rng
        sc = self.sc
        # Trains (trams) run on rails in the road: draw the rails, then the tram.
        n = self.count("train")
        for i in range(n):
            z = self.z_for("train", 12, 45, i, n)
            if rng.uniform() < 0.5:
                x = self.lane_x(1.5)
                self.draw_rails(x)
                self.add(z, lambda x=x, z=z: self.tram_rear(x, z))
            else:
                self.add(z, lambda z=z: self.tram_side(z))
        for name, lo, hi, draw in (
            ("car", 4, 55, self.car),
            ("truck", 7, 55, self.truck),
            ("bus", 7, 55, self.bus),
        ):
            n = self.count(name)
            for i in range(n):
                z = self.z_for(name, lo, hi, i, n)
                x = self.lane_x()
                side_view = rng.uniform() < 0.25 and z > 8
                self.add(z, lambda d=draw, x=x, z=z, sv=side_view: d(x, z, sv))
        # Parked cars along a kerb.
        n = self.count("parked car")
        if n:
            side = -1 if rng.uniform() < 0.5 else 1
            r = self.rl if side < 0 else self.rr
            z = rng.uniform(4, 12)
            for _ in range(n):
                self.add(z, lambda x=side * (r - 1.1), z=z: self.car(x, z, False))
                z += rng.uniform(5, 9)
        n = self.count("person")
        for i in range(n):
            z = self.z_for("person", 4, 40, i, n)
            cross = rng.uniform() < 0.2
            x = self.lane_x(0.5) if cross else self.walk_x()
            self.add(z, lambda x=x, z=z: self.person(x, z))
        n = self.count("rider")
        for i in range(n):
            z = self.z_for("rider", 5, 40, i, n)
            side = -1 if rng.uniform() < 0.5 else 1
            r = self.rl if side < 0 else self.rr
            x = side * (r - rng.uniform(0.6, 1.5))
            moto = rng.uniform() < 0.4
            self.add(z, lambda x=x, z=z, m=moto: self.rider(x, z, m))
        for name in ("bicycle", "motorcycle"):
            n = self.count(name)
            for i in range(n):
                z = self.z_for(name, 4, 30, i, n)
                x = self.walk_x() if rng.uniform() < 0.7 else self.lane_x(0.6)
                fn = self.bicycle if name == "bicycle" else self.motorcycle
                self.add(z, lambda fn=fn, x=x, z=z, nm=name: fn(x, z, sc.colour(nm), 1 if x > 0 else -1))
        # Street furniture on the kerb: poles, some carrying signs or lights.
        kinds = {"traffic light": "light", "traffic sign": "sign", "pole": "lamp"}
        for fname, kind in kinds.items():
            n = self.count(fname)
            for i in range(n):
                near = self.forced == fname and i == 0
                z = float(rng.uniform(4, 10)) if near else float(4 + 50 * rng.uniform() ** 1.3)
                side = -1 if rng.uniform() < 0.5 else 1
                r = self.rl if side < 0 else self.rr
                x = side * (r + 0.35)
                self.add(z, lambda x=x, z=z, k=kind, sd=side: self.pole(x, z, k, sd))
        n = self.count("tree")
        for _ in range(n):
            side = -1 if rng.uniform() < 0.5 else 1
            r, s, t = (self.rl, self.sl, self.tl) if side < 0 else (self.rr, self.sr, self.tr)
            x = side * (r + s + t * 0.5 - 0.5) if t > 0 else side * (r + s - 0.6)
            z = float(5 + 50 * rng.uniform() ** 1.2)
            self.add(z, lambda x=x, z=z: self.tree(x, z))
        n = self.count("static")
        for _ in range(n):
            x, z = self.walk_x(), float(rng.uniform(4, 30))
            self.add(z, lambda x=x, z=z: self.clutter(x, z))

    def draw_rails(self, x: float) -> None:
        sc = self.sc
        col = sc.colour("pole", jitter=6)
        for u in (-0.72, 0.72):
            sc.ground_quad("road", col, x + u - 0.04, x + u + 0.04, sc.Z_NEAR, sc.Z_FAR)

    def car(self, x: float, z: float, side_view: bool) -> None:
        sc, rng = self.sc, self.rng
        col = sc.colour("car")
        glass, tyre = sc.colour("glass", jitter=8), sc.colour("tyre", jitter=4)
        if side_view:
            d = 1 if rng.uniform() < 0.5 else -1
            prof = [
                (-2.15, 0.3),
                (2.15, 0.3),
                (2.2, 0.8),
                (1.4, 0.95),
                (0.8, 1.45),
                (-1.0, 1.45),
                (-1.7, 1.0),
                (-2.15, 0.95),
            ]
            sc.poly("car", col, sc.bb(x, z, [(d * u, v) for u, v in prof]))
            sc.poly(
                "car",
                glass,
                sc.bb(x, z, [(d * u, v) for u, v in [(1.25, 0.98), (0.75, 1.38), (-0.9, 1.38), (-1.5, 0.98)]]),
            )
            for u in (-1.35, 1.35):
                sc.circle_bb("car", tyre, x, z, d * u, 0.33, 0.33)
            return
        for u in (-0.88, 0.58):
            sc.rect_bb("car", tyre, x, z, u, u + 0.3, 0.0, 0.4)
        sc.poly(
            "car",
            col,
            sc.bb(x, z, [(-0.9, 0.3), (0.9, 0.3), (0.92, 0.9), (0.8, 1.0), (-0.8, 1.0), (-0.92, 0.9)]),
        )
        sc.poly("car", col, sc.bb(x, z, [(-0.8, 0.95), (0.8, 0.95), (0.6, 1.45), (-0.6, 1.45)]))
        sc.poly("car", glass, sc.bb(x, z, [(-0.68, 1.0), (0.68, 1.0), (0.54, 1.38), (-0.54, 1.38)]))
        light = sc.colour("lamp", jitter=4)
        for u in (-0.86, 0.62):
            sc.rect_bb("car", light, x, z, u, u + 0.24, 0.7, 0.84)
        sc.rect_bb("car", (230, 230, 230), x, z, -0.25, 0.25, 0.4, 0.55)  # plate: car in gtFine labelIds

    def truck(self, x: float, z: float, side_view: bool) -> None:
        sc = self.sc
        col, box = sc.colour("truck"), sc.colour("truck")
        tyre, glass = sc.colour("tyre", jitter=4), sc.colour("glass", jitter=8)
        if side_view:
            d = 1 if self.rng.uniform() < 0.5 else -1
            sc.poly("truck", box, sc.bb(x, z, [(d * -4.2, 0.8), (d * 1.8, 0.8), (d * 1.8, 3.8), (d * -4.2, 3.8)]))
            sc.poly(
                "truck",
                col,
                sc.bb(x, z, [(d * 1.9, 0.6), (d * 4.0, 0.6), (d * 4.0, 2.2), (d * 3.5, 3.1), (d * 1.9, 3.1)]),
            )
            sc.poly(
                "truck",
                glass,
                sc.bb(x, z, [(d * 3.0, 2.0), (d * 3.85, 2.0), (d * 3.45, 2.9), (d * 3.0, 2.9)]),
            )
            for u in (-3.2, -2.2, 3.0):
                sc.circle_bb("truck", tyre, x, z, d * u, 0.5, 0.5)
            return
        for u in (-1.2, 0.8):
            sc.rect_bb("truck", tyre, x, z, u, u + 0.4, 0.0, 0.6)
        sc.rect_bb("truck", box, x, z, -1.25, 1.25, 0.55, 3.7)
        sc.rect_bb("truck", sc.tint(box, 0.8), x, z, -0.02, 0.02, 0.7, 3.5)  # rear doors split
        sc.rect_bb("truck", sc.tint(box, 0.6), x, z, -1.25, 1.25, 0.45, 0.62)  # bumper

    def bus(self, x: float, z: float, side_view: bool) -> None:
        sc = self.sc
        col = sc.colour("bus")
        tyre, glass = sc.colour("tyre", jitter=4), sc.colour("glass", jitter=8)
        if side_view:
            d = 1 if self.rng.uniform() < 0.5 else -1
            sc.rect_bb("bus", col, x, z, -6.0, 6.0, 0.3, 3.1)
            u = -5.6
            while u < 5.4:
                sc.rect_bb("bus", glass, x, z, d * u, d * (u + 1.4), 1.5, 2.6)
                u += 1.7
            sc.rect_bb("bus", glass, x, z, d * 4.4, d * 5.2, 0.5, 2.6)  # door
            for u in (-3.8, 4.0):
                sc.circle_bb("bus", tyre, x, z, d * u, 0.5, 0.5)
            return
        sc.rect_bb("bus", tyre, x, z, -1.2, -0.8, 0.0, 0.5)
        sc.rect_bb("bus", tyre, x, z, 0.8, 1.2, 0.0, 0.5)
        sc.rect_bb("bus", col, x, z, -1.27, 1.27, 0.3, 3.1)
        sc.rect_bb("bus", glass, x, z, -1.05, 1.05, 2.0, 2.9)
        sc.rect_bb("bus", sc.tint(col, 0.7), x, z, -1.1, 1.1, 2.95, 3.05)  # destination display
        light = sc.colour("lamp", jitter=4)
        for u in (-1.2, 0.95):
            sc.rect_bb("bus", light, x, z, u, u + 0.25, 0.6, 0.8)

    def tram_rear(self, x: float, z: float) -> None:
        sc = self.sc
        col = sc.colour("train")
        glass = sc.colour("glass", jitter=8)
        sc.rect_bb("train", col, x, z, -1.3, 1.3, 0.35, 3.5)
        sc.rect_bb("train", glass, x, z, -1.1, 1.1, 1.6, 3.1)
        sc.rect_bb("train", sc.tint(col, 0.6), x, z, -1.3, 1.3, 0.3, 0.5)
        sc.line(
            "train",
            sc.colour("pole", jitter=4),  # pantograph
            sc.bb(x, z, [(-0.6, 3.5), (0.0, 4.3), (0.6, 3.5)]),
            sc.f * 0.05 / z,
        )

    def tram_side(self, z: float) -> None:
        """A long tram crossing the street at depth z, on its own rails."""
        sc, rng = self.sc, self.rng
        col = sc.colour("train")
        glass = sc.colour("glass", jitter=8)
        ln = rng.uniform(20, 32)
        x0 = rng.uniform(-ln, 0.0)
        rail = sc.colour("pole", jitter=6)
        for dz in (-0.7, 0.7):
            sc.ground_quad("road", rail, -self.rl, self.rr, z + dz - 0.04, z + dz + 0.04)
        sc.poly(
            "train",
            col,
            [
                sc.p(x0, 0.4, z),
                sc.p(x0 + ln, 0.4, z),
                sc.p(x0 + ln, 3.2, z),
                sc.p(x0 + ln - 0.5, 3.6, z),
                sc.p(x0 + 0.5, 3.6, z),
                sc.p(x0, 3.2, z),
            ],
        )
        u = x0 + 0.8
        while u + 1.2 < x0 + ln - 0.5:
            sc.poly(
                "train",
                glass,
                [sc.p(u, 1.5, z), sc.p(u + 1.2, 1.5, z), sc.p(u + 1.2, 2.8, z), sc.p(u, 2.8, z)],
            )
            u += 1.6
        sc.poly(
            "train",
            sc.tint(col, 0.5),
            [sc.p(x0, 0.0, z), sc.p(x0 + ln, 0.0, z), sc.p(x0 + ln, 0.45, z), sc.p(x0, 0.45, z)],
        )

    def person(self, x: float, z: float, cloth: RGB | None = None) -> None:
        sc, rng = self.sc, self.rng
        hs = rng.uniform(0.9, 1.1)  # individual height
        top = cloth or sc.colour("person")
        legs, skin = sc.colour("trousers"), sc.colour("skin", jitter=8)
        step = rng.uniform(0.0, 0.15)
        bb = [(u * hs, v * hs) for u, v in [(-0.17 - step, 0.0), (-0.03, 0.0), (-0.02, 0.86), (-0.2, 0.86)]]
        sc.poly("person", legs, sc.bb(x, z, bb))
        bb = [(u * hs, v * hs) for u, v in [(0.03, 0.0), (0.17 + step, 0.0), (0.2, 0.86), (0.02, 0.86)]]
        sc.poly("person", legs, sc.bb(x, z, bb))
        bb = [
            (u * hs, v * hs)
            for u, v in [(-0.22, 0.82), (0.22, 0.82), (0.24, 1.45), (0.1, 1.5), (-0.1, 1.5), (-0.24, 1.45)]
        ]
        sc.poly("person", top, sc.bb(x, z, bb))
        for sgn in (-1, 1):
            bb = [(sgn * u * hs, v * hs) for u, v in [(0.24, 1.45), (0.31, 1.42), (0.33, 0.85), (0.26, 0.85)]]
            sc.poly("person", sc.tint(top, 0.85), sc.bb(x, z, bb))
        sc.circle_bb("person", skin, x, z, 0.0, 1.62 * hs, 0.12 * hs)
        sc.circle_bb("person", sc.colour("trousers", jitter=6), x, z, 0.0, 1.7 * hs, 0.08 * hs)  # hair

    def bicycle(self, x: float, z: float, col: RGB, d: int) -> None:
        sc = self.sc
        tyre = sc.colour("tyre", jitter=4)
        t = sc.style.thin_scale
        for u in (-0.52, 0.52):
            sc.circle_bb("bicycle", tyre, x, z, d * u, 0.34, 0.34, width_m=0.06 * t)
        wpx = sc.f * 0.05 * t * sc.s / z
        frame = [(-0.52, 0.34), (-0.12, 0.85), (0.4, 0.85), (0.0, 0.34), (-0.52, 0.34)]
        sc.line("bicycle", col, sc.bb(x, z, [(d * u, v) for u, v in frame]), wpx)
        sc.line("bicycle", col, sc.bb(x, z, [(d * 0.0, 0.34), (d * -0.12, 0.85)]), wpx)
        sc.line("bicycle", col, sc.bb(x, z, [(d * 0.52, 0.34), (d * 0.42, 1.0), (d * 0.3, 1.05)]), wpx)
        sc.rect_bb("bicycle", tyre, x, z, d * -0.2 if d > 0 else 0.0, d * -0.2 if d < 0 else 0.0, 0.88, 0.95)

    def motorcycle(self, x: float, z: float, col: RGB, d: int) -> None:
        sc = self.sc
        tyre = sc.colour("tyre", jitter=4)
        for u in (-0.7, 0.7):
            sc.circle_bb("motorcycle", tyre, x, z, d * u, 0.32, 0.32)
        body = [(-0.75, 0.5), (0.55, 0.45), (0.7, 0.75), (0.35, 0.95), (-0.2, 0.9), (-0.8, 0.8)]
        sc.poly("motorcycle", col, sc.bb(x, z, [(d * u, v) for u, v in body]))
        sc.line(
            "motorcycle",
            sc.colour("pole", jitter=4),
            sc.bb(x, z, [(d * 0.7, 0.32), (d * 0.55, 1.1)]),
            sc.f * 0.06 * sc.s / z,
        )

    def rider(self, x: float, z: float, moto: bool) -> None:
        """A rider on a bicycle or motorcycle, seen from the side or from behind."""
        sc, rng = self.sc, self.rng
        top, legs, skin = sc.colour("person"), sc.colour("trousers"), sc.colour("skin", jitter=8)
        vcol = sc.colour("motorcycle" if moto else "bicycle")
        veh = "motorcycle" if moto else "bicycle"
        if rng.uniform() < 0.5:  # rear view
            tyre = sc.colour("tyre", jitter=4)
            sc.rect_bb(veh, tyre, x, z, -0.05 - 0.04 * moto, 0.05 + 0.04 * moto, 0.0, 0.68)
            sc.rect_bb(veh, vcol, x, z, -0.3, 0.3, 1.0, 1.05)  # handlebar
            if moto:
                sc.rect_bb(veh, vcol, x, z, -0.22, 0.22, 0.45, 0.9)
            sc.poly("rider", legs, sc.bb(x, z, [(-0.2, 0.3), (0.2, 0.3), (0.22, 1.0), (-0.22, 1.0)]))
            sc.poly("rider", top, sc.bb(x, z, [(-0.23, 0.95), (0.23, 0.95), (0.25, 1.55), (-0.25, 1.55)]))
            sc.circle_bb("rider", skin if not moto else sc.colour("motorcycle"), x, z, 0.0, 1.7, 0.13)
            return
        d = 1 if rng.uniform() < 0.5 else -1
        (self.motorcycle if moto else self.bicycle)(x, z, vcol, d)
        seat_v = 0.9 if moto else 0.95
        sc.poly(
            "rider",
            legs,
            sc.bb(x, z, [(d * -0.25, seat_v), (d * 0.05, seat_v), (d * 0.15, 0.35), (d * 0.0, 0.35)]),
        )
        sc.poly(
            "rider",
            top,
            sc.bb(x, z, [(d * -0.3, seat_v), (d * 0.05, seat_v), (d * 0.25, 1.55), (d * -0.05, 1.6)]),
        )
        sc.line(
            "rider",
            sc.tint(top, 0.85),
            sc.bb(x, z, [(d * 0.15, 1.45), (d * 0.4, 1.05)]),
            sc.f * 0.08 * sc.s / z,
        )
        sc.circle_bb("rider", skin if not moto else sc.colour("motorcycle"), x, z, d * 0.15, 1.75, 0.13)

    def pole(self, x: float, z: float, kind: str, side: int) -> None:
        sc, rng = self.sc, self.rng
        col = sc.colour("pole")
        hgt = rng.uniform(3.0, 4.0) if kind == "sign" else rng.uniform(4.5, 8.0)
        t = sc.style.thin_scale
        wpx = max(1.0, sc.f * 0.18 * t / z)
        (xb, yb), (_, yt) = sc.p(x, 0, z), sc.p(x, hgt, z)
        sc.poly("pole", col, [(xb - wpx / 2, yb), (xb + wpx / 2, yb), (xb + wpx / 2, yt), (xb - wpx / 2, yt)])
        if kind == "lamp":
            arm = -side * rng.uniform(1.0, 2.5)
            sc.line("pole", col, [sc.p(x, hgt, z), sc.p(x + arm, hgt + 0.3, z)], sc.f * 0.1 * t / z)
            sc.poly(
                "pole",
                sc.tint(col, 1.2),
                [
                    sc.p(x + arm - 0.35, hgt + 0.35, z),
                    sc.p(x + arm + 0.35, hgt + 0.35, z),
                    sc.p(x + arm + 0.25, hgt + 0.15, z),
                    sc.p(x + arm - 0.25, hgt + 0.15, z),
                ],
            )
        elif kind == "light":
            # Either on top of the pole or hanging from an arm over the road.
            lx = x if rng.uniform() < 0.5 else x - side * rng.uniform(2.0, 4.0)
            if lx != x:
                sc.line("pole", col, [sc.p(x, hgt - 0.2, z), sc.p(lx, hgt - 0.2, z)], sc.f * 0.12 * t / z)
            box = sc.colour("traffic light")
            x0, y0 = sc.p(lx - 0.18 * t, hgt - 0.1, z)
            x1, y1 = sc.p(lx + 0.18 * t, hgt - 0.1 - 1.0 * t, z)
            sc.poly("traffic light", box, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
            lit = int(rng.integers(3))
            for k in range(3):
                cx, cy = sc.p(lx, hgt - 0.1 - (0.18 + 0.32 * k) * t, z)
                lamp = PALETTE["lamp"][k] if k == lit else (60, 60, 50)
                r = sc.f * 0.11 * t / z
                sc.ellipse("traffic light", sc.tint(lamp, 1.0), cx, cy, r, r)
        else:
            shape = int(rng.integers(4))
            cx, cy = sc.p(x, hgt - 0.4, z)
            r = max(1.0, sc.f * 0.38 * min(t, 2.0) / z)
            c1 = sc.colour("traffic sign")
            c2 = sc.colour("traffic sign", jitter=6)
            if shape == 0:  # round: ring + inner disc
                sc.ellipse("traffic sign", c1, cx, cy, r, r)
                sc.ellipse("traffic sign", c2, cx, cy, r * 0.7, r * 0.7)
            elif shape == 1:  # warning triangle
                sc.poly("traffic sign", c1, [(cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r), (cx, cy - r)])
                sc.poly(
                    "traffic sign",
                    c2,
                    [(cx - 0.6 * r, cy + 0.55 * r), (cx + 0.6 * r, cy + 0.55 * r), (cx, cy - 0.5 * r)],
                )
            elif shape == 2:  # rectangular information sign
                sc.poly(
                    "traffic sign",
                    c1,
                    [
                        (cx - 1.1 * r, cy - 0.8 * r),
                        (cx + 1.1 * r, cy - 0.8 * r),
                        (cx + 1.1 * r, cy + 0.8 * r),
                        (cx - 1.1 * r, cy + 0.8 * r),
                    ],
                )
                sc.poly(
                    "traffic sign",
                    c2,
                    [
                        (cx - 0.7 * r, cy - 0.15 * r),
                        (cx + 0.7 * r, cy - 0.15 * r),
                        (cx + 0.7 * r, cy + 0.15 * r),
                        (cx - 0.7 * r, cy + 0.15 * r),
                    ],
                )
            else:  # back of a sign: plain grey disc
                sc.ellipse("traffic sign", sc.colour("pole", jitter=6, shade=1.15), cx, cy, r, r)

    def tree(self, x: float, z: float) -> None:
        sc, rng = self.sc, self.rng
        hgt = rng.uniform(4, 9)
        trunk = sc.colour("trunk", jitter=8)
        sc.rect_bb("vegetation", trunk, x / sc.s, z, -0.15, 0.15, 0.0, hgt * 0.55 / sc.s)
        col = sc.colour("vegetation")
        for _ in range(int(rng.integers(3, 6))):
            cx, cy = sc.p(x + rng.uniform(-1, 1), hgt * rng.uniform(0.6, 0.85), z)
            rx = sc.f * rng.uniform(1.0, 2.2) / z
            sc.ellipse("vegetation", sc.tint(col, rng.uniform(0.85, 1.15)), cx, cy, rx, rx * rng.uniform(0.8, 1.2))

    def clutter(self, x: float, z: float) -> None:
        """Bins and benches: 'static', an ignored Cityscapes class."""
        sc, rng = self.sc, self.rng
        col = sc.colour("static")
        if rng.uniform() < 0.5:
            sc.rect_bb("static", col, x, z, -0.3, 0.3, 0.0, 1.0)
        else:
            sc.rect_bb("static", col, x, z, -0.9, 0.9, 0.4, 0.5)
            sc.rect_bb("static", col, x, z, -0.9, 0.9, 0.6, 0.9)

    def ego(self) -> None:
        """Ego-vehicle bonnet at the bottom (Cityscapes' 'ego vehicle', ignored)."""
        sc = self.sc
        hb = sc.style.ego_vehicle * sc.h
        xs = np.linspace(0, sc.w, 17)
        top = [(float(xx), float(sc.h - hb * (0.6 + 0.4 * (1 - ((xx - sc.w / 2) / (sc.w / 2)) ** 2)))) for xx in xs]
        sc.poly("ego vehicle", sc.colour("ego vehicle", jitter=4), [(0, sc.h), *top, (sc.w, sc.h)])


# -------------------------------------------------------------------------------------------- finishing
def _upsampled_noise(rng: np.random.Generator, h: int, w: int, factor: int) -> np.ndarray:
    small = rng.standard_normal((max(2, h // factor + 1), max(2, w // factor + 1))).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _finish(rgb: Image.Image, lab: np.ndarray, style: SynthStyle, rng: np.random.Generator) -> np.ndarray:
    """Camera and lighting model: saturation, texture, shadows, cast, gamma, blur, sensor noise."""
    h, w = lab.shape
    img = np.asarray(rgb, dtype=np.float32) / 255.0
    grey = img.mean(axis=2, keepdims=True)
    img = grey + style.saturation * (img - grey)
    # Sky gets a vertical gradient in both domains (a renderer has it too).
    rows = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    img = np.where((lab == ID["sky"])[..., None], img * (1.0 + 0.25 * rows)[..., None], img)
    if style.texture_strength > 0:
        fine = rng.standard_normal((h, w)).astype(np.float32)
        mid = _upsampled_noise(rng, h, w, 4)
        low = _upsampled_noise(rng, h, w, 16)
        wts = _TEX[lab]
        tex = wts[..., 0] * fine + wts[..., 1] * mid + wts[..., 2] * low
        img = img * (1.0 + style.texture_strength * np.clip(tex, -2.5, 2.5))[..., None]
        # Clouds: the sky is brightened towards white where the low-frequency field is high.
        cloud = np.clip(low - 0.3, 0.0, 1.0) * (lab == ID["sky"]) * min(1.0, 2.0 * style.texture_strength)
        img = img + cloud[..., None] * (0.9 - img)
    if style.shadow_strength > 0:
        sh = Image.new("L", (w, h), 0)
        dr = ImageDraw.Draw(sh)
        for _ in range(int(rng.integers(1, 4))):
            x0, x1 = sorted(rng.uniform(-0.3 * w, 1.3 * w, 2))
            y0 = rng.uniform(0.3 * h, h)
            dr.polygon([(x0, y0), (x1, y0), (x1 + rng.uniform(-0.3, 0.3) * w, h), (x0 - 0.2 * w, h)], fill=255)
        m = np.asarray(sh.filter(ImageFilter.GaussianBlur(max(0.5, 0.01 * w))), dtype=np.float32) / 255.0
        img = img * (1.0 - style.shadow_strength * m)[..., None]
    gain = style.brightness * (1.0 + style.brightness_jitter * rng.standard_normal())
    img = img * (np.asarray(style.colour_cast, dtype=np.float32) * gain)
    img = np.clip(img, 0.0, 1.0) ** style.gamma
    out = Image.fromarray((img * 255.0 + 0.5).astype(np.uint8))
    if style.blur_sigma > 0:
        out = out.filter(ImageFilter.GaussianBlur(style.blur_sigma))
    arr = np.asarray(out, dtype=np.float32)
    if style.noise_std > 0:
        arr = arr + rng.normal(0.0, style.noise_std, arr.shape).astype(np.float32)
    return np.clip(arr + 0.5, 0, 255).astype(np.uint8)


def render(cfg: SynthConfig, domain: str, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of a split: (RGB uint8 [H, W, 3], label ids uint8 [H, W]).

    Depends only on (cfg.seed, domain, split, index) and the domain's style: splits can grow stably.
    """
    style = cfg.source_style if domain == "source" else cfg.target_style
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, DOMAIN_CODE[domain], SPLIT_CODE[split], index]))
    sc = _Scene(cfg.height, cfg.width, style, _domain_offsets(style), rng)
    _Painter(sc, FORCED_ROTATION[index % len(FORCED_ROTATION)]).paint()
    lab = np.asarray(sc.lab, dtype=np.uint8).copy()
    return _finish(sc.rgb, lab, style, rng), lab


# --------------------------------------------------------------------------------------------- writing
def _source_name(i: int) -> str:
    return f"{i + 1:05d}.png"


def target_stem(cities: Sequence[str], i: int) -> tuple[str, str]:
    """(city, stem) of target image ``i``: round-robin over cities, sequence = i // n_cities, frame 19."""
    city = cities[i % len(cities)]
    return city, f"{city}_{i // len(cities):06d}_{19:06d}"


def _save_png(path: Path, arr: np.ndarray) -> None:
    # uint8 [H, W, 3] is saved as RGB, uint8 [H, W] as "L" (8-bit label ids).
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(path, format="PNG", compress_level=6)


def generate(root: str | Path, cfg: SynthConfig) -> dict[str, Any]:
    """Write the source (GTA5 layout) and target (Cityscapes layout) trees under ``root``.

    Built in ``<root>.tmp`` and renamed into place, so an interrupted run never leaves a complete-looking
    tree; an existing ``root`` is replaced. Returns (and writes to ``root/synth_summary.json``) the image
    counts and per-class pixel counts (train-class names plus 'ignore') per domain split.
    """
    root = Path(root)
    tmp = root.with_name(root.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    id_names = {lab.id: lab.name for lab in CS_LABELS if lab.id >= 0}
    pixels: dict[str, dict[str, int]] = {}
    counts: dict[str, int] = {}

    def tally(key: str, lab: np.ndarray) -> None:
        bc = np.bincount(lab.ravel(), minlength=256)
        acc = pixels.setdefault(key, {n: 0 for n in [*TRAIN_CLASSES, "ignore"]})
        for i in np.nonzero(bc)[0]:
            name = id_names.get(int(i), "")
            acc[name if name in TRAIN_CLASSES else "ignore"] += int(bc[i])
        counts[key] = counts.get(key, 0) + 1

    src_img, src_lab = tmp / "source" / "images", tmp / "source" / "labels"
    src_img.mkdir(parents=True)
    src_lab.mkdir(parents=True)
    for i in range(cfg.n_source):
        img, lab = render(cfg, "source", "train", i)
        _save_png(src_img / _source_name(i), img)
        _save_png(src_lab / _source_name(i), lab)
        tally("source", lab)
    counts.setdefault("source", 0)
    for split, n, cities in (
        ("train", cfg.n_target_train, cfg.train_cities),
        ("val", cfg.n_target_val, cfg.val_cities),
    ):
        key = f"target_{split}"
        counts.setdefault(key, 0)
        for c in cities:
            (tmp / "target" / "leftImg8bit" / split / c).mkdir(parents=True, exist_ok=True)
            (tmp / "target" / "gtFine" / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, lab = render(cfg, "target", split, i)
            city, stem = target_stem(cities, i)
            _save_png(tmp / "target" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", img)
            _save_png(tmp / "target" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", lab)
            tally(key, lab)
    for key in counts:
        pixels.setdefault(key, {n: 0 for n in [*TRAIN_CLASSES, "ignore"]})
    summary = {"counts": counts, "pixels": pixels, "config": cfg.to_dict()}
    (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m pipeline.data.synth ROOT [--seed N] [--n-source N] ...``: generate with default styles."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    for f in fields(SynthConfig):
        if f.type in ("int", int):
            ap.add_argument("--" + f.name.replace("_", "-"), type=int, default=None)
    args = ap.parse_args(argv)
    kw = {k: v for k, v in vars(args).items() if k != "root" and v is not None}
    summary = generate(args.root, SynthConfig.from_dict(kw))
    print(json.dumps(summary["counts"]))


if __name__ == "__main__":
    main()

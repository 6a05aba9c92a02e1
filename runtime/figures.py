"""Seeded scenes of drawn people with exact human-parsing labels (numpy and OpenCV only).

:func:`scene` draws people part by part (hair, face, hat, sunglasses, clothes, arms, legs, shoes, …) in
z-order onto a background, then lights the picture. Invariants: the same arguments give the same arrays;
``labels`` holds the 20 parsing class ids of :data:`CIHP_PARSING` (multi-human) or :data:`LIP_PARSING`
(single-human), never :data:`IGNORE`; ``humans`` is > 0 exactly where ``labels`` is not Background, and
every person drawn keeps at least :func:`min_person_pixels` visible pixels. Left and right are the
person's: a person facing the camera has Left-arm on the image's right. :func:`write_dataset` lays scenes
out as CIHP/LIP do; ``m2fp-figures`` (:func:`main`) is its command line.
"""

from __future__ import annotations

import colorsys
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import cv2
import numpy as np

from .cli_errors import Command
from .errors import M2FPError

log = logging.getLogger(__name__)

#: the 20 parsing classes of the CIHP (multi-human) model, index = id; its 21st class "Human" is no part
CIHP_PARSING: tuple[str, ...] = (
    "Background", "Hat", "Hair", "Glove", "Sunglasses", "UpperClothes", "Dress", "Coat", "Socks",
    "Pants", "Torso-skin", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm", "Left-leg",
    "Right-leg", "Left-shoe", "Right-shoe",
)
#: the 20 classes of the LIP (single-human) model: CIHP's ids, with "Jumpsuits" where CIHP has "Torso-skin"
LIP_PARSING: tuple[str, ...] = (
    "Background", "Hat", "Hair", "Glove", "Sunglasses", "Upper-clothes", "Dress", "Coat", "Socks",
    "Pants", "Jumpsuits", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm", "Left-leg",
    "Right-leg", "Left-shoe", "Right-shoe",
)
TASKS: tuple[str, ...] = ("multi-human", "single-human")
#: the label of pixels a loss should skip; the generator draws hard edges, so it never writes it
IGNORE = 255
MIN_SIDE, MAX_SIDE = 64, 4096
MAX_PEOPLE = 12
#: every person drawn keeps at least this share of the image's pixels visible
MIN_PERSON_SHARE = 0.002
#: part classes a scene of two or more people always shows (Background not counted)
MIN_CLASSES = 8
_ATTEMPTS = 12  # random layouts tried before the tiled one


def _id(name: str) -> int:
    return CIHP_PARSING.index(name)


HAT, HAIR, GLOVE, SUNGLASSES = _id("Hat"), _id("Hair"), _id("Glove"), _id("Sunglasses")
UPPER, DRESS, COAT, SOCKS, PANTS = _id("UpperClothes"), _id("Dress"), _id("Coat"), _id("Socks"), _id("Pants")
TORSO_SKIN, SCARF, SKIRT, FACE = _id("Torso-skin"), _id("Scarf"), _id("Skirt"), _id("Face")
JUMPSUITS = LIP_PARSING.index("Jumpsuits")
ARM = {"left": _id("Left-arm"), "right": _id("Right-arm")}
LEG = {"left": _id("Left-leg"), "right": _id("Right-leg")}
SHOE = {"left": _id("Left-shoe"), "right": _id("Right-shoe")}


class FigureError(M2FPError, ValueError):
    """An argument of the generator is out of range; the message names it."""


@dataclass(frozen=True)
class Person:
    """One drawn person: ``index`` is its value in ``Scene.humans`` (draw order, later ones occlude).

    ``facing`` is ``"front"`` (the person's left is the image's right) or ``"back"`` (left is left);
    ``box`` is ``(x0, y0, x1, y1)`` of the whole figure in pixels, which may reach past the border.
    """

    index: int
    facing: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True, eq=False)
class Scene:
    """An RGB ``image`` with its part ``labels`` (class ids of ``classes``) and person ids ``humans``."""

    image: np.ndarray
    labels: np.ndarray
    humans: np.ndarray
    classes: tuple[str, ...]
    people: tuple[Person, ...] = ()


# ------------------------------------------------------------------------------------------ checks
def _check(height: int, width: int, task: str, people: int | None) -> None:
    for name, side in (("height", height), ("width", width)):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise FigureError(f"{name}: expected {MIN_SIDE}..{MAX_SIDE} pixels, got {side}")
    if task not in TASKS:
        raise FigureError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    if people is not None and not 1 <= people <= MAX_PEOPLE:
        raise FigureError(f"people: expected 1..{MAX_PEOPLE}, got {people}")


def min_person_pixels(height: int, width: int) -> int:
    """The fewest visible pixels any person of a ``height`` × ``width`` scene keeps."""
    return max(1, math.ceil(MIN_PERSON_SHARE * height * width))


# ------------------------------------------------------------------------------------------ canvas
_SHIFT = 3  # OpenCV's fixed-point bits: sub-pixel placement without anti-aliasing
_ONE = 1 << _SHIFT
Point = tuple[float, float]


def _fx(v: float) -> int:
    return int(round(v * _ONE))


class _Canvas:
    """A map of region ids; each region has one class, person, colour and texture strength."""

    def __init__(self, height: int, width: int) -> None:
        self.regions = np.zeros((height, width), np.uint16)
        self.cls: list[int] = [0]
        self.person: list[int] = [0]
        self.colour: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)]
        self.texture: list[tuple[float, float]] = [(0.0, 0.0)]

    def region(self, cls: int, colour: Sequence[float], person: int, texture: tuple[float, float] = (0, 0)) -> int:
        self.cls.append(cls)
        self.person.append(person)
        self.colour.append((float(colour[0]), float(colour[1]), float(colour[2])))
        self.texture.append(texture)
        return len(self.cls) - 1

    def poly(self, r: int, pts: Sequence[Point]) -> None:
        arr = np.round(np.asarray(pts, np.float64) * _ONE).astype(np.int32)
        cv2.fillPoly(self.regions, [arr], (r,), cv2.LINE_8, _SHIFT)

    def ellipse(self, r: int, c: Point, axes: Point, angle: float = 0.0, start: float = 0.0,
                end: float = 360.0) -> None:
        size = (_fx(max(axes[0], 0.5)), _fx(max(axes[1], 0.5)))
        cv2.ellipse(self.regions, (_fx(c[0]), _fx(c[1])), size, angle, start, end, (r,), -1, cv2.LINE_8, _SHIFT)

    def limb(self, r: int, p0: Point, p1: Point, r0: float, r1: float) -> None:
        """A tapered capsule from ``p0`` (radius ``r0``) to ``p1`` (radius ``r1``)."""
        r0, r1 = max(r0, 0.5), max(r1, 0.5)
        self.ellipse(r, p0, (r0, r0))
        self.ellipse(r, p1, (r1, r1))
        dx, dy = p1[0] - p0[0], p1[1] - p0[1]
        length = math.hypot(dx, dy)
        if length > 1e-6:
            nx, ny = -dy / length, dx / length
            self.poly(r, [(p0[0] + nx * r0, p0[1] + ny * r0), (p1[0] + nx * r1, p1[1] + ny * r1),
                          (p1[0] - nx * r1, p1[1] - ny * r1), (p0[0] - nx * r0, p0[1] - ny * r0)])


# ------------------------------------------------------------------------------------------ looks
_SKIN = ((250, 222, 200), (240, 196, 164), (226, 174, 134), (200, 140, 100), (166, 108, 72), (124, 80, 54),
         (92, 60, 42))
_HAIR = ((22, 18, 16), (58, 38, 26), (102, 68, 40), (156, 116, 70), (214, 186, 126), (168, 72, 38),
         (150, 148, 146), (232, 226, 214))


def _colour(rng: np.random.Generator, muted: bool = False) -> tuple[float, float, float]:
    """A clothing colour (RGB 0-255): saturated, muted, neutral or denim."""
    kind = rng.random()
    if kind < 0.18:
        v = rng.uniform(0.08, 0.95)
        return (v * 255, v * 255, v * 255)
    if kind < 0.3 and not muted:
        return tuple(255 * c for c in colorsys.hsv_to_rgb(rng.uniform(0.58, 0.64), rng.uniform(0.4, 0.7),
                                                         rng.uniform(0.3, 0.7)))  # type: ignore[return-value]
    sat = rng.uniform(0.15, 0.45) if muted else rng.uniform(0.3, 0.9)
    rgb = colorsys.hsv_to_rgb(rng.random(), sat, rng.uniform(0.25, 0.95))
    return (rgb[0] * 255, rgb[1] * 255, rgb[2] * 255)


def _near(colour: Sequence[float], factor: float) -> tuple[float, float, float]:
    return (min(255.0, colour[0] * factor), min(255.0, colour[1] * factor), min(255.0, colour[2] * factor))


@dataclass(frozen=True)
class _Look:
    """What a person wears and how they stand; lengths are fractions of the person's height."""

    facing: str
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_style: str  # short, long, bun, buzz
    top: str  # tshirt, longsleeve, tank, dress, jumpsuit
    bottom: str  # pants, shorts, skirt, none (dress, jumpsuit)
    coat: bool
    hat: str  # "", cap, beanie, wide
    sunglasses: bool
    scarf: bool
    gloves: bool
    socks: bool
    vneck: bool
    long_sleeves: bool  # jumpsuits only: the other tops decide by their kind
    hems: dict[str, float]  # skirt, dress, coat, socks (socks: share of the shin covered)
    width: float
    head: float
    arms: dict[str, tuple[float, float]]  # side -> (shoulder angle outward from down, elbow bend), radians
    legs: dict[str, tuple[float, float]]  # side -> (hip angle outward, knee bend), radians
    colours: dict[str, tuple[float, float, float]]
    textures: dict[str, tuple[float, float]]


_ARM_STYLES = {  # degrees: (shoulder lo, hi, elbow lo, hi), weight
    "down": ((4, 22, -15, 30), 0.45),
    "hip": ((35, 50, -110, -85), 0.15),
    "out": ((65, 100, -25, 25), 0.2),
    "up": ((110, 160, -40, 40), 0.2),
}


def _arm(rng: np.random.Generator) -> tuple[float, float]:
    names = list(_ARM_STYLES)
    style = _ARM_STYLES[names[rng.choice(len(names), p=[w for _, w in _ARM_STYLES.values()])]][0]
    return math.radians(rng.uniform(style[0], style[1])), math.radians(rng.uniform(style[2], style[3]))


def _look(rng: np.random.Generator, task: str, *, safe: bool = False) -> _Look:
    """A random outfit and pose; ``safe``: front-facing, short sleeves and shorts (many classes show)."""
    single = task == "single-human"
    facing = "front" if safe or rng.random() < 0.72 else "back"
    tops = ["tshirt", "longsleeve", "tank", "dress"] + (["jumpsuit"] if single else [])
    weights = [0.38, 0.27, 0.13, 0.12] + ([0.1] if single else [])
    top = "tshirt" if safe else tops[rng.choice(len(tops), p=np.array(weights) / sum(weights))]
    if top in ("dress", "jumpsuit"):
        bottom = "none"
    else:
        bottom = "shorts" if safe else ["pants", "shorts", "skirt"][rng.choice(3, p=[0.55, 0.25, 0.2])]
    coat = not safe and top in ("tshirt", "longsleeve", "dress") and rng.random() < 0.2
    legs_show = bottom in ("shorts", "skirt") or top == "dress"
    colours = {name: _colour(rng) for name in ("top", "bottom", "coat", "hat", "scarf", "gloves", "socks")}
    colours["shoes"] = _colour(rng, muted=True) if rng.random() < 0.5 else _near((40, 36, 34), rng.uniform(0.6, 2))
    colours["glasses"] = _near((30, 30, 34), rng.uniform(0.5, 1.5))
    textures = {}
    for name in ("top", "bottom", "coat", "scarf"):
        pick = rng.random()
        textures[name] = ((rng.uniform(0.12, 0.3), 0.0) if pick < 0.18 else
                          (0.0, rng.uniform(0.1, 0.25)) if pick < 0.3 else (0.0, 0.0))
    arms = {side: (math.radians(rng.uniform(6, 20)), 0.0) if safe else _arm(rng) for side in ("left", "right")}
    legs = {side: (math.radians(rng.uniform(1, 16)), math.radians(rng.uniform(-10, 6))) for side in ("left", "right")}
    return _Look(
        facing=facing, skin=_SKIN[rng.integers(len(_SKIN))], hair=_HAIR[rng.integers(len(_HAIR))],
        hair_style=["short", "long", "bun", "buzz"][rng.choice(4, p=[0.4, 0.35, 0.1, 0.15])],
        top=top, bottom=bottom, coat=coat,
        hat="" if safe or rng.random() > 0.28 else ["cap", "beanie", "wide"][rng.integers(3)],
        sunglasses=not safe and facing == "front" and rng.random() < 0.22,
        scarf=not safe and rng.random() < 0.18,
        gloves=not safe and rng.random() < 0.15,
        socks=legs_show and rng.random() < 0.55,
        vneck=facing == "front" and not single and top in ("tshirt", "tank", "dress") and rng.random() < 0.4,
        long_sleeves=rng.random() < 0.5,
        hems={"skirt": rng.uniform(0.6, 0.77), "dress": rng.uniform(0.62, 0.77), "coat": rng.uniform(0.64, 0.76),
              "socks": rng.uniform(0.2, 0.45)},
        width=rng.uniform(0.85, 1.15), head=rng.uniform(0.92, 1.1),
        arms=arms, legs=legs, colours=colours, textures=textures,
    )


# ------------------------------------------------------------------------------------------ people
def _draw_person(cv: _Canvas, k: int, look: _Look, cx: float, top: float, u: float, task: str) -> Person:
    """Draw person ``k`` of height ``u`` pixels with the top of its head at ``(cx, top)``, back to front."""
    front = look.facing == "front"
    ws, hs = look.width, look.head
    lsign = 1.0 if front else -1.0  # where the person's left is, on the image's x axis

    def sign(side: str) -> float:
        return lsign if side == "left" else -lsign

    def at(dx: float, dy: float) -> Point:
        return (cx + dx * u, top + dy * u)

    def mirror(pts: Sequence[Point]) -> list[Point]:
        return [at(x, y) for x, y in pts] + [at(-x, y) for x, y in reversed(pts)]

    def reg(cls: int, colour: Sequence[float], texture: tuple[float, float] = (0, 0)) -> int:
        return cv.region(cls, colour, k, texture)

    cols, tex = look.colours, look.textures
    skin = look.skin
    single = task == "single-human"
    neck_cls = FACE if single else TORSO_SKIN

    # joints (fractions of u) -------------------------------------------------------------------
    shoulder_x, shoulder_y, hip_x, hip_y = 0.112 * ws, 0.19, 0.054 * ws, 0.5
    joints: dict[str, dict[str, Point]] = {}
    for side in ("left", "right"):
        s = sign(side)
        a, b = look.arms[side]
        for bend in (b, 0.0, -a + math.radians(10)):  # fall back to a straight, then a hanging forearm
            sh = (s * shoulder_x, shoulder_y)
            el = (sh[0] + s * 0.165 * math.sin(a), sh[1] + 0.165 * math.cos(a))
            wr = (el[0] + s * 0.15 * math.sin(a + bend), el[1] + 0.15 * math.cos(a + bend))
            hd = (wr[0] + s * 0.028 * math.sin(a + bend), wr[1] + 0.028 * math.cos(a + bend))
            if min(s * el[0], s * wr[0], s * hd[0]) >= 0.045:  # the whole arm on its own side of the body
                break
        alpha, beta = look.legs[side]
        hip = (s * hip_x, hip_y)
        knee = (hip[0] + s * 0.235 * math.sin(alpha), hip[1] + 0.235 * math.cos(alpha))
        if s * (knee[0] + s * 0.225 * math.sin(alpha + beta)) < 0.035:
            beta = 0.0
        ankle = (knee[0] + s * 0.225 * math.sin(alpha + beta), knee[1] + 0.225 * math.cos(alpha + beta))
        joints[side] = {"shoulder": sh, "elbow": el, "wrist": wr, "hand": hd, "hip": hip, "knee": knee,
                        "ankle": ankle}

    def j(side: str, name: str) -> Point:
        x, y = joints[side][name]
        return at(x, y)

    # 1. long hair behind the head (front view) -------------------------------------------------
    if look.hair_style == "long" and front:
        hair_back = reg(HAIR, look.hair)
        cv.ellipse(hair_back, at(0, 0.075 * hs), (0.068 * hs * u, 0.07 * hs * u))
        cv.poly(hair_back, mirror([(0.068 * hs, 0.075 * hs), (0.075 * hs, 0.25), (0.03, 0.26)]))

    # 2. legs, socks, shoes -----------------------------------------------------------------------
    for side in ("left", "right"):
        leg = reg(LEG[side], skin)
        cv.limb(leg, j(side, "hip"), j(side, "knee"), 0.044 * ws * u, 0.034 * u)
        cv.limb(leg, j(side, "knee"), j(side, "ankle"), 0.034 * u, 0.023 * u)
        if look.socks:
            ax, ay = joints[side]["ankle"]
            kx, ky = joints[side]["knee"]
            f = look.hems["socks"]
            top_sock = (ax + (kx - ax) * f, ay + (ky - ay) * f)
            cv.limb(reg(SOCKS, cols["socks"]), at(*top_sock), j(side, "ankle"), 0.029 * u, 0.026 * u)
        ax, ay = joints[side]["ankle"]
        shoe = reg(SHOE[side], cols["shoes"])
        cv.ellipse(shoe, at(ax + sign(side) * 0.012, ay + 0.022), (0.038 * u, 0.024 * u))
        cv.ellipse(reg(SHOE[side], _near(cols["shoes"], 0.55)), at(ax + sign(side) * 0.012, ay + 0.03),
                   (0.036 * u, 0.014 * u), 0, 0, 180)

    # 3. below the waist ----------------------------------------------------------------------------
    bottom_reg = reg(JUMPSUITS if look.top == "jumpsuit" else PANTS,
                     cols["top"] if look.top == "jumpsuit" else cols["bottom"],
                     tex["top"] if look.top == "jumpsuit" else tex["bottom"])
    if look.bottom in ("pants", "shorts") or look.top == "jumpsuit":
        cv.poly(bottom_reg, mirror([(0.095 * ws, 0.44), (0.1 * ws, 0.53), (0.0, 0.56)]))
        for side in ("left", "right"):
            if look.bottom == "shorts":
                hx, hy = joints[side]["hip"]
                kx, ky = joints[side]["knee"]
                cv.limb(bottom_reg, j(side, "hip"), at(hx + (kx - hx) * 0.6, hy + (ky - hy) * 0.6),
                        0.052 * ws * u, 0.043 * u)
            else:
                cv.limb(bottom_reg, j(side, "hip"), j(side, "knee"), 0.054 * ws * u, 0.042 * u)
                cv.limb(bottom_reg, j(side, "knee"), j(side, "ankle"), 0.042 * u, 0.034 * u)
    elif look.bottom == "skirt":
        skirt = reg(SKIRT, cols["bottom"], tex["bottom"])
        hem = look.hems["skirt"]
        flare = 0.12 + 0.3 * (hem - 0.6)
        cv.poly(skirt, mirror([(0.095 * ws, 0.43), (flare * ws, hem)]))

    # 4. neck, torso, coat -----------------------------------------------------------------------------
    cv.limb(reg(neck_cls, _near(skin, 0.92)), at(0, 0.1), at(0, 0.17), 0.024 * ws * u, 0.026 * ws * u)
    shoulder_pts = [(0.04, 0.15), (0.098 * ws, 0.165), (0.124 * ws, 0.195), (0.124 * ws, 0.235),
                    (0.104 * ws, 0.3), (0.09 * ws, 0.4)]
    if look.top == "tank":
        shoulder_pts = [(0.045, 0.15), (0.07 * ws, 0.16), (0.09 * ws, 0.23), (0.097 * ws, 0.3),
                        (0.09 * ws, 0.4)]
    top_cls = {"dress": DRESS, "jumpsuit": JUMPSUITS}.get(look.top, UPPER)
    top_reg = bottom_reg if look.top == "jumpsuit" else reg(top_cls, cols["top"], tex["top"])
    cv.poly(top_reg, mirror([*shoulder_pts, (0.097 * ws, 0.5)]))
    if look.top == "dress":
        hem = look.hems["dress"]
        cv.poly(top_reg, mirror([(0.09 * ws, 0.4), ((0.13 + 0.35 * (hem - 0.62)) * ws, hem)]))
    if look.vneck:
        cv.poly(reg(TORSO_SKIN, skin), [at(-0.036, 0.147), at(0.036, 0.147), at(0, 0.2 + 0.03 * ws)])
    coat_reg = 0
    if look.coat:
        coat_reg = reg(COAT, cols["coat"], tex["coat"])
        hem = look.hems["coat"]
        cv.poly(coat_reg, mirror([(0.045, 0.148), (0.104 * ws, 0.163), (0.132 * ws, 0.195), (0.134 * ws, 0.24),
                                  (0.115 * ws, 0.4), (0.13 * ws, hem)]))
        if front:  # the coat open at the front: a V of the shirt
            cv.poly(top_reg, [at(-0.045, 0.148), at(0.045, 0.148), at(0, 0.36)])
            cv.limb(reg(COAT, _near(cols["coat"], 0.8)), at(0, 0.37), at(0, hem), 0.004 * u, 0.004 * u)

    # 5. arms: skin, sleeves, gloves ------------------------------------------------------------------
    for side in ("left", "right"):
        arm = reg(ARM[side], skin)
        cv.limb(arm, j(side, "shoulder"), j(side, "elbow"), 0.03 * ws * u, 0.025 * u)
        cv.limb(arm, j(side, "elbow"), j(side, "wrist"), 0.025 * u, 0.02 * u)
        cv.ellipse(arm, j(side, "hand"), (0.024 * u, 0.026 * u))
        sleeve = coat_reg if look.coat else (top_reg if look.top in ("tshirt", "longsleeve", "jumpsuit") else 0)
        sleeve_long = look.coat or look.top == "longsleeve" or (look.top == "jumpsuit" and look.long_sleeves)
        if sleeve:
            sx, sy = joints[side]["shoulder"]
            ex, ey = joints[side]["elbow"]
            if sleeve_long:
                wx, wy = joints[side]["wrist"]
                cv.limb(sleeve, j(side, "shoulder"), j(side, "elbow"), 0.037 * ws * u, 0.031 * u)
                cv.limb(sleeve, j(side, "elbow"), at(ex + (wx - ex) * 0.92, ey + (wy - ey) * 0.92), 0.031 * u,
                        0.026 * u)
            else:
                cv.limb(sleeve, j(side, "shoulder"), at(sx + (ex - sx) * 0.55, sy + (ey - sy) * 0.55),
                        0.037 * ws * u, 0.034 * u)
        if look.gloves:
            glove = reg(GLOVE, cols["gloves"])
            cv.ellipse(glove, j(side, "hand"), (0.028 * u, 0.03 * u))
            cv.limb(glove, j(side, "wrist"), j(side, "hand"), 0.024 * u, 0.027 * u)

    # 6. scarf -------------------------------------------------------------------------------------------
    if look.scarf:
        scarf = reg(SCARF, cols["scarf"], tex["scarf"])
        cv.poly(scarf, mirror([(0.05 * ws, 0.138), (0.06 * ws, 0.182)]))
        tail = lsign * 0.03
        cv.limb(scarf, at(tail, 0.17), at(tail * 1.3, 0.31), 0.02 * u, 0.022 * u)

    # 7. head --------------------------------------------------------------------------------------------
    face_c, face_ax = (0.0, 0.074), (0.05 * hs, 0.064 * hs)
    if front:
        face = reg(FACE, skin)
        for dx in (-1, 1):
            cv.ellipse(face, at(dx * 0.05 * hs, 0.08), (0.009 * u, 0.014 * u))
        cv.ellipse(face, at(*face_c), (face_ax[0] * u, face_ax[1] * u))
        if face_ax[0] * u >= 5:  # eyes and mouth are only drawn when they are a few pixels large
            eye = reg(FACE, (35, 28, 26))
            for dx in (-1, 1):
                cv.ellipse(eye, at(dx * 0.019 * hs, 0.074), (0.0065 * u, 0.0055 * u))
            brow = reg(FACE, _near(look.hair, 0.8))
            for dx in (-1, 1):
                cv.ellipse(brow, at(dx * 0.02 * hs, 0.062), (0.01 * u, 0.003 * u))
            cv.ellipse(reg(FACE, _near((190, 90, 90), 0.9)), at(0, 0.106), (0.013 * u, 0.004 * u))
        hair = reg(HAIR, look.hair)
        cap = {"short": (0.054, 0.05, 0.06), "long": (0.056, 0.052, 0.062), "bun": (0.053, 0.048, 0.06),
               "buzz": (0.051, 0.045, 0.062)}[look.hair_style]
        cv.ellipse(hair, at(0, cap[2] * hs), (cap[0] * hs * u, cap[1] * hs * u), 0, 180, 360)
        if look.hair_style != "buzz":  # fringe and sideburns
            cv.poly(hair, mirror([(0.053 * hs, 0.06 * hs), (0.05 * hs, 0.085 * hs), (0.036 * hs, 0.06 * hs)]))
        if look.hair_style == "bun":
            cv.ellipse(hair, at(0, 0.004), (0.026 * hs * u, 0.022 * hs * u))
        if look.sunglasses:
            glasses = reg(SUNGLASSES, look.colours["glasses"])
            for dx in (-1, 1):
                cv.ellipse(glasses, at(dx * 0.021 * hs, 0.075), (0.018 * hs * u, 0.012 * hs * u))
            cv.limb(glasses, at(-0.01, 0.073), at(0.01, 0.073), 0.003 * u, 0.003 * u)
    else:
        cv.ellipse(reg(FACE, skin), at(0, 0.08), (0.057 * hs * u, 0.014 * u))  # ears behind the hair
        hair = reg(HAIR, look.hair)
        cv.ellipse(hair, at(*face_c), ((face_ax[0] + 0.004) * u, (face_ax[1] + 0.002) * u))
        if look.hair_style == "long":
            cv.poly(hair, mirror([(0.054 * hs, 0.08), (0.07 * hs, 0.26), (0.02, 0.28)]))
        if look.hair_style == "bun":
            cv.ellipse(hair, at(0, 0.004), (0.026 * hs * u, 0.022 * hs * u))
    if look.hat:
        hat = reg(HAT, cols["hat"])
        if look.hat == "cap":
            cv.ellipse(hat, at(0, 0.052 * hs), (0.058 * hs * u, 0.05 * hs * u), 0, 180, 360)
            brim = lsign * 0.03 if front else -lsign * 0.02
            cv.ellipse(reg(HAT, _near(cols["hat"], 0.8)), at(brim, 0.05 * hs), (0.07 * hs * u, 0.012 * u))
        elif look.hat == "beanie":
            cv.ellipse(hat, at(0, 0.05 * hs), (0.058 * hs * u, 0.055 * hs * u), 0, 180, 360)
            cv.poly(reg(HAT, _near(cols["hat"], 0.85)), mirror([(0.059 * hs, 0.035 * hs), (0.059 * hs, 0.058 * hs)]))
        else:
            cv.poly(hat, mirror([(0.046 * hs, -0.022 * hs), (0.05 * hs, 0.045 * hs)]))
            cv.ellipse(reg(HAT, _near(cols["hat"], 0.85)), at(0, 0.045 * hs), (0.11 * hs * u, 0.016 * u))

    xs = [x for side in joints.values() for x, _ in side.values()]
    reach = 0.04
    box = (cx + (min(xs) - reach) * u, top - 0.03 * u, cx + (max(xs) + reach) * u, top + 1.0 * u)
    return Person(index=k, facing=look.facing, box=box)


# ------------------------------------------------------------------------------------------ background
@dataclass(frozen=True)
class _Backdrop:
    planes: list[np.ndarray]  # R, G, B, each (H, W) float32 0-1: a gradient wall, maybe a floor and panels
    gain: np.ndarray  # (H, W) float32: stripes, tiles and soft blotches, multiplied in at the end
    horizon: float  # the floor line, pixels from the top: people stand below it


def _background(rng: np.random.Generator, h: int, w: int) -> _Backdrop:
    yy = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    xx = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    c1 = np.array(_colour(rng, muted=True), np.float32) / 255
    c2 = np.array(_colour(rng, muted=True), np.float32) / 255
    angle = rng.uniform(0, 2 * math.pi)
    t = np.clip(0.5 + math.cos(angle) * (xx - 0.5) + math.sin(angle) * (yy - 0.5), 0, 1)
    planes = [t * float(b - a) + float(a) for a, b in zip(c1, c2)]  # per plane: numpy is slow on (H, W, 3)
    gain = np.ones((h, w), np.float32)
    horizon = h * rng.uniform(0.42, 0.8)
    if rng.random() < 0.45:  # wallpaper stripes, vertical or slanted
        period = rng.uniform(0.02, 0.08) * w
        slant = float(rng.choice([0.0, 0.0, 0.6, -0.6]))
        phase = (np.arange(w, dtype=np.float32)[None, :] + slant * np.arange(h, dtype=np.float32)[:, None]) / period
        gain += rng.uniform(0.04, 0.12) * np.sign(np.sin(2 * math.pi * phase))
    for _ in range(rng.integers(0, 4)):  # doors, windows, pictures
        x0, y0 = rng.uniform(-0.1, 0.9) * w, rng.uniform(-0.1, 0.6) * horizon
        x1, y1 = x0 + rng.uniform(0.08, 0.3) * w, y0 + rng.uniform(0.15, 0.6) * horizon
        panel = [c / 255 for c in _colour(rng, muted=True)]
        for plane, c in zip(planes, panel):
            cv2.rectangle(plane, (int(x0), int(y0)), (int(x1), int(y1)), (c,), -1)
            cv2.rectangle(plane, (int(x0), int(y0)), (int(x1), int(y1)), (0.6 * c,), max(1, int(0.006 * w)))
    if rng.random() < 0.7:  # a floor below the horizon, darker towards the camera
        floor = np.array(_colour(rng, muted=True), np.float32) / 255
        y0 = min(h, int(math.ceil(horizon)))
        below = (np.arange(y0, h, dtype=np.float32) - horizon) / max(1.0, h - horizon)
        for plane, c in zip(planes, floor):
            plane[y0:] = ((1 - 0.35 * below) * c)[:, None]
        if rng.random() < 0.4:  # tiles
            period = rng.uniform(0.05, 0.12) * w
            seams = np.sin(2 * math.pi * np.arange(w, dtype=np.float32) / period) > 0.95
            gain[y0:, seams] *= 0.85
    cells = (max(2, h // 40), max(2, w // 40))
    soft = cv2.resize(rng.standard_normal(cells, dtype=np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    gain *= 1 + rng.uniform(0.02, 0.08) * soft
    return _Backdrop(planes, gain, horizon)


# ------------------------------------------------------------------------------------------ scenes
@dataclass(frozen=True)
class _Placed:
    look: _Look
    cx: float
    top: float
    height: float


def _layout(rng: np.random.Generator, h: int, w: int, task: str, n: int, horizon: float,
            safe: bool) -> list[_Placed]:
    """Where each person stands, far (small, drawn first) to near; ``safe`` tiles them side by side."""
    if safe:
        slot = w / n
        u = min(0.92 * h, slot / 0.42)
        return [_Placed(_look(rng, task, safe=True), (i + 0.5) * slot, h - u - 0.02 * h, u) for i in range(n)]
    if n == 1:
        u = h * (rng.uniform(0.75, 0.98) if rng.random() < 0.75 else rng.uniform(1.0, 1.5))
        return [_Placed(_look(rng, task), w * rng.uniform(0.36, 0.64), h * rng.uniform(0.01, 0.09), u)]
    scales = np.sort(rng.uniform(0.42, 0.98, n))
    xs = (rng.permutation(n) + 0.5 + rng.uniform(-0.4, 0.4, n)) / n * w
    placed = []
    for s, x in zip(scales, xs):
        u = float(s) * h * min(1.0, 2.2 * w / (h * n) + 0.25)
        depth = (s - 0.42) / 0.56
        foot = horizon + depth * (h - horizon) * 1.08 + rng.uniform(0.02, 0.1) * h
        foot = max(foot, u * 0.9)  # a head in the picture: no one is wholly cut off at the top
        placed.append(_Placed(_look(rng, task), float(x), float(foot - u), u))
    return placed


def _render(h: int, w: int, task: str, placed: list[_Placed]) -> tuple[_Canvas, tuple[Person, ...]]:
    cv = _Canvas(h, w)
    people = tuple(_draw_person(cv, k, p.look, p.cx, p.top, p.height, task) for k, p in enumerate(placed, 1))
    return cv, people


def _maps(cv: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    """The class-id and person-id maps of the canvas."""
    return np.take(np.asarray(cv.cls, np.uint8), cv.regions), np.take(np.asarray(cv.person, np.uint8), cv.regions)


def _acceptable(labels: np.ndarray, humans: np.ndarray, n: int) -> bool:
    h, w = labels.shape
    if np.bincount(humans.ravel(), minlength=n + 1)[1:].min() < min_person_pixels(h, w):
        return False
    if n < 2:
        return True
    present = np.bincount(labels.ravel(), minlength=len(CIHP_PARSING))
    return int(np.count_nonzero(present[1:])) >= MIN_CLASSES


def _compose(rng: np.random.Generator, cv: _Canvas, humans: np.ndarray, backdrop: _Backdrop,
             placed: list[_Placed]) -> np.ndarray:
    """Colours, cloth texture, body shading and outlines on the people, ground shadows, then the light."""
    h, w = cv.regions.shape
    regions = cv.regions.astype(np.intp)  # converted once for every np.take below
    person = regions > 0
    # soft shadows at the feet (only the backdrop shows them), drawn and blurred at a quarter of the size
    small = np.ones(((h + 3) // 4, (w + 3) // 4), np.float32)
    for p in placed:
        cv2.ellipse(small, (_fx(p.cx / 4), _fx((p.top + 0.995 * p.height) / 4)),
                    (_fx(0.04 * p.height), _fx(0.007 * p.height)), 0, 0, 360, (0.7,), -1, cv2.LINE_8, _SHIFT)
    shadow = cv2.resize(cv2.GaussianBlur(small, (0, 0), 0.5 + 0.0025 * h), (w, h), interpolation=cv2.INTER_LINEAR)
    texture = np.asarray(cv.texture, np.float32)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    period = max(4.0, h / 70)
    across = np.sin(2 * math.pi * yy / period) > 0
    stripes = across.astype(np.float32)
    checks = (across ^ (np.sin(2 * math.pi * xx / period) > 0)).astype(np.float32)
    cloth = np.ones((h, w), np.float32)
    for k, pattern in ((0, stripes), (1, checks)):
        if texture[:, k].any():
            cloth -= np.take(texture[:, k], regions) * pattern
    # a rounded body: darker towards each person's sides, lit from one side
    centre = np.asarray([0.0] + [p.cx for p in placed], np.float32)
    half = np.asarray([1.0] + [0.2 * p.height for p in placed], np.float32)
    owner = humans.astype(np.intp)
    lateral = np.clip((xx - np.take(centre, owner)) / np.take(half, owner), -1.3, 1.3)
    body = 1 + lateral * (rng.uniform(-0.12, 0.12) - 0.16 * lateral)
    # outlines: darker within a pixel or two of every part boundary
    edges = np.zeros((h, w), bool)
    dx = cv.regions[:, 1:] != cv.regions[:, :-1]
    dy = cv.regions[1:, :] != cv.regions[:-1, :]
    edges[:, 1:] |= dx
    edges[:, :-1] |= dx
    edges[1:, :] |= dy
    edges[:-1, :] |= dy
    dist = cv2.distanceTransform(np.where(edges, 0, 255).astype(np.uint8), cv2.DIST_L2, 3)
    outline = 1 - 0.3 * np.exp(-dist / (1.0 + 0.003 * h))
    shade = np.where(person, cloth * body * outline, shadow * backdrop.gain)
    colours = np.asarray(cv.colour, np.float32) / 255
    planes = [np.where(person, np.take(colours[:, k], regions), backdrop.planes[k]) for k in range(3)]
    # light: contrast c and brightness g about mid-grey, a shading ramp over the frame, sensor noise, blur:
    # ((img * shade - 0.5) * c + 0.5) * g * ramp + noise, as one multiply and one add
    angle = rng.uniform(0, 2 * math.pi)
    ramp = 1 + (math.cos(angle) * (xx / w - 0.5) + math.sin(angle) * (yy / h - 0.5)) * rng.uniform(0.0, 0.5)
    contrast, gain = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.15)
    noise = rng.uniform(0.0, 0.025) * (rng.random((h, w), dtype=np.float32) - 0.5) * 3.4
    scale = (255 * contrast * gain) * ramp * shade
    offset = 255 * ((0.5 - 0.5 * contrast) * gain * ramp + noise)
    img = cv2.merge([plane * scale + offset for plane in planes])
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.4, 1.0))
    return cv2.convertScaleAbs(cv2.max(img, 0.0))


def size_for(resize: str, canvas: tuple[int, int] | None, default: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of a scene for a bundle's preprocessing: a center-canvas bundle's canvas
    (``(width, height)``, each side clamped to MIN_SIDE..MAX_SIDE), else ``default``."""
    if resize == "center-canvas" and canvas:
        w, h = canvas
        return min(max(h, MIN_SIDE), MAX_SIDE), min(max(w, MIN_SIDE), MAX_SIDE)
    return default


def scene(seed: int, height: int = 384, width: int = 512, *, task: str = "multi-human",
          people: int | None = None) -> Scene:
    """Draw scene ``seed``: ``people`` persons (default 2-4 for multi-human, 1 for single-human).

    The same arguments always give the same arrays. Every person keeps :func:`min_person_pixels` visible
    pixels and, with two or more people, at least :data:`MIN_CLASSES` part classes show.
    """
    _check(height, width, task, people)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise FigureError(f"seed: expected a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    n = people if people is not None else (1 if task == "single-human" else int(rng.integers(2, 5)))
    backdrop = _background(rng, height, width)
    for attempt in range(_ATTEMPTS + 1):  # the last one tiles the people side by side
        placed = _layout(rng, height, width, task, n, backdrop.horizon, safe=attempt == _ATTEMPTS)
        cv, persons = _render(height, width, task, placed)
        labels, humans = _maps(cv)
        if _acceptable(labels, humans, n):
            break
    else:  # pragma: no cover - the tiled layout has always passed; keep the scene rather than fail
        log.warning("figure scene %d (%dx%d, %d people): a person is hardly visible", seed, height, width, n)
    image = _compose(rng, cv, humans, backdrop, placed)
    classes = LIP_PARSING if task == "single-human" else CIHP_PARSING
    return Scene(image=image, labels=labels, humans=humans, classes=classes, people=persons)


# ------------------------------------------------------------------------------------------ datasets
def item_seed(seed: int, index: int) -> int:
    """The :func:`scene` seed of item ``index`` of the dataset ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def _png(path: Path, array: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", array)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 array as PNG
        raise FigureError(f"{path}: PNG encoding failed")
    path.write_bytes(data.tobytes())


def write_dataset(out: Path, count: int, seed: int = 0, *, height: int = 384, width: int = 512,
                  task: str = "multi-human") -> list[str]:
    """Write ``count`` scenes as CIHP/LIP lay them out: ``images/NAME.png`` (RGB), ``labels/NAME.png`` (class
    ids) and ``humans/NAME.png`` (person ids), single-channel 8-bit, plus ``classes.txt`` (one name a line,
    id order). Item ``i`` is ``scene(item_seed(seed, i), …)``; returns the names written."""
    _check(height, width, task, None)
    if count < 0:
        raise FigureError(f"count: expected 0 or more, got {count}")
    if seed < 0:
        raise FigureError(f"seed: expected a non-negative integer, got {seed}")
    out = Path(out)
    for sub in ("images", "labels", "humans"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    classes = LIP_PARSING if task == "single-human" else CIHP_PARSING
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in classes))
    names = []
    for i in range(count):
        name = f"figure-{i:05d}"
        s = scene(item_seed(seed, i), height, width, task=task)
        _png(out / "images" / f"{name}.png", cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR))
        _png(out / "labels" / f"{name}.png", s.labels)
        _png(out / "humans" / f"{name}.png", s.humans)
        names.append(name)
    log.info("wrote %d %s scenes to %s", count, task, out)
    return names


# ------------------------------------------------------------------------------------------ command line
def _size(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
    if not match:
        raise click.BadParameter(f"expected HEIGHTxWIDTH such as 384x512, got {value!r}", ctx, param)
    h, w = int(match[1]), int(match[2])
    if not (MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE):
        raise click.BadParameter(f"each side must be {MIN_SIDE}..{MAX_SIDE} pixels, got {h}x{w}", ctx, param)
    return h, w


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--count", required=True, type=click.IntRange(min=1), help="Number of scenes to write.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Dataset seed.")
@click.option("--size", default="384x512", show_default=True, callback=_size,
              help=f"HEIGHTxWIDTH of every scene, each side {MIN_SIDE}..{MAX_SIDE}.")
@click.option("--task", default="multi-human", show_default=True, type=click.Choice(TASKS),
              help="multi-human: 2-4 people, CIHP classes; single-human: one person, LIP classes.")
def main(out: Path, count: int, seed: int, size: tuple[int, int], task: str) -> None:
    """Write COUNT labelled scenes of drawn people to OUT: images/, labels/, humans/ and classes.txt."""
    names = write_dataset(out, count, seed, height=size[0], width=size[1], task=task)
    click.echo(f"wrote {len(names)} {task} scenes of {size[0]}x{size[1]} to {out}")

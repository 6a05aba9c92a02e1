"""Fixed label colours: the same class name always gets the same colour in every version.

The 20 human-parsing classes use the colours of the LIP/CIHP visualisation palette; "Human" (the
multi-human instance class) is white. Any other class name gets a colour derived from its index with
the PASCAL VOC bit-interleaving scheme, so a palette depends only on the class list.
"""

from __future__ import annotations

from collections.abc import Sequence

KNOWN_COLOURS: dict[str, tuple[int, int, int]] = {
    "Background": (0, 0, 0),
    "Hat": (128, 0, 0),
    "Hair": (255, 0, 0),
    "Glove": (0, 85, 0),
    "Sunglasses": (170, 0, 51),
    "UpperClothes": (255, 85, 0),
    "Upper-clothes": (255, 85, 0),
    "Dress": (0, 0, 85),
    "Coat": (0, 119, 221),
    "Socks": (85, 85, 0),
    "Pants": (0, 85, 85),
    "Torso-skin": (85, 51, 0),
    "Jumpsuits": (85, 51, 0),
    "Scarf": (52, 86, 128),
    "Skirt": (0, 128, 0),
    "Face": (0, 0, 255),
    "Left-arm": (51, 170, 221),
    "Right-arm": (0, 255, 255),
    "Left-leg": (85, 255, 170),
    "Right-leg": (170, 255, 85),
    "Left-shoe": (255, 255, 0),
    "Right-shoe": (255, 170, 0),
    "Human": (255, 255, 255),
}


def voc_colour(index: int) -> tuple[int, int, int]:
    """PASCAL VOC's colour for ``index`` (bits of the index spread over the high bits of R, G, B)."""
    r = g = b = 0
    c = index
    for shift in range(7, -1, -1):
        r |= ((c >> 0) & 1) << shift
        g |= ((c >> 1) & 1) << shift
        b |= ((c >> 2) & 1) << shift
        c >>= 3
    return r, g, b


def palette_for(classes: Sequence[str]) -> list[tuple[int, int, int]]:
    """One RGB colour per class, in class order."""
    return [KNOWN_COLOURS.get(name, voc_colour(i)) for i, name in enumerate(classes)]

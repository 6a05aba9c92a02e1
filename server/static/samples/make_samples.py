"""Draw the WebUI's sample images (small stick-and-blob figures) with OpenCV.

Run from anywhere: ``python server/static/samples/make_samples.py``. The output is deterministic,
so re-running it leaves the committed PNG/JPEG files unchanged (JPEG up to the encoder version).
The demo models are random-init, so what they "parse" in these pictures is noise; the samples exist
to exercise the upload → parse → overlay path without needing a photo at hand.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent


def _background(h: int, w: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> np.ndarray:
    """Vertical gradient (BGR) with a little seeded noise, like a wall meeting a floor."""
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    img = (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32)
    img = np.broadcast_to(img, (h, w, 3)).copy()
    img += np.random.default_rng(h * 31 + w).normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _figure(img: np.ndarray, cx: int, top: int, height: int, shirt: tuple[int, int, int],
            trousers: tuple[int, int, int], skin: tuple[int, int, int] = (150, 180, 225),
            hair: tuple[int, int, int] = (30, 40, 60), arms_up: bool = False) -> None:
    """A person of ``height`` pixels standing at ``cx``: head, hair, torso, arms, legs, shoes."""
    u = height / 10.0
    head_r = int(0.75 * u)
    head_c = (cx, int(top + head_r))
    neck_y = int(top + 2 * head_r)
    hip_y = int(top + 5.6 * u)
    foot_y = int(top + height)
    thick = max(2, int(0.55 * u))
    # legs (trousers), then shoes
    for dx in (-1, 1):
        cv2.line(img, (cx + dx * int(0.35 * u), hip_y), (cx + dx * int(0.7 * u), foot_y - int(0.3 * u)),
                 trousers, thick + 1, cv2.LINE_AA)
        cv2.ellipse(img, (cx + dx * int(0.85 * u), foot_y - int(0.2 * u)), (int(0.45 * u), int(0.2 * u)),
                    0, 0, 360, (40, 40, 40), -1, cv2.LINE_AA)
    # torso (shirt) as a rounded polygon
    torso = np.array([[cx - int(1.1 * u), neck_y + int(0.3 * u)], [cx + int(1.1 * u), neck_y + int(0.3 * u)],
                      [cx + int(0.8 * u), hip_y], [cx - int(0.8 * u), hip_y]], np.int32)
    cv2.fillConvexPoly(img, torso, shirt, cv2.LINE_AA)
    cv2.polylines(img, [torso], True, shirt, 3, cv2.LINE_AA)
    # arms: sleeve then skin
    for dx in (-1, 1):
        shoulder = (cx + dx * int(1.0 * u), neck_y + int(0.5 * u))
        if arms_up:
            elbow = (cx + dx * int(1.6 * u), neck_y - int(0.6 * u))
            hand = (cx + dx * int(1.9 * u), top - int(0.2 * u))
        else:
            elbow = (cx + dx * int(1.5 * u), neck_y + int(2.0 * u))
            hand = (cx + dx * int(1.6 * u), neck_y + int(3.4 * u))
        cv2.line(img, shoulder, elbow, shirt, thick, cv2.LINE_AA)
        cv2.line(img, elbow, hand, skin, max(2, thick - 1), cv2.LINE_AA)
        cv2.circle(img, hand, max(2, int(0.3 * u)), skin, -1, cv2.LINE_AA)
    # neck, head, hair, eyes
    cv2.line(img, (cx, neck_y - int(0.2 * u)), (cx, neck_y + int(0.4 * u)), skin, thick, cv2.LINE_AA)
    cv2.circle(img, head_c, head_r, skin, -1, cv2.LINE_AA)
    cv2.ellipse(img, (head_c[0], head_c[1] - int(0.25 * head_r)), (head_r, int(0.8 * head_r)), 0, 180, 360,
                hair, -1, cv2.LINE_AA)
    for dx in (-1, 1):
        cv2.circle(img, (head_c[0] + dx * int(0.35 * head_r), head_c[1] + int(0.1 * head_r)),
                   max(1, head_r // 8), (20, 20, 20), -1, cv2.LINE_AA)


def one_person() -> np.ndarray:
    img = _background(320, 240, (205, 215, 225), (120, 135, 150))
    _figure(img, 120, 30, 270, shirt=(40, 90, 220), trousers=(110, 60, 30))
    return img


def two_people() -> np.ndarray:
    img = _background(240, 320, (220, 200, 170), (90, 120, 90))
    _figure(img, 100, 25, 200, shirt=(60, 170, 60), trousers=(50, 50, 50), hair=(20, 60, 120))
    _figure(img, 225, 45, 180, shirt=(180, 80, 160), trousers=(140, 100, 40), arms_up=True)
    return img


def crowd() -> np.ndarray:
    img = _background(200, 300, (235, 225, 210), (150, 150, 160))
    for i, (cx, top, h, shirt) in enumerate([(50, 40, 150, (30, 30, 200)), (120, 25, 165, (200, 140, 30)),
                                             (190, 45, 145, (90, 90, 90)), (255, 30, 160, (30, 160, 200))]):
        _figure(img, cx, top, h, shirt=shirt, trousers=(60 + 30 * i, 50, 40), arms_up=i % 2 == 1)
    return img


def main() -> None:
    outputs = {
        "one_person.png": one_person(),
        "two_people.jpg": two_people(),
        "crowd.png": crowd(),
    }
    for name, img in outputs.items():
        path = HERE / name
        params = [cv2.IMWRITE_JPEG_QUALITY, 90] if name.endswith(".jpg") else [cv2.IMWRITE_PNG_COMPRESSION, 9]
        if not cv2.imwrite(str(path), img, params):
            raise SystemExit(f"could not write {path}")
        print(f"{path.relative_to(HERE.parent.parent.parent)}: {img.shape[1]}x{img.shape[0]}")


if __name__ == "__main__":
    main()

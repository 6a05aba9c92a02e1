"""Draw the WebUI's sample images with the project's figure generator (``m2fpkit.runtime.figures``).

Run from anywhere: ``python server/static/samples/make_samples.py``. Each sample is one seeded scene, so
re-running it leaves the committed PNG files unchanged (the JPEG up to the encoder version). The demo
models are random-init, so what they "parse" in these pictures is noise; the samples exist to exercise
the upload → parse → overlay path without needing a photo at hand.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from m2fpkit.runtime.figures import scene

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent

#: file name → (seed, height, width, task, people); seeds picked by eye among the first few
SAMPLES: dict[str, tuple[int, int, int, str, int]] = {
    "one_person.png": (7, 320, 240, "single-human", 1),
    "two_people.jpg": (5, 240, 320, "multi-human", 2),
    "crowd.png": (3, 200, 300, "multi-human", 4),
}


def render(name: str) -> np.ndarray:
    """The sample ``name`` as a BGR image, ready for OpenCV to write."""
    seed, height, width, task, people = SAMPLES[name]
    return cv2.cvtColor(scene(seed, height, width, task=task, people=people).image, cv2.COLOR_RGB2BGR)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in SAMPLES:
        img = render(name)
        path = HERE / name
        params = [cv2.IMWRITE_JPEG_QUALITY, 90] if name.endswith(".jpg") else [cv2.IMWRITE_PNG_COMPRESSION, 9]
        if not cv2.imwrite(str(path), img, params):
            raise SystemExit(f"could not write {path}")
        log.info("%s: %dx%d", path.relative_to(HERE.parent.parent.parent), img.shape[1], img.shape[0])


if __name__ == "__main__":
    main()

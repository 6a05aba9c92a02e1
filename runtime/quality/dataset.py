"""A labeled dataset in the CIHP/LIP layout, read as untrusted input.

::

    images/NAME.jpg|.jpeg|.png   the photos (any format ``imageio`` decodes, by these suffixes)
    labels/NAME.png              class ids, 8-bit single-channel (grayscale) PNG; 255 = not scored
    classes.txt                  optional: one class name a line, in id order (else: the bundle's order)

(``figures.write_dataset`` writes it; its ``humans/`` directory is not read here.) Invariants: :meth:`Dataset.open`
refuses, with a :class:`~m2fpkit.runtime.errors.DatasetError` naming the file, every defect it can see without
running a model — a file of another kind or suffix, an image without a label or a label without an image, two
images of one name, a label that is not an 8-bit single-channel PNG, a size that differs from its image's, a
class id outside the class list (255 aside), a malformed ``classes.txt``, an empty set — and reads every file
once to fingerprint the set: :attr:`Dataset.sha256` covers the sorted (name, image SHA-256, label SHA-256)
and the class list, so it survives a move of the directory and changes with any byte of the data. Files are
opened as regular files only, each under a size cap (``bundle.regular``: never a blocked read on a FIFO),
and images pass ``imageio``'s header and pixel guards. :meth:`Dataset.samples` reads the files again and
refuses one whose bytes changed since the fingerprint. A class list other than the bundle's is mapped by
name (:func:`class_map`), or refused naming the classes that do not map.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..bundle import jsonfile
from ..bundle.regular import read_regular
from ..errors import DatasetError, InputError, MalformedFile
from ..imageio import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, check_size, decode_image, probe
from .grades import DatasetRef
from .metrics import IGNORE, MAX_CLASSES

log = logging.getLogger(__name__)

IMAGES, LABELS, CLASSES_FILE = "images", "labels", "classes.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABEL_SUFFIX = ".png"
#: size caps per file: an image, a label map, classes.txt
MAX_IMAGE_BYTES, MAX_LABEL_BYTES, MAX_CLASSES_BYTES = 64 << 20, 16 << 20, 64 << 10
#: most images a dataset may hold; longest item and class name
MAX_ITEMS, MAX_NAME, MAX_CLASS_NAME = 100_000, 200, 100
_PNG_COLOUR = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale with alpha", 6: "RGBA"}


# ------------------------------------------------------------------------------------------ files
def parse_classes(data: bytes, what: str = CLASSES_FILE) -> tuple[str, ...]:
    """The class names of a ``classes.txt`` (UTF-8, one name a line, id order; surrounding blanks and a final
    newline ignored); DatasetError naming ``what`` and the line for anything else."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DatasetError(what, "not UTF-8 text") from None
    lines = text.removeprefix("\ufeff").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DatasetError(what, "no class names (one name a line, in class id order)")
    if len(lines) > MAX_CLASSES:
        raise DatasetError(what, f"{len(lines)} lines, more than {MAX_CLASSES} classes (ids are 8-bit, 255 = ignore)")
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            raise DatasetError(what, f"line {number}: empty (one class name a line, in class id order)")
        if len(name) > MAX_CLASS_NAME or not name.isprintable():
            raise DatasetError(what, f"line {number}: expected a class name of 1-{MAX_CLASS_NAME} printable "
                                     f"characters, got {jsonfile.brief(name, 40)}")
        if name in seen:
            raise DatasetError(what, f"line {number}: {name!r} already named on line {seen[name]}")
        seen[name] = number
    return tuple(seen)


def decode_label(data: bytes, what: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An 8-bit single-channel (grayscale) PNG → its ``(H, W)`` uint8 class ids; DatasetError naming ``what``
    for anything else (another format, depth or colour type, a size over the limits, corrupt data)."""
    try:
        info = probe(data)
        check_size(info, max_pixels, DEFAULT_MAX_ASPECT)
    except InputError as exc:
        raise DatasetError(what, str(exc)) from None
    if info.format != "PNG":
        raise DatasetError(what, f"a {info.format} image; a label map is a PNG (lossless)")
    if len(data) < 26:  # probe reads the size (bytes 16-23); depth and colour type follow
        raise DatasetError(what, "PNG header is truncated or corrupt")
    depth, colour = data[24], data[25]
    if depth != 8 or colour != 0:
        kind = _PNG_COLOUR.get(colour, f"colour type {colour}")
        raise DatasetError(what, f"a {depth}-bit {kind} PNG, not an 8-bit single-channel (grayscale) PNG of "
                                 "class ids")
    try:
        label = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        label = None
    if label is None or label.size == 0:
        raise DatasetError(what, "PNG data could not be decoded (truncated or corrupt)")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise DatasetError(what, f"decodes to {label.dtype} of shape {label.shape}, not 8-bit single-channel")
    if label.shape != (info.height, info.width):
        raise DatasetError(what, f"header says {info.width}x{info.height} but the data decodes to "
                                 f"{label.shape[1]}x{label.shape[0]}")
    return label


def largest_class(label: np.ndarray) -> int:
    """The largest class id in ``label`` other than IGNORE (-1: every pixel is ignored)."""
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256)[:IGNORE])
    return int(present[-1]) if present.size else -1


def check_classes(label: np.ndarray, n_classes: int, what: str) -> None:
    """DatasetError naming ``what`` if ``label`` holds an id >= ``n_classes`` other than IGNORE."""
    top = largest_class(label)
    if top >= n_classes:
        raise DatasetError(what, f"class id {top} outside the class list (0..{n_classes - 1}; {IGNORE} = ignore)")


# ------------------------------------------------------------------------------------------ classes
def _fold(name: str) -> str:
    return re.sub(r"[\s_-]+", "", name).casefold()


def class_map(dataset: Sequence[str], bundle: Sequence[str], what: str = CLASSES_FILE) -> np.ndarray:
    """A 256-entry uint8 lookup table: dataset class id → the bundle's class id of the same name (IGNORE stays
    IGNORE). Names match exactly, else when equal but for case, blanks, ``-`` and ``_`` (``UpperClothes`` ⇄
    ``Upper-clothes``) and that match is unique. DatasetError naming ``what`` lists the names that map to none
    of the bundle's classes, or two that map to the same one."""
    lut = np.full(256, IGNORE, np.uint8)
    exact = {name: i for i, name in enumerate(bundle)}
    folded: dict[str, list[int]] = {}
    for i, name in enumerate(bundle):
        folded.setdefault(_fold(name), []).append(i)
    missing: list[str] = []
    taken: dict[int, str] = {}
    for j, name in enumerate(dataset):
        target = exact.get(name)
        if target is None and len(folded.get(_fold(name), ())) == 1:
            target = folded[_fold(name)][0]
        if target is None:
            missing.append(name)
            continue
        if target in taken:
            raise DatasetError(what, f"{taken[target]!r} and {name!r} both map to the bundle's class "
                                     f"{bundle[target]!r}")
        taken[target] = name
        lut[j] = target
    if missing:
        raise DatasetError(what, f"no class of the bundle is named {', '.join(map(repr, missing))} "
                                 f"(the bundle's classes: {', '.join(bundle)})")
    return lut


# ------------------------------------------------------------------------------------------ dataset
@dataclass(frozen=True)
class Item:
    """One labeled image: its name, files (relative to the dataset directory), their SHA-256, the label's size
    and its largest class id other than IGNORE (-1: none)."""

    name: str
    image: str
    label: str
    image_sha256: str
    label_sha256: str
    height: int
    width: int
    largest_class: int


@dataclass(frozen=True, eq=False)
class Sample:
    """An image read for scoring: RGB uint8 ``(H, W, 3)`` and its label map in the bundle's class ids."""

    name: str
    rgb: np.ndarray
    label: np.ndarray


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _entries(root: Path, sub: str, suffixes: tuple[str, ...]) -> dict[str, str]:
    """name → file name of the entries of ``root/sub`` (dot files skipped); DatasetError for anything else."""
    folder = root / sub
    try:
        with os.scandir(folder) as it:
            files = sorted(e.name for e in it if not e.name.startswith("."))
    except FileNotFoundError:
        raise DatasetError(str(folder), "no such directory (a dataset holds images/ and labels/)") from None
    except NotADirectoryError:
        raise DatasetError(str(folder), "not a directory (a dataset holds images/ and labels/)") from None
    except OSError as exc:
        raise DatasetError(str(folder), f"unreadable ({exc.strerror or exc})") from None
    if len(files) > MAX_ITEMS:
        raise DatasetError(str(folder), f"{len(files)} files, more than {MAX_ITEMS}")
    found: dict[str, str] = {}
    for file in files:
        where = str(folder / file)
        stem, suffix = os.path.splitext(file)
        if not file.isprintable() or len(stem) > MAX_NAME:
            raise DatasetError(where, f"expected a file name of at most {MAX_NAME} printable characters")
        if suffix.lower() not in suffixes:
            raise DatasetError(where, f"not a {' or '.join(suffixes)} file")
        if stem in found:
            raise DatasetError(where, f"a second file named {stem!r} (also {found[stem]})")
        found[stem] = file
    return found


def _read(path: Path, max_bytes: int) -> bytes:
    try:
        return read_regular(path, str(path), max_bytes=max_bytes)
    except MalformedFile as exc:
        raise DatasetError(str(path), exc.reason) from None
    except OSError as exc:
        raise DatasetError(str(path), f"unreadable ({exc.strerror or exc})") from None


@dataclass(frozen=True, eq=False)
class Dataset:
    """A checked labeled dataset (see the module docstring); open one with :meth:`open`."""

    root: Path
    name: str
    #: the class list of ``classes.txt`` (None: none; labels are in the bundle's order)
    classes: tuple[str, ...] | None
    items: tuple[Item, ...]
    sha256: str
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def open(cls, root: str | os.PathLike, name: str | None = None, *,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> Dataset:
        """Check and fingerprint the dataset at ``root`` (name: ``name``, else the directory's); DatasetError
        naming the file at fault."""
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(str(root), "not a dataset directory (images/, labels/ and maybe classes.txt)")
        name = name if name is not None else Path(os.path.abspath(root)).name
        if not 0 < len(name) <= MAX_NAME or not name.isprintable():
            raise DatasetError(str(root), f"dataset name: expected 1-{MAX_NAME} printable characters, got "
                                          f"{jsonfile.brief(name, 40)}")
        classes_path = root / CLASSES_FILE
        classes = None
        if os.path.lexists(classes_path):
            classes = parse_classes(_read(classes_path, MAX_CLASSES_BYTES), str(classes_path))
        images = _entries(root, IMAGES, IMAGE_SUFFIXES)
        labels = _entries(root, LABELS, (LABEL_SUFFIX,))
        for stem, file in images.items():
            if stem not in labels:
                raise DatasetError(str(root / IMAGES / file), f"no label {LABELS}/{stem}{LABEL_SUFFIX}")
        for stem, file in labels.items():
            if stem not in images:
                raise DatasetError(str(root / LABELS / file), f"no image {IMAGES}/{stem}.jpg, .jpeg or .png")
        if not images:
            raise DatasetError(str(root / IMAGES), "no images: a dataset needs at least one labeled image")
        items = tuple(cls._item(root, stem, images[stem], labels[stem], classes, max_pixels) for stem in sorted(images))
        fingerprint = _sha256(jsonfile.dumps({
            "classes": list(classes) if classes is not None else None,
            "items": [[i.name, i.image_sha256, i.label_sha256] for i in items],
        }))
        log.info("dataset %s: %d images, sha256 %s", root, len(items), fingerprint[:16])
        return cls(root, name, classes, items, fingerprint, max_pixels)

    @staticmethod
    def _item(root: Path, stem: str, image_file: str, label_file: str, classes: tuple[str, ...] | None,
              max_pixels: int) -> Item:
        image_path, label_path = root / IMAGES / image_file, root / LABELS / label_file
        image = _read(image_path, MAX_IMAGE_BYTES)
        try:
            info = probe(image)
            check_size(info, max_pixels, DEFAULT_MAX_ASPECT)
        except InputError as exc:
            raise DatasetError(str(image_path), str(exc)) from None
        label_bytes = _read(label_path, MAX_LABEL_BYTES)
        label = decode_label(label_bytes, str(label_path), max_pixels=max_pixels)
        if (info.height, info.width) != label.shape and (info.width, info.height) != label.shape:
            raise DatasetError(str(label_path), f"{label.shape[1]}x{label.shape[0]}, but its image {image_file} is "
                                                f"{info.width}x{info.height}")
        if classes is not None:
            check_classes(label, len(classes), str(label_path))
        return Item(stem, f"{IMAGES}/{image_file}", f"{LABELS}/{label_file}", _sha256(image), _sha256(label_bytes),
                    label.shape[0], label.shape[1], largest_class(label))

    def ref(self) -> DatasetRef:
        """What a grade records of this dataset (the directory's absolute path)."""
        return DatasetRef(self.name, os.path.abspath(self.root), len(self.items), self.sha256)

    def mapping(self, bundle_classes: Sequence[str]) -> np.ndarray:
        """The lookup table from this dataset's class ids to the bundle's (:func:`class_map`; the identity when
        there is no ``classes.txt``); DatasetError naming the label file holding an id outside the class list."""
        classes = self.classes if self.classes is not None else tuple(bundle_classes)
        for item in self.items:
            if item.largest_class >= len(classes):
                check_classes(np.array([[item.largest_class]], np.uint8), len(classes), str(self.root / item.label))
        if self.classes is None or tuple(self.classes) == tuple(bundle_classes):
            lut = np.full(256, IGNORE, np.uint8)
            lut[:len(classes)] = np.arange(len(classes), dtype=np.uint8)
            return lut
        return class_map(self.classes, bundle_classes, str(self.root / CLASSES_FILE))

    def samples(self, bundle_classes: Sequence[str]) -> Iterator[Sample]:
        """Every item, read again, decoded and its label mapped to the bundle's class ids, in name order;
        DatasetError naming the file if it changed since :meth:`open`, or the image cannot be decoded, or it
        decodes to another size than its label."""
        lut = self.mapping(bundle_classes)
        for item in self.items:
            image_path, label_path = self.root / item.image, self.root / item.label
            image = _read(image_path, MAX_IMAGE_BYTES)
            label_bytes = _read(label_path, MAX_LABEL_BYTES)
            for path, data, digest in ((image_path, image, item.image_sha256),
                                       (label_path, label_bytes, item.label_sha256)):
                if _sha256(data) != digest:
                    raise DatasetError(str(path), "changed since the dataset was opened (its fingerprint no longer "
                                                  "holds); evaluate again")
            try:
                rgb = decode_image(image, max_pixels=self.max_pixels)
            except InputError as exc:
                raise DatasetError(str(image_path), str(exc)) from None
            label = decode_label(label_bytes, str(label_path), max_pixels=self.max_pixels)
            if rgb.shape[:2] != label.shape:
                raise DatasetError(str(label_path), f"{label.shape[1]}x{label.shape[0]}, but its image decodes to "
                                                    f"{rgb.shape[1]}x{rgb.shape[0]} (EXIF orientation applied)")
            yield Sample(item.name, rgb, lut[label])

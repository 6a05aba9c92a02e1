"""The pixel limit holds for every accepted format, enforced by OpenCV's decoders themselves, and
pathological encodings are refused or bounded in time (issue 11, fault 2).

Memory is measured in a fresh interpreter (``ru_maxrss`` before/after: tracemalloc does not see C
allocations), which also loads cv2 the way ``m2fp-serve`` does: through ``m2fpkit.runtime.imageio``.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from m2fpkit.runtime import imageio
from m2fpkit.runtime.errors import ImageTooLarge, InputError, UndecodableImage
from m2fpkit.runtime.imageio import decode_image, probe

BOMB_SIDE = 10_000  # 100 Mpx: 300 MB decoded, 285 KB deflated
RSS_BOUND_MB = 40  # what a refused decode may add to the peak RSS of a fresh interpreter


# ------------------------------------------------------------------------------------------ helpers

def _deflated_zeros(nbytes: int) -> bytes:
    comp, chunk = zlib.compressobj(9), bytes(3_000_000)
    parts = [comp.compress(chunk[: min(len(chunk), nbytes - done)]) for done in range(0, nbytes, len(chunk))]
    return b"".join(parts) + comp.flush()


def _tiff(pages: list[dict]) -> bytes:
    """A little-endian RGB TIFF, one IFD per page. Page keys: ``size`` (w, h), ``data`` (the single strip),
    ``deflate`` (bool), ``repeat`` (w, h) appended as repeated ImageWidth/ImageLength entries."""
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for i, page in enumerate(pages):
        (w, h), data = page["size"], page["data"]
        entries = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 8 if page.get("deflate") else 1), (262, 3, 2),
                   (273, 4, -1), (277, 3, 3), (278, 4, h), (279, 4, len(data)), (284, 3, 1)]
        if "repeat" in page:
            entries += [(256, 4, page["repeat"][0]), (257, 4, page["repeat"][1])]
        data_off = len(out) + 2 + 12 * len(entries) + 4
        end = data_off + len(data) + len(data) % 2
        out += struct.pack("<H", len(entries))
        for tag, typ, value in entries:
            value = data_off if value == -1 else value
            out += (struct.pack("<HHIHH", tag, typ, 1, value, 0) if typ == 3
                    else struct.pack("<HHII", tag, typ, 1, value))
        out += struct.pack("<I", end if i + 1 < len(pages) else 0) + data + b"\x00" * (len(data) % 2)
    return bytes(out)


def _first_and_last_size_entries(data: bytes) -> tuple[tuple[int, int], tuple[int, int]]:
    """(first, last) ImageWidth/ImageLength values of IFD 0: libtiff keeps the first, the old pre-check the last."""
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    seen: dict[int, list[int]] = {}
    for i in range(count):
        tag, _, _, value = struct.unpack_from("<HHII", data, ifd + 2 + 12 * i)
        seen.setdefault(tag, []).append(value)
    return (seen[256][0], seen[257][0]), (seen[256][-1], seen[257][-1])


@pytest.fixture(scope="module")
def tiff_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fault's file: IFD 0 says 10000x10000 (what libtiff uses), repeated entries after it say 100x100."""
    strip = _deflated_zeros(BOMB_SIDE * BOMB_SIDE * 3)
    data = _tiff([{"size": (BOMB_SIDE, BOMB_SIDE), "data": strip, "deflate": True, "repeat": (100, 100)}])
    path = tmp_path_factory.mktemp("bombs") / "repeated-tags.tiff"
    path.write_bytes(data)
    return path


def _fresh_python(code: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (no OpenCV cap inherited unless ``env`` sets one); its last
    stdout line is JSON."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_IO_")}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


_MEASURE = """
import json, resource, sys, time
import numpy as np
{imports}
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
out = {{}}
try:
{body}
except Exception as exc:
    out["error"] = type(exc).__name__
    out["message"] = str(exc)
out["seconds"] = time.perf_counter() - t0
out["rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(out))
"""


def _measure(path: Path, imports: str, body: str, env: dict[str, str] | None = None) -> dict:
    body = "\n".join("    " + line for line in body.strip().splitlines())
    return _fresh_python(_MEASURE.format(imports=imports, body=body), str(path), env=env)


# --------------------------------------------------------------- the fault: repeated TIFF size tags

def test_repeated_tags_fooled_the_old_precheck_and_opencv_decodes_the_bomb(tiff_bomb):
    """Reproduces fault 2: the last entries (what the old pre-check read) say 100x100; OpenCV without a
    cap decodes the first ones, 10000x10000 (a 300 MB image), from a ~285 KB file. (The peak-RSS growth
    this causes is measured but not asserted: how much of it shows in ru_maxrss depended on the box.)"""
    data = tiff_bomb.read_bytes()
    assert len(data) < 300_000
    assert _first_and_last_size_entries(data) == ((BOMB_SIDE, BOMB_SIDE), (100, 100))
    old_path = _measure(tiff_bomb, "import cv2", """
img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
out["shape"] = list(img.shape)
""")
    assert old_path.get("shape") == [BOMB_SIDE, BOMB_SIDE, 3], old_path


def test_repeated_tags_are_sized_by_their_largest_value(tiff_bomb, monkeypatch):
    info = probe(tiff_bomb.read_bytes())
    assert (info.width, info.height) == (BOMB_SIDE, BOMB_SIDE)
    monkeypatch.setattr(imageio.cv2, "imdecode", lambda *a: pytest.fail("the bomb reached the decoder"))
    with pytest.raises(ImageTooLarge, match=r"10000x10000 = 100 Mpx, limit is 40 Mpx"):
        decode_image(tiff_bomb.read_bytes())


def test_repeated_tags_bomb_is_refused_with_bounded_memory(tiff_bomb):
    got = _measure(tiff_bomb, "from m2fpkit.runtime.imageio import decode_image", "decode_image(data)")
    assert got["error"] == "ImageTooLarge", got
    assert got["rss_growth_mb"] < RSS_BOUND_MB and got["seconds"] < 2, got


def test_the_decoder_itself_refuses_the_bomb_when_the_precheck_is_fooled(tiff_bomb):
    """The pre-check made to read 100x100 again (the old fault): OpenCV's own cap, set by imageio before cv2
    loads, refuses the 100 Mpx decode before allocating it — ImageTooLarge, RSS flat."""
    got = _measure(tiff_bomb, "from m2fpkit.runtime import imageio", """
imageio._probe = lambda buf: (imageio.ImageInfo("TIFF", 100, 100), None)
out["cap"] = imageio.decoder_pixel_cap()
imageio.decode_image(data)
""")
    assert got["cap"] == imageio.DEFAULT_MAX_PIXELS
    assert got["error"] == "ImageTooLarge", got
    assert got["message"] == ("TIFF data is larger than its header says (100x100): the decoder refused it over "
                              "its 40 Mpx cap, limit is 40 Mpx")
    assert got["rss_growth_mb"] < RSS_BOUND_MB, got


def test_an_honest_header_over_the_cap_is_refused_by_opencv_itself(tmp_path):
    """Every accepted format: OpenCV's decoders assert the cap on the size they parsed (validateInputImageSize)."""
    side = (1000, 900)  # 0.9 Mpx, over a 0.5 Mpx cap
    rgb = np.zeros((side[1], side[0], 3), np.uint8)
    for ext in (".png", ".jpg", ".webp", ".bmp", ".tiff"):
        ok, enc = cv2.imencode(ext, rgb)
        assert ok
        (tmp_path / f"img{ext}").write_bytes(enc.tobytes())
    got = _fresh_python("""
import json, sys, cv2, numpy as np
from pathlib import Path
from m2fpkit.runtime import imageio
out = {}
for path in sorted(Path(sys.argv[1]).iterdir()):
    try:
        cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
        out[path.suffix] = "decoded"
    except cv2.error as exc:
        out[path.suffix] = "validateInputImageSize" if "validateInputImageSize" in str(exc) else str(exc)
out["cap"] = imageio.decoder_pixel_cap()
print(json.dumps(out))
""", str(tmp_path), env={"OPENCV_IO_MAX_IMAGE_PIXELS": "500000"})  # the operator's own value is kept
    assert got.pop("cap") == 500_000
    assert got == {ext: "validateInputImageSize" for ext in (".bmp", ".jpg", ".png", ".tiff", ".webp")}


def test_opencv_reads_its_cap_once_when_loaded():
    """Why the cap is process-wide: setting the variable after ``import cv2`` changes nothing."""
    got = _fresh_python("""
import json, os, cv2, numpy as np
os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = "1000"
ok, png = cv2.imencode(".png", np.zeros((50, 50, 3), np.uint8))
print(json.dumps({"shape": list(cv2.imdecode(png, cv2.IMREAD_COLOR).shape)}))
""")
    assert got == {"shape": [50, 50, 3]}


def test_limit_decoder_pixels_reports_a_mismatch(monkeypatch, caplog):
    monkeypatch.setattr(imageio, "_DECODER_CAP", 40_000_000)
    assert imageio.limit_decoder_pixels(40_000_000) == 40_000_000
    assert not caplog.records
    imageio.limit_decoder_pixels(100_000_000)
    assert "set OPENCV_IO_MAX_IMAGE_PIXELS=100000000" in caplog.records[-1].getMessage()
    assert caplog.records[-1].levelname == "WARNING"
    imageio.limit_decoder_pixels(1_000_000)
    assert caplog.records[-1].levelname == "INFO"


def test_a_lying_header_under_a_lower_limit_is_refused_after_the_decode():
    """Per-call limits below the process cap: a size the header parse missed is caught on the decoded image."""
    small = np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3)
    data = _tiff([{"size": (64, 48), "data": small.tobytes(), "repeat": (8, 6)}])
    assert (probe(data).width, probe(data).height) == (64, 48)  # the largest of the repeated values
    assert np.array_equal(decode_image(data), small)
    with pytest.raises(ImageTooLarge, match=r"decodes to 64x48 = 0.0 Mpx \(its header says 8x6\), limit is 0.0 Mpx"):
        _decode_with_header(data, (8, 6), max_pixels=1000)
    with pytest.raises(UndecodableImage, match="header says 8x6 but the data decodes to 64x48"):
        _decode_with_header(data, (8, 6), max_pixels=10_000)


def _decode_with_header(data: bytes, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """decode_image as if the pre-check had read ``size`` (a header parse that disagrees with the decoder)."""
    real = imageio._probe

    def fake(buf: bytes):
        info, layout = real(buf)
        return imageio.ImageInfo(info.format, *size), layout
    old, imageio._probe = imageio._probe, fake
    try:
        return decode_image(data, max_pixels=max_pixels)
    finally:
        imageio._probe = old


# ------------------------------------------------------------------------------ multi-page TIFF

def test_multipage_tiff_decodes_the_first_page_only(tiff_bomb, tmp_path):
    """Rule: the first page (Pillow's Image.open gives it too); later pages are never read, even a 100 Mpx one."""
    first = np.random.default_rng(1).integers(0, 256, (48, 64, 3), np.uint8)
    strip = _deflated_zeros(BOMB_SIDE * BOMB_SIDE * 3)
    data = _tiff([{"size": (64, 48), "data": first.tobytes()},
                  {"size": (BOMB_SIDE, BOMB_SIDE), "data": strip, "deflate": True},
                  *[{"size": (64, 48), "data": first.tobytes()}] * 200])
    assert np.array_equal(decode_image(data), first)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), first)
    path = tmp_path / "pages.tiff"
    path.write_bytes(data)
    got = _measure(path, "from m2fpkit.runtime.imageio import decode_image",
                   "out['shape'] = list(decode_image(data).shape)")
    assert got.get("shape") == [48, 64, 3], got
    assert got["rss_growth_mb"] < RSS_BOUND_MB and got["seconds"] < 1, got


# ------------------------------------------------------------------------------ JPEG scans

def _progressive_jpeg(side: int) -> bytes:
    rgb = cv2.resize(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8), (side, side))
    ok, enc = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return enc.tobytes()


#: an AC scan of component 1 (Ss=1, Se=63) with no entropy-coded data: 11 bytes, a full pass over the blocks
_EMPTY_SCAN = b"\xff\xda\x00\x08\x01\x01\x00\x01\x3f\x00\x00"


def _with_scans(jpeg: bytes, extra: int) -> bytes:
    eoi = jpeg.rindex(b"\xff\xd9")
    return jpeg[:eoi] + _EMPTY_SCAN * extra + jpeg[eoi:]


def test_empty_scans_cost_the_decoder_time():
    """The pathology: each empty scan is a pass over every block (time grows with scans, not bytes)."""
    base = _progressive_jpeg(2048)
    bomb = _with_scans(base, 2000)
    assert len(bomb) - len(base) == 22_000
    timings = []
    for data in (base, bomb):
        t0 = time.perf_counter()
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
        timings.append(time.perf_counter() - t0)
    assert timings[1] > 3 * timings[0], timings


def test_progressive_jpeg_with_thousands_of_scans_is_refused_quickly(monkeypatch):
    base = _progressive_jpeg(4096)
    assert decode_image(base).shape == (4096, 4096, 3)  # ~10 scans: fine
    bomb = _with_scans(base, 20_000)  # 220 KB more; ~15 s of libjpeg on this image
    monkeypatch.setattr(imageio.cv2, "imdecode", lambda *a: pytest.fail("the scan bomb reached the decoder"))
    t0 = time.perf_counter()
    with pytest.raises(UndecodableImage, match=f"more than {imageio.MAX_JPEG_SCANS} scans"):
        decode_image(bomb)
    assert time.perf_counter() - t0 < 2


def test_scan_count_skips_entropy_data_and_embedded_thumbnails():
    """Only real SOS markers count: 0xFF 0xDA inside an APP segment (e.g. an EXIF thumbnail) does not."""
    base = _progressive_jpeg(64)
    app1 = b"Exif\x00\x00" + _EMPTY_SCAN * 200
    data = base[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + base[2:]
    layout = imageio._jpeg_markers(data)
    assert layout.complete and 1 <= layout.scans <= 12
    assert decode_image(data).shape == (64, 64, 3)


def test_jpeg_with_too_many_segments_is_refused_quickly():
    base = _progressive_jpeg(64)
    comments = b"\xff\xfe\x00\x02" * 1_000_000  # 4 MB of empty COM segments
    t0 = time.perf_counter()
    with pytest.raises(UndecodableImage, match="marker segments"):
        decode_image(base[:2] + comments + base[2:])
    assert time.perf_counter() - t0 < 2


def test_restart_markers_do_not_count_as_segments():
    rgb = cv2.resize(np.random.default_rng(2).integers(0, 256, (8, 8, 3), np.uint8), (512, 512))
    ok, enc = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_RST_INTERVAL, 1])
    assert ok and enc.tobytes().count(b"\xff\xd0") > 100
    assert decode_image(enc.tobytes()).shape == (512, 512, 3)


# ------------------------------------------------------------------------------ animated formats

def _animated(fmt: str, frames: int, **kw) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (48, 64, 3), np.uint8) for _ in range(frames)]
    buf = io.BytesIO()
    pil = [Image.fromarray(a) for a in images]
    pil[0].save(buf, fmt, save_all=True, append_images=pil[1:], duration=20, **kw)
    return buf.getvalue(), images[0]


@pytest.mark.parametrize(("fmt", "kw"), [("PNG", {}), ("WEBP", {"lossless": True})])
def test_animated_png_and_webp_give_the_first_frame_in_bounded_time(fmt, kw):
    """Rule: APNG and animated WebP are accepted and give their first frame, as Pillow's Image.open does;
    the other frames are not decoded (the time does not grow with their number)."""
    few, first = _animated(fmt, 3, **kw)
    many, first_too = _animated(fmt, 400, **kw)
    assert np.array_equal(first, first_too)
    assert np.array_equal(decode_image(few), first)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(few)).convert("RGB")), first)
    timings = []
    for data in (few, many):
        t0 = time.perf_counter()
        for _ in range(5):
            assert np.array_equal(decode_image(data), first)
        timings.append(time.perf_counter() - t0)
    assert timings[1] < 5 * timings[0] + 0.05, timings


# ------------------------------------------------------------------------------ property

MAX_PIXELS = 64 * 64


def _seeds() -> dict[str, bytes]:
    rgb = cv2.resize(np.random.default_rng(4).integers(0, 256, (4, 4, 3), np.uint8), (40, 30))
    out = {}
    for ext, params in ((".png", []), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]), (".jpg", []),
                        (".tiff", []), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]), (".webp", []), (".bmp", [])):
        ok, enc = cv2.imencode(ext, rgb, params)
        assert ok
        out[f"{ext}{len(out)}"] = enc.tobytes()
    out["tiff-repeat"] = _tiff([{"size": (40, 30), "data": bytes(40 * 30 * 3), "repeat": (40, 30)}])
    return out


SEEDS = _seeds()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["set", "set", "set", "cut", "dup", "insert"]))
        low = draw(st.sampled_from([12, 12, 12, 0]))  # mostly past the magic bytes (a wrong one is just refused)
        at = draw(st.integers(min(low, len(data)), min(len(data), 160)))  # the headers
        if kind == "set" and at < len(data):
            data[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif kind == "cut":
            del data[draw(st.integers(1, len(data))):]
        elif kind == "dup":
            data[at:at] = data[at: at + draw(st.integers(1, 40))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=12))
    return bytes(data)


def _check_decode(data: bytes) -> None:
    try:
        out = decode_image(data, max_pixels=MAX_PIXELS, max_aspect=20.0)
    except InputError:
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.flags.c_contiguous
    assert out.shape[0] * out.shape[1] <= MAX_PIXELS
    assert max(out.shape[:2]) / min(out.shape[:2]) <= 20.0


def test_seed_images_decode():
    for name, data in SEEDS.items():
        assert decode_image(data, max_pixels=MAX_PIXELS).shape == (30, 40, 3), name


_PROPERTY = settings(derandomize=True, max_examples=600, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow])


@_PROPERTY
@given(mutated())
def test_mutated_headers_give_an_image_within_limits_or_an_input_error(data):
    _check_decode(data)


@_PROPERTY
@given(st.one_of(st.binary(max_size=300),
                 st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBP", b"BM",
                                  b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"]).flatmap(
                     lambda magic: st.binary(max_size=300).map(lambda rest: magic + rest))))
def test_arbitrary_bytes_give_an_image_within_limits_or_an_input_error(data):
    _check_decode(data)


def test_a_limit_above_the_decoder_cap_is_refused_by_the_decoder_with_a_reason(tmp_path):
    ok, enc = cv2.imencode(".png", np.zeros((900, 1000, 3), np.uint8))
    assert ok
    (tmp_path / "img.png").write_bytes(enc.tobytes())
    got = _measure(tmp_path / "img.png", "from m2fpkit.runtime.imageio import decode_image",
                   "decode_image(data, max_pixels=10_000_000)", env={"OPENCV_IO_MAX_IMAGE_PIXELS": "500000"})
    assert got["error"] == "ImageTooLarge", got
    assert "1000x900 = 0.9 Mpx, over the image decoder's 0.5 Mpx cap (OPENCV_IO_MAX_IMAGE_PIXELS)" in got["message"]

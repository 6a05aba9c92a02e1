"""The tar reader and the signature parser against hostile input (an outside audit's findings, then fuzzing).

Archives here are synthetic: a manifest and a few small files, built in memory — no exported model
needed, except for the one test that goes through the ``m2fp-bundle install`` command. Each audit
finding has a test that failed before the fix: sparse members (GNU pax 0.0 / 0.1 / 1.0 and old GNU
``S``), deep and long member names, the signature checked on the archive's own manifest before any
file is extracted. The property tests (hypothesis, seeded) throw arbitrary bytes and structured-random
tars at :func:`unpack` and arbitrary bytes at :func:`signature.parse_signature`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import string
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2fpkit.runtime.bundle import archive as archive_mod
from m2fpkit.runtime.bundle import manifest as manifest_mod
from m2fpkit.runtime.bundle import signature, signing
from m2fpkit.runtime.bundle.archive import peek_version, unpack
from m2fpkit.runtime.bundle.signature import TrustPolicy
from m2fpkit.runtime.bundle.store import BundleStore
from m2fpkit.runtime.delivery.cli import main
from m2fpkit.runtime.delivery.install import install
from m2fpkit.runtime.errors import ArchiveError, BundleError, SignatureError, VerificationFailed

SPARSE_REAL_SIZE = 256 << 20  # what the sparse member claims to expand to
STORED = 10 << 10              # what it really carries
EVIL = Path("/tmp/m2fp-untrusted-evil")  # every absolute name the tests use points here
FILES = {"config.json": b'{"not": "checked by unpack"}\n', "model.onnx": b"graph" * 100,
         "model.onnx.data": bytes(range(256)) * 40, "golden/sample.png": b"\x89PNG fake"}


# --------------------------------------------------------------------------------------- builders
def manifest_bytes(files: dict[str, bytes], sizes: dict[str, int] | None = None) -> bytes:
    entries = {rel: {"size": (sizes or {}).get(rel, len(data)), "sha256": hashlib.sha256(data).hexdigest()}
               for rel, data in sorted(files.items())}
    return json.dumps({"algorithm": "sha256", "files": entries}, sort_keys=True).encode()


def header(name: str, size: int = 0, *, type: bytes = tarfile.REGTYPE, fmt: int = tarfile.PAX_FORMAT,
           pax: dict[str, str] | None = None, **attrs) -> bytes:
    """A member header (plus its extended headers) as tarfile writes it."""
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode = size, type, 0o644
    for k, v in attrs.items():
        setattr(info, k, v)
    if pax:
        info.pax_headers = dict(pax)
    return info.tobuf(fmt, "utf-8", "surrogateescape")


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def member(name: str, data: bytes = b"", **kw) -> bytes:
    return header(name, len(data), **kw) + padded(data)


def tar_bytes(*members: bytes) -> bytes:
    return b"".join(members) + b"\0" * (2 * tarfile.BLOCKSIZE)


def bundle_members(version: str = "v1.0", files: dict[str, bytes] = FILES, *, manifest: bytes | None = None,
                   sig: bytes | None = None, skip: tuple[str, ...] = ()) -> list[bytes]:
    out = [member(f"{version}/manifest.json", manifest if manifest is not None else manifest_bytes(files))]
    if sig is not None:
        out.append(member(f"{version}/manifest.sig", sig))
    out += [member(f"{version}/{rel}", data) for rel, data in sorted(files.items()) if rel not in skip]
    return out


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def old_gnu_sparse(name: str, stored: bytes, real_size: int, *, extended: bool = False) -> bytes:
    """An old-GNU sparse member (type ``S``): one map entry (0, len(stored)) and the real size in the header."""
    buf = bytearray(header(name, len(stored), type=tarfile.GNUTYPE_SPARSE, fmt=tarfile.GNU_FORMAT))
    buf[386:398] = b"%011o\0" % 0
    buf[398:410] = b"%011o\0" % len(stored)
    buf[482] = 1 if extended else 0
    buf[483:495] = b"%011o\0" % real_size
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % (sum(buf) & 0o777777)
    return bytes(buf) + (b"" if extended else padded(stored))


def negative_size(name: str, size: int, how: str) -> bytes:
    """A header declaring a negative size, in a pax record or base-256 encoded in the header itself."""
    if how == "pax":
        return header(name, 0, pax={"size": str(size)})
    buf = bytearray(header(name, 0, fmt=tarfile.GNU_FORMAT))
    buf[124:136] = b"\xff" + (size & ((1 << 88) - 1)).to_bytes(11, "big")
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % (sum(buf) & 0o777777)
    return bytes(buf)


SPARSE_NAME = "v1.0/model.onnx.data"


def _sparse_pax_00() -> bytes:
    return member(SPARSE_NAME, b"\1" * STORED,
                  pax={"GNU.sparse.size": str(SPARSE_REAL_SIZE), "GNU.sparse.numblocks": "1",
                       "GNU.sparse.offset": "0", "GNU.sparse.numbytes": str(STORED)})


def _sparse_pax_01() -> bytes:
    return member("v1.0/GNUSparseFile.0/model.onnx.data", b"\1" * STORED,
                  pax={"GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.name": SPARSE_NAME,
                       "GNU.sparse.size": str(SPARSE_REAL_SIZE), "GNU.sparse.numblocks": "1",
                       "GNU.sparse.map": f"0,{STORED}"})


def _sparse_pax_10() -> bytes:
    sparse_map = padded(f"1\n0\n{STORED}\n".encode())
    return member("v1.0/GNUSparseFile.0/model.onnx.data", sparse_map + b"\1" * STORED,
                  pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": SPARSE_NAME,
                       "GNU.sparse.realsize": str(SPARSE_REAL_SIZE)})


SPARSE: dict[str, Callable[[], bytes]] = {
    "pax-0.0": _sparse_pax_00,
    "pax-0.1": _sparse_pax_01,
    "pax-1.0": _sparse_pax_10,
    "old-gnu-S": lambda: old_gnu_sparse(SPARSE_NAME, b"\1" * STORED, SPARSE_REAL_SIZE),
    "old-gnu-S-extended-at-eof": lambda: old_gnu_sparse(SPARSE_NAME, b"", SPARSE_REAL_SIZE, extended=True),
}


@pytest.fixture
def writes(monkeypatch) -> list[int]:
    """Sizes of every write unpacking makes (through ``archive.write_all``, its one write path)."""
    seen: list[int] = []
    real = archive_mod.write_all

    def counting(fd: int, data) -> None:
        seen.append(len(data))
        real(fd, data)

    monkeypatch.setattr(archive_mod, "write_all", counting)
    return seen


@pytest.fixture
def out(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_a_plain_synthetic_archive_unpacks_byte_for_byte(tmp_path, out):
    dest = unpack(write(tmp_path / "ok.tar", tar_bytes(*bundle_members())), out)
    assert dest == out / "v1.0"
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} == {"manifest.json", *FILES}
    assert all((dest / rel).read_bytes() == data for rel, data in FILES.items())


# ------------------------------------------------------------------------------ 1. sparse members
@pytest.mark.parametrize("kind", sorted(SPARSE))
def test_sparse_members_are_refused_before_anything_is_written(tmp_path, out, writes, kind):
    files = {**FILES, "model.onnx.data": b"\1" * STORED}
    sizes = {"model.onnx.data": SPARSE_REAL_SIZE}  # the manifest agrees with the expanded size
    members = bundle_members(files=files, manifest=manifest_bytes(files, sizes), skip=("model.onnx.data",))
    bad = write(tmp_path / "sparse.tar", tar_bytes(*members, SPARSE[kind]()))
    assert bad.stat().st_size < 32 << 10  # a few KB on the wire …
    if kind.startswith("pax"):  # … that tarfile itself expands to 256 MB
        with tarfile.open(bad) as tf:
            assert tf.getmember(SPARSE_NAME).size == SPARSE_REAL_SIZE
    with pytest.raises(ArchiveError, match="sparse") as info:
        unpack(bad, out)
    assert "\n" not in str(info.value)
    assert writes == [] and list(out.iterdir()) == []


def test_a_sparse_record_in_a_global_pax_header_is_refused(tmp_path, out, writes):
    """A global pax header applies to every member after it: its GNU.sparse records are refused too."""
    records = _pax_record("GNU.sparse.size", str(SPARSE_REAL_SIZE))
    sparse_global = header("g", len(records), type=tarfile.XGLTYPE, fmt=tarfile.USTAR_FORMAT) + padded(records)
    bad = write(tmp_path / "g.tar", tar_bytes(sparse_global, *bundle_members()))
    with pytest.raises(ArchiveError, match="sparse"):
        unpack(bad, out)
    assert writes == [] and list(out.iterdir()) == []


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


# ----------------------------------------------------------------------- 2. deep and long names
DEEP = "v1.0/" + "d/" * 1100 + "f"


@pytest.mark.parametrize("where", ["first", "after-the-manifest"])
@pytest.mark.parametrize("kind", ["file", "directory"])
@pytest.mark.parametrize("fmt", ["pax", "gnu"])
def test_a_member_1100_directories_deep_is_one_line_archive_error(tmp_path, out, writes, where, kind, fmt):
    deep = member(DEEP, b"x", fmt=tarfile.PAX_FORMAT if fmt == "pax" else tarfile.GNU_FORMAT,
                  **({"type": tarfile.DIRTYPE} if kind == "directory" else {}))
    members = bundle_members()
    members.insert(0 if where == "first" else 1, deep)
    bad = write(tmp_path / "deep.tar", tar_bytes(*members))
    with pytest.raises(ArchiveError) as info:
        unpack(bad, out)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert "1101 parts" in message and f"at most {manifest_mod.MAX_PATH_PARTS}" in message
    assert writes == [] and list(out.iterdir()) == []


def test_nine_parts_below_the_version_are_refused_by_the_manifest_rule(tmp_path, out):
    eight = "v1.0/" + "/".join("abcdefgh")
    nine = "v1.0/" + "/".join("abcdefghi")
    files = {**FILES, eight[5:]: b"ok"}
    dest = unpack(write(tmp_path / "eight.tar", tar_bytes(*bundle_members(files=files))), out)
    assert (dest / eight[5:]).read_bytes() == b"ok"
    with pytest.raises(ArchiveError, match=r"9 parts under v1\.0/, at most 8"):
        unpack(write(tmp_path / "nine.tar", tar_bytes(*bundle_members(), member(nine, b"x"))), tmp_path)


@pytest.mark.parametrize("name, message", [
    ("v1.0/" + "x" * 300, "a part longer than 255 bytes"),
    ("v1.0/" + "/".join(["y" * 200] * 6), "longer than 1024 bytes"),
    ("v1.0/bad\nname", "not listed"),
])
def test_long_or_odd_names_give_one_short_line(tmp_path, out, writes, name, message):
    bad = write(tmp_path / "long.tar", tar_bytes(*bundle_members(), member(name, b"x")))
    with pytest.raises(ArchiveError, match=message) as info:
        unpack(bad, out)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400
    assert writes == [] and list(out.iterdir()) == []


def test_chained_and_oversized_extended_headers_are_refused(tmp_path, out):
    chain = b"".join(header("x", len(r), type=tarfile.XHDTYPE, fmt=tarfile.USTAR_FORMAT) + padded(r)
                     for r in [_pax_record("comment", "c")] * 2000)
    bad = write(tmp_path / "chain.tar", tar_bytes(*bundle_members()[:1], chain + member("v1.0/config.json", b"{}")))
    with pytest.raises(ArchiveError, match="extended tar headers in a row"):  # was a RecursionError in tarfile
        unpack(bad, out)
    big = _pax_record("comment", "c" * (archive_mod.MAX_EXTENDED_HEADER_BYTES + 1))
    bad = write(tmp_path / "big.tar", tar_bytes(header("x", len(big), type=tarfile.XHDTYPE,
                                                       fmt=tarfile.USTAR_FORMAT) + padded(big), *bundle_members()))
    with pytest.raises(ArchiveError, match="extended tar header of"):
        unpack(bad, out)
    assert list(out.iterdir()) == []


@pytest.fixture(scope="module")
def real_bundle(ms_multi, tmp_path_factory) -> Path:
    """The session's exported bundle cloned as v1.0."""
    from reference.bundles import clone_bundle

    return clone_bundle(ms_multi.bundle_dir, tmp_path_factory.mktemp("untrusted_src"), "v1.0")


def test_the_deep_member_through_the_install_command(real_bundle, tmp_path):
    """``m2fp-bundle install`` on a real bundle's archive plus one deep member: exit 1, one line on stderr."""
    members = [member(f"v1.0/{p.relative_to(real_bundle).as_posix()}", p.read_bytes())
               for p in sorted(real_bundle.rglob("*")) if p.is_file()]
    assert unpack(write(tmp_path / "ok.tar", tar_bytes(*members)), tmp_path).name == "v1.0"  # fine without it
    members.insert(1, member(DEEP, b"x"))
    bad = write(tmp_path / "deep.tar", tar_bytes(*members))
    edge = tmp_path / "edge"
    result = CliRunner().invoke(main, ["install", str(bad), "--bundles", str(edge)])
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: unsafe member name")
    assert "1101 parts" in result.stderr and len(result.stderr) < 400
    assert "Traceback" not in result.output and not isinstance(result.exception, RecursionError)
    assert BundleStore(edge).versions() == [] and not [p for p in edge.rglob("*") if p.is_file()]


@pytest.mark.parametrize("how", ["base-256", "pax"])
def test_a_negative_member_size_is_refused_at_once(tmp_path, out, writes, how):
    """tarfile steps back to the same header for a negative size and would read it again and again."""
    bad_member = negative_size("v1.0/config.json", -512, how)
    bad = write(tmp_path / "negative.tar", tar_bytes(bundle_members()[0], bad_member))
    with pytest.raises(ArchiveError, match="negative size -512"):
        unpack(bad, out)
    assert writes == [] and list(out.iterdir()) == []


# ------------------------------------------------------------- 3. signature before extraction
@pytest.fixture(scope="module")
def signer() -> dict[str, object]:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    return {"key": key, "other": other, "trust": TrustPolicy((key.public_key(),))}


def signed_tar(signer, how: str) -> bytes:
    manifest = manifest_bytes(FILES)
    sig = {"good": lambda: signing.signature_bytes(manifest, signer["key"]),
           "other-key": lambda: signing.signature_bytes(manifest, signer["other"]),
           "other-manifest": lambda: signing.signature_bytes(manifest + b" ", signer["key"]),
           "garbage": lambda: b"{not json",
           "unsigned": lambda: None}[how]()
    return tar_bytes(*bundle_members(sig=sig))


@pytest.mark.parametrize("how, message", [
    ("unsigned", "unsigned: manifest.sig is missing"),
    ("other-key", "wrong signature: signed by key"),
    ("other-manifest", "changed after signing"),
    ("garbage", "manifest.sig"),
])
def test_with_trusted_keys_a_bad_signature_stops_unpack_before_any_file(tmp_path, out, writes, signer, how, message):
    bad = write(tmp_path / "bad.tar", signed_tar(signer, how))
    with pytest.raises(SignatureError, match=message):
        unpack(bad, out, trust=signer["trust"])
    assert writes == [] and list(out.iterdir()) == []
    assert unpack(bad, out).name == "v1.0"  # without keys nothing is required


def test_a_good_signature_unpacks_and_the_signature_is_kept(tmp_path, out, signer):
    dest = unpack(write(tmp_path / "good.tar", signed_tar(signer, "good")), out, trust=signer["trust"])
    assert (dest / "model.onnx.data").read_bytes() == FILES["model.onnx.data"]
    assert signature.check((dest / "manifest.json").read_bytes(), (dest / "manifest.sig").read_bytes(),
                           signer["trust"]) == signature.key_id(signer["key"].public_key())


def test_install_checks_the_signature_on_the_archive_before_extracting(tmp_path, writes, signer):
    bundles = tmp_path / "bundles"
    bad = write(tmp_path / "m2fp-v1.0.tar", signed_tar(signer, "other-key"))
    with pytest.raises(VerificationFailed, match="signature: wrong signature") as info:
        install(bad, bundles, trust=signer["trust"])
    assert [(c.name, c.status) for c in info.value.report.checks] == [("archive", "skip"), ("signature", "FAIL")]
    assert writes == []  # not even the manifest was written
    assert BundleStore(bundles).versions() == [] and not [p for p in bundles.rglob("*") if p.is_file()]


# -------------------------------------------------------------------------- unpack's other rules
def test_unpack_refuses_a_file_that_differs_from_the_manifest_hash(tmp_path, out):
    manifest = manifest_bytes({**FILES, "model.onnx": b"other" * 100})
    bad = write(tmp_path / "hash.tar", tar_bytes(*bundle_members(manifest=manifest)))
    with pytest.raises(ArchiveError, match=r"v1\.0/model\.onnx: SHA-256 .* does not match manifest\.json"):
        unpack(bad, out)
    assert list(out.iterdir()) == []


def test_unpack_refuses_a_path_listed_as_file_and_directory(tmp_path, out):
    files = {**FILES, "golden": b"a file named like a directory"}
    bad = write(tmp_path / "clash.tar", tar_bytes(*bundle_members(files=files)))
    with pytest.raises(ArchiveError, match="both as a file and as the directory"):
        unpack(bad, out)
    assert list(out.iterdir()) == []


def test_peek_version_refuses_unsafe_first_members(tmp_path):
    assert peek_version(write(tmp_path / "ok.tar", tar_bytes(*bundle_members("v2.3")))) == "v2.3"
    with pytest.raises(ArchiveError, match="sparse"):
        peek_version(write(tmp_path / "s.tar", tar_bytes(SPARSE["pax-1.0"]())))
    with pytest.raises(ArchiveError, match="1101 parts"):
        peek_version(write(tmp_path / "d.tar", tar_bytes(member(DEEP, b"x"))))


# ------------------------------------------------------------------------------- 7. properties
SEED_TAR = tar_bytes(*bundle_members())
NAMES = st.one_of(
    st.sampled_from(sorted(FILES) + ["manifest.json", "manifest.sig", "stray.txt", "golden", "golden/x"]),
    st.sampled_from(["..", "../evil", "a/../../evil", "./x", "a//b", ".hidden", "a\\b", "x\x00y", "",
                     str(EVIL), "/" + str(EVIL), "bad\nname"]),
    st.integers(1, 1200).map(lambda n: "d/" * n + "f"),
    st.integers(200, 600).map(lambda n: "x" * n),
    st.text(string.ascii_letters + "/._-é\udcff", max_size=30),
)
KINDS = st.sampled_from(["reg"] * 6 + ["dir", "sym", "lnk", "chr", "blk", "fifo", "sparse-pax", "sparse-old",
                                        "negative", "cont", "unknown"])
VERSIONS = st.sampled_from(["v1.0"] * 6 + ["v2.1-rc.1", "v1.0/..", "latest", ""])


@st.composite
def hostile_tars(draw) -> bytes:
    """A bundle-shaped tar: some honest members, some hostile ones, a manifest honest or not."""
    version = draw(VERSIONS)
    files = draw(st.dictionaries(st.sampled_from(sorted(FILES) + ["a/b/c.bin", "golden/y.png"]),
                                 st.binary(max_size=600), min_size=1, max_size=5))
    listed = dict(files)
    manifest_kind = draw(st.sampled_from(["honest"] * 4 + ["sizes", "hashes", "extra", "missing", "json", "none"]))
    if manifest_kind == "sizes":
        manifest = manifest_bytes(files, {rel: len(d) + draw(st.integers(-5, 5)) for rel, d in files.items()})
    elif manifest_kind == "hashes":  # right sizes, hashes of other content
        manifest = manifest_bytes({rel: bytes(b ^ 1 for b in d) for rel, d in files.items()})
    elif manifest_kind == "extra":
        listed[draw(NAMES) or "x"] = b"listed, not in the archive"
        manifest = manifest_bytes(listed)
    elif manifest_kind == "json":
        manifest = json.dumps(draw(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                                                lambda c: st.lists(c, max_size=3)
                                                | st.dictionaries(st.text(max_size=8), c, max_size=3),
                                                max_leaves=10))).encode()
    else:
        manifest = manifest_bytes(files)
    members = [] if manifest_kind == "none" else [member(f"{version}/manifest.json", manifest)]
    members += [member(f"{version}/{rel}", data) for rel, data in files.items()
                if not (manifest_kind == "missing" and rel == min(files))]
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 4]))):
        members.insert(draw(st.integers(0, len(members))), _hostile(draw, version))
    if members and draw(st.sampled_from([False] * 4 + [True])):
        members.append(members[draw(st.integers(0, len(members) - 1))])  # a duplicate
    data = tar_bytes(*members)
    if draw(st.sampled_from([False] * 4 + [True])):
        data = data[:max(0, len(data) - draw(st.integers(1, 2048)))]  # truncated
    return data


def _hostile(draw, version: str) -> bytes:
    name = f"{version}/{draw(NAMES)}" if draw(st.booleans()) else draw(NAMES)
    kind = draw(KINDS)
    data = draw(st.binary(max_size=64))
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
    try:
        if kind == "reg":
            return member(name, data, fmt=fmt)
        if kind == "dir":
            return header(name, type=tarfile.DIRTYPE, fmt=fmt)
        if kind in ("sym", "lnk"):
            target = draw(st.sampled_from([str(EVIL), "../../etc/passwd", f"{version}/config.json"]))
            return header(name, type=tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE, linkname=target, fmt=fmt)
        if kind in ("chr", "blk", "fifo"):
            return header(name, type={"chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[kind],
                          devmajor=1, devminor=3, fmt=fmt)
        if kind == "sparse-pax":
            real = draw(st.sampled_from(["0", "64", str(SPARSE_REAL_SIZE), "x", "-1", "1,2,3"]))
            records = draw(st.sampled_from([
                {"GNU.sparse.size": real, "GNU.sparse.offset": "0", "GNU.sparse.numbytes": str(len(data))},
                {"GNU.sparse.map": f"0,{real}", "GNU.sparse.size": real},
                {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": real},
            ]))
            return member(name, data, pax=records)
        if kind == "negative":
            return negative_size(name, -draw(st.integers(1, 4096)), draw(st.sampled_from(["pax", "base-256"])))
        if kind == "sparse-old":
            return old_gnu_sparse(name, data, draw(st.integers(0, SPARSE_REAL_SIZE)), extended=draw(st.booleans()))
        return member(name, data, type=tarfile.CONTTYPE if kind == "cont" else b"Z", fmt=fmt)
    except (ValueError, UnicodeError):  # tarfile cannot even write this name in this format
        return member(f"{version}/stray.txt", data)


def _check_unpack(data: bytes) -> None:
    """unpack returns a directory of exactly the manifest's files, each verified, or raises a BundleError;
    either way nothing exists outside ``out`` and a refusal leaves ``out`` empty."""
    with tempfile.TemporaryDirectory(prefix="m2fp-prop-") as tmp:
        root = Path(tmp)
        archive = write(root / "a.tar", data)
        out = root / "sandbox" / "out"
        out.mkdir(parents=True)
        try:
            dest = unpack(archive, out)
        except BundleError as exc:
            assert "\n" not in str(exc)
            assert list(out.iterdir()) == []
        else:
            assert dest.parent == out and list(out.iterdir()) == [dest]
            manifest = manifest_mod.read(dest)
            found = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if not p.is_dir() or p.is_symlink()}
            assert found - set(manifest.files) <= manifest_mod.SIDE_FILES and set(manifest.files) <= found
            for rel, entry in manifest.files.items():
                p = dest / rel
                assert not p.is_symlink() and p.is_file()
                assert p.stat().st_size == entry.size and manifest_mod.sha256_file(p) == entry.sha256
        assert sorted(os.listdir(root)) == ["a.tar", "sandbox"] and os.listdir(root / "sandbox") == ["out"]
        assert not EVIL.exists() and not Path(str(EVIL) + ".txt").exists()


PROPERTY = settings(derandomize=True, database=None, deadline=None, max_examples=200,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY
@given(st.binary(max_size=4096))
def test_unpack_of_arbitrary_bytes(data):
    _check_unpack(data)


@PROPERTY
@given(st.lists(st.tuples(st.integers(0, len(SEED_TAR) - 1), st.binary(min_size=1, max_size=16)), max_size=6),
       st.integers(0, len(SEED_TAR)))
def test_unpack_of_a_valid_archive_with_random_bytes_overwritten(patches, cut):
    data = bytearray(SEED_TAR)
    for pos, chunk in patches:
        data[pos:pos + len(chunk)] = chunk
    _check_unpack(bytes(data[:max(cut, len(data) // 2)]))


@PROPERTY
@given(hostile_tars())
def test_unpack_of_structured_random_tars(data):
    _check_unpack(data)


def _check_signature_parser(raw: bytes) -> None:
    try:
        kid, sig = signature.parse_signature(raw)
    except SignatureError as exc:
        assert str(exc)
    else:
        assert len(sig) == 64 and isinstance(sig, bytes)
        assert kid == "?" or (kid.isascii() and kid.isalnum() and 1 <= len(kid) <= 64)
    policy = TrustPolicy((Ed25519PrivateKey.from_private_bytes(b"\1" * 32).public_key(),))
    try:
        signature.check(b"{}", raw, policy)
    except SignatureError:
        pass


@settings(derandomize=True, database=None, deadline=None, max_examples=300)
@given(st.binary(max_size=512))
def test_signature_parser_on_arbitrary_bytes(raw):
    _check_signature_parser(raw)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=8)


@settings(derandomize=True, database=None, deadline=None, max_examples=300)
@given(st.fixed_dictionaries({}, optional={
    "algorithm": st.sampled_from(["ed25519", "ED25519", "rsa"]) | JSON_VALUES,
    "key_id": st.text(max_size=80) | JSON_VALUES,
    "signature": st.binary(max_size=100).map(lambda b: base64.b64encode(b).decode())
                 | st.text(string.ascii_letters + "+/=-_ \n", max_size=100) | JSON_VALUES,
}), st.booleans())
def test_signature_parser_on_structured_random_json(doc, pad):
    raw = json.dumps(doc).encode() + (b"\n  " if pad else b"")
    _check_signature_parser(raw)


def test_the_property_checker_sees_both_outcomes():
    """The checker itself: the seed archive unpacks, a hostile one is refused (guards the harness)."""
    with tempfile.TemporaryDirectory() as tmp:
        assert unpack(write(Path(tmp) / "a.tar", SEED_TAR), tmp).name == "v1.0"
        with pytest.raises(ArchiveError):
            unpack(write(Path(tmp) / "b.tar", tar_bytes(member("v1.0/../evil", b"x"))), tmp)
    _check_unpack(SEED_TAR)

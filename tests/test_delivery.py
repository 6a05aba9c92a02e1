"""``m2fp-bundle``: pack → sign → copy → verify → install across two bundle roots, and every refusal.

Bundles are cheap clones (:mod:`reference.bundles`) of the session's exported multi-human bundle.
"Two machines" are two bundle roots that share nothing but the packed file and the public key.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from m2fpkit.runtime.bundle import archive as archive_mod
from m2fpkit.runtime.bundle import reader
from m2fpkit.runtime.bundle.archive import pack, unpack
from m2fpkit.runtime.bundle.signature import TrustPolicy
from m2fpkit.runtime.bundle.signing import keygen, sign
from m2fpkit.runtime.bundle.store import BundleStore
from m2fpkit.runtime.delivery import ArchiveError, SignatureError, VerificationFailed, VersionInUse
from m2fpkit.runtime.delivery import install as install_mod
from m2fpkit.runtime.delivery.cli import main
from m2fpkit.runtime.delivery.install import install, list_versions, promote, remove, verify
from m2fpkit.runtime.errors import VersionExists
from m2fpkit.runtime.predictor import Predictor
from reference.bundles import clone_bundle, corrupt, synthetic_png

FAST = {"short_edge": 160}
M2FP_BUNDLE = Path(sys.executable).with_name("m2fp-bundle")


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def build_root(ms_multi, tmp_path_factory) -> Path:
    """"Machine A": the exported bundle as v1.0 (unsigned) and v1.1 (signed), read-only for the tests."""
    root = tmp_path_factory.mktemp("machine_a")
    clone_bundle(ms_multi.bundle_dir, root, "v1.0", preprocess=FAST, notes="delivery test v1.0")
    clone_bundle(ms_multi.bundle_dir, root, "v1.1", preprocess=FAST, notes="delivery test v1.1")
    return root


@pytest.fixture
def own_root(build_root, tmp_path) -> Path:
    """A private copy of ``build_root`` that a test may damage or sign."""
    root = tmp_path / "r"
    shutil.copytree(build_root, root)
    return root


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    keygen(d / "a.key", d / "a.pub")
    keygen(d / "b.key", d / "b.pub")
    return {"private": d / "a.key", "public": d / "a.pub", "other_private": d / "b.key", "other_public": d / "b.pub"}


@pytest.fixture(scope="module")
def signed_root(build_root, keys) -> Path:
    sign(build_root / "m2fp" / "v1.1", keys["private"])
    return build_root


@pytest.fixture(scope="module")
def archives(signed_root, tmp_path_factory) -> dict[str, Path]:
    """Packed archives: v1.0 unsigned, v1.1 signed with key a."""
    d = tmp_path_factory.mktemp("archives")
    return {"unsigned": pack(signed_root / "m2fp" / "v1.0", d).path,
            "signed": pack(signed_root / "m2fp" / "v1.1", d).path}


@pytest.fixture
def edge(tmp_path) -> Path:
    """"Machine B": an empty bundle root."""
    return tmp_path / "edge_bundles"


def run(*args: str, env: dict[str, str] | None = None):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def visible(root: Path) -> list[str]:
    """What a reader of the store sees: version names (dot entries are invisible by design)."""
    return BundleStore(root).versions()


def leftovers(root: Path) -> list[str]:
    """Staging or removal directories left in the store (there must be none after any command)."""
    d = root / "m2fp"
    return sorted(p.name for p in d.iterdir() if p.name.startswith((".staging-", ".removed-", ".replaced-"))) \
        if d.is_dir() else []


def member_offset(archive: Path, rel: str) -> tuple[int, int]:
    with tarfile.open(archive) as tf:
        for m in tf.getmembers():
            if m.name.endswith("/" + rel):
                return m.offset_data, m.size
    raise AssertionError(f"{rel} not in {archive}")


# ------------------------------------------------------------------------------ the happy path
def test_two_machine_round_trip_pack_sign_copy_verify_install_serve(build_root, keys, edge, tmp_path):
    # machine A: sign and pack with the documented commands
    work = tmp_path / "a"
    shutil.copytree(build_root, work)
    r = run("sign", "v1.0", "--bundles", work, "--private-key", keys["private"])
    assert r.exit_code == 0, r.output
    r = run("pack", "v1.0", "--bundles", work, "-o", tmp_path / "out.tar")
    assert r.exit_code == 0 and "packed v1.0" in r.output, r.output
    # "copy" to machine B
    carried = tmp_path / "usb" / "m2fp-v1.0.tar"
    carried.parent.mkdir()
    shutil.copyfile(tmp_path / "out.tar", carried)
    r = run("verify", carried, "--public-key", keys["public"])
    assert r.exit_code == 0, r.output
    for name in ("archive", "manifest", "config", "graph", "selftest", "signature"):
        assert any(line.split()[:2] == ["ok", name] for line in r.output.splitlines()), (name, r.output)
    assert r.output.rstrip().endswith("verified")
    r = run("install", carried, "--bundles", edge, "--public-key", keys["public"])
    assert r.exit_code == 0, r.output
    assert "installed v1.0" in r.output
    installed = edge / "m2fp" / "v1.0"
    assert visible(edge) == ["v1.0"] and leftovers(edge) == []
    assert reader.inspect(installed, TrustPolicy.from_keys(keys["public"])).signed_by is not None
    assert (installed / "manifest.sig").is_file()
    # machine B serves it: same output as on machine A
    image = synthetic_png(96, 128, seed=3)
    a = Predictor.load(work / "m2fp" / "v1.0").predict(image).result.label_map
    b = Predictor.load(installed).predict(image).result.label_map
    assert (a == b).all()


def test_pack_is_deterministic_and_puts_the_manifest_first(build_root, tmp_path):
    one = pack(build_root / "m2fp" / "v1.0", tmp_path / "one.tar").path
    two = pack(build_root / "m2fp" / "v1.0", tmp_path / "two.tar").path
    assert one.read_bytes() == two.read_bytes()
    with tarfile.open(one) as tf:
        members = tf.getmembers()
    assert members[0].name == "v1.0/manifest.json"
    assert all(m.isreg() and m.uid == 0 and m.mtime == 0 and m.mode == 0o644 for m in members)
    listed = json.loads((build_root / "m2fp" / "v1.0" / "manifest.json").read_text())["files"]
    assert {m.name.split("/", 1)[1] for m in members[1:]} == set(listed)
    assert not list(tmp_path.glob(".*.tmp"))


def test_pack_refuses_a_damaged_bundle_and_leaves_no_file(own_root, tmp_path):
    root = own_root
    corrupt(root / "m2fp" / "v1.0", "flip-byte")
    r = run("pack", "v1.0", "--bundles", root, "-o", tmp_path / "x.tar")
    assert r.exit_code == 1
    assert "SHA-256" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "x.tar").exists() and not list(tmp_path.glob(".x.tar.*"))


def test_verify_and_install_an_unsigned_bundle_without_a_key(archives, edge):
    r = run("verify", archives["unsigned"])
    assert r.exit_code == 0
    assert "skip  signature  unsigned" in r.output
    done = install(archives["unsigned"], edge)
    assert done.version == "v1.0" and not done.replaced
    assert visible(edge) == ["v1.0"]


def test_install_from_a_directory(build_root, edge):
    done = install(build_root / "m2fp" / "v1.0", edge)
    assert done.report.ok and visible(edge) == ["v1.0"] and leftovers(edge) == []


# ----------------------------------------------------------------------------------- refusals
def test_corrupted_file_in_the_archive_is_refused(archives, edge, tmp_path):
    bad = tmp_path / "bad.tar"
    shutil.copyfile(archives["unsigned"], bad)
    offset, size = member_offset(bad, "model.onnx.data")
    with open(bad, "r+b") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = run("verify", bad)
    assert r.exit_code == 1
    # unpacking hashes every member against the archive's manifest: the archive itself is refused
    assert any(line.split()[:2] == ["FAIL", "archive"] and "model.onnx.data" in line and "SHA-256" in line
               for line in r.output.splitlines()), r.output
    assert "NOT verified: archive" in r.output
    r = run("install", bad, "--bundles", edge)
    assert r.exit_code == 1 and "model.onnx.data" in r.stderr and "SHA-256" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.output
    assert visible(edge) == [] and leftovers(edge) == []


@pytest.mark.parametrize("where", ["middle", "inside-the-last-member"])
def test_truncated_archive_is_refused(archives, edge, tmp_path, where):
    data = archives["unsigned"].read_bytes()
    offset, size = member_offset(archives["unsigned"], "model.onnx.data")  # the last member
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 if where == "middle" else offset + size - 100])
    r = run("verify", cut)
    assert r.exit_code == 1
    assert "FAIL  archive" in r.output and ("truncated" in r.output or "missing" in r.output), r.output
    with pytest.raises(ArchiveError, match="truncated|missing"):
        install(cut, edge)
    assert visible(edge) == [] and leftovers(edge) == []


def _tar_from(bundle: Path, path: Path, *, skip: tuple[str, ...] = (), extra=None, prefix: str | None = None) -> Path:
    """A tar of ``bundle`` (members ``<version>/<rel>``) plus whatever ``extra(tf, version)`` adds."""
    version = prefix or bundle.name
    with tarfile.open(path, "w") as tf:
        for p in sorted(bundle.rglob("*")):
            rel = p.relative_to(bundle).as_posix()
            if p.is_file() and rel not in skip:
                tf.add(p, f"{version}/{rel}")
        if extra:
            extra(tf, version)
    return path


def _file(tf: tarfile.TarFile, name: str, data: bytes = b"evil\n", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data) if info.isreg() else None)


UNSAFE = {
    "dotdot": (lambda tf, v: _file(tf, f"{v}/../evil.txt"), "'..' path parts"),
    "dotdot-deep": (lambda tf, v: _file(tf, f"{v}/golden/../../evil.txt"), "'..' path parts"),
    "absolute": (lambda tf, v: _file(tf, "/tmp/m2fp-delivery-evil.txt"), "absolute"),
    "outside": (lambda tf, v: _file(tf, "elsewhere/evil.txt"), "not under a <version>/ directory"),
    "symlink": (lambda tf, v: _file(tf, f"{v}/link", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
                "symbolic link"),
    "hardlink": (lambda tf, v: _file(tf, f"{v}/hard", b"", type=tarfile.LNKTYPE, linkname=f"{v}/config.json"),
                 "hard link"),
    "device": (lambda tf, v: _file(tf, f"{v}/null", b"", type=tarfile.CHRTYPE, devmajor=1, devminor=3), "device"),
    "fifo": (lambda tf, v: _file(tf, f"{v}/pipe", b"", type=tarfile.FIFOTYPE), "FIFO"),
    "unlisted": (lambda tf, v: _file(tf, f"{v}/stray.txt"), "not listed in manifest.json"),
    "duplicate": (lambda tf, v: _file(tf, f"{v}/config.json", b"{}"), "appears twice"),
    "two-versions": (lambda tf, v: _file(tf, "v9.9/manifest.json", b"{}"), "several versions"),
}


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_unsafe_archive_members_are_refused_before_anything_is_written(build_root, tmp_path, kind):
    add, message = UNSAFE[kind]
    bad = _tar_from(build_root / "m2fp" / "v1.0", tmp_path / "bad.tar", extra=add)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError, match=message.replace("(", r"\(").replace(".", r"\.")):
        unpack(bad, out)
    assert list(out.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/m2fp-delivery-evil.txt").exists()


def test_oversize_member_is_refused_from_its_header(build_root, tmp_path):
    bundle = build_root / "m2fp" / "v1.0"
    data = (bundle / "model.onnx.data").read_bytes()
    bad = _tar_from(bundle, tmp_path / "big.tar", skip=("model.onnx.data",),
                    extra=lambda tf, v: _file(tf, f"{v}/model.onnx.data", data + b"\0" * 4096))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError, match=r"model\.onnx\.data: \d+ bytes in the archive, manifest\.json says"):
        unpack(bad, out)
    assert list(out.iterdir()) == []


def test_archive_without_manifest_is_refused(build_root, tmp_path, edge):
    bad = _tar_from(build_root / "m2fp" / "v1.0", tmp_path / "nomanifest.tar", skip=("manifest.json",))
    r = run("install", bad, "--bundles", edge)
    assert r.exit_code == 1 and "no manifest.json inside" in r.stderr
    assert visible(edge) == [] and leftovers(edge) == []


def test_dotdot_archive_through_the_cli(build_root, tmp_path, edge):
    bad = _tar_from(build_root / "m2fp" / "v1.0", tmp_path / "dd.tar", extra=UNSAFE["dotdot"][0])
    r = run("verify", bad)
    assert r.exit_code == 1 and "FAIL  archive" in r.output and "'..'" in r.output
    r = run("install", bad, "--bundles", edge)
    assert r.exit_code == 1 and "'..'" in r.stderr
    assert visible(edge) == [] and leftovers(edge) == [] and not (edge / "m2fp" / "evil.txt").exists()


def test_wrong_signature_is_refused(archives, keys, edge, monkeypatch):
    r = run("verify", archives["signed"], "--public-key", keys["other_public"])
    assert r.exit_code == 1
    assert "FAIL  signature  wrong signature: signed by key" in r.output
    writes = []
    real = archive_mod.write_all
    monkeypatch.setattr(archive_mod, "write_all", lambda fd, data: (writes.append(len(data)), real(fd, data)))
    r = run("install", archives["signed"], "--bundles", edge, "--public-key", keys["other_public"])
    assert r.exit_code == 1 and "signature" in r.stderr
    assert writes == []  # refused on the archive's own manifest, before any file was extracted
    assert visible(edge) == [] and leftovers(edge) == []


def test_manifest_edited_after_signing_is_refused(own_root, keys):
    bundle = own_root / "m2fp" / "v1.0"
    sign(bundle, keys["private"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")  # same content
    reader.inspect(bundle)  # the hashes still match …
    with pytest.raises(SignatureError, match="changed after signing"):  # … but the signed bytes changed
        reader.inspect(bundle, TrustPolicy.from_keys(keys["public"]))
    assert not verify(bundle, TrustPolicy.from_keys(keys["public"])).ok


def test_a_second_trusted_key_is_accepted(archives, keys):
    report = verify(archives["signed"], TrustPolicy.from_keys([keys["other_public"], keys["public"]]))
    assert report.ok, report.render()


def test_missing_signature_is_refused_when_a_public_key_is_configured(archives, keys, edge):
    r = run("verify", archives["unsigned"], "--public-key", keys["public"])
    assert r.exit_code == 1 and "FAIL  signature  unsigned: manifest.sig is missing" in r.output
    # the edge box's configuration: the key in the environment
    r = run("install", archives["unsigned"], "--bundles", edge, env={"M2FP_PUBLIC_KEY": str(keys["public"])})
    assert r.exit_code == 1 and "unsigned" in r.stderr
    assert visible(edge) == [] and leftovers(edge) == []
    with pytest.raises(VerificationFailed, match="unsigned") as info:
        install(archives["unsigned"], edge, trust=TrustPolicy.from_keys(keys["public"]))
    assert [(c.name, c.status) for c in info.value.report.checks] == [("archive", "skip"), ("signature", "FAIL")]
    assert visible(edge) == [] and leftovers(edge) == []


def test_missing_key_files_give_one_line(archives, build_root, tmp_path, edge):
    for args in (("verify", archives["signed"], "--public-key", tmp_path / "nope.pub"),
                 ("install", archives["signed"], "--bundles", edge, "--public-key", tmp_path / "nope.pub"),
                 ("sign", build_root / "m2fp" / "v1.0", "--private-key", tmp_path / "nope.key")):
        r = run(*args)
        assert r.exit_code == 1, args
        assert r.stderr.count("\n") == 1 and "nope." in r.stderr and "not found" in r.stderr, r.stderr
        assert "Traceback" not in r.output
    assert visible(edge) == []
    assert not (build_root / "m2fp" / "v1.0" / "manifest.sig").exists()


def test_a_key_file_that_is_not_a_key(archives, tmp_path):
    junk = tmp_path / "junk.pub"
    junk.write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    r = run("verify", archives["signed"], "--public-key", junk)
    assert r.exit_code == 1 and "not a PEM public key" in r.stderr


def test_disk_full_during_unpack_leaves_nothing(archives, edge, monkeypatch):
    written = {"n": 0}
    real = archive_mod.write_all

    def full_disk(fd: int, data) -> None:
        if written["n"] + len(data) > 1_500_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written["n"] += len(data)
        real(fd, data)

    monkeypatch.setattr(archive_mod, "write_all", full_disk)
    with pytest.raises(OSError) as info:
        install(archives["unsigned"], edge)
    assert info.value.errno == errno.ENOSPC
    assert written["n"] > 0  # it failed mid-unpack, not before
    assert visible(edge) == [] and leftovers(edge) == []
    r = run("install", archives["unsigned"], "--bundles", edge)
    assert r.exit_code == 1 and "No space left on device" in r.stderr and "Traceback" not in r.output
    assert visible(edge) == [] and leftovers(edge) == []
    monkeypatch.setattr(archive_mod, "write_all", real)
    assert install(archives["unsigned"], edge).version == "v1.0"  # and nothing blocks a retry


def test_concurrent_installs_of_one_version_one_wins(archives, edge, monkeypatch):
    """Both installs unpack and verify, then race at the publishing rename: exactly one wins."""
    barrier = threading.Barrier(2, timeout=120)
    real = BundleStore.publish

    def publish_together(store, *args, **kwargs):
        barrier.wait()
        return real(store, *args, **kwargs)

    monkeypatch.setattr(BundleStore, "publish", publish_together)
    results: list[object] = []

    def one() -> None:
        try:
            results.append(install(archives["signed"], edge))
        except Exception as exc:  # collected and checked below
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    wins = [r for r in results if isinstance(r, install_mod.Installed)]
    losses = [r for r in results if isinstance(r, Exception)]
    assert len(wins) == 1 and len(losses) == 1, results
    assert isinstance(losses[0], VersionExists) and "meanwhile" in str(losses[0])
    assert visible(edge) == ["v1.1"] and leftovers(edge) == []
    assert verify(edge / "m2fp" / "v1.1").ok


def test_concurrent_install_processes(archives, edge):
    procs = [subprocess.Popen([str(M2FP_BUNDLE), "install", str(archives["unsigned"]), "--bundles", str(edge)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    loser_err = next(err for p, (_, err) in zip(procs, outs) if p.returncode == 1)
    assert "already installed" in loser_err or "meanwhile" in loser_err
    assert "Traceback" not in loser_err
    assert visible(edge) == ["v1.0"] and leftovers(edge) == []
    assert verify(edge / "m2fp" / "v1.0").ok


def test_install_refuses_an_existing_version_unless_forced(build_root, archives, edge, tmp_path):
    install(archives["unsigned"], edge)
    r = run("install", archives["unsigned"], "--bundles", edge)
    assert r.exit_code == 1 and "already installed" in r.stderr
    # a rebuilt v1.0 (other notes) replaces it only with --force
    other = tmp_path / "other"
    clone_bundle(build_root / "m2fp" / "v1.0", other, "v1.0", notes="rebuilt")
    rebuilt = pack(other / "m2fp" / "v1.0", tmp_path / "rebuilt.tar").path
    r = run("install", rebuilt, "--bundles", edge, "--force")
    assert r.exit_code == 0 and "replaced the previous copy" in r.output
    assert json.loads((edge / "m2fp" / "v1.0" / "config.json").read_text())["notes"] == "rebuilt"
    assert visible(edge) == ["v1.0"] and leftovers(edge) == []


def test_graph_config_disagreement_is_refused(own_root, edge):
    root = own_root
    corrupt(root / "m2fp" / "v1.0", "graph-version")  # manifest regenerated: only the graph check sees it
    r = run("verify", root / "m2fp" / "v1.0")
    assert r.exit_code == 1 and "FAIL  graph" in r.output and "m2fp.version" in r.output
    with pytest.raises(VerificationFailed, match="graph"):
        install(root / "m2fp" / "v1.0", edge)
    assert visible(edge) == [] and leftovers(edge) == []


# ------------------------------------------------------------------------- list, promote, rm
def test_list_shows_channel_task_aliases_and_signatures(archives, keys, edge):
    install(archives["unsigned"], edge)
    install(archives["signed"], edge)
    promote(edge, "v1.1", "latest")
    r = run("list", "--bundles", edge)
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].split() == ["VERSION", "CHANNEL", "TASK", "ALIASES", "SIGNED", "SIZE", "PROBLEM"]
    assert lines[1].split()[:5] == ["v1.0", "stable", "multi-human", "-", "no"]
    assert lines[2].split()[:5] == ["v1.1", "stable", "multi-human", "latest", "yes"]
    rows = {row["version"]: row for row in list_versions(edge, TrustPolicy.from_keys(keys["other_public"]))}
    assert rows["v1.1"]["signed"] == "WRONG" and rows["v1.0"]["signed"] == "no"
    r = run("list", "--bundles", edge, "--public-key", keys["public"], "--json")
    rows = {row["version"]: row for row in json.loads(r.output)}
    assert rows["v1.1"]["signed"] == "verified"
    for version, length in (("v1.1", 64 + 1 + 16), ("v1.0", 64)):  # manifest SHA-256 (+ "-" signature digest)
        assert rows[version]["identity"] == reader.identity_of(edge / "m2fp" / version)
        assert len(rows[version]["identity"]) == length


def test_promote_moves_aliases_atomically_and_refuses_unverified_versions(archives, build_root, edge, tmp_path):
    install(archives["unsigned"], edge)
    r = run("promote", "v1.0", "--alias", "stable", "--bundles", edge)
    assert r.exit_code == 0 and "stable → v1.0" in r.output
    assert json.loads((edge / "m2fp" / "aliases.json").read_text()) == {"stable": "v1.0"}
    # a damaged version cannot become an alias target
    install(archives["signed"], edge)
    corrupt(edge / "m2fp" / "v1.1", "flip-byte")
    r = run("promote", "v1.1", "--alias", "stable", "--bundles", edge)
    assert r.exit_code == 1 and "does not verify" in r.stderr and "stable not moved" in r.stderr
    assert json.loads((edge / "m2fp" / "aliases.json").read_text()) == {"stable": "v1.0"}
    for bad in ("auto", "v1.0", "Latest"):
        r = run("promote", "v1.0", "--alias", bad, "--bundles", edge)
        assert r.exit_code == 1 and "not an alias name" in r.stderr
    r = run("promote", "v7.0", "--alias", "stable", "--bundles", edge)
    assert r.exit_code == 1 and "not installed" in r.stderr
    assert not list((edge / "m2fp").glob(".aliases.json.*"))


def test_promote_requires_a_signature_when_a_key_is_configured(archives, keys, edge):
    install(archives["unsigned"], edge)
    r = run("promote", "v1.0", "--alias", "latest", "--bundles", edge, "--public-key", keys["public"])
    assert r.exit_code == 1 and "unsigned" in r.stderr
    assert not (edge / "m2fp" / "aliases.json").exists()


def test_rm_refuses_a_routed_or_aliased_version_unless_forced(archives, edge, tmp_path):
    install(archives["unsigned"], edge)
    install(archives["signed"], edge)
    routes = tmp_path / "routes.toml"
    routes.write_text('[weights]\n"v1.0" = 90\n"v1.1" = 10\n[aliases]\nstable = "v1.0"\n')
    r = run("rm", "v1.1", "--bundles", edge, "--routes", routes)
    assert r.exit_code == 1 and "still in use" in r.stderr and "routes.toml → weights" in r.stderr
    routes.write_text('[weights]\n"v1.0" = 100\n[shadow]\nversion = "v1.1"\nfraction = 0.1\n')
    r = run("rm", "v1.1", "--bundles", edge, "--routes", routes)
    assert r.exit_code == 1 and "shadow" in r.stderr
    routes.write_text('[weights]\n"v1.0" = 100\n')
    promote(edge, "v1.1", "canary")
    r = run("rm", "v1.1", "--bundles", edge, "--routes", routes)
    assert r.exit_code == 1 and "aliases.json → canary" in r.stderr
    assert visible(edge) == ["v1.0", "v1.1"]
    r = run("rm", "v1.1", "--bundles", edge, "--routes", routes, "--force")
    assert r.exit_code == 0 and "removed v1.1" in r.output
    assert visible(edge) == ["v1.0"] and leftovers(edge) == []
    assert "canary" not in json.loads((edge / "m2fp" / "aliases.json").read_text())  # no dangling alias
    # the routes file names v1.0: refused, also via the environment
    r = run("rm", "v1.0", "--bundles", edge, env={"M2FP_ROUTES": str(routes)})
    assert r.exit_code == 1 and "weights" in r.stderr
    # JSON routes files too
    routes_json = tmp_path / "routes.json"
    routes_json.write_text(json.dumps({"weights": {}, "aliases": {"stable": "v1.0"}}))
    with pytest.raises(VersionInUse, match="aliases → stable"):
        remove(edge, "v1.0", routes_file=routes_json)
    r = run("rm", "v9.0", "--bundles", edge)
    assert r.exit_code == 1 and "not installed" in r.stderr


def test_rm_with_an_unreadable_routes_file_refuses(archives, edge, tmp_path):
    install(archives["unsigned"], edge)
    routes = tmp_path / "routes.toml"
    routes.write_text("[weights\n")
    r = run("rm", "v1.0", "--bundles", edge, "--routes", routes)
    assert r.exit_code == 1 and "cannot tell which versions it uses" in r.stderr
    r = run("rm", "v1.0", "--bundles", edge, "--routes", tmp_path / "missing.toml")
    assert r.exit_code == 1 and "not found" in r.stderr
    assert visible(edge) == ["v1.0"]


def test_keygen_refuses_to_overwrite_and_protects_the_private_key(tmp_path):
    priv, pub = tmp_path / "k.key", tmp_path / "k.pub"
    r = run("keygen", "--private-key", priv, "--public-key", pub)
    assert r.exit_code == 0 and "key " in r.output
    assert (priv.stat().st_mode & 0o777) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    before = priv.read_bytes()
    r = run("keygen", "--private-key", priv, "--public-key", pub)
    assert r.exit_code == 1 and "not overwritten" in r.stderr
    assert priv.read_bytes() == before
    assert run("keygen", "--private-key", priv, "--public-key", pub, "--force").exit_code == 0
    assert priv.read_bytes() != before


def test_signature_file_format(own_root, keys):
    bundle = own_root / "m2fp" / "v1.0"
    sign(bundle, keys["private"])
    sig = json.loads((bundle / "manifest.sig").read_text())
    assert sig["algorithm"] == "ed25519" and len(sig["key_id"]) == 16
    import base64

    assert len(base64.b64decode(sig["signature"])) == 64
    assert not [p for p in bundle.parent.iterdir() if p.name.endswith(".tmp")]
    reader.inspect(bundle)  # manifest.sig is a side file, not an unlisted one


def test_errors_are_one_line_without_traceback_from_the_installed_script(tmp_path):
    r = subprocess.run([str(M2FP_BUNDLE), "verify", str(tmp_path / "missing.tar")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == f"Error: {tmp_path / 'missing.tar'}: no such file or directory"


def test_delivery_modules_do_not_import_torch():
    code = ("import sys; import m2fpkit.runtime.delivery.cli, m2fpkit.runtime.delivery.install, "
            "m2fpkit.runtime.delivery.pull, m2fpkit.runtime.bundle.signature, m2fpkit.runtime.lkg, "
            "m2fpkit.server.distribution; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

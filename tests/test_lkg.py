"""The last-known-good record on its own: atomic write, round trip, tolerant load, intact check.

Where the record is kept (a writable state directory, or off with a reason) is the registry's
``recovery`` module, tested at the end of this file and in ``test_readonly_root.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from m2fpkit.runtime import lkg
from m2fpkit.runtime.bundle.reader import identity_of
from m2fpkit.runtime.bundle.store import BundleStore
from m2fpkit.runtime.registry.recovery import LastKnownGoodKeeper, place


def manifest_bytes(content: bytes = b"x") -> bytes:
    """A well-formed manifest listing one file (``identity_of`` parses it; it checks no file)."""
    entry = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    return json.dumps({"algorithm": "sha256", "files": {"model.onnx": entry}}).encode() + b"\n"


def fake_bundle(store: Path, version: str, manifest: bytes | None = None) -> str:
    """A version directory holding only a manifest; returns its content key (unsigned: the manifest's SHA-256)."""
    manifest = manifest_bytes() if manifest is None else manifest
    (store / version).mkdir(parents=True)
    (store / version / "manifest.json").write_bytes(manifest)
    return hashlib.sha256(manifest).hexdigest()


def test_round_trip(tmp_path):
    store = tmp_path / "m2fp"
    versions = {"v1.0": fake_bundle(store, "v1.0"), "v1.2": fake_bundle(store, "v1.2", manifest_bytes(b"y"))}
    routes = {"weights": {"v1.2": 90.0, "v1.0": 10.0}, "aliases": {"stable": "v1.0"}, "shadow": None}
    lkg.record(store, versions, {"latest": "v1.2", "stable": "v1.0"}, routes)
    state = lkg.load(store)
    assert state is not None
    assert state.versions == versions
    assert state.aliases == {"latest": "v1.2", "stable": "v1.0"}
    assert state.routes == routes
    assert state.recorded_at.endswith("Z")
    raw = json.loads((store / ".lkg.json").read_text())
    assert raw["schema"] == 1 and list(raw) == sorted(raw)  # sorted keys
    assert [p.name for p in store.iterdir() if p.name.startswith(".")] == [".lkg.json"]  # no temp file left


def test_the_content_key_of_an_unsigned_bundle_is_the_hash_of_its_manifest_bytes(tmp_path):
    raw = manifest_bytes(b"exact bytes")
    digest = fake_bundle(tmp_path, "v1.0", raw)
    assert identity_of(tmp_path / "v1.0") == digest == hashlib.sha256(raw).hexdigest()
    (tmp_path / "v1.0" / "manifest.sig").write_bytes(b"signature bytes")  # signed: the signature's digest joins
    assert identity_of(tmp_path / "v1.0") == f"{digest}-{hashlib.sha256(b'signature bytes').hexdigest()[:16]}"


def test_record_replaces_the_previous_state(tmp_path):
    store = tmp_path / "m2fp"
    a = fake_bundle(store, "v1.0")
    lkg.record(store, {"v1.0": a}, {}, {})
    b = fake_bundle(store, "v1.2", manifest_bytes(b"y"))
    lkg.record(store, {"v1.2": b}, {"latest": "v1.2"}, {"weights": {"v1.2": 1}})
    state = lkg.load(store)
    assert state.versions == {"v1.2": b} and state.aliases == {"latest": "v1.2"}


def test_a_failed_write_keeps_the_previous_record(tmp_path, monkeypatch):
    store = tmp_path / "m2fp"
    a = fake_bundle(store, "v1.0")
    lkg.record(store, {"v1.0": a}, {}, {})
    before = (store / ".lkg.json").read_bytes()

    def no_space(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lkg.os, "write", no_space)
    with pytest.raises(OSError):
        lkg.record(store, {"v1.0": a}, {"latest": "v1.0"}, {})
    monkeypatch.undo()
    assert (store / ".lkg.json").read_bytes() == before
    assert sorted(p.name for p in store.iterdir() if p.name.startswith(".")) == [".lkg.json"]


def test_intact_names_what_changed(tmp_path):
    store = tmp_path / "m2fp"
    versions = {"v1.0": fake_bundle(store, "v1.0"), "v1.1": fake_bundle(store, "v1.1"),
                "v1.2": fake_bundle(store, "v1.2")}
    lkg.record(store, versions, {}, {})
    (store / "v1.1" / "manifest.json").write_bytes(manifest_bytes(b"changed"))
    (store / "v1.2" / "manifest.json").unlink()
    (store / "v1.2").rmdir()
    assert lkg.load(store).intact(store) == {"v1.0": None, "v1.1": "content changed since it was recorded",
                                             "v1.2": "missing"}


def test_no_record_is_none(tmp_path):
    assert lkg.load(tmp_path) is None
    assert lkg.load(tmp_path / "does-not-exist") is None


@pytest.mark.parametrize("content", [
    "{not json",
    "[]",
    '{"schema": 2, "versions": {}}',
    '{"schema": 1, "versions": {"../etc": "' + "0" * 64 + '"}}',
    '{"schema": 1, "versions": {"v1.0": "short"}}',
    '{"schema": 1, "versions": {}, "aliases": {"latest": "../v1.0"}}',
    '{"schema": 1, "versions": {}, "routes": []}',
])
def test_damaged_records_are_ignored_with_a_warning(tmp_path, caplog, content):
    (tmp_path / ".lkg.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="m2fpkit.runtime.lkg"):
        assert lkg.load(tmp_path) is None
    assert any(".lkg.json ignored" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("versions, aliases, routes", [
    ({"latest": "0" * 64}, {}, {}),          # an alias is not a version
    ({"v1.0": "xyz"}, {}, {}),               # not a SHA-256
    ({}, {"v1.0": "v1.0"}, {}),              # a version is not an alias name
    ({}, {"latest": "nope"}, {}),            # alias target not a version
    ({}, {}, ["not", "a", "table"]),
])
def test_record_refuses_malformed_input(tmp_path, versions, aliases, routes):
    with pytest.raises(ValueError):
        lkg.record(tmp_path, versions, aliases, routes)
    assert not (tmp_path / ".lkg.json").exists()


def test_record_creates_the_state_directory(tmp_path):
    state = tmp_path / "new" / "state"
    lkg.record(state, {}, {}, {})
    assert lkg.load(state).versions == {}
    assert os.stat(state / ".lkg.json").st_size > 0


# ------------------------------------------------------------------------------------ where it is kept
def test_the_record_goes_to_the_state_dir_when_one_is_given(tmp_path):
    store = BundleStore(tmp_path / "bundles")
    (tmp_path / "bundles").mkdir()
    assert place(store, tmp_path / "state" / "m2fp") == (tmp_path / "state" / "m2fp", None)
    assert (tmp_path / "state" / "m2fp").is_dir()  # created: it is not the bundle root
    assert not store.dir.exists()


def test_without_a_state_dir_the_record_goes_to_the_store_directory(tmp_path):
    root = tmp_path / "bundles"
    root.mkdir()
    store = BundleStore(root)
    # no m2fp/ yet: it will be the store directory, but nothing is created to find that out
    assert place(store, None) == (store.dir, None)
    assert list(root.iterdir()) == []
    store.dir.mkdir()
    assert place(store, None) == (store.dir, None)


def test_no_writable_place_turns_it_off_once_with_the_reason(tmp_path, monkeypatch, caplog):
    """Read-only simulated with ``os.access`` (the real read-only mount is ``test_readonly_root.py``)."""
    from m2fpkit.runtime.registry import recovery

    root = tmp_path / "bundles"
    (root / "m2fp").mkdir(parents=True)
    monkeypatch.setattr(recovery.os, "access", lambda path, mode: not str(path).startswith(str(root)))
    keeper = LastKnownGoodKeeper(BundleStore(root))
    with caplog.at_level(logging.INFO, logger="m2fpkit.runtime.registry.recovery"):
        assert keeper.open() is None
        for _ in range(3):
            keeper.record({"v1.0": "0" * 64}, {}, {})
    assert keeper.status.startswith("off: the bundle store ") and "read-only" in keeper.status
    assert "--state-dir" in keeper.status
    (message,) = [r.getMessage() for r in caplog.records]  # once, and the log (not the status) names the path
    assert message.startswith(f"last-known-good off (store {root / 'm2fp'}") and message.endswith(keeper.status[5:])
    assert not (root / "m2fp" / ".lkg.json").exists()


def test_a_failed_write_turns_it_off_once(tmp_path, monkeypatch, caplog):
    store = BundleStore(tmp_path / "bundles")
    store.dir.mkdir(parents=True)
    keeper = LastKnownGoodKeeper(store)
    keeper.open()
    assert keeper.status == "on"
    keeper.record({"v1.0": "0" * 64}, {"latest": "v1.0"}, {})
    assert lkg.load(store.dir).versions == {"v1.0": "0" * 64}

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lkg, "write_atomic", no_space)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="m2fpkit.runtime.registry.recovery"):
        for _ in range(3):
            keeper.record({"v1.0": "1" * 64}, {}, {})
    assert keeper.status == "off: the record cannot be written (No space left on device)"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert (len(warnings) == 1 and warnings[0].startswith("last-known-good off: cannot write ")
            and "No space left" in warnings[0])
    assert lkg.load(store.dir).versions == {"v1.0": "0" * 64}  # the previous record stays

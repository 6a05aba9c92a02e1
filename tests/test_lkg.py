"""The last-known-good record on its own: atomic write, round trip, tolerant load, intact check."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from m2fpkit.runtime import lkg


def fake_bundle(store: Path, version: str, manifest: bytes = b'{"algorithm": "sha256", "files": {}}\n') -> str:
    (store / version).mkdir(parents=True)
    (store / version / "manifest.json").write_bytes(manifest)
    return hashlib.sha256(manifest).hexdigest()


def test_round_trip(tmp_path):
    store = tmp_path / "m2fp"
    versions = {"v1.0": fake_bundle(store, "v1.0"), "v1.2": fake_bundle(store, "v1.2", b"{}\n")}
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


def test_manifest_sha256_is_the_hash_of_the_manifest_bytes(tmp_path):
    digest = fake_bundle(tmp_path, "v1.0", b"exact bytes")
    assert lkg.manifest_sha256(tmp_path / "v1.0") == digest == hashlib.sha256(b"exact bytes").hexdigest()


def test_record_replaces_the_previous_state(tmp_path):
    store = tmp_path / "m2fp"
    a = fake_bundle(store, "v1.0")
    lkg.record(store, {"v1.0": a}, {}, {})
    b = fake_bundle(store, "v1.2", b"{}\n")
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
    (store / "v1.1" / "manifest.json").write_bytes(b'{"changed": true}\n')
    (store / "v1.2" / "manifest.json").unlink()
    (store / "v1.2").rmdir()
    assert lkg.load(store).intact(store) == {"v1.0": None, "v1.1": "manifest changed since it was recorded",
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


def test_record_creates_the_store_directory(tmp_path):
    store = tmp_path / "new" / "m2fp"
    lkg.record(store, {}, {}, {})
    assert lkg.load(store).versions == {}
    assert os.stat(store / ".lkg.json").st_size > 0

"""With trusted keys configured, nothing of an unverified bundle is shown or served as if valid.

Fault reproduced (outside audit on 8793463): with ``--public-key``, an unsigned or tampered bundle's
``config.json`` was listed by ``/api/versions`` and served by ``/api/{v}/meta`` before anything loaded
it (the signature was only checked at load). Now discovery applies the registry's trust policy: such
a version is ``failed`` with the reason, its config is never read into the registry.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from m2fpkit.runtime.bundle.signature import TrustPolicy
from m2fpkit.runtime.bundle.signing import keygen, sign
from m2fpkit.runtime.errors import VersionUnavailable
from m2fpkit.runtime.registry import Registry, RegistryOptions
from reference.bundles import clone_bundle, edit_config


@pytest.fixture
def signed_store(fast_multi_src: Path, tmp_path: Path) -> tuple[Path, TrustPolicy]:
    keygen(tmp_path / "k.key", tmp_path / "k.pub")
    root = tmp_path / "bundles"
    sign(clone_bundle(fast_multi_src, root, "v1.0"), tmp_path / "k.key")
    clone_bundle(fast_multi_src, root, "v2.0", notes="unsigned")

    def tamper(stage: Path) -> None:
        sign(stage, tmp_path / "k.key")
        edit_config(stage, lambda raw: raw.update(notes="tampered after signing"))  # manifest re-sealed, unsigned

    clone_bundle(fast_multi_src, root, "v3.0", then=tamper)
    return root, TrustPolicy.from_keys([tmp_path / "k.pub"])


async def test_unverified_bundles_are_failed_at_discovery_and_never_described(signed_store):
    root, trust = signed_store
    registry = Registry(root, RegistryOptions(trust=trust, watch=False, idle_ttl=0, warmup=False))
    await registry.start()
    try:
        assert registry.config("v1.0") is not None and registry.is_ready("v1.0")
        for version, why in (("v2.0", "unsigned"), ("v3.0", "wrong signature")):
            assert registry.config(version) is None, f"{version}'s config was read into the registry"
            with pytest.raises(VersionUnavailable, match=why):
                registry.resolve(version)
        assert registry.latest() == "v1.0", "latest never points at an unverified bundle"
        text = repr(registry.status())
        assert "unsigned" in text and "tampered" not in text, "an unverified config leaked into the status"
    finally:
        await registry.close()


async def test_without_keys_the_same_bundles_are_served(signed_store):
    root, _ = signed_store
    registry = Registry(root, RegistryOptions(watch=False, idle_ttl=0, warmup=False))
    await registry.start()
    try:
        assert all(registry.config(v) is not None for v in ("v1.0", "v2.0", "v3.0"))
        assert registry.latest() == "v3.0"
    finally:
        await registry.close()

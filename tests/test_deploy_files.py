"""deploy/ checked without a cluster or a Docker engine.

- Every Kubernetes manifest under ``deploy/k8s/`` against the API schemas ``kubernetes-validate`` ships
  (strict: an unknown field is an error), the compose file against the vendored compose-spec schema.
- Cross-references a schema cannot see: kustomization ⇄ files, volumes, Secrets/ConfigMaps and their
  keys (defined in a manifest, or created by a ``kubectl create`` command in ``deploy/README.md``),
  port names, selectors, one image name and tag everywhere, one bundle claim for the Job and the
  Deployment, the public key inside its mount, the Job pulling every version the routes name.
- ``.dockerignore`` through the Docker SDK's own matcher: nothing the Dockerfile copies is left out,
  the environments, caches and data are, and the build context stays small.
- The bundle-pull Job's command, run as written (its env, its mounts mapped to temporary
  directories) against a central ``m2fp-serve --distribution-token`` on loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from docker.utils.build import PatternMatcher

from m2fpkit.runtime.bundle.signing import keygen, sign
from m2fpkit.runtime.delivery.install import verify
from m2fpkit.runtime.routes_file import loads_routes
from reference.bundles import clone_bundle, corrupt
from server_fixtures import ServerProcess

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_SCHEMA = DEPLOY / "schemas" / "compose-spec.json"
DOCKERFILE = DEPLOY / "Dockerfile"
#: the oldest Kubernetes release the manifests are meant for, and the newest the validator ships
K8S_VERSIONS = ("1.30.0", "1.37.0")
IMAGE_NAME = "m2fp-serve"
TOKEN = "pull-token-789"
FAST = {"short_edge": 160}


# ------------------------------------------------------------------------------------- loading
def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) for every document of every manifest."""
    out = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def objects(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for _, o in k8s_objects() if o["kind"] == kind}


def one(kind: str) -> dict[str, Any]:
    found = objects(kind)
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {sorted(found)}"
    return next(iter(found.values()))


def ours(obj: dict[str, Any]) -> bool:
    """The server's objects and their helpers (not, say, a monitoring stack beside them)."""
    labels = obj["metadata"].get("labels", {})
    return labels.get("app.kubernetes.io/name") == "m2fp" or labels.get("app.kubernetes.io/part-of") == "m2fp"


def pod_specs() -> dict[str, dict[str, Any]]:
    """``Kind/name`` → pod spec of every workload of ours."""
    return {f"{o['kind']}/{o['metadata']['name']}": o["spec"]["template"]["spec"]
            for _, o in k8s_objects() if o["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet") and ours(o)}


def job_container() -> dict[str, Any]:
    [container] = one("Job")["spec"]["template"]["spec"]["containers"]
    return container


def job_setting(name: str) -> list[str]:
    """A space-separated setting of the bundle-pull Job (M2FP_PULL_VERSIONS, M2FP_PULL_ALIASES)."""
    return env_of(job_container())[name]["value"].split()


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def readme_creates() -> dict[tuple[str, str], set[str]]:
    """(kind, name) → keys for every ``kubectl create secret generic|configmap`` in deploy/README.md."""
    created: dict[tuple[str, str], set[str]] = {}
    text = (DEPLOY / "README.md").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        m = re.search(r"kubectl create (secret generic|configmap) (.*)$", line)
        if not m:
            continue
        words = shlex.split(m[2].split("#")[0])
        kind = "Secret" if m[1].startswith("secret") else "ConfigMap"
        keys = set()
        for w in words[1:]:
            source = re.match(r"--from-(literal|file)=(.*)$", w)
            if source and source[1] == "literal":
                keys.add(source[2].split("=", 1)[0])
            elif source:  # --from-file=KEY=PATH, or --from-file=PATH (key = the file name)
                keys.add(source[2].split("=", 1)[0] if "=" in source[2] else Path(source[2]).name)
        created[(kind, words[0])] = keys
    return created


# ------------------------------------------------------------------------------------- schemas
def test_kustomization_lists_every_manifest_and_nothing_else():
    listed = [r.split("#")[0].strip() for r in kustomization()["resources"]]
    assert sorted(listed) == [p.name for p in manifest_files()]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes_in_strict_mode(path: Path, version: str):
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("mutate", [
    lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolcy="Always"),
    lambda d: d["spec"].update(replicas="two"),
], ids=["unknown field", "wrong type"])
def test_the_kubernetes_validator_refuses_a_broken_deployment(mutate):
    doc = yaml.safe_load((K8S / "deployment.yaml").read_text())
    mutate(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def compose_validator() -> jsonschema.Draft7Validator:
    schema = yaml.safe_load(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())


def test_compose_file_matches_the_compose_spec_schema():
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_validator().iter_errors(compose())]
    assert errors == []


@pytest.mark.parametrize("mutate", [
    lambda d: d["services"]["m2fp"].update(stop_grace="30s"),
    lambda d: d["services"]["nginx"].update(ports="8080:80"),
    lambda d: d["services"]["nginx"]["depends_on"]["m2fp"].update(condition="service_ready"),
], ids=["unknown key", "string for a list", "unknown condition"])
def test_the_compose_schema_refuses_a_broken_file(mutate):
    doc = compose()
    mutate(doc)
    assert list(compose_validator().iter_errors(doc))


def test_the_vendored_compose_schema_is_the_copy_its_readme_records():
    notes = (DEPLOY / "schemas" / "README.md").read_text()
    digest = hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest()
    assert f"sha256 {digest}" in notes
    assert "Apache License" in (DEPLOY / "schemas" / "compose-spec.LICENSE").read_text()


# ------------------------------------------------------------------------------ cross-references
@pytest.mark.parametrize("workload", sorted(pod_specs()))
def test_pods_mount_exactly_the_volumes_they_declare(workload: str):
    spec = pod_specs()[workload]
    declared = [v["name"] for v in spec.get("volumes", [])]
    assert len(declared) == len(set(declared)), f"{workload}: a volume is declared twice"
    mounted = {m["name"] for c in containers(spec) for m in c.get("volumeMounts", [])}
    assert mounted == set(declared), f"{workload}: mounted {sorted(mounted)}, declared {sorted(declared)}"


def test_every_secret_and_configmap_a_pod_uses_exists_with_its_keys():
    defined = {("ConfigMap", n): set(o.get("data", {})) | set(o.get("binaryData", {}))
               for n, o in objects("ConfigMap").items()}
    defined |= {("Secret", n): set(o.get("data", {})) | set(o.get("stringData", {}))
                for n, o in objects("Secret").items()}
    created = readme_creates()
    assert not set(created) & set(defined), "created by the README and also defined in a manifest"
    known = defined | created
    used: list[tuple[str, str, str | None, str]] = []  # kind, name, key, where
    for workload, spec in pod_specs().items():
        for v in spec.get("volumes", []):
            for kind, field in (("ConfigMap", "configMap"), ("Secret", "secret")):
                if field in v:
                    ref = v[field]
                    name = ref.get("name") or ref.get("secretName")
                    items = [i["key"] for i in ref.get("items", [])] or [None]
                    used += [(kind, name, key, f"{workload} volume {v['name']}") for key in items]
        for c in containers(spec):
            for e in c.get("env", []):
                src = e.get("valueFrom", {})
                for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if field in src:
                        used.append((kind, src[field]["name"], src[field]["key"], f"{workload} env {e['name']}"))
    assert used
    for kind, name, key, where in used:
        assert (kind, name) in known, f"{where}: {kind} {name} is neither in deploy/k8s nor created in deploy/README.md"
        assert key is None or key in known[(kind, name)], f"{where}: {kind} {name} has no key {key}"


def test_probe_and_service_ports_name_a_container_port():
    spec = one("Deployment")["spec"]["template"]["spec"]
    names = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
    for c in spec["containers"]:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in c:
                assert c[probe]["httpGet"]["port"] in names, f"{probe} port"
    for name, svc in objects("Service").items():
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, f"Service {name} targets port {port['targetPort']}"


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_pick_the_serving_pods_and_never_the_pull_job():
    deployment = one("Deployment")
    serving = deployment["spec"]["template"]["metadata"]["labels"]
    job_pods = one("Job")["spec"]["template"]["metadata"]["labels"]
    selectors = {"Deployment": deployment["spec"]["selector"]["matchLabels"],
                 "PodDisruptionBudget": one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]}
    selectors |= {f"Service {n}": s["spec"]["selector"] for n, s in objects("Service").items()}
    for who, selector in selectors.items():
        assert matches(selector, serving), f"{who} does not select the Deployment's pods"
        assert not matches(selector, job_pods), f"{who} selects the bundle-pull Job's pods"
    target = one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_one_image_name_and_tag_everywhere():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    image = f"{IMAGE_NAME}:{version}"
    for workload, spec in pod_specs().items():
        for c in containers(spec):
            assert c["image"] == image, f"{workload} container {c['name']}"
            assert c["imagePullPolicy"] == "IfNotPresent", f"{workload}: a versioned tag is pulled once per node"
    [entry] = [i for i in kustomization()["images"] if i["name"] == IMAGE_NAME]
    assert entry["newTag"] == version and entry["newName"].endswith(f"/{IMAGE_NAME}")
    server = compose()["x-server"]
    assert server["image"] == image
    assert (COMPOSE.parent / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert f"-t {image} " in DOCKERFILE.read_text()


def bundle_mount(workload: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, mount) of the pod's PersistentVolumeClaim."""
    spec = pod_specs()[workload]
    [volume] = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    [mount] = [m for c in spec["containers"] for m in c.get("volumeMounts", []) if m["name"] == volume["name"]]
    return volume, mount


def test_the_job_writes_and_the_deployment_reads_the_same_claim():
    [claim] = objects("PersistentVolumeClaim").values()
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    job = f"Job/{one('Job')['metadata']['name']}"
    deployment = f"Deployment/{one('Deployment')['metadata']['name']}"
    (jv, jm), (dv, dm) = bundle_mount(job), bundle_mount(deployment)
    claims = {jv["persistentVolumeClaim"]["claimName"], dv["persistentVolumeClaim"]["claimName"]}
    assert claims == {claim["metadata"]["name"]}, f"claims used {sorted(claims)}, defined {claim['metadata']['name']}"
    assert dv["persistentVolumeClaim"].get("readOnly") is True and dm.get("readOnly") is True, \
        "the serving pods must mount the bundle volume read-only"
    assert not jv["persistentVolumeClaim"].get("readOnly") and not jm.get("readOnly"), "the Job writes the volume"
    dockerfile_root = re.search(r"M2FP_BUNDLES=(\S+)", DOCKERFILE.read_text())[1]
    assert jm["mountPath"] == dm["mountPath"] == dockerfile_root
    [pull] = pod_specs()[job]["containers"]
    assert env_of(pull)["M2FP_BUNDLES"]["value"] == dockerfile_root


def test_the_first_apply_step_selects_the_claim_and_the_pull_job():
    """deploy/README.md applies ``-l app.kubernetes.io/component=bundles`` first, then waits for the Job."""
    readme = (DEPLOY / "README.md").read_text()
    selector = re.search(r"kubectl apply -k deploy/k8s -l (\S+)=(\S+)", readme)
    assert selector
    picked = {o["kind"] for _, o in k8s_objects() if o["metadata"].get("labels", {}).get(selector[1]) == selector[2]}
    assert picked == {"PersistentVolumeClaim", "Job"}
    assert f"kubectl wait --for=condition=complete job/{one('Job')['metadata']['name']}" in readme


@pytest.mark.parametrize("workload", sorted(pod_specs()))
def test_the_trusted_public_key_is_a_file_the_pod_mounts(workload: str):
    spec = pod_specs()[workload]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"]:
        key_path = Path(env_of(c)["M2FP_PUBLIC_KEY"]["value"])
        mounts = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == key_path.parent]
        assert len(mounts) == 1, f"{workload}: nothing (or several volumes) mounted at {key_path.parent}"
        source = volumes[mounts[0]["name"]]["configMap"]["name"]
        keys = readme_creates().get(("ConfigMap", source), set())
        assert key_path.name in keys, f"{workload}: the README's ConfigMap {source} has keys {sorted(keys)}"


def test_the_job_pulls_every_version_the_servers_routes_name():
    spec = one("Deployment")["spec"]["template"]["spec"]
    [server] = spec["containers"]
    routes_path = Path(server["args"][server["args"].index("--routes") + 1])
    [mount] = [m for m in server["volumeMounts"] if Path(m["mountPath"]) == routes_path.parent]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    routes_map = objects("ConfigMap")[volume["configMap"]["name"]]
    routes = loads_routes(routes_map["data"][routes_path.name], "toml", f"ConfigMap → {routes_path.name}")
    named = routes.weighted_versions() | set(routes.aliases.values())
    named |= {routes.shadow.version} if routes.shadow else set()
    pulled = set(job_setting("M2FP_PULL_VERSIONS"))
    assert named and named <= pulled, f"routed but never pulled: {sorted(named - pulled)}"
    promoted = dict(pair.split("=", 1) for pair in job_setting("M2FP_PULL_ALIASES"))
    assert set(promoted.values()) <= pulled


def test_compose_references_resolve():
    doc = compose()
    declared = set(doc.get("volumes", {}))
    for name, service in doc["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                if source != "./in":  # the bundle-admin input folder, made by whoever uses it
                    assert (COMPOSE.parent / source).exists(), f"{name}: bind source {source}"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
        for dep in service.get("depends_on", {}):
            assert dep in doc["services"], f"{name} depends on {dep}"


# ---------------------------------------------------------------------------------- .dockerignore
def dockerignore() -> PatternMatcher:
    """The patterns as `docker build` reads them (comments and blank lines dropped)."""
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    return PatternMatcher([ln for ln in lines if ln and not ln.startswith("#")])


def copy_sources() -> list[str]:
    """The build-context paths of the Dockerfile's COPY instructions (not ``COPY --from``)."""
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += [w.rstrip("/") for w in words[1:-1] if not w.startswith("--")]
    return sources


def tracked(path: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--", path], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_dockerignore_keeps_every_file_the_dockerfile_copies():
    pm = dockerignore()
    sources = copy_sources()
    assert {"pyproject.toml", "README.md", "runtime", "server"} <= set(sources)
    for source in sources:
        files = tracked(source)
        assert files, f"COPY {source}: no such file in the repository"
        left_out = [f for f in files if pm.matches(f)]
        assert left_out == [], f"COPY {source}: .dockerignore leaves out {left_out[:5]}"


@pytest.mark.parametrize("path", [
    ".venv/lib/python3.11/site-packages/torch/__init__.py", "build/lib/m2fpkit/__init__.py",
    "m2fpkit.egg-info/PKG-INFO", "runtime/__pycache__/errors.cpython-311.pyc", "server/bundle/x.pyc",
    ".git/HEAD", ".pytest_cache/v/cache/nodeids", ".mypy_cache/3.11/x.json", ".ruff_cache/0.17.6/1",
    ".hypothesis/examples/x", "bundles/m2fp/v1.2/model.onnx", "benchmarks/.cache/r101/model.onnx",
    "benchmarks/results/tmp/run.json", "model.onnx", "model.onnx.data",
    "m2fp-v1.2.tar", "m2fp-signing.key", "deploy/in/m2fp-signing.key", "deploy/in/m2fp-v1.2.tar", ".env",
])
def test_dockerignore_leaves_out_environments_caches_data_and_keys(path: str):
    assert dockerignore().matches(path)


@pytest.mark.parametrize("path", ["export/build.py", "runtime/bundle/store.py", "server/static/index.html",
                                  "tests/reference/bundles.py", "deploy/Dockerfile", "m2fp-signing.pub"])
def test_dockerignore_keeps_source_files_whatever_their_name(path: str):
    assert not dockerignore().matches(path)


def context_files(root: Path) -> Iterator[Path]:
    for rel in dockerignore().walk(str(root)):
        p = root / rel
        if p.is_file() and not p.is_symlink():
            yield p


def test_the_build_context_of_this_checkout_is_small():
    files = list(context_files(REPO))
    assert not [f for f in files if f.relative_to(REPO).parts[0] in (".venv", ".git", "bundles")]
    size = sum(f.stat().st_size for f in files)
    assert size < 64 * 2**20, f"build context {size / 2**20:.0f} MB"


# ---------------------------------------------------------------------------- the pull Job, run
@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("deploy_keys")
    keygen(d / "trusted.key", d / "trusted.pub")
    keygen(d / "other.key", d / "other.pub")
    return {"private": d / "trusted.key", "public": d / "trusted.pub", "other": d / "other.pub"}


@pytest.fixture(scope="module")
def central(ms_multi, keys, tmp_path_factory):
    """The central server with every version the Job pulls, signed with the trusted key."""
    root = tmp_path_factory.mktemp("deploy_central") / "bundles"
    for version in job_setting("M2FP_PULL_VERSIONS"):
        sign(clone_bundle(ms_multi.bundle_dir, root, version, preprocess=FAST), keys["private"])
    with ServerProcess(root, root.parent / "central.log", "--distribution-token", TOKEN, "--idle-ttl", "0") as server:
        yield server


def run_job(tmp: Path, central_url: str, public_key: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """The Job's container command with its env; its mounts become folders under ``tmp``, its
    Secret ``m2fp-pull`` the central server's URL and token, the trust ConfigMap ``public_key``."""
    job = one("Job")
    spec = job["spec"]["template"]["spec"]
    [c] = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {}
    for m in c["volumeMounts"]:
        local = tmp / m["name"]
        local.mkdir(parents=True, exist_ok=True)
        if "configMap" in volumes[m["name"]]:
            (local / Path(env_of(c)["M2FP_PUBLIC_KEY"]["value"]).name).write_bytes(public_key.read_bytes())
        mounts[m["mountPath"]] = local
    secrets = {("m2fp-pull", "url"): central_url, ("m2fp-pull", "token"): TOKEN}
    env = {k: v for k, v in os.environ.items() if not k.startswith("M2FP_")}
    env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp),
            "TMPDIR": str(mounts.get("/tmp", tmp))}
    for name, e in env_of(c).items():
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            env[name] = secrets[(ref["name"], ref["key"])]
            continue
        value = e["value"]
        inside = [m for m in mounts if value == m or value.startswith(m + "/")]
        if inside:  # a path in a mount: the same path in its folder
            mount_path = max(inside, key=len)
            value = str(mounts[mount_path]) + value[len(mount_path):]
        env[name] = value
    done = subprocess.run(c["command"] + c["args"], env=env, capture_output=True, text=True, timeout=900)
    bundles = mounts[bundle_mount(f"Job/{job['metadata']['name']}")[1]["mountPath"]]
    return done, bundles


def installed(bundles: Path) -> list[str]:
    root = bundles / "m2fp"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_the_pull_job_fills_an_empty_volume_and_a_second_run_changes_nothing(central, keys, tmp_path):
    versions = job_setting("M2FP_PULL_VERSIONS")
    done, bundles = run_job(tmp_path, central.url, keys["public"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(installed(bundles)) == {"aliases.json", *versions}
    aliases = json.loads((bundles / "m2fp" / "aliases.json").read_text())
    assert dict(pair.split("=", 1) for pair in job_setting("M2FP_PULL_ALIASES")).items() <= aliases.items()
    for version in versions:
        assert verify(bundles / "m2fp" / version).ok
        assert f"pulled {version} " in done.stdout

    before = {p: p.stat().st_mtime_ns for p in (bundles / "m2fp").rglob("*") if ".downloads" not in p.parts}
    again, _ = run_job(tmp_path, central.url, keys["public"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "pulled" not in again.stdout
    assert again.stdout.count("is installed and verifies; nothing to do") == len(versions)
    after = {p: p.stat().st_mtime_ns for p in (bundles / "m2fp").rglob("*") if ".downloads" not in p.parts}
    assert {p: t for p, t in after.items() if p.name != "aliases.json"} == \
        {p: t for p, t in before.items() if p.name != "aliases.json"}


def test_the_pull_job_replaces_a_version_that_no_longer_verifies(central, keys, tmp_path):
    damaged, *intact = job_setting("M2FP_PULL_VERSIONS")
    first, bundles = run_job(tmp_path, central.url, keys["public"])
    assert first.returncode == 0, first.stdout + first.stderr
    corrupt(bundles / "m2fp" / damaged, "flip-byte")
    assert not verify(bundles / "m2fp" / damaged).ok
    done, _ = run_job(tmp_path, central.url, keys["public"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{damaged} is installed but does not verify; pulling it again" in done.stdout
    assert f"pulled {damaged} " in done.stdout
    for version in intact:
        assert f"{version} is installed and verifies; nothing to do" in done.stdout
    assert verify(bundles / "m2fp" / damaged).ok


def test_the_pull_job_refuses_bundles_signed_with_another_key(central, keys, tmp_path):
    done, bundles = run_job(tmp_path, central.url, keys["other"])
    assert done.returncode == 1
    refused = job_setting("M2FP_PULL_VERSIONS") + job_setting("M2FP_PULL_ALIASES")
    assert f"m2fp-bundle-pull: failed: {' '.join(refused)}" in done.stderr
    assert "signature" in done.stderr
    assert installed(bundles) == []

"""Open Inference Protocol v2 on a real ``m2fp-serve`` process, driven by the unmodified ``tritonclient[http]``.

One server over a copy of the demo root (v1.0 stable, v1.1 single-human, v1.2 latest, v2.0-beta API 2.0),
with a routes file (v1.0 and v1.2 weighted 50/50, alias ``canary`` → v1.2), an admin token and a 1 MB body
cap. Every answer is checked against what ``/api/{v}/parse`` says for the same image on the same server.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import SAMPLES, ServerProcess, copy_root, decode_png_b64, png_bytes  # noqa: E402

TOKEN = "oip-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ROUTES = '[weights]\n"v1.0" = 50\n"v1.2" = 50\n\n[aliases]\ncanary = "v1.2"\n'
MODEL = "m2fp"


@pytest.fixture(scope="module")
def server(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("oip")
    root = copy_root(demo_root, work / "bundles")
    routes = work / "routes.toml"
    routes.write_text(ROUTES)
    proc = ServerProcess(root, work / "server.log", "--routes", str(routes), "--admin-token", TOKEN,
                         "--max-body-mb", "1")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    c = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)
    yield c
    c.close()


IMAGES = {"generated.png": png_bytes(160, 120), "two_people.jpg": (SAMPLES / "two_people.jpg").read_bytes()}


def image_input(image: bytes, binary: bool) -> triton.InferInput:
    """The image as one BYTES element: raw in binary mode, its base64 text in JSON mode."""
    inp = triton.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([image if binary else base64.b64encode(image)], dtype=object),
                            binary_data=binary)
    return inp


def infer(client: triton.InferenceServerClient, image: bytes, version: str = "", binary: bool = True,
          outputs: tuple[str, ...] = (), **kwargs) -> triton.InferResult:
    requested = [triton.InferRequestedOutput(n, binary_data=binary) for n in outputs] or None
    return client.infer(MODEL, [image_input(image, binary)], model_version=version, outputs=requested, **kwargs)


def http(server: ServerProcess, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(server.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def api_parse(server: ServerProcess, version: str, image: bytes, headers: dict[str, str] | None = None) -> dict:
    status, hdrs, body = http(server, "POST", f"/api/{version}/parse?include=label_map,person_map,persons"
                                              "&visualization=0", image,
                              {"Content-Type": "application/octet-stream", **(headers or {})})
    assert status == 200, body
    out = json.loads(body)
    assert out["version"] == hdrs["X-Model-Version"]
    return out


def oip_error(status: int, body: bytes, code: str) -> str:
    """The protocol's error body: ``{"error": <reason>, "code", "request_id"}``; returns the reason."""
    doc = json.loads(body)
    assert isinstance(doc["error"], str) and doc["error"], doc
    assert doc["code"] == code and doc["request_id"], (status, doc)
    return doc["error"]


def raises(status: int, fn, *args, **kwargs) -> str:
    with pytest.raises(InferenceServerException) as exc:
        fn(*args, **kwargs)
    assert exc.value.status() == str(status), exc.value
    return exc.value.message()


# ---------------------------------------------------------------------------------- metadata
def test_server_is_live_ready_and_lists_its_extensions(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "m2fp-serve" and meta["version"]
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])


def test_model_metadata_lists_versions_inputs_and_outputs(client):
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["versions"] == ["v1.0", "v1.1", "v1.2", "v2.0-beta"]
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [1]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "label_map": ("INT32", [-1, -1]), "person_map": ("INT32", [-1, -1]), "instances": ("BYTES", [1])}
    # a version, an alias and latest resolve as /api/{v}/parse resolves them
    assert client.get_model_metadata(MODEL, "latest")["versions"] == ["v1.2"]
    assert client.get_model_metadata(MODEL, "stable")["versions"] == ["v1.0"]
    assert client.get_model_metadata(MODEL, "canary")["versions"] == ["v1.2"]
    single = client.get_model_metadata(MODEL, "v1.1")
    assert single["versions"] == ["v1.1"] and [o["name"] for o in single["outputs"]] == ["label_map", "instances"]


def test_model_ready_per_version(client):
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "v1.2") and client.is_model_ready(MODEL, "latest")
    assert client.is_model_ready(MODEL, "stable")  # routed and aliased versions are kept loaded
    assert not client.is_model_ready(MODEL, "v9.9")
    assert not client.is_model_ready("other")


# ------------------------------------------------------------------------------------- infer
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("version", ["v1.2", "latest", "stable", "canary", "v1.1"])
def test_infer_equals_api_parse_pixel_for_pixel(server, client, version: str, binary: bool):
    for name, image in IMAGES.items():
        api = api_parse(server, version, image)
        # binary: no outputs named (tritonclient then asks for all, as binary data); JSON: each one named
        produced = ("label_map", "person_map", "instances") if api["task"] == "multi-human" \
            else ("label_map", "instances")
        result = infer(client, image, version, binary=binary, outputs=() if binary else produced)
        response = result.get_response()
        assert response["model_name"] == MODEL and response["model_version"] == api["version"], name
        label_map = result.as_numpy("label_map")
        expected = decode_png_b64(api["label_map"])
        assert label_map.dtype == np.int32 and label_map.shape == (api["image"]["height"], api["image"]["width"])
        assert np.array_equal(label_map, expected), f"{version} {name}: label maps differ"
        names = {o["name"] for o in response["outputs"]}
        if api["task"] == "multi-human":
            assert np.array_equal(result.as_numpy("person_map"), decode_png_b64(api["person_map"])), name
        else:
            assert "person_map" not in names and "person_map" not in api
        if binary:  # binary_data_size on every output, nothing inline
            assert all("data" not in o and o["parameters"]["binary_data_size"] > 0 for o in response["outputs"])
        else:
            assert all("data" in o and "parameters" not in o for o in response["outputs"])
        instances = result.as_numpy("instances")
        assert instances.shape == (1,)
        summary = json.loads(instances[0])
        assert summary["version"] == api["version"] and summary["task"] == api["task"]
        assert (summary["labels"], summary["scores"]) == (api["labels"], api["scores"])
        assert summary["classes_present"] == api["classes_present"]
        assert [(p["id"], p["score"]) for p in summary["persons"]] == [(p["id"], p["score"]) for p in api["persons"]]


def test_infer_returns_only_the_outputs_asked_for(client):
    result = infer(client, IMAGES["generated.png"], "v1.2", binary=False, outputs=("label_map",))
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["label_map"]
    assert response["outputs"][0]["shape"] == [120, 160] and len(response["outputs"][0]["data"]) == 120 * 160
    # mixed: one output inline, one binary, the response says which
    outs = [triton.InferRequestedOutput("label_map", binary_data=True),
            triton.InferRequestedOutput("instances", binary_data=False)]
    mixed = client.infer(MODEL, [image_input(IMAGES["generated.png"], True)], model_version="v1.2", outputs=outs)
    by_name = {o["name"]: o for o in mixed.get_response()["outputs"]}
    assert "binary_data_size" in by_name["label_map"]["parameters"] and "data" in by_name["instances"]
    assert json.loads(mixed.as_numpy("instances")[0])["version"] == "v1.2"
    # a single-human version has no person map: asked for, it is left out (its metadata does not list it)
    single = infer(client, IMAGES["generated.png"], "v1.1", outputs=("person_map", "label_map"))
    assert [o["name"] for o in single.get_response()["outputs"]] == ["label_map"]
    assert single.as_numpy("person_map") is None and single.as_numpy("label_map").shape == (120, 160)


def test_infer_without_a_version_routes_like_auto_and_sticks(server, client):
    """No version: weighted sticky routing on the ``route_key`` parameter, else the route key header."""
    image = IMAGES["generated.png"]
    seen: dict[str, str] = {}
    for n in range(16):
        key = f"user-{n}"
        _, hdrs, _ = http(server, "POST", "/api/auto/parse?visualization=0", image,
                          {"Content-Type": "image/png", "X-Route-Key": key})
        by_param = infer(client, image, parameters={"route_key": key}, outputs=("instances",)).get_response()
        by_header = infer(client, image, headers={"X-Route-Key": key}, outputs=("instances",)).get_response()
        again = infer(client, image, parameters={"route_key": key}, outputs=("instances",)).get_response()
        assert by_param["model_version"] == by_header["model_version"] == again["model_version"] \
            == hdrs["X-Model-Version"], key
        assert by_param["parameters"]["route"] == "auto"
        seen[key] = by_param["model_version"]
    assert set(seen.values()) == {"v1.0", "v1.2"}, seen  # both weighted versions get users


def test_infer_respects_the_clients_api_version(server, client):
    """``X-API-Version`` chooses as on ``/api``: by name it reaches v2.0-beta (API 2.0); unversioned it is
    routed like ``/api/auto/parse`` (same version or same refusal)."""
    image, api2 = IMAGES["generated.png"], {"X-API-Version": "2.0"}
    response = infer(client, image, "v2.0-beta", headers=api2, outputs=("instances",)).get_response()
    assert response["model_version"] == "v2.0-beta"
    assert "v1.2" in raises(409, infer, client, image, "v1.2", headers=api2)
    status, hdrs, _ = http(server, "POST", "/api/auto/parse?visualization=0", image,
                           {"Content-Type": "image/png", **api2})
    if status == 200:
        assert infer(client, image, headers=api2).get_response()["model_version"] == hdrs["X-Model-Version"]
    else:
        raises(status, infer, client, image, headers=api2)


def test_infer_counts_in_the_same_metrics(server, client):
    def requests() -> float:
        _, _, text = http(server, "GET", "/metrics")
        for fam in text_string_to_metric_families(text.decode()):
            for s in fam.samples:
                if s.name == "m2fp_requests_total" and s.labels == {"version": "v1.2", "rule": "exact",
                                                                    "status": "200"}:
                    return s.value
        return 0.0

    before = requests()
    for _ in range(2):
        infer(client, IMAGES["generated.png"], "v1.2", outputs=("instances",))
    assert requests() == before + 2


# ------------------------------------------------------------------------------------ errors
def test_errors_use_the_servers_mapping_in_the_protocols_shape(server, client):
    image = IMAGES["generated.png"]
    assert "v9.9" in raises(404, infer, client, image, "v9.9")
    assert "Bad_Name" in raises(400, infer, client, image, "Bad_Name")
    for bad in (b"certainly not an image", b"", png_bytes(160, 120)[:60]):  # as /api/{v}/parse answers them
        status, _, body = http(server, "POST", "/api/v1.2/parse", bad, {"Content-Type": "application/octet-stream"})
        assert 400 <= status < 500
        assert raises(status, infer, client, bad, "v1.2") == json.loads(body)["detail"]
    assert "other" in raises(404, client.infer, "other", [image_input(image, True)])
    assert "other" in raises(404, client.get_model_metadata, "other")

    status, _, body = http(server, "GET", "/v2/models/other")
    assert status == 404 and "other" in oip_error(status, body, "unknown_model")
    status, hdrs, body = http(server, "GET", "/v2/models/m2fp/infer")
    assert status == 405 and "POST" in hdrs["Allow"]
    oip_error(status, body, "method_not_allowed")
    status, _, body = http(server, "POST", "/v2/models/m2fp/versions/v1.2/infer", b'{"inputs": []}',
                           {"Content-Type": "application/json"})
    assert status == 400 and "one input" in oip_error(status, body, "bad_infer_request")
    status, _, body = http(server, "POST", "/v2/models/m2fp/versions/v1.2/infer", b"{}",
                           {"Inference-Header-Content-Length": "12x"})
    assert status == 400 and "Inference-Header-Content-Length" in oip_error(status, body, "bad_infer_request")
    # the intake's size cap (--max-body-mb 1) holds for the protocol's bodies too
    big = np.random.default_rng(0).integers(0, 256, 1_200_000, dtype=np.uint8).tobytes()
    status, _, body = http(server, "POST", "/v2/models/m2fp/versions/v1.2/infer", big,
                           {"Inference-Header-Content-Length": "10"})
    assert status == 413
    oip_error(status, body, "body_too_large")
    status, _, body = http(server, "GET", "/v2/no/such/route")
    assert status == 404
    oip_error(status, body, "not_found")


def test_json_output_too_large_is_refused_before_inference_naming_binary_data(client):
    """A flat 2100x2100 PNG (a few KB): its label map as JSON could take 17.6 MB, over the default 16 MB cap."""
    ok, png = cv2.imencode(".png", np.full((2100, 2100, 3), 128, np.uint8))
    message = raises(413, infer, client, png.tobytes(), "v1.2", binary=False, outputs=("label_map",))
    assert "--max-json-output-mb" in message and "binary_data" in message, message


# -------------------------------------------------------------------------------- repository
def test_repository_extension_needs_the_admin_token(client):
    for call, args in ((client.get_model_repository_index, ()), (client.load_model, (MODEL,)),
                       (client.unload_model, (MODEL,))):
        raises(401, call, *args)
        raises(401, call, *args, headers={"Authorization": "Bearer wrong"})


def test_repository_index_load_and_unload_map_onto_the_registry(server, client):
    index = client.get_model_repository_index(headers=ADMIN)
    assert [(row["name"], row["version"]) for row in index] == [(MODEL, v) for v in
                                                                ("v1.0", "v1.1", "v1.2", "v2.0-beta")]
    states = {row["version"]: row["state"] for row in index}
    assert states["v1.2"] == states["v1.0"] == "READY"

    client.load_model(MODEL, headers=ADMIN, query_params={"version": "v1.1"})
    assert client.is_model_ready(MODEL, "v1.1")
    assert {r["version"] for r in client.get_model_repository_index(headers=ADMIN)
            if r["state"] == "READY"} >= {"v1.0", "v1.1", "v1.2"}
    client.unload_model(MODEL, headers=ADMIN, query_params={"version": "v1.1"})
    assert not client.is_model_ready(MODEL, "v1.1")
    status, _, body = http(server, "GET", "/v2/models/m2fp/versions/v1.1/ready")
    assert status == 409 and json.loads(body)["ready"] is False
    ready = http(server, "POST", "/v2/repository/index", b'{"ready": true}', ADMIN)
    assert "v1.1" not in {r["version"] for r in json.loads(ready[2])}

    # the version may also be named in the body's parameters; without one, `latest` loads
    status, _, body = http(server, "POST", "/v2/repository/models/m2fp/load",
                           b'{"parameters": {"version": "v2.0-beta"}}', ADMIN)
    assert status == 200 and json.loads(body)["version"] == "v2.0-beta"
    assert client.is_model_ready(MODEL, "v2.0-beta")
    client.load_model(MODEL, headers=ADMIN)
    # unload without a version: every loaded version the server does not keep loaded
    client.unload_model(MODEL, headers=ADMIN)
    assert not client.is_model_ready(MODEL, "v2.0-beta")
    assert client.is_model_ready(MODEL, "v1.2") and client.is_model_ready(MODEL, "v1.0")

    assert "v1.0" in raises(409, client.unload_model, MODEL, headers=ADMIN, query_params={"version": "stable"})
    assert client.is_model_ready(MODEL, "stable")
    raises(404, client.load_model, MODEL, headers=ADMIN, query_params={"version": "v9.9"})
    raises(404, client.load_model, "other", headers=ADMIN)
    status, _, body = http(server, "POST", "/v2/repository/index", b"[1, 2", ADMIN)
    assert status == 400
    oip_error(status, body, "bad_json")


def test_a_server_with_no_versions_and_no_admin_token(empty_root: Path, tmp_path: Path):
    proc = ServerProcess(empty_root, tmp_path / "server.log").start(until="/healthz")
    try:
        c = triton.InferenceServerClient(proc.url.removeprefix("http://"))
        try:
            assert c.is_server_live() and not c.is_server_ready()
            status, _, body = http(proc, "GET", "/v2/health/ready")  # the protocol's "false": a 4xx
            assert status == 409 and json.loads(body) == {"ready": False, "error": "no versions yet"}
            assert not c.is_model_ready(MODEL)
            assert "no versions yet" in raises(503, infer, c, IMAGES["generated.png"])
            assert "admin-token" in raises(404, c.get_model_repository_index, headers=ADMIN)
        finally:
            c.close()
    finally:
        proc.stop()


def test_the_readme_example_runs_as_written(server):
    """README's tritonclient example, copied and pasted, run from the repository root: only the address differs."""
    repo = Path(__file__).resolve().parent.parent
    readme = (repo / "README.md").read_text()
    section = readme.split("## Open Inference Protocol (Triton/KServe clients)", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "the README's OIP section has no python example"
    sample = re.search(r'open\("([^"]+)", "rb"\)', code.group(1))
    assert sample, "the README's OIP example reads no image file"
    img = cv2.imread(str(repo / sample.group(1)))
    assert img is not None, f"{sample.group(1)} (the README's example image) is not in the repository"
    script = code.group(1).replace("127.0.0.1:8080", server.url.removeprefix("http://"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = proc.stdout.splitlines()
    assert first.startswith(f"v1.2 {img.shape[:2]} ")
    assert second.split()[0] in ("v1.0", "v1.2") and second.split()[1] == "auto"

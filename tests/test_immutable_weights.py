"""What a loaded version computes with cannot be changed or taken away by editing its files.

Fault reproduced (outside audit on 8793463): truncating a loaded version's ``model.onnx.data`` in place
killed the server with SIGBUS on the next request (the weight pool shared a file mapping), and
rewriting it in place (``cp`` over it, ``rsync --inplace``) silently changed the served weights while
the version stayed ready — even with ``--public-key``. Now sessions are built only from verified bytes
copied into private memory; an in-place edit is noticed like any other change, verified like a new
bundle, and either swapped in or refused while the verified old content keeps answering.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from m2fpkit.runtime.bundle import reader
from m2fpkit.runtime.errors import IntegrityError
from m2fpkit.runtime.predictor import Predictor
from m2fpkit.runtime.session import RuntimeSettings, SessionFactory
from m2fpkit.runtime.weights import WeightPool
from reference.bundles import clone_bundle, edit_config, refresh_golden

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import ServerProcess, http_json, png_bytes  # noqa: E402

DATA = "model.onnx.data"


def factory() -> SessionFactory:
    return SessionFactory(RuntimeSettings(intra_op_threads=1), WeightPool())


def run(p: Predictor) -> np.ndarray:
    return p.run(np.random.default_rng(0).standard_normal((1, 3, 160, 224), dtype=np.float32))[0]


@pytest.fixture
def bundle(fast_multi_src: Path, tmp_path: Path) -> Path:
    return clone_bundle(fast_multi_src, tmp_path / "bundles", "v1.0")


@pytest.mark.parametrize("edit", ["truncate", "rewrite-in-place", "delete", "zero-length"])
def test_a_loaded_predictor_ignores_every_edit_of_its_files(bundle: Path, edit: str):
    p = Predictor.load(bundle, factory())
    try:
        before = run(p)
        data = bundle / DATA
        if edit == "truncate":
            os.truncate(data, data.stat().st_size // 3)
        elif edit == "rewrite-in-place":
            with open(data, "r+b") as f:  # same inode, other bytes: what `cp` over a file does
                f.write(os.urandom(data.stat().st_size))
        elif edit == "delete":
            for child in bundle.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            os.truncate(data, 0)
        np.testing.assert_array_equal(run(p), before)
        assert p.self_test() is not None  # the golden sample was kept in memory too
    finally:
        p.close()


def test_data_changed_between_verification_and_load_is_refused(bundle: Path):
    content = reader.load(bundle)
    with open(bundle / DATA, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    pool = WeightPool()
    with pytest.raises(IntegrityError, match=r"model\.onnx\.data: changed on disk while loading"):
        SessionFactory(RuntimeSettings(intra_op_threads=1), pool).create(content)
    assert pool.stats()["tensors"] == 0, "nothing of the refused content is kept"


def test_the_session_reads_no_file_of_the_bundle(bundle: Path, tmp_path: Path):
    """Built from bytes: with every file of the bundle gone after the read, the session still builds."""
    content = reader.load(bundle)
    tensors = list(content.tensors())  # the only read of the data file, hashed against the manifest
    assert tensors

    class Replayed(reader.BundleContent):
        def tensors(self):  # type: ignore[override]
            yield from tensors

    replay = Replayed(content.info, content.files)
    shutil.rmtree(bundle)
    p = Predictor.from_content(replay, factory())
    try:
        assert run(p).shape[1] == p.config.num_queries
    finally:
        p.close()


def _answer(body: dict) -> str:
    """What a parse computed: label map, labels and scores (random weights paint little, scores differ)."""
    img = cv2.imdecode(np.frombuffer(base64.b64decode(body["label_map"]), np.uint8), cv2.IMREAD_UNCHANGED)
    return hashlib.sha256(img.tobytes() + repr((body["labels"], body["scores"])).encode()).hexdigest()


def test_in_place_edits_under_load_never_crash_or_change_answers(fast_multi_src: Path, tmp_path: Path):
    """Truncate, then rewrite in place with other bytes, then copy a valid new bundle over the old one in
    place, under a steady stream of parses: the server stays up, answers 200 every time, and every
    answer is the verified old content's until the valid replacement is swapped in, then the new one's."""
    root = tmp_path / "bundles"
    v1 = clone_bundle(fast_multi_src, root, "v1.0")
    # the replacement, prepared aside: same version, no score thresholds, so its answers differ (random
    # weights score every instance low: the old content answers nothing, the new one lists instances)

    def no_thresholds(stage: Path) -> None:
        edit_config(stage, lambda raw: raw["postprocess"].update(human_score_threshold=0.0, part_score_threshold=0.0))
        refresh_golden(stage)

    new = clone_bundle(fast_multi_src, tmp_path / "aside", "v1.0", notes="new", then=no_thresholds)
    image = png_bytes(200, 150, seed=3)
    server = ServerProcess(root, tmp_path / "server.log", "--max-queue", "64").start()
    url = f"{server.url}/api/v1.0/parse?include=label_map&visualization=0"
    answers: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def post() -> tuple[int, dict]:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(url, data=image, headers={"Content-Type": "image/png"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                import json
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, {}

    def load_loop() -> None:
        while not stop.is_set():
            status, body = post()
            answers.append((time.monotonic(), status, _answer(body) if status == 200 else ""))

    try:
        status, body = post()
        assert status == 200
        old = _answer(body)
        worker = threading.Thread(target=load_loop)
        worker.start()

        def versions() -> dict:
            return {v["version"]: v for v in http_json(server.url + "/api/versions")[1]["versions"]}

        def wait(pred, what: str, timeout: float = 30.0) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if pred():
                    return
                time.sleep(0.1)
            raise AssertionError(f"timed out waiting for {what}\n{server.log_tail()}")

        data = v1 / DATA
        os.truncate(data, data.stat().st_size // 2)
        wait(lambda: versions()["v1.0"].get("update_error"), "the truncated content to be refused")
        n_truncated = len(answers)
        time.sleep(1.0)
        with open(data, "r+b") as f:  # back to full size, other bytes (rsync --inplace of a bad copy)
            f.write(os.urandom((new / DATA).stat().st_size))
        time.sleep(1.5)
        assert versions()["v1.0"]["state"] == "ready" and versions()["v1.0"]["update_error"]
        t_valid = time.monotonic()
        for name in ("model.onnx.data", "model.onnx", "weights.json", "golden/labels.png", "config.json",
                     "manifest.json"):  # `cp -r new/* v1.0/`: every file rewritten in place
            with open(v1 / name, "r+b") as dst:
                dst.write((new / name).read_bytes())
                dst.truncate()
        wait(lambda: versions()["v1.0"].get("notes") == "new" and not versions()["v1.0"].get("update_error"),
             "the valid in-place update to be swapped in")
        time.sleep(1.0)
        stop.set()
        worker.join(timeout=60)
        assert server.proc is not None and server.proc.poll() is None, "the server died"
    finally:
        stop.set()
        server.stop()
    assert len(answers) > n_truncated > 0
    statuses = {s for _, s, _ in answers}
    assert statuses == {200}, f"non-200 answers: {statuses}\n{server.log_tail()}"
    kinds = [lm for _, _, lm in answers]
    assert set(kinds) <= {old, kinds[-1]} and kinds[-1] != old, "only the old and the new content answered"
    first_new = kinds.index(kinds[-1])
    assert all(k == old for k in kinds[:first_new]) and all(k == kinds[-1] for k in kinds[first_new:])
    assert answers[first_new][0] >= t_valid, "new answers only after the valid content was written"

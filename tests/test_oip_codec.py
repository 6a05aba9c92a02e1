"""The Open Inference Protocol codec (``server/oip_codec.py``): untrusted bodies and ``Inference-Header-Content-Length``
values give a parsed request or a clean 400, never anything else; and what tritonclient's own code writes
and reads round-trips exactly (binary and JSON, any image bytes, non-uniform label maps in row-major order).
"""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2fpkit.server.errors import HTTPProblem
from m2fpkit.server.oip_codec import (
    MAX_HEADER_BYTES,
    InferRequest,
    RequestedOutput,
    Tensor,
    decode_request,
    encode_response,
    output_bound,
    pack_bytes,
    split_body,
    unpack_bytes,
)

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_or_400(body: bytes, header: str | None) -> InferRequest | None:
    """The codec's contract: an InferRequest, or an HTTPProblem with status 400 (None); anything else fails."""
    try:
        return decode_request(body, header)
    except HTTPProblem as exc:
        assert exc.status == 400 and exc.error == "bad_infer_request", (exc.status, exc.error)
        assert exc.detail and len(exc.detail) < 400
        return None


def request_body(image: bytes, binary: bool, **kwargs) -> tuple[bytes, str | None]:
    """The body tritonclient itself sends for one encoded image (its ``generate_request_body``)."""
    inp = triton.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([image if binary else base64.b64encode(image)], dtype=object),
                            binary_data=binary)
    body, json_size = triton.InferenceServerClient.generate_request_body([inp], **kwargs)
    return body, None if json_size is None else str(json_size)


# ------------------------------------------------------------------------------ untrusted input
@PROPS
@given(body=st.binary(max_size=512), header=st.one_of(st.none(), st.text(max_size=20),
                                                      st.integers(-5, 600).map(str)))
def test_any_body_and_header_is_a_request_or_a_400(body: bytes, header: str | None):
    decode_or_400(body, header)


_SCALAR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
_JSON = st.recursive(_SCALAR, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """Requests shaped like the real ones with one or more fields replaced, and binary data cut or padded."""
    image = draw(st.binary(max_size=64))
    element = pack_bytes(image)
    inp: dict = {"name": "image", "datatype": "BYTES", "shape": [1],
                 "parameters": {"binary_data_size": len(element)}}
    doc: dict = {"inputs": [inp], "parameters": {"binary_data_output": draw(st.booleans())},
                 "outputs": [{"name": "label_map", "parameters": {"binary_data": True}}]}
    holders = {"doc": doc, "inp": inp, "params": inp["parameters"], "outputs": doc["outputs"][0]}
    for _ in range(draw(st.integers(0, 3))):  # a replaced holder may be detached: its later edits are moot
        target = draw(st.sampled_from(["doc", "inp", "params", "outputs"]))
        key = draw(st.sampled_from(["name", "datatype", "shape", "parameters", "data", "inputs", "outputs",
                                    "binary_data_size", "binary_data_output", "route_key", "id", "binary_data"]))
        holders[target][key] = draw(_JSON)
    header = json.dumps(doc).encode()
    tail = draw(st.sampled_from(["exact", "cut", "pad", "lie"]))
    data = element if tail in ("exact", "lie") else element[:draw(st.integers(0, len(element)))] if tail == "cut" \
        else element + draw(st.binary(min_size=1, max_size=8))
    if tail == "lie":  # the element's own length prefix disagrees with its bytes
        data = struct.pack("<I", draw(st.integers(0, 2**32 - 1))) + data[4:]
    length = str(len(header) + draw(st.integers(-3, 3)) * draw(st.booleans()))
    return header + data, length


@PROPS
@given(near_valid())
def test_near_valid_requests_are_parsed_or_refused_cleanly(case: tuple[bytes, str | None]):
    body, header = case
    req = decode_or_400(body, header)
    if req is not None:  # what was accepted is consistent: the image is the bytes the body carries
        assert isinstance(req.image, bytes) and req.image in body


@PROPS
@given(image=st.binary(max_size=2048), binary=st.booleans(), route_key=st.text(min_size=1, max_size=40))
def test_tritonclients_requests_round_trip(image: bytes, binary: bool, route_key: str):
    body, header = request_body(image, binary, request_id="r-1", parameters={"route_key": route_key})
    req = decode_request(body, header)
    assert req.image == image and req.id == "r-1" and req.route_key == route_key
    assert req.binary_output is True and req.outputs == ()  # no outputs named: tritonclient asks for binary


def test_requested_outputs_keep_their_own_binary_flag():
    inp = triton.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"\x89PNG"], dtype=object))
    outs = [triton.InferRequestedOutput("label_map", binary_data=False), triton.InferRequestedOutput("instances")]
    body, size = triton.InferenceServerClient.generate_request_body([inp], outputs=outs)
    req = decode_request(body, str(size))
    assert req.outputs == (RequestedOutput("label_map", False), RequestedOutput("instances", True))
    assert req.image == b"\x89PNG"
    # one output named twice is answered once, as first asked
    twice = json.loads(body[:size])
    twice["outputs"].append({"name": "label_map", "parameters": {"binary_data": True}})
    again = decode_request(json.dumps(twice).encode() + body[size:], str(len(json.dumps(twice))))
    assert again.outputs == req.outputs
    assert decode_request(_JSON_IMAGE, None).image == b"\x00"


_JSON_IMAGE = b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]}'
_SIZED = b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]}'


@pytest.mark.parametrize("body, header, named", [
    (b'{"inputs": []}', None, "exactly one input"),
    (b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]}', None, "'image'"),
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}', None, "datatype"),
    (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["AA==", "AA=="]}]}', None,
     "shape"),
    (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]}', None, "base64"),
    (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}], "extra": 1}', None,
     "unknown key"),
    (b'{"inputs": 1}', "999", "999 bytes"),
    (b'{"inputs": 1}', "-1", "byte count"),
    (b"\xff\xfe", None, "not UTF-8"),
    (_SIZED + b"\x05\x00\x00\x00abc", str(len(_SIZED)), "9 bytes declared"),
    # null is a value, not an absent key
    (_JSON_IMAGE[:-1] + b', "parameters": {"route_key": null}}', None, "route_key"),
    (_JSON_IMAGE[:-1] + b', "parameters": {"binary_data_output": null}}', None, "binary_data_output"),
    (_JSON_IMAGE[:-1] + b', "outputs": null}', None, "outputs"),
    (_JSON_IMAGE[:-1] + b', "id": null}', None, "id"),
])
def test_refusals_name_the_problem(body: bytes, header: str | None, named: str):
    with pytest.raises(HTTPProblem) as exc:
        decode_request(body, header)
    assert exc.value.status == 400 and named in exc.value.detail, exc.value.detail


def test_split_and_bytes_elements():
    assert split_body(b"{}xyz", "2") == (b"{}", b"xyz")
    assert split_body(b"{}", None) == (b"{}", b"")
    assert unpack_bytes(pack_bytes(b"abc"), "t") == b"abc"
    with pytest.raises(HTTPProblem):
        unpack_bytes(pack_bytes(b"abc") + b"!", "t")  # shape [1]: one element, nothing after it


# -------------------------------------------------------------------------------------- output
@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), seed=st.integers(0, 2**16), binary=st.booleans(),
       text=st.text(max_size=30))
def test_responses_read_back_with_tritonclient(h: int, w: int, seed: int, binary: bool, text: str):
    """A non-uniform map comes back from tritonclient's own reader equal, in row-major [H, W] order."""
    labels = np.random.default_rng(seed).integers(0, 20, (h, w)).astype(np.uint8)
    tensors = [Tensor("label_map", "INT32", (h, w), labels.astype("<i4")),
               Tensor("instances", "BYTES", (1,), json.dumps({"t": text}).encode())]
    req = InferRequest(image=b"", id="abc", binary_output=binary)
    reply = encode_response(req, "v1.2", tensors, {"route": "exact"})
    body, header_length = b"".join(reply.chunks), reply.header_length
    assert (header_length is not None) == binary and len(body) == reply.size
    result = triton.InferenceServerClient.parse_response_body(body, header_length=header_length)
    got = result.as_numpy("label_map")
    assert got.shape == (h, w) and got.dtype == np.int32 and np.array_equal(got, labels)
    inst = result.as_numpy("instances")[0]
    assert json.loads(inst if isinstance(inst, (str, bytes)) else str(inst)) == {"t": text}
    response = result.get_response()
    assert response["model_name"] == "m2fp" and response["model_version"] == "v1.2" and response["id"] == "abc"


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 60), w=st.integers(1, 60), seed=st.integers(0, 2**16), binary=st.booleans(),
       name=st.sampled_from(["label_map", "person_map"]), extreme=st.booleans())
def test_an_outputs_size_is_within_its_bound_from_the_shape(h: int, w: int, seed: int, binary: bool, name: str,
                                                             extreme: bool):
    """What the caps are checked against before inference: exact for binary data, an upper bound for JSON
    (here with the largest ids a map can hold), and only the outputs asked for are in the body."""
    top = 255 if name == "label_map" else 65535
    rng = np.random.default_rng(seed)
    data = np.full((h, w), top) if extreme else rng.integers(0, top + 1, (h, w))
    req = InferRequest(image=b"", outputs=(RequestedOutput(name, binary),))
    tensors = [Tensor(n, "INT32", (h, w), data.astype("<i4")) for n in ("label_map", "person_map")]
    reply = encode_response(req, "v1.2", tensors, {})
    body = b"".join(reply.chunks)
    if binary:
        assert reply.header_length is not None
        assert reply.size - reply.header_length == output_bound(name, True, h * w)
    else:
        start = body.index(b'"data":[') + len(b'"data":[')
        assert body.index(b"]", start) - start <= output_bound(name, False, h * w)
    result = triton.InferenceServerClient.parse_response_body(b"".join(reply.chunks),
                                                              header_length=reply.header_length)
    assert [o["name"] for o in result.get_response()["outputs"]] == [name]
    assert np.array_equal(result.as_numpy(name), data)


def test_a_binary_requests_json_header_is_capped_and_a_json_only_request_is_not():
    image = b"\x89PNG" + bytes(MAX_HEADER_BYTES)
    body, size = request_body(image, binary=True)
    padded = body[:int(size) - 1] + b" " * MAX_HEADER_BYTES + body[int(size) - 1:]
    with pytest.raises(HTTPProblem) as exc:
        decode_request(padded, str(int(size) + MAX_HEADER_BYTES))
    assert exc.value.status == 413 and exc.value.error == "infer_header_too_large"
    assert str(MAX_HEADER_BYTES) in exc.value.detail
    body, size = request_body(image, binary=False)  # the image as base64 inside the JSON: > 64 KiB, accepted
    assert size is None and len(body) > MAX_HEADER_BYTES and decode_request(body, None).image == image

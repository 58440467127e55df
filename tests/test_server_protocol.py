"""vaelink.server without HTTP: query parsing as the endpoint runtime does it, the protocol's rules
(operation, scaling, output kinds) and the dynamic batcher."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import requests

from vaelink.cards import get_card
from vaelink.errors import QueueFullError, RejectedRequestError
from vaelink.server.batching import Batcher, Job
from vaelink.server.protocol import (
    Limits,
    decode_request,
    encode_request,
    encode_response,
    operation,
    parse_query,
)

SDXL = get_card("sdxl")
FLUX = get_card("flux1")


# -- query parsing ------------------------------------------------------------------------------


def test_parse_query_follows_the_endpoint_runtime():
    query = parse_query(
        "shape=1&shape=4&shape=8&shape=8&dtype=float16&partial_postprocess=True&do_scaling=false"
        "&scaling_factor=0.13025&height=1024&one=7&neg=-3&unicode=%C2%B2&empty="
    )
    assert query == {
        "shape": [1, 4, 8, 8],
        "dtype": "float16",
        "partial_postprocess": True,
        "do_scaling": False,
        "scaling_factor": "0.13025",  # floats stay strings
        "height": 1024,
        "one": 7,  # a one-element list arrives bare
        "neg": "-3",  # not isnumeric()
        "unicode": "²",  # isnumeric() but not an int
        "empty": "",
    }


def test_parse_query_reads_what_requests_sends():
    """The diffusers client encodes its parameters with `requests`: lists as repeated keys,
    booleans as True/False, floats with repr, None dropped."""
    params = {
        "image_format": "jpg",
        "output_type": "pt",
        "partial_postprocess": False,
        "shape": [1, 16, 4096],
        "dtype": "bfloat16",
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "height": 1024,
        "width": None,
    }
    url = requests.Request("POST", "http://x/", params=params).prepare().url
    query = parse_query(url.split("?", 1)[1])
    assert query["shape"] == [1, 16, 4096]
    assert query["partial_postprocess"] is False
    assert float(query["scaling_factor"]) == 0.3611
    assert query["height"] == 1024 and "width" not in query


@pytest.mark.parametrize(
    ("query", "content_type", "op"),
    [
        ({"output_type": "pt"}, None, "decode"),
        ({"shape": [1, 4, 8, 8], "dtype": "float16"}, "tensor/binary", "decode"),
        ({}, "tensor/binary; charset=x", "decode"),
        ({}, None, "encode"),  # diffusers' encode sends no Content-Type
        ({"shape": [1, 3, 64, 64], "dtype": "float32"}, None, "encode"),
        ({}, "image/png", "encode"),
    ],
)
def test_operation(query, content_type, op):
    assert operation(query, content_type) == op


# -- decode parameters ---------------------------------------------------------------------------

BASE = {"shape": [1, 4, 8, 8], "dtype": "float16"}


@pytest.mark.parametrize(
    ("extra", "accept", "output"),
    [
        ({"output_type": "pil"}, "image/jpeg", "jpeg"),
        ({"output_type": "pil", "image_format": "png"}, "image/png", "png"),
        ({"output_type": "pil"}, "image/webp", "webp"),
        ({"output_type": "pil", "image_format": "png"}, "*/*", "png"),  # Accept decides first
        ({"output_type": "pil"}, None, "jpeg"),
        ({"output_type": "pil"}, "tensor/binary", "unit"),  # the client holds a processor
        ({"output_type": "pt"}, "tensor/binary", "raw"),
        ({"output_type": "pt", "partial_postprocess": True}, "tensor/binary", "uint8"),
        ({}, "image/png", "png"),  # no output_type: Accept says
        ({}, None, "raw"),
    ],
)
def test_decode_output_kind(extra, accept, output):
    assert decode_request({**BASE, **extra}, accept, SDXL).output == output


@pytest.mark.parametrize(
    ("extra", "card", "expected"),
    [
        ({"scaling_factor": "0.13025"}, SDXL, (0.13025, 0.0)),
        ({"scaling_factor": "0.3611", "shift_factor": "0.1159"}, FLUX, (0.3611, 0.1159)),
        ({"scaling_factor": "0.5"}, FLUX, (0.5, 0.0)),  # what is not sent is not applied
        ({"shift_factor": "0.25", "do_scaling": True}, FLUX, (1.0, 0.25)),
        ({"scaling_factor": 2}, SDXL, (2.0, 0.0)),  # "2" arrives as an int
        ({"do_scaling": True}, FLUX, (0.3611, 0.1159)),  # deprecated: the model's own
        ({"do_scaling": False}, FLUX, (1.0, 0.0)),
        ({}, FLUX, (1.0, 0.0)),  # (open) nothing sent - the client's do_scaling=False: none
    ],
)
def test_decode_scaling_rules(extra, card, expected):
    req = decode_request({**BASE, "output_type": "pt", **extra}, None, card)
    assert (req.scaling.factor, req.scaling.shift) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, (1.0, 0.0)),  # (open) nothing sent: nothing applied, the raw posterior
        ({"scaling_factor": "0.3611", "shift_factor": "0.1159"}, (0.3611, 0.1159)),
        ({"do_scaling": True}, (0.3611, 0.1159)),
        ({"do_scaling": False}, (1.0, 0.0)),
    ],
)
def test_encode_scaling_rules(extra, expected):
    req = encode_request(extra, FLUX)
    assert (req.scaling.factor, req.scaling.shift) == pytest.approx(expected)


def test_encode_moments_are_never_scaled():
    query = {"moments": True, "scaling_factor": "0.3611", "shift_factor": "0.1159"}
    req = encode_request(query, FLUX)
    assert req.moments and not encode_request({}, FLUX).moments
    moments = np.linspace(-1, 1, 2 * 16 * 4, dtype=np.float32).reshape(1, 32, 2, 2)
    answer = encode_response(moments, req)
    assert np.array_equal(np.frombuffer(answer.body, np.float32).reshape(moments.shape), moments)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"dtype": "float16", "output_type": "pt"}, "missing query parameter shape"),
        ({"shape": [1, 4, 8, 8], "output_type": "pt"}, "missing query parameter dtype"),
        ({**BASE, "dtype": "float64"}, "unknown dtype"),
        ({**BASE, "dtype": ["float16", "float32"]}, "one value"),
        ({**BASE, "shape": [1, "x", 8, 8]}, "shape must be"),
        ({**BASE, "output_type": "gif"}, "unknown output_type"),
        ({**BASE, "output_type": "mp4"}, "video"),
        ({**BASE, "output_type": "pt", "partial_postprocess": "maybe"}, "True or False"),
        ({**BASE, "scaling_factor": "abc"}, "must be a number"),
        ({**BASE, "scaling_factor": "nan"}, "finite"),
        ({**BASE, "scaling_factor": 0}, "zero"),
        ({**BASE, "height": "-8", "width": 8}, "at least 1"),
        ({**BASE, "shape": [2, 4, 8, 8], "output_type": "pil"}, "one image"),
    ],
)
def test_decode_request_refusals(query, message):
    with pytest.raises(RejectedRequestError, match=message) as info:
        decode_request(query, "image/jpeg", SDXL)
    assert info.value.status == 400


def test_default_limits_go_beyond_the_public_endpoints():
    limits = Limits()
    assert limits.max_pixels == 4096 * 4096
    assert limits.tile_above_pixels == 2048 * 2048


# -- the batcher ---------------------------------------------------------------------------------


class Recorder:
    """A run function that records its batches and returns each job's input times ten."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.batches: list[tuple[object, list[int]]] = []
        self.cancels: list[threading.Event | None] = []
        self.delay = delay
        self.fail = fail

    def __call__(
        self, key: object, jobs: list[Job], cancel: threading.Event | None = None
    ) -> list[np.ndarray]:
        self.batches.append((key, [int(job.array[0, 0]) for job in jobs]))
        self.cancels.append(cancel)
        time.sleep(self.delay)
        if self.fail:
            raise ValueError("engine says no")
        x = np.concatenate([job.array for job in jobs]) * 10
        return np.split(x, np.cumsum([job.size for job in jobs])[:-1])


def run_batcher(recorder: Recorder, submissions, **options):
    """Submits `(key, value, size)` jobs at once; returns each result or exception."""

    async def main():
        batcher = Batcher(recorder, **options)
        await batcher.start()
        try:
            tasks = [
                batcher.submit(key, np.full((size, 1), value, np.float32))
                for key, value, size in submissions
            ]
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_batcher_groups_by_key_and_returns_each_its_own():
    recorder = Recorder(delay=0.01)
    subs = [("a", 1, 1), ("b", 2, 1), ("a", 3, 1), ("a", 4, 2), ("b", 5, 1)]
    results = run_batcher(recorder, subs, max_batch=8, max_wait=0.02)
    for (_, value, size), result in zip(subs, results, strict=True):
        np.testing.assert_array_equal(result, np.full((size, 1), 10 * value))
    assert sorted(recorder.batches, key=str) == [("a", [1, 3, 4]), ("b", [2, 5])]


def test_batcher_respects_max_batch_in_images():
    recorder = Recorder()
    subs = [("k", i, 2) for i in range(5)]  # 10 images, at most 4 per call
    results = run_batcher(recorder, subs, max_batch=4, max_wait=0.05)
    assert all(isinstance(r, np.ndarray) for r in results)
    assert [values for _, values in recorder.batches] == [[0, 1], [2, 3], [4]]


def test_batcher_off_runs_requests_one_by_one():
    recorder = Recorder()
    run_batcher(recorder, [("k", i, 1) for i in range(3)], max_batch=1, max_wait=0)
    assert [values for _, values in recorder.batches] == [[0], [1], [2]]


def test_batcher_refuses_beyond_its_queue():
    recorder = Recorder(delay=0.05)
    results = run_batcher(recorder, [("k", i, 1) for i in range(5)], max_batch=1, max_queue=2)
    refused = [r for r in results if isinstance(r, QueueFullError)]
    assert len(refused) == 3 and all(r.retry_after >= 1 for r in refused)
    assert sum(isinstance(r, np.ndarray) for r in results) == 2


def test_batcher_gives_an_engine_error_to_every_request_of_the_batch():
    results = run_batcher(Recorder(fail=True), [("k", 1, 1), ("k", 2, 1)], max_wait=0.02)
    assert all(isinstance(r, ValueError) and "engine says no" in str(r) for r in results)


def test_batcher_keeps_working_after_an_error():
    recorder = Recorder(fail=True)

    async def main():
        batcher = Batcher(recorder, max_wait=0)
        await batcher.start()
        with pytest.raises(ValueError):
            await batcher.submit("k", np.ones((1, 1), np.float32))
        recorder.fail = False
        result = await batcher.submit("k", np.ones((1, 1), np.float32))
        await batcher.stop()
        return result

    np.testing.assert_array_equal(asyncio.run(main()), [[10.0]])

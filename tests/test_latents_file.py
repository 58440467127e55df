"""vaelink.latents_file: latents as safetensors files. Round trips, the on-disk format (checked with the
`safetensors` package when installed, and always by parsing the header by hand), files written by
other tools, and corrupt files."""

from __future__ import annotations

import itertools
import json
import struct

import ml_dtypes
import numpy as np
import pytest

import vaelink
from vaelink import FormatError, TensorError
from vaelink.latents_file import latents_from_bytes, latents_to_bytes

ST_DTYPES = {
    np.dtype("<f4"): "F32",
    np.dtype("<f2"): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype("u1"): "U8",
}


def raw_bits(array: np.ndarray) -> np.ndarray:
    return array.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[array.dtype.itemsize])


def assert_same_tensor(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    np.testing.assert_array_equal(raw_bits(a), raw_bits(b))


def parse_safetensors(data: bytes) -> tuple[dict, bytes]:
    """The format by hand: u64 little-endian header length, JSON header, then the data section."""
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    return header, data[8 + n :]


def write_safetensors(entries, metadata=None, pad: bool = True) -> bytes:
    """A safetensors file from scratch, as another tool would write it: `entries` are
    `(name, dtype code, shape, raw bytes)`, laid out in the order given."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    body = b""
    for name, code, shape, raw in entries:
        header[name] = {
            "dtype": code,
            "shape": shape,
            "data_offsets": [len(body), len(body) + len(raw)],
        }
        body += raw
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


@pytest.fixture
def tensors(rng) -> dict[str, np.ndarray]:
    return {
        "latents": rng.standard_normal((1, 16, 64, 64)).astype(np.float32),
        "latents_bf16": rng.standard_normal((2, 4, 8, 8)).astype(ml_dtypes.bfloat16),
        "half": rng.standard_normal((3, 5)).astype(np.float16),
        "image": rng.integers(0, 256, (32, 48, 3), dtype=np.uint8),
        "scalar_like": np.array([0.18215], np.float32),
        "odd": rng.integers(0, 256, (7,), dtype=np.uint8),  # odd length: tensors after it realign
    }


def test_save_and_load_round_trip(tmp_path, tensors):
    path = tmp_path / "latents.safetensors"
    metadata = {"model": "black-forest-labs/FLUX.1-dev", "scaling_factor": "0.3611", "note": "ü ✓"}
    vaelink.save_latents(path, tensors, metadata)
    loaded, meta = vaelink.load_latents(path)
    assert meta == metadata
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert_same_tensor(loaded[name], array)
    assert loaded["latents"].flags.writeable
    vaelink.save_latents(str(path), tensors)  # str paths too; no metadata
    loaded, meta = vaelink.load_latents(str(path))
    assert meta == {} and set(loaded) == set(tensors)


def test_loaded_tensors_are_in_file_order(tensors):
    data = latents_to_bytes(tensors)
    header, _ = parse_safetensors(data)
    by_offset = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    loaded, _ = latents_from_bytes(data)
    assert list(loaded) == [name for _, name in by_offset]


def test_file_format_by_hand(tensors):
    metadata = {"format": "pt", "k": "v"}
    data = latents_to_bytes(tensors, metadata)
    (n,) = struct.unpack_from("<Q", data)
    assert n % 8 == 0 and 8 + n <= len(data)  # the header is padded so that the data aligns
    header, body = parse_safetensors(data)
    assert header.pop("__metadata__") == metadata
    assert set(header) == set(tensors)
    spans = []
    for name, array in tensors.items():
        entry = header[name]
        assert entry["dtype"] == ST_DTYPES[array.dtype]
        assert entry["shape"] == list(array.shape)
        start, end = entry["data_offsets"]
        assert end - start == array.nbytes
        assert body[start:end] == array.tobytes()  # little-endian, C order
        spans.append((start, end))
    spans.sort()
    assert spans[0][0] == 0 and spans[-1][1] == len(body)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # no gaps or overlap


def test_safetensors_package_reads_our_files(tensors, tmp_path):
    numpy_api = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "x.safetensors"
    numpy_safe = {k: v for k, v in tensors.items() if v.dtype != ml_dtypes.bfloat16}
    vaelink.save_latents(path, numpy_safe, {"a": "b"})
    theirs = numpy_api.load_file(str(path))
    for name, array in numpy_safe.items():
        assert_same_tensor(theirs[name], array)
    numpy_api.save_file(numpy_safe, str(tmp_path / "y.safetensors"), metadata={"c": "d"})
    ours, meta = vaelink.load_latents(tmp_path / "y.safetensors")
    assert meta == {"c": "d"}
    for name, array in numpy_safe.items():
        assert_same_tensor(ours[name], array)


def test_safetensors_torch_reads_our_bfloat16(tensors, tmp_path):
    torch_api = pytest.importorskip("safetensors.torch")
    import torch

    path = tmp_path / "bf16.safetensors"
    vaelink.save_latents(path, tensors)
    theirs = torch_api.load_file(str(path))
    assert theirs["latents_bf16"].dtype == torch.bfloat16
    bits = theirs["latents_bf16"].view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, tensors["latents_bf16"].view(np.uint16))
    torch_api.save_file({"x": theirs["latents_bf16"]}, str(tmp_path / "t.safetensors"))
    ours, _ = vaelink.load_latents(tmp_path / "t.safetensors")
    assert_same_tensor(ours["x"], tensors["latents_bf16"])


def test_reads_files_written_by_other_tools(rng):
    a = rng.standard_normal((2, 3)).astype("<f4")
    b = rng.standard_normal((4,)).astype(ml_dtypes.bfloat16)
    c = rng.integers(0, 256, (3, 3), dtype=np.uint8)
    # Deliberately unusual: tensors not in name or size order, unpadded header, no metadata.
    data = write_safetensors(
        [
            ("zeta", "U8", [3, 3], c.tobytes()),
            ("alpha", "F32", [2, 3], a.tobytes()),
            ("mid", "BF16", [4], b.tobytes()),
        ],
        pad=False,
    )
    loaded, meta = latents_from_bytes(data)
    assert meta == {}
    assert list(loaded) == ["zeta", "alpha", "mid"]  # file order
    assert_same_tensor(loaded["zeta"], c)
    assert_same_tensor(loaded["alpha"], a)
    assert_same_tensor(loaded["mid"], b)


def test_big_endian_and_non_contiguous_inputs_are_stored_little_endian(rng):
    x = rng.standard_normal((4, 6)).astype(np.float32)
    data = latents_to_bytes({"be": x.astype(">f4"), "t": x.T, "h": x.astype(">f2")})
    header, body = parse_safetensors(data)
    s, e = header["be"]["data_offsets"]
    assert body[s:e] == x.astype("<f4").tobytes()
    s, e = header["t"]["data_offsets"]
    assert body[s:e] == np.ascontiguousarray(x.T).tobytes() and header["t"]["shape"] == [6, 4]
    loaded, _ = latents_from_bytes(data)
    assert_same_tensor(loaded["be"], x)
    assert_same_tensor(loaded["t"], np.ascontiguousarray(x.T))
    assert_same_tensor(loaded["h"], x.astype("<f2"))


@pytest.mark.parametrize(
    "array",
    [np.zeros(3, np.float64), np.zeros(3, np.int32), np.zeros(3, np.uint16), np.zeros(3, bool)],
    ids=lambda a: str(a.dtype),
)
def test_save_rejects_other_dtypes(array):
    with pytest.raises(TensorError, match="cannot travel on the wire"):
        latents_to_bytes({"x": array})


@pytest.mark.parametrize(
    "array", [np.float32(1.0), np.zeros((0, 4), np.float32)], ids=["0-d", "empty"]
)
def test_save_rejects_shapes_it_cannot_load(array):
    # A 0-d array used to be stored silently as shape (1,); now both refuse clearly.
    with pytest.raises(TensorError):
        latents_to_bytes({"x": np.asarray(array)})


def test_corrupt_files_raise_format_error(tensors, rng):
    good = latents_to_bytes({"a": tensors["latents"][:, :2], "b": tensors["odd"]}, {"m": "x"})
    (n,) = struct.unpack_from("<Q", good)
    cases = {
        "empty": b"",
        "short": b"\x01\x02\x03",
        "length only": good[:8],
        "header cut": good[: 8 + n // 2],
        "data cut": good[:-1],
        "data extra": good + b"\x00",
        "huge header length": struct.pack("<Q", 2**62) + good[8:],
        "header length past end": struct.pack("<Q", len(good)) + good[8:],
        "all 0xff": b"\xff" * 64,
        "random": bytes(rng.integers(0, 256, 500, dtype=np.uint8)),
        "not json": struct.pack("<Q", 16) + b"{this is not js}",
        "json list": struct.pack("<Q", 8) + b"[1,2,3] ",
        "F64 tensor": write_safetensors([("x", "F64", [2], b"\x00" * 16)]),
        "I8 tensor": write_safetensors([("x", "I8", [2], b"\x00" * 2)]),
        "unknown dtype": write_safetensors([("x", "F33", [2], b"\x00" * 8)]),
        "offsets mismatch": write_safetensors([("x", "F32", [3], b"\x00" * 8)]),
        "metadata not strings": write_safetensors([("x", "U8", [1], b"\x00")], {"a": 1}),
        "overlap": struct.pack("<Q", 96)
        + json.dumps(
            {
                "x": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                "y": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
            }
        )
        .encode()
        .ljust(96)
        + b"\x00" * 6,
    }
    for name, data in cases.items():
        with pytest.raises(FormatError) as info:
            latents_from_bytes(data)
        assert isinstance(info.value, ValueError), name
        assert str(info.value), name


def test_corrupt_file_on_disk(tmp_path, tensors):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(latents_to_bytes(tensors)[:-10])
    with pytest.raises(FormatError):
        vaelink.load_latents(path)
    with pytest.raises(FileNotFoundError):
        vaelink.load_latents(tmp_path / "missing.safetensors")


def test_random_corruption_never_crashes(tensors, rng):
    good = bytearray(latents_to_bytes({"a": tensors["half"], "b": tensors["odd"]}, {"k": "v"}))
    for _ in range(300):
        broken = bytearray(good)
        for p in rng.integers(0, len(broken), int(rng.integers(1, 4))):
            broken[p] = int(rng.integers(0, 256))
        try:
            loaded, _ = latents_from_bytes(bytes(broken))
        except (FormatError, TensorError):
            continue
        for array in loaded.values():  # bytes changed in the data section only: arrays still fit
            assert array.dtype in ST_DTYPES

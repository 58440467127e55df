"""vaelink.wire: the remote-VAE tensor wire format (to_wire / from_wire) and lossless compression
(compress / decompress), including hostile bodies, shapes and buffers."""

from __future__ import annotations

import struct

import ml_dtypes
import numpy as np
import pytest
import torch

import vaelink
from vaelink import FormatError, TensorError, VaelinkError
from vaelink.wire import WireTensor

DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "uint8": np.dtype("u1"),
}
SHAPES = [(7,), (1, 4, 64, 64), (2, 16, 3, 5), (1, 2, 3, 4, 5), (1, 1, 1, 1, 1, 1, 1, 2)]


def random_tensor(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.standard_normal(shape).astype(np.float32).astype(DTYPES[dtype])


def raw_bits(array: np.ndarray) -> np.ndarray:
    return array.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[array.dtype.itemsize])


def assert_same_tensor(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(raw_bits(a), raw_bits(b))


# -------------------------------------------------------------------------------------------------
# to_wire / from_wire


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_wire_round_trip(shape, dtype, rng):
    x = random_tensor(rng, shape, dtype)
    wire = vaelink.to_wire(x)
    assert isinstance(wire, WireTensor)
    assert wire.shape == shape and wire.dtype == dtype
    assert isinstance(wire.body, bytes) and wire.body == x.tobytes()
    assert len(wire.body) == x.size * DTYPES[dtype].itemsize
    assert wire.shape_header() == "[" + ",".join(map(str, shape)) + "]"
    back = vaelink.from_wire(wire.body, wire.shape, wire.dtype)
    assert_same_tensor(back, x)


def test_wire_body_is_little_endian_c_order():
    x = np.array([[1.0, -2.0], [0.5, 3.0]], dtype=">f4").T  # big-endian and Fortran order
    wire = vaelink.to_wire(x)
    assert wire.body == struct.pack("<4f", 1.0, 0.5, -2.0, 3.0)
    assert (wire.shape, wire.dtype) == ((2, 2), "float32")
    half = vaelink.to_wire(np.array([1.0, -2.0], ">f2"))
    assert half.body == np.array([1.0, -2.0], "<f2").tobytes() == b"\x00\x3c\x00\xc0"
    assert vaelink.to_wire(np.array([1.0], ml_dtypes.bfloat16)).body == b"\x80\x3f"


def test_to_wire_converts_dtypes(rng):
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    bf = vaelink.to_wire(x, "bfloat16")
    assert bf.dtype == "bfloat16" and bf.shape == x.shape
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    assert bf.body == expected
    half = vaelink.to_wire(x, "float16")
    assert half.dtype == "float16" and half.body == x.astype("<f2").tobytes()
    same = vaelink.to_wire(x, "float32")
    assert same.body == x.tobytes()
    up = vaelink.to_wire(x.astype(ml_dtypes.bfloat16), "float32")
    assert up.body == x.astype(ml_dtypes.bfloat16).astype(np.float32).tobytes()
    with pytest.raises(TensorError, match="unknown dtype"):
        vaelink.to_wire(x, "float64")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "array",
    [np.float32(1.0), np.zeros((0,), np.float32), np.zeros((2, 0, 3), np.uint8)],
    ids=["0-d", "empty", "empty-2"],
)
def test_to_wire_rejects_empty_tensors(array):
    with pytest.raises(TensorError, match="empty or 0-d"):
        vaelink.to_wire(array)


@pytest.mark.parametrize("dtype", [np.float64, np.int8, np.int64, np.uint16, np.bool_])
def test_to_wire_rejects_other_dtypes(dtype):
    with pytest.raises(TensorError, match="cannot travel on the wire"):
        vaelink.to_wire(np.zeros(4, dtype))


def test_from_wire_is_zero_copy(rng):
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    body = bytearray(x.tobytes())
    out = vaelink.from_wire(body, x.shape, "float32")
    assert np.shares_memory(out, np.frombuffer(body, np.uint8))
    assert out.flags.writeable
    body[:4] = struct.pack("<f", 42.0)  # the array sees changes to the body: same memory
    assert out[0, 0, 0, 0] == 42.0
    out[0, 0, 0, 1] = -7.0
    assert struct.unpack_from("<f", body, 4)[0] == -7.0

    frozen = vaelink.from_wire(bytes(body), x.shape, "float32")
    assert not frozen.flags.writeable  # bytes are immutable: a read-only view, still no copy
    view = memoryview(body)[16:]
    tail = vaelink.from_wire(view, (len(view) // 4,), "float32")
    assert np.shares_memory(tail, np.frombuffer(body, np.uint8))
    np.testing.assert_array_equal(tail, out.ravel()[4:])


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_from_wire_bfloat16_and_others_come_back_typed(dtype, rng):
    x = random_tensor(rng, (3, 5), dtype)
    out = vaelink.from_wire(x.tobytes(), [3, 5], dtype)
    assert out.dtype == DTYPES[dtype]
    assert_same_tensor(out, x)
    assert_same_tensor(vaelink.from_wire(x.tobytes(), np.array([3, 5]), dtype), x)


@pytest.mark.parametrize("delta", [-1, 1, -4, 4, -60])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_from_wire_rejects_wrong_body_lengths(delta, dtype):
    n = 2 * 3 * 10 * DTYPES[dtype].itemsize
    with pytest.raises(TensorError, match=rf"body has {n + delta} bytes .* needs {n} bytes"):
        vaelink.from_wire(b"\x00" * (n + delta), (2, 3, 10), dtype)


def test_from_wire_rejects_empty_body():
    with pytest.raises(TensorError, match="needs 4 bytes"):
        vaelink.from_wire(b"", (1,), "float32")


@pytest.mark.parametrize("dtype", ["float64", "int8", "", "Float32", "bf16", "float32 ", "uint16"])
def test_from_wire_rejects_unknown_dtypes(dtype):
    with pytest.raises(TensorError, match="unknown dtype") as info:
        vaelink.from_wire(b"\x00" * 64, (8,), dtype)
    assert "float16, bfloat16, float32, uint8" in str(info.value)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([-1], "negative"),
        ([4, -2], "negative"),
        ([0], "zero dimension"),
        ([3, 0, 2], "zero dimension"),
        ([], "1 to 8 dimensions"),
        ([1] * 9, "1 to 8 dimensions"),
        ([2] * 12, "1 to 8 dimensions"),
        ([2**40, 2**40], "too large"),
        ([2**31, 2**31, 2**31], "too large"),
        ([2**62, 4], "too large"),
        ([2**63], "too large"),
        ([2**64 + 1], "too large"),
        ([-(2**70)], "too large"),
    ],
    ids=str,
)
def test_from_wire_rejects_hostile_shapes(shape, message):
    with pytest.raises(TensorError, match=message) as info:
        vaelink.from_wire(b"\x00" * 16, shape, "uint8")
    assert isinstance(info.value, ValueError) and isinstance(info.value, VaelinkError)


# -------------------------------------------------------------------------------------------------
# compress / decompress


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_compress_round_trip(shape, dtype, rng):
    x = random_tensor(rng, shape, dtype)
    blob = vaelink.compress(x)
    assert isinstance(blob, bytes)
    assert_same_tensor(vaelink.decompress(blob), x)


def test_compress_round_trip_keeps_every_bit(rng):
    # NaNs with payloads, signed zeros, infinities, subnormals: compared as bits.
    patterns = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
    patterns[:6] = [0x7FC00001, 0xFFFFFFFF, 0x80000000, 0x7F800000, 0x00000001, 0x7F800001]
    x = patterns.view(np.float32).reshape(100, 1000)
    back = vaelink.decompress(vaelink.compress(x))
    np.testing.assert_array_equal(back.view(np.uint32), patterns.reshape(100, 1000))
    halves = np.arange(65536, dtype=np.uint16)
    for dt in (np.float16, ml_dtypes.bfloat16):
        out = vaelink.decompress(vaelink.compress(halves.view(dt)))
        assert out.dtype == np.dtype(dt)
        np.testing.assert_array_equal(out.view(np.uint16), halves)


def test_compress_non_contiguous_and_big_endian(rng):
    x = rng.standard_normal((2, 4, 32, 48)).astype(np.float32)
    for variant in [x[:, ::2, 3:, ::-1], x.transpose(0, 2, 3, 1)]:
        assert_same_tensor(vaelink.decompress(vaelink.compress(variant)), variant.copy())
    back = vaelink.decompress(vaelink.compress(x.astype(">f4")))
    assert_same_tensor(back, x)


def smooth_latents() -> np.ndarray:
    y, x = np.mgrid[0:128, 0:128].astype(np.float32) / 128
    channels = [np.sin(3 * x + c) * np.cos(2 * y - c) for c in range(4)]
    return np.stack(channels)[None].astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_compress_shrinks_smooth_data(dtype):
    x = smooth_latents().astype(DTYPES[dtype])
    blob = vaelink.compress(x)
    assert len(blob) < 0.7 * x.nbytes, (len(blob), x.nbytes)
    assert_same_tensor(vaelink.decompress(blob), x)


def test_compress_levels(rng):
    x = smooth_latents()
    sizes = {level: len(vaelink.compress(x, level=level)) for level in (-5, 1, 3, 19)}
    assert sizes[19] < sizes[1] < x.nbytes
    assert sizes[-5] >= sizes[19]
    for level in sizes:
        assert_same_tensor(vaelink.decompress(vaelink.compress(x, level=level)), x)
    for level in (23, 1000, -(2**20)):
        with pytest.raises(FormatError, match="zstd level"):
            vaelink.compress(x, level=level)


def test_compressed_header_layout():
    x = np.zeros((2, 3, 5), ml_dtypes.bfloat16)
    blob = vaelink.compress(x)
    assert blob[:4] == b"VLZ1"
    assert blob[4:8] == bytes([2, 3, 0, 0])  # bfloat16 code 2, three dimensions, reserved
    assert struct.unpack_from("<3Q", blob, 8) == (2, 3, 5)
    assert blob[32:36] == b"\x28\xb5\x2f\xfd"  # zstd frame magic


def test_decompress_accepts_bytes_like(rng):
    x = random_tensor(rng, (4, 9), "float16")
    blob = vaelink.compress(x)
    for data in (blob, bytearray(blob), memoryview(blob)):
        assert_same_tensor(vaelink.decompress(data), x)


@pytest.mark.parametrize(
    "array",
    [np.float32(1.0), np.zeros(0, np.float32), np.zeros((3, 0), np.uint8), np.zeros((1,) * 9)],
    ids=["0-d", "empty", "empty-2", "9-d"],
)
def test_compress_rejects_unsendable_shapes(array):
    with pytest.raises(TensorError):
        vaelink.compress(array.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.uint16])
def test_compress_rejects_other_dtypes(dtype):
    with pytest.raises(TensorError):
        vaelink.compress(np.zeros(4, dtype))


def _header(code: int, dims, reserved: bytes = b"\x00\x00") -> bytes:
    return b"VLZ1" + bytes([code, len(dims)]) + reserved + struct.pack(f"<{len(dims)}Q", *dims)


def test_decompress_rejects_corrupt_headers(rng):
    x = random_tensor(rng, (4, 8, 8), "float32")
    blob = vaelink.compress(x)
    frame = blob[8 + 3 * 8 :]
    cases = {
        "empty": b"",
        "magic only": b"VLZ1",
        "bad magic": b"VLZ2" + blob[4:],
        "gzip": b"\x1f\x8b\x08\x00" + blob[4:],
        "dtype code 0": _header(0, (4, 8, 8)) + frame,
        "dtype code 9": _header(9, (4, 8, 8)) + frame,
        "ndim 0": _header(3, ()) + frame,
        "ndim 9": _header(3, (1,) * 9) + frame,
        "reserved": _header(3, (4, 8, 8), b"\x01\x00") + frame,
        "dims cut": blob[:20],
        "zero dim": _header(3, (4, 0, 8)) + frame,
        "giant dims": _header(3, (2**40, 2**40, 1)) + frame,
        "2**63 dim": _header(3, (2**63, 1, 1)) + frame,
        "lies bigger": _header(3, (4, 8, 9)) + frame,
        "lies smaller": _header(3, (4, 8, 7)) + frame,
        "lies far bigger": _header(3, (2**20, 8, 8)) + frame,
        "other dtype": _header(1, (4, 8, 8)) + frame,  # float16: half the bytes
        "no frame": blob[: 8 + 3 * 8],
        "garbage frame": blob[: 8 + 3 * 8] + bytes(rng.integers(0, 256, 200, dtype=np.uint8)),
    }
    for name, data in cases.items():
        with pytest.raises((FormatError, TensorError)) as info:
            vaelink.decompress(data)
        assert isinstance(info.value, ValueError), name


def test_decompress_rejects_truncation(rng):
    blob = vaelink.compress(random_tensor(rng, (4, 32, 32), "float32"))
    for cut in [1, 5, 8, 12, 31, 32, 36, 40, len(blob) // 2, len(blob) - 1]:
        with pytest.raises((FormatError, TensorError)):
            vaelink.decompress(blob[:cut])


def test_decompress_survives_random_corruption(rng):
    x = smooth_latents()
    blob = vaelink.compress(x)
    outcomes = {"error": 0, "array": 0}
    for _ in range(300):
        broken = bytearray(blob)
        for p in rng.integers(32, len(broken), int(rng.integers(1, 4))):  # inside the frame
            broken[p] ^= int(rng.integers(1, 256))
        try:
            out = vaelink.decompress(bytes(broken))
        except (FormatError, TensorError):
            outcomes["error"] += 1
        else:  # zstd frames carry no checksum by default: a flip may decode to other numbers
            assert out.shape == x.shape and out.dtype == x.dtype
            outcomes["array"] += 1
    assert outcomes["error"] > 0


def test_decompress_random_garbage(rng):
    for n in [0, 1, 7, 8, 9, 100, 5000]:
        data = bytes(rng.integers(0, 256, n, dtype=np.uint8))
        with pytest.raises(FormatError):
            vaelink.decompress(data)
        with pytest.raises((FormatError, TensorError)):
            vaelink.decompress(b"VLZ1" + data)


def test_decompress_refuses_tensors_over_max_bytes() -> None:
    x = np.zeros((4, 1024), np.float32)  # 16 KiB that compresses to almost nothing
    blob = vaelink.compress(x)
    assert len(blob) < 200
    assert np.array_equal(vaelink.decompress(blob, max_bytes=x.nbytes), x)
    with pytest.raises(vaelink.FormatError, match="over the limit"):
        vaelink.decompress(blob, max_bytes=x.nbytes - 1)
    with pytest.raises(vaelink.TensorError):
        vaelink.decompress(blob, max_bytes=-1)

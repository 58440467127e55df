"""vaelink.dtypes (the four wire dtypes) and bfloat16 conversion (`vaelink.to_bfloat16` and
`from_bfloat16`, in vaelink.wire) against torch and ml_dtypes, bit for bit."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

import vaelink
from vaelink import TensorError, dtypes


def torch_bf16_bits(x: np.ndarray) -> np.ndarray:
    """torch's float32 -> bfloat16 rounding, as uint16 bits."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def ours_bits(x: np.ndarray) -> np.ndarray:
    out = vaelink.to_bfloat16(x)
    assert out.dtype == dtypes.bfloat16 and out.shape == np.shape(x)
    return out.view(np.uint16)


def f32(bit_patterns) -> np.ndarray:
    return np.asarray(bit_patterns, dtype=np.uint32).view(np.float32)


# -------------------------------------------------------------------------------------------------
# The dtype table


def test_wire_dtype_table():
    assert list(dtypes.WIRE_DTYPES) == ["float16", "bfloat16", "float32", "uint8"]
    assert dtypes.bfloat16 == np.dtype(ml_dtypes.bfloat16)
    for name, dt in dtypes.WIRE_DTYPES.items():
        assert dtypes.numpy_dtype(name) == dt
        assert dtypes.dtype_name(dt) == name
    assert {dt.itemsize for dt in dtypes.WIRE_DTYPES.values()} == {1, 2, 4}


@pytest.mark.parametrize(
    ("given", "name"),
    [
        (np.float32, "float32"),
        (np.dtype(">f4"), "float32"),
        ("<f2", "float16"),
        (np.dtype(">f2"), "float16"),
        (ml_dtypes.bfloat16, "bfloat16"),
        (np.uint8, "uint8"),
        ("u1", "uint8"),
    ],
)
def test_dtype_name_accepts_types_and_byte_orders(given, name):
    assert dtypes.dtype_name(given) == name


@pytest.mark.parametrize(
    "given",
    [np.float64, np.int8, np.uint16, np.int32, np.complex64, np.bool_, ml_dtypes.float8_e4m3fn],
)
def test_dtype_name_rejects_other_dtypes(given):
    with pytest.raises(TensorError, match="cannot travel on the wire"):
        dtypes.dtype_name(given)


@pytest.mark.parametrize("name", ["float64", "int8", "", "FLOAT32", "bf16", "fp16", None, 5, ["x"]])
def test_numpy_dtype_rejects_unknown_names(name):
    with pytest.raises(TensorError, match="unknown dtype"):
        dtypes.numpy_dtype(name)  # type: ignore[arg-type]


def test_bits_views_share_memory():
    x = np.array([1.0, -2.5, 3.0], dtype=ml_dtypes.bfloat16)
    raw = dtypes.to_bits(x)
    assert raw.dtype == np.uint16 and np.shares_memory(raw, x)
    assert raw.tolist() == [0x3F80, 0xC020, 0x4040]
    back = dtypes.from_bits(raw)
    assert back.dtype == dtypes.bfloat16 and np.shares_memory(back, x)
    other = np.arange(3, dtype=np.float32)
    assert dtypes.to_bits(other) is other


# -------------------------------------------------------------------------------------------------
# float32 -> bfloat16


def test_to_bfloat16_random_normal_matches_torch(rng):
    x = rng.standard_normal((64, 1000)).astype(np.float32) * np.float32(3.0)
    np.testing.assert_array_equal(ours_bits(x), torch_bf16_bits(x))


def test_to_bfloat16_random_bit_patterns_match_torch(rng):
    # Every exponent, including subnormals, huge values and infinities; NaNs tested separately.
    x = f32(rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32))
    x = x[~np.isnan(x)]
    np.testing.assert_array_equal(ours_bits(x), torch_bf16_bits(x))
    np.testing.assert_array_equal(ours_bits(x), x.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_to_bfloat16_halfway_ties_round_to_even(rng):
    # Low 16 bits exactly 0x8000: halfway between two bfloat16 values. Even upper halves stay, odd
    # ones round up. Also the neighbours just below and above the tie.
    upper = rng.integers(0, 0x7F7F, 5000, dtype=np.uint32)
    upper = np.concatenate([upper, upper | 0x8000])  # both signs
    ties = f32((upper << 16) | 0x8000)
    below, above = f32((upper << 16) | 0x7FFF), f32((upper << 16) | 0x8001)
    for x in (ties, below, above):
        np.testing.assert_array_equal(ours_bits(x), torch_bf16_bits(x))
    got = ours_bits(ties).astype(np.uint32)
    np.testing.assert_array_equal(got, np.where(upper % 2 == 0, upper, upper + 1))
    np.testing.assert_array_equal(ours_bits(below).astype(np.uint32), upper)
    np.testing.assert_array_equal(ours_bits(above).astype(np.uint32), upper + 1)
    assert ours_bits(np.float32(1 + 2**-8)) == 0x3F80  # tie, even: down
    assert ours_bits(np.float32(1 + 3 * 2**-8)) == 0x3F82  # tie, odd: up to even


def test_to_bfloat16_special_values():
    specials = np.array(
        [
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            np.finfo(np.float32).max,  # rounds up to inf
            -np.finfo(np.float32).max,
            3.3895e38,  # largest bfloat16, about
            np.finfo(np.float32).tiny,  # smallest normal
            np.finfo(np.float32).smallest_subnormal,
            -np.finfo(np.float32).smallest_subnormal,
            1e-39,  # subnormal
            -5.9e-39,
            65504.0,
            1e30,
            -1e-30,
        ],
        dtype=np.float32,
    )
    ours = ours_bits(specials)
    np.testing.assert_array_equal(ours, torch_bf16_bits(specials))
    assert ours[:6].tolist() == [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7F80, 0xFF80]


def test_to_bfloat16_nan_stays_nan():
    nans = f32([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0x7F810000, 0x7F80FFFF])
    assert np.isnan(nans).all()
    out = vaelink.to_bfloat16(nans)
    assert np.isnan(out.astype(np.float32)).all()
    # The sign survives, and signalling NaNs (whose payload may sit in the dropped bits) stay NaN
    # rather than turning into infinity.
    np.testing.assert_array_equal(out.view(np.uint16) >> 15, nans.view(np.uint32) >> 31)


def test_to_bfloat16_shapes_and_inputs(rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    expected = torch_bf16_bits(x)
    np.testing.assert_array_equal(ours_bits(x), expected)
    view = x.transpose(3, 1, 0, 2)
    np.testing.assert_array_equal(ours_bits(view), expected.transpose(3, 1, 0, 2))
    np.testing.assert_array_equal(ours_bits(x.astype(">f4")), expected)
    assert vaelink.to_bfloat16(np.float32(1.5)).shape == ()
    assert vaelink.to_bfloat16([1.0, 2.0]).tolist() == [1.0, 2.0]
    half = rng.standard_normal(1000).astype(np.float16)  # float16 -> float32 is exact
    np.testing.assert_array_equal(ours_bits(half), torch_bf16_bits(half.astype(np.float32)))


# -------------------------------------------------------------------------------------------------
# bfloat16 -> float32


def test_from_bfloat16_is_exact_for_every_bit_pattern():
    raw = np.arange(65536, dtype=np.uint16)
    expected = raw.astype(np.uint32) << 16
    for source in (raw, raw.view(ml_dtypes.bfloat16)):
        out = vaelink.from_bfloat16(source)
        assert out.dtype == np.float32 and out.shape == (65536,)
        np.testing.assert_array_equal(out.view(np.uint32), expected)
    as_torch = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).to(torch.float32)
    finite = ~np.isnan(as_torch.numpy())
    np.testing.assert_array_equal(out[finite], as_torch.numpy()[finite])


def test_bfloat16_round_trip_is_exact(rng):
    bf = rng.standard_normal((3, 7, 11)).astype(np.float32).astype(ml_dtypes.bfloat16)
    back = vaelink.from_bfloat16(bf)
    assert back.shape == bf.shape
    np.testing.assert_array_equal(vaelink.to_bfloat16(back).view(np.uint16), bf.view(np.uint16))
    np.testing.assert_array_equal(vaelink.from_bfloat16(bf[:, ::2, 1:]), back[:, ::2, 1:])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int16, np.uint8])
def test_from_bfloat16_rejects_other_dtypes(dtype):
    with pytest.raises(TensorError, match="bfloat16"):
        vaelink.from_bfloat16(np.zeros(4, dtype))

//! Tensors: pre/post-processing, bfloat16, the wire format, packing, compression, safetensors.
//! bfloat16 crosses this boundary as `uint16` bits; the Python layer views them as `ml_dtypes.bfloat16`.

use std::collections::HashMap;

use half::{bf16, f16};
use numpy::{Element, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use vaelink_core::dtype::{self, Float};
use vaelink_core::process::{self, Dims};
use vaelink_core::{compress, group_norm, latents_file, packing, DType, TensorSpec};

use crate::arrays::{contiguous, shape_of, to_numpy};
use crate::errors::{tensor_error, IntoPyResult};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(preprocess, m)?)?;
    m.add_function(wrap_pyfunction!(postprocess, m)?)?;
    m.add_function(wrap_pyfunction!(f32_to_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(bf16_to_f32, m)?)?;
    m.add_function(wrap_pyfunction!(check_wire_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(pack_latents, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_latents, m)?)?;
    m.add_function(wrap_pyfunction!(compress_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(decompress_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(serialize_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(deserialize_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(group_stats, m)?)?;
    Ok(())
}

/// A float array as it arrives: float32, float16, or bfloat16 carried as uint16 bits.
#[derive(FromPyObject)]
enum FloatArray<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F16(PyReadonlyArrayDyn<'py, f16>),
    BF16(PyReadonlyArrayDyn<'py, u16>),
}

/// Any array whose elements packing can move: 1, 2 or 4 bytes wide.
#[derive(FromPyObject)]
enum AnyArray<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F16(PyReadonlyArrayDyn<'py, f16>),
    U16(PyReadonlyArrayDyn<'py, u16>),
    U8(PyReadonlyArrayDyn<'py, u8>),
}

fn new_vec<T: Clone + Default>(len: usize) -> Vec<T> {
    vec![T::default(); len]
}

fn run_preprocess<'py, T: Float + Element + Default>(
    py: Python<'py>,
    src: &[u8],
    dims: Dims,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let out = py
        .detach(|| {
            let mut out = new_vec::<T>(src.len());
            process::preprocess(src, dims, &mut out).map(|()| out)
        })
        .py()?;
    to_numpy(py, out, &[dims.n, 3, dims.height, dims.width])
}

/// `uint8 HWC/NHWC` -> `NCHW` in [-1, 1] as float32, float16 or bfloat16 bits.
#[pyfunction]
fn preprocess<'py>(
    py: Python<'py>,
    images: PyReadonlyArrayDyn<'py, u8>,
    dtype: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let dims = match *images.shape() {
        [h, w, c] => Dims {
            n: 1,
            channels: c,
            height: h,
            width: w,
        },
        [n, h, w, c] => Dims {
            n,
            channels: c,
            height: h,
            width: w,
        },
        ref other => {
            return Err(tensor_error(format!(
                "images must be HWC or NHWC uint8, got shape {other:?}"
            )))
        }
    };
    let src = contiguous(&images)?;
    Ok(match DType::parse(dtype).py()? {
        DType::F32 => run_preprocess::<f32>(py, src, dims)?.into_any(),
        DType::F16 => run_preprocess::<f16>(py, src, dims)?.into_any(),
        DType::BF16 => run_preprocess::<bf16>(py, src, dims)?.into_any(),
        DType::U8 => {
            return Err(tensor_error(
                "preprocess produces float32, float16 or bfloat16",
            ))
        }
    })
}

fn run_postprocess<'py, T: Float>(
    py: Python<'py>,
    shape: &[usize],
    src: &[T],
) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    let [n, channels, height, width] = shape_of::<4>(shape, "decoder output (NCHW)")?;
    let dims = Dims {
        n,
        channels,
        height,
        width,
    };
    let out = py
        .detach(|| {
            let mut out = vec![0u8; src.len()];
            process::postprocess(src, dims, &mut out).map(|()| out)
        })
        .py()?;
    to_numpy(py, out, &[n, height, width, channels])
}

/// Float `NCHW` -> `uint8 NHWC`, `round(clamp(x / 2 + 0.5, 0, 1) * 255)` in float32.
#[pyfunction]
fn postprocess<'py>(
    py: Python<'py>,
    tensor: FloatArray<'py>,
) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    match tensor {
        FloatArray::F32(a) => run_postprocess(py, a.shape(), contiguous(&a)?),
        FloatArray::F16(a) => run_postprocess(py, a.shape(), contiguous(&a)?),
        FloatArray::BF16(a) => {
            let bits: &[u16] = contiguous(&a)?;
            run_postprocess::<bf16>(py, a.shape(), bytemuck::cast_slice(bits))
        }
    }
}

#[pyfunction]
fn f32_to_bf16<'py>(
    py: Python<'py>,
    array: PyReadonlyArrayDyn<'py, f32>,
) -> PyResult<Bound<'py, PyArrayDyn<u16>>> {
    let src = contiguous(&array)?;
    let out = py
        .detach(|| {
            let mut out = new_vec::<u16>(src.len());
            dtype::f32_to_bf16_slice(src, &mut out).map(|()| out)
        })
        .py()?;
    to_numpy(py, out, array.shape())
}

#[pyfunction]
fn bf16_to_f32<'py>(
    py: Python<'py>,
    bits: PyReadonlyArrayDyn<'py, u16>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let src = contiguous(&bits)?;
    let out = py
        .detach(|| {
            let mut out = new_vec::<f32>(src.len());
            dtype::bf16_to_f32_slice(src, &mut out).map(|()| out)
        })
        .py()?;
    to_numpy(py, out, bits.shape())
}

/// Validates a wire tensor's shape and dtype against its body length; returns the shape.
#[pyfunction]
fn check_wire_tensor(shape: Vec<i64>, dtype: &str, nbytes: usize) -> PyResult<Vec<usize>> {
    let spec = TensorSpec::from_signed(&shape, DType::parse(dtype).py()?).py()?;
    spec.check_body_len(nbytes).py()?;
    Ok(spec.shape().to_vec())
}

fn run_pack<'py, T: Element + Copy>(
    py: Python<'py>,
    array: &PyReadonlyArrayDyn<'py, T>,
) -> PyResult<Bound<'py, PyAny>> {
    let shape = shape_of::<4>(array.shape(), "latents to pack (BCHW)")?;
    let src = contiguous(array)?;
    let out = py.detach(|| packing::pack(src, shape)).py()?;
    let [b, c, h, w] = shape;
    Ok(to_numpy(py, out, &[b, (h / 2) * (w / 2), 4 * c])?.into_any())
}

fn run_unpack<'py, T: Element + Copy>(
    py: Python<'py>,
    array: &PyReadonlyArrayDyn<'py, T>,
    height: usize,
    width: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let shape = shape_of::<3>(array.shape(), "packed latents (B, tokens, channels)")?;
    let src = contiguous(array)?;
    let (out, unpacked) = py
        .detach(|| packing::unpack(src, shape, height, width))
        .py()?;
    Ok(to_numpy(py, out, &unpacked)?.into_any())
}

/// `[B, C, H, W] -> [B, HW/4, 4C]` (Flux).
#[pyfunction]
fn pack_latents<'py>(py: Python<'py>, latents: AnyArray<'py>) -> PyResult<Bound<'py, PyAny>> {
    match latents {
        AnyArray::F32(a) => run_pack(py, &a),
        AnyArray::F16(a) => run_pack(py, &a),
        AnyArray::U16(a) => run_pack(py, &a),
        AnyArray::U8(a) => run_pack(py, &a),
    }
}

/// `[B, HW/4, 4C] -> [B, C, H, W]` for an image of `height x width` pixels (Flux).
#[pyfunction]
fn unpack_latents<'py>(
    py: Python<'py>,
    latents: AnyArray<'py>,
    height: usize,
    width: usize,
) -> PyResult<Bound<'py, PyAny>> {
    match latents {
        AnyArray::F32(a) => run_unpack(py, &a, height, width),
        AnyArray::F16(a) => run_unpack(py, &a, height, width),
        AnyArray::U16(a) => run_unpack(py, &a, height, width),
        AnyArray::U8(a) => run_unpack(py, &a, height, width),
    }
}

/// Compresses raw little-endian tensor bytes described by `shape` and `dtype`.
#[pyfunction]
fn compress_tensor<'py>(
    py: Python<'py>,
    data: PyReadonlyArrayDyn<'py, u8>,
    shape: Vec<usize>,
    dtype: &str,
    level: i32,
) -> PyResult<Bound<'py, PyBytes>> {
    let spec = TensorSpec::new(&shape, DType::parse(dtype).py()?).py()?;
    let src = contiguous(&data)?;
    let packed = py.detach(|| compress::compress(src, &spec, level)).py()?;
    Ok(PyBytes::new(py, &packed))
}

/// Raw tensor bytes as a uint8 array, with the tensor's shape and dtype name.
type RawBytes<'py> = (Bound<'py, PyArrayDyn<u8>>, Vec<usize>, &'static str);

/// Returns `(raw bytes as a uint8 array, shape, dtype name)`.
#[pyfunction]
fn decompress_tensor<'py>(
    py: Python<'py>,
    data: &[u8],
    max_bytes: usize,
) -> PyResult<RawBytes<'py>> {
    let (spec, raw) = py.detach(|| compress::decompress(data, max_bytes)).py()?;
    let len = raw.len();
    Ok((
        to_numpy(py, raw, &[len])?,
        spec.shape().to_vec(),
        spec.dtype().name(),
    ))
}

/// `tensors`: `(name, raw bytes, shape, dtype)` tuples; returns the safetensors file as bytes.
#[pyfunction]
#[pyo3(signature = (tensors, metadata=None))]
fn serialize_safetensors<'py>(
    py: Python<'py>,
    tensors: Vec<(String, PyReadonlyArrayDyn<'py, u8>, Vec<usize>, String)>,
    metadata: Option<HashMap<String, String>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let specs = tensors
        .iter()
        .map(|(_, _, shape, dtype)| TensorSpec::new(shape, DType::parse(dtype)?))
        .collect::<vaelink_core::Result<Vec<_>>>()
        .py()?;
    let datas = tensors
        .iter()
        .map(|(_, d, _, _)| contiguous(d))
        .collect::<PyResult<Vec<_>>>()?;
    let views: Vec<(&str, &TensorSpec, &[u8])> = tensors
        .iter()
        .zip(&specs)
        .zip(datas)
        .map(|(((name, ..), spec), data)| (name.as_str(), spec, data))
        .collect();
    let bytes = py
        .detach(|| latents_file::serialize(&views, metadata))
        .py()?;
    Ok(PyBytes::new(py, &bytes))
}

type RawTensor<'py> = (String, Bound<'py, PyArrayDyn<u8>>, Vec<usize>, &'static str);

/// Parses safetensors bytes into `([(name, raw bytes, shape, dtype)], metadata)`, in file order.
#[pyfunction]
fn deserialize_safetensors<'py>(
    py: Python<'py>,
    data: &[u8],
) -> PyResult<(Vec<RawTensor<'py>>, HashMap<String, String>)> {
    let (tensors, metadata) = py.detach(|| latents_file::deserialize(data)).py()?;
    let tensors = tensors
        .into_iter()
        .map(|t| {
            let len = t.data.len();
            Ok((
                t.name,
                to_numpy(py, t.data, &[len])?,
                t.spec.shape().to_vec(),
                t.spec.dtype().name(),
            ))
        })
        .collect::<PyResult<Vec<_>>>()?;
    Ok((tensors, metadata))
}

type F32Array<'py> = Bound<'py, PyArrayDyn<f32>>;

/// GroupNorm's per-group mean and 1/std over a contiguous float32 `[N, C, H, W]` map, as two
/// float32 `[N, groups]` arrays; `rows` `(r0, r1)`: only those rows count (a strip's own rows,
/// not its halo).
#[pyfunction]
#[pyo3(signature = (x, groups, eps, rows = None))]
fn group_stats<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
    groups: usize,
    eps: f64,
    rows: Option<(usize, usize)>,
) -> PyResult<(F32Array<'py>, F32Array<'py>)> {
    let &[batch, channels, height, width] = x.shape() else {
        return Err(tensor_error(format!(
            "group_stats takes an [N, C, H, W] map, got shape {:?}",
            x.shape()
        )));
    };
    let (r0, r1) = rows.unwrap_or((0, height));
    if r0 >= r1 || r1 > height {
        return Err(tensor_error(format!(
            "rows ({r0}, {r1}) are not inside {height} rows"
        )));
    }
    let data = contiguous(&x)?;
    let stats = py
        .detach(|| {
            let window = r0 * width..r1 * width;
            group_norm::group_stats_window(data, batch, channels, window, groups, eps)
        })
        .py()?;
    Ok((
        to_numpy(py, stats.mean, &[batch, groups])?,
        to_numpy(py, stats.rstd, &[batch, groups])?,
    ))
}

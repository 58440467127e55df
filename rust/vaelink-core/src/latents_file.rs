//! Latents on disk as safetensors: several named tensors plus string metadata in one file.

use std::collections::HashMap;

use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::wire::TensorSpec;

/// A named tensor: its spec and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub spec: TensorSpec,
    pub data: Vec<u8>,
}

fn st_err(e: impl std::fmt::Display) -> Error {
    Error::Format(format!("invalid safetensors data: {e}"))
}

fn to_st(dtype: DType) -> StDtype {
    match dtype {
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::F32 => StDtype::F32,
        DType::U8 => StDtype::U8,
    }
}

fn from_st(dtype: StDtype, name: &str) -> Result<DType> {
    match dtype {
        StDtype::F16 => Ok(DType::F16),
        StDtype::BF16 => Ok(DType::BF16),
        StDtype::F32 => Ok(DType::F32),
        StDtype::U8 => Ok(DType::U8),
        other => Err(Error::Format(format!(
            "tensor {name:?} has dtype {other:?}; vaelink reads float16, bfloat16, float32 and uint8"
        ))),
    }
}

/// Serialises tensors (borrowed as `(name, spec, bytes)`) and metadata into safetensors bytes.
pub fn serialize(
    tensors: &[(&str, &TensorSpec, &[u8])],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|&(name, spec, data)| {
            spec.check_body_len(data.len())?;
            let view = TensorView::new(to_st(spec.dtype()), spec.shape().to_vec(), data)
                .map_err(st_err)?;
            Ok((name, view))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, metadata).map_err(st_err)
}

/// Parses safetensors bytes into tensors (in file order) and metadata.
pub fn deserialize(buf: &[u8]) -> Result<(Vec<NamedTensor>, HashMap<String, String>)> {
    let (_, meta) = SafeTensors::read_metadata(buf).map_err(st_err)?;
    let file = SafeTensors::deserialize(buf).map_err(st_err)?;
    let mut offsets: Vec<_> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| (info.data_offsets.0, name))
        .collect();
    offsets.sort();
    let tensors = offsets
        .into_iter()
        .map(|(_, name)| {
            let view = file.tensor(&name).map_err(st_err)?;
            let dtype = from_st(view.dtype(), &name)?;
            let spec = TensorSpec::new(view.shape(), dtype)?;
            Ok(NamedTensor {
                name,
                spec,
                data: view.data().to_vec(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((tensors, meta.metadata().clone().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_tensors_and_metadata_round_trip() {
        let a = TensorSpec::new(&[1, 4, 2, 2], DType::F32).unwrap();
        let b = TensorSpec::new(&[3], DType::BF16).unwrap();
        let a_data: Vec<u8> = (0..64).collect();
        let b_data = vec![1u8; 6];
        let meta = HashMap::from([("model".to_string(), "sd15".to_string())]);
        let bytes = serialize(
            &[("latents", &a, &a_data), ("extra", &b, &b_data)],
            Some(meta.clone()),
        )
        .unwrap();
        let (tensors, back_meta) = deserialize(&bytes).unwrap();
        assert_eq!(back_meta, meta);
        assert_eq!(tensors.len(), 2);
        let latents = tensors.iter().find(|t| t.name == "latents").unwrap();
        assert_eq!((&latents.spec, &latents.data), (&a, &a_data));
    }

    #[test]
    fn corrupt_files_are_errors() {
        assert!(deserialize(b"").is_err());
        assert!(deserialize(&[255u8; 64]).is_err());
        let a = TensorSpec::new(&[4], DType::U8).unwrap();
        let bytes = serialize(&[("x", &a, &[1, 2, 3, 4])], None).unwrap();
        assert!(deserialize(&bytes[..bytes.len() - 1]).is_err());
        assert!(serialize(&[("x", &a, &[1, 2, 3])], None).is_err());
    }
}

//! vaelink's pure Rust core.
//!
//! Everything a VAE service needs around the network itself: image codecs, the tensor wire format of
//! the Hugging Face remote-VAE protocol, image <-> tensor pre/post-processing, GroupNorm statistics
//! for exact tiling, latent packing, lossless tensor compression and safetensors files. It knows nothing of Python (`vaelink-py` binds it) nor of
//! the network (the HTTP transport is `vaelink-http`).

pub mod compress;
pub mod dtype;
pub mod error;
pub mod group_norm;
pub mod image_codec;
pub mod latents_file;
pub mod packing;
pub mod process;
pub mod wire;

pub use dtype::DType;
pub use error::{Error, Result};
pub use image_codec::RgbImage;
pub use wire::TensorSpec;

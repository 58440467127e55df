"""vaelink: VAE encode/decode for diffusion models, fast, locally or remotely.

This release provides the foundation the engine, server and client stand on: image codecs, tensor
pre/post-processing, the remote-VAE wire format, latent packing, compression and latent files."""

from . import dtypes, image, processing, storage, wire
from .errors import (
    DecodeError,
    EncodeError,
    FormatError,
    ImageTooLargeError,
    TensorError,
    VaelinkError,
)
from .image import decode_image, encode_image, fit_to_multiple, load_rgb, probe_image
from .processing import pack_latents, postprocess, preprocess, unpack_latents
from .storage import load_latents, save_latents
from .wire import compress, decompress, from_bfloat16, from_wire, to_bfloat16, to_wire

__version__ = "0.1.0"

__all__ = [
    "DecodeError",
    "EncodeError",
    "FormatError",
    "ImageTooLargeError",
    "TensorError",
    "VaelinkError",
    "compress",
    "decode_image",
    "decompress",
    "dtypes",
    "encode_image",
    "fit_to_multiple",
    "from_bfloat16",
    "from_wire",
    "image",
    "load_latents",
    "load_rgb",
    "pack_latents",
    "postprocess",
    "preprocess",
    "probe_image",
    "processing",
    "save_latents",
    "storage",
    "to_bfloat16",
    "to_wire",
    "unpack_latents",
    "wire",
]

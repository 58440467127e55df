"""vaelink: VAE encode/decode for diffusion models, fast, locally or remotely.

`vaelink.encode` / `vaelink.decode` (and `vaelink.VAE`, which keeps sessions and connections) run a
model with the local engine, on a remote-VAE endpoint, or on the first of a list that answers. Under
them: image codecs, tensor pre/post-processing, the remote-VAE wire format, latent packing,
compression and latent files, in the Rust core."""

from . import dtypes, image, processing, wire
from .api import VAE, decode, encode
from .batches import ImageInput, LatentInput
from .compress import compress, decompress
from .dtypes import from_bfloat16, to_bfloat16
from .errors import (
    CorruptExportError,
    DecodeError,
    EncodeError,
    EngineError,
    FormatError,
    HubError,
    ImageTooLargeError,
    InvalidEndpointError,
    ModelError,
    ModelMismatchError,
    ModelNotExportedError,
    NonFiniteOutputError,
    OperationCancelledError,
    QueueFullError,
    RejectedRequestError,
    RemoteAuthError,
    RemoteConnectionError,
    RemoteError,
    RemoteRedirectError,
    RemoteRequestError,
    RemoteResponseError,
    RemoteTimeoutError,
    RemoteUnavailableError,
    RuntimeMissingError,
    ServerBusyError,
    ServerError,
    ShuttingDownError,
    TensorError,
    UnknownModelError,
    VaelinkError,
    VaelinkWarning,
)
from .image import (
    decode_image,
    encode_image,
    fit_to_multiple,
    load_rgb,
    probe_image,
    resize_image,
)
from .latents_file import load_latents, save_latents
from .processing import pack_latents, postprocess, preprocess, unpack_latents
from .wire import from_wire, to_wire

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "CorruptExportError",
    "DecodeError",
    "EncodeError",
    "EngineError",
    "FormatError",
    "HubError",
    "ImageInput",
    "ImageTooLargeError",
    "InvalidEndpointError",
    "LatentInput",
    "ModelError",
    "ModelMismatchError",
    "ModelNotExportedError",
    "NonFiniteOutputError",
    "OperationCancelledError",
    "QueueFullError",
    "RejectedRequestError",
    "RemoteAuthError",
    "RemoteConnectionError",
    "RemoteError",
    "RemoteRedirectError",
    "RemoteRequestError",
    "RemoteResponseError",
    "RemoteTimeoutError",
    "RemoteUnavailableError",
    "RuntimeMissingError",
    "ServerBusyError",
    "ServerError",
    "ShuttingDownError",
    "TensorError",
    "UnknownModelError",
    "VaelinkError",
    "VaelinkWarning",
    "compress",
    "decode",
    "decode_image",
    "decompress",
    "dtypes",
    "encode",
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
    "resize_image",
    "save_latents",
    "to_bfloat16",
    "to_wire",
    "unpack_latents",
    "wire",
]

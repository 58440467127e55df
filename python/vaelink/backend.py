"""The interface every place a model runs implements: the local engine (`vaelink.engine.Engine`) and
a remote endpoint (`vaelink.remote.RemoteBackend`). `vaelink.VAE` only picks backends, falls back
from one to the next and converts their outputs; what an input means is settled before a backend
sees it (`vaelink.batches`)."""

from __future__ import annotations

from typing import Any, Protocol

from .batches import ImageBatch, LatentBatch, RawOutput

__all__ = ["Backend"]


class Backend(Protocol):
    def encode(
        self, images: ImageBatch, /, *, sample: bool = False, seed: int | None = None
    ) -> Any:
        """Images -> latents `[B, C, H/f, W/f]` float32, scaled with the model card's factors: the
        posterior mean, or a sample (`seed` makes it reproducible). numpy, or torch for a batch
        held in torch."""
        ...

    def moments(self, images: ImageBatch, /) -> Any:
        """Images -> the encoder's output, unscaled: the posterior's moments `[B, 2C, h, w]` (mean,
        then log-variance) of an AutoencoderKL model; `[B, C, h, w]` latents from a tiny model, or
        from an endpoint that gives latents only (see `RemoteBackend.moments`)."""
        ...

    def decode(self, latents: LatentBatch, /, *, output: RawOutput = "uint8") -> Any:
        """Scaled latents -> uint8 `[B, H, W, 3]` pixels, or the float32 `[B, 3, H, W]` decoder
        output (`output="float"`)."""
        ...

"""A VAE for diffusers pipelines: `vaelink.diffusers.vae(model, endpoint)` is what a pipeline takes as
its `vae` (`Pipeline(vae=...)`, `from_pretrained(..., vae=...)`, `pipe.vae = ...`), and it runs the
model where `vaelink.VAE` does - the local engine, an endpoint, or the first of a list that answers.

A thin adapter, as safetensors' `torch.py` is over its core: `vaelink.VAE` encodes and decodes, this
module only speaks diffusers' dialect. Pipelines work in unscaled latents (they apply
`config.scaling_factor` and `shift_factor` themselves) where vaelink's API takes and gives scaled
ones, so `decode` scales what it is given with the card's factors before `VAE.decode` undoes them,
and `encode` asks `VAE.moments` for the unscaled posterior. The posterior is diffusers' own
`DiagonalGaussianDistribution` over the moments, so `latent_dist.sample(generator)` draws the same
noise from the pipeline's generator as the torch VAE does.

diffusers (and torch) are imported on first use, not with this module."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Unpack

from .api import VAE, Endpoints, VAEOptions
from .batches import ImageInput
from .cards import DEFAULT_MODEL
from .errors import ModelError, RemoteError, TensorError
from .exports import ModelLike
from .frameworks import Tensor, is_torch, torch

__all__ = ["LatentsOnlyPosterior", "vae"]  # and PipelineVAE, made on first use


def vae(
    model: ModelLike | VAE = DEFAULT_MODEL,
    endpoint: Endpoints = None,
    *,
    dtype: Any = None,
    **options: Unpack[VAEOptions],
) -> Any:
    """A `PipelineVAE` of `model` (a card name, an export folder, or a `vaelink.VAE` as it is),
    run locally (`endpoint=None`), on an endpoint, or on the first of a list that answers
    (`[url, ..., "local"]`); `options` are `vaelink.VAE`'s. `dtype` (a torch dtype, float32 by
    default) is the dtype of the tensors it returns, as a torch VAE's weights set it; `to()`
    changes it, as pipelines do.

    Args:
        model: A card name, an export folder, or a `vaelink.VAE` to wrap as it is.
        endpoint: None (local), a URL, or a list of URLs, `"local"` and `(url, token)` pairs.
        dtype: The torch dtype of the tensors returned (default: float32).
        **options: `vaelink.VAE`'s keyword arguments (`token`, `timeout`, ...).

    Returns:
        The `PipelineVAE`, a diffusers `ModelMixin`.

    Raises:
        TypeError: `endpoint` or `options` given with a `vaelink.VAE`; or, as for `vaelink.VAE`,
            an invalid endpoint entry.
        ValueError: An invalid endpoint list or tokens, as for `vaelink.VAE`.
        ModelError: `model` cannot be resolved (`UnknownModelError`, `CorruptExportError`), or
            its spatial factor is no power of 2.
        ImportError: diffusers or torch is not installed.
    """
    if isinstance(model, VAE):
        if endpoint is not None or options:
            raise TypeError("endpoint and options belong to the vaelink.VAE given, not here")
        core = model
    else:
        core = VAE(model, endpoint, **options)
    return _adapter_class()(core, dtype=dtype)


def __getattr__(name: str) -> Any:
    """`PipelineVAE`, made when first asked for (it subclasses diffusers' `ModelMixin`)."""
    if name == "PipelineVAE":
        return _adapter_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _seeds(generator: Any, count: int) -> list[int]:
    """Seeds for a server's sampler, drawn from the pipeline's generator (or each of a list)."""
    generators = generator if isinstance(generator, list) else [generator] * count
    seeds = []
    for g in generators:
        device = g.device if g is not None else "cpu"
        seeds.append(int(torch().randint(0, 2**31 - 1, (1,), generator=g, device=device)))
    return seeds


class LatentsOnlyPosterior:
    """The posterior as far as an endpoint that answers latents only (not `vaelink serve`) lets
    it be known: `mean` and `mode()` are its latents; `sample(generator)` asks it again with
    `sample=True` and a seed drawn from the generator (one per image for a list of generators):
    a sample of the posterior, but not the noise the torch VAE would draw; `std` is unknown."""

    def __init__(self, mean: Tensor, resample: Callable[[Sequence[int]], Tensor]) -> None:
        self.mean = mean
        self._resample = resample

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: Any = None) -> Tensor:
        return self._resample(_seeds(generator, len(self.mean)))

    @property
    def std(self) -> Tensor:
        raise RemoteError(
            "the endpoint answered latents only, not the posterior's moments: its std is unknown "
            "(vaelink serve gives them)"
        )


@functools.cache
def _adapter_class() -> type[Any]:
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput
    from diffusers.models.autoencoders.vae import (
        AutoencoderMixin,
        DecoderOutput,
        DiagonalGaussianDistribution,
    )
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
    from diffusers.utils.accelerate_utils import apply_forward_hook

    class PipelineVAE(ModelMixin, AutoencoderMixin, ConfigMixin):
        """A `vaelink.VAE` with the surface of diffusers' `AutoencoderKL` (`AutoencoderTiny` for
        tiny models): `config`, `dtype`, `device`, `to()`, `encode()` and `decode()`, tiling
        and slicing switches. It holds no weights: one empty parameter carries the device and dtype
        that `to()`, `pipe.to()` and CPU offload give it, and outputs are returned in that dtype,
        on the device of their input (where the engine ran, or where the answer was put).

        `config.block_out_channels` only has the right length (`vae_scale_factor` is
        `2 ** (len - 1)`); `force_upcast` is False: the engine recomputes non-finite float16
        output in float32 itself. `enable_tiling()` and `enable_slicing()` set the flags pipelines
        read; vaelink tiles and slices on its own when an image or batch would not fit its memory
        budget (the engine), or beyond the server's size (`vaelink serve`)."""

        def __init__(self, core: VAE, dtype: Any = None) -> None:
            super().__init__()
            card = core.card
            blocks = int(math.log2(card.spatial_factor)) + 1
            if 2 ** (blocks - 1) != card.spatial_factor:
                raise ModelError(
                    f"{card.name}: spatial factor {card.spatial_factor} is no power of 2"
                )
            self.register_to_config(
                in_channels=3,
                out_channels=3,
                latent_channels=card.latent_channels,
                block_out_channels=[128] * blocks,
                scaling_factor=card.scaling_factor,
                shift_factor=card.shift_factor,
                latents_mean=list(card.latents_mean) if card.latents_mean else None,
                latents_std=list(card.latents_std) if card.latents_std else None,
                force_upcast=False,
                vaelink_model=card.name,
            )
            # Empty: where `to()` and the offload hooks (which look at the parameters) put it.
            placement = torch().empty(0, dtype=dtype or torch().float32)
            self.placement = torch().nn.Parameter(placement, requires_grad=False)
            self.vaelink = core
            self.use_tiling = False
            self.use_slicing = False

        def extra_repr(self) -> str:
            return repr(self.vaelink)

        @apply_forward_hook  # type: ignore[untyped-decorator]
        def encode(self, x: Tensor, return_dict: bool = True) -> Any:
            """Images `[B, 3, H, W]` in [-1, 1] -> `AutoencoderKLOutput(latent_dist)`, unscaled
            (`AutoencoderTinyOutput(latents)` for tiny models)."""
            _check_tensor(x, "images")
            card = self.vaelink.card
            moments = self.vaelink.moments(x, fit=None).to(self.dtype)
            if not card.has_posterior:
                output: Any = AutoencoderTinyOutput(latents=moments)
                return output if return_dict else (moments,)
            if moments.shape[1] == 2 * card.latent_channels:
                posterior: Any = DiagonalGaussianDistribution(moments)
            else:
                posterior = LatentsOnlyPosterior(moments, lambda seeds: self._sample(x, seeds))
            return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

        def _sample(self, x: Tensor, seeds: Sequence[int]) -> Tensor:
            """Posterior samples with the server's sampler: the batch with one seed, else each
            image with its own."""
            core = self.vaelink
            if len(set(seeds)) == 1:
                latents = core.encode(x, sample=True, seed=seeds[0], fit=None)
            else:
                pieces = [
                    core.encode(x[i : i + 1], sample=True, seed=seed, fit=None)
                    for i, seed in enumerate(seeds)
                ]
                latents = torch().cat(pieces)
            return core.card.scaling.invert(latents).to(self.dtype)

        @apply_forward_hook  # type: ignore[untyped-decorator]
        def decode(self, z: Tensor, return_dict: bool = True, generator: Any = None) -> Any:
            """Unscaled latents `[B, C, h, w]` -> `DecoderOutput(sample)`: the raw decoder
            output `[B, 3, H, W]`, as the torch VAE's. `generator` is taken and not needed."""
            _check_tensor(z, "latents")
            latents = self.vaelink.card.scaling.apply(z.float())
            images = self.vaelink.decode(latents, output="float").to(self.dtype)
            return DecoderOutput(sample=images) if return_dict else (images,)

        def forward(
            self,
            sample: Tensor,
            sample_posterior: bool = False,
            return_dict: bool = True,
            generator: Any = None,
        ) -> Any:
            """Encode and decode, as `AutoencoderKL.forward`."""
            encoded = self.encode(sample)
            if hasattr(encoded, "latents"):
                z = encoded.latents
            else:
                dist = encoded.latent_dist
                z = dist.sample(generator) if sample_posterior else dist.mode()
            return self.decode(z, return_dict=return_dict)

    PipelineVAE.__module__ = __name__
    PipelineVAE.__qualname__ = "PipelineVAE"
    return PipelineVAE


def _check_tensor(value: ImageInput | Any, what: str) -> None:
    """Pipelines hand torch tensors; anything else is refused as a torch VAE would."""
    if not is_torch(value):
        raise TensorError(f"{what} for a pipeline VAE must be a torch tensor, got {type(value)}")

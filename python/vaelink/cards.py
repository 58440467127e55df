"""Model cards: what vaelink knows about each VAE it supports, kept in `vaelink/models/*.toml`.

Latent normalisation constants live here, in vaelink's own cards, not in exported configs:
`latents = (z - shift_factor) * scaling_factor` after encoding, the inverse before decoding
(`ModelCard.scaling`)."""

from __future__ import annotations

import dataclasses
import functools
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from .errors import UnknownModelError, VaelinkError

__all__ = ["DEFAULT_MODEL", "IDENTITY", "ModelCard", "Scaling", "get_card", "list_cards"]

DEFAULT_MODEL = "vaelink-tiny"
"""The model bundled with the package: it works offline, out of the box."""

Architecture = Literal["AutoencoderKL", "AutoencoderTiny"]


@dataclass(frozen=True)
class Scaling:
    """The latent normalisation `latents = (z - shift) * factor`: `apply` after the encoder,
    `invert` before the decoder. Works on numpy arrays and torch tensors alike."""

    factor: float = 1.0
    shift: float = 0.0

    def apply(self, z: Any) -> Any:
        if self.is_identity:
            return z
        return (z - self.shift) * self.factor

    def invert(self, latents: Any) -> Any:
        if self.is_identity:
            return latents
        return latents / self.factor + self.shift

    @property
    def is_identity(self) -> bool:
        return self.factor == 1.0 and self.shift == 0.0


IDENTITY = Scaling()


@dataclass(frozen=True)
class ModelCard:
    name: str
    description: str
    architecture: Architecture
    latent_channels: int
    scaling_factor: float
    shift_factor: float = 0.0
    spatial_factor: int = 8
    repo: str | None = None
    subfolder: str | None = None
    revision: str | None = None
    packed_latents: bool = False
    """Its pipelines pass latents packed 2x2 (`[B, HW/4, 4C]`, FLUX.1)."""

    @property
    def has_posterior(self) -> bool:
        """AutoencoderKL encoders give a Gaussian posterior (mean, logvar); tiny ones a latent."""
        return self.architecture == "AutoencoderKL"

    @property
    def scaling(self) -> Scaling:
        return Scaling(self.scaling_factor, self.shift_factor)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise VaelinkError(f"model card has unknown keys: {sorted(unknown)}")
        return cls(**data)


@functools.cache
def _cards() -> dict[str, ModelCard]:
    cards = {}
    for entry in resources.files("vaelink.models").iterdir():
        if entry.name.endswith(".toml"):
            card = ModelCard.from_dict(tomllib.loads(entry.read_text()))
            cards[card.name] = card
    return cards


def list_cards() -> list[ModelCard]:
    return sorted(_cards().values(), key=lambda c: c.name)


def get_card(name: str) -> ModelCard:
    try:
        return _cards()[name]
    except KeyError:
        known = ", ".join(sorted(_cards()))
        raise UnknownModelError(f"unknown model {name!r}; known models: {known}") from None

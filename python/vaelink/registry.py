"""Model cards: what vaelink knows about each VAE it supports, kept in `vaelink/models/*.toml`.

Latent normalisation constants live here, in vaelink's own cards, not in exported configs:
`latents = (z - shift_factor) * scaling_factor` after encoding, the inverse before decoding."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from .errors import VaelinkError

__all__ = ["ModelCard", "UnknownModelError", "get_card", "list_cards"]

Architecture = Literal["AutoencoderKL", "AutoencoderTiny"]


class UnknownModelError(VaelinkError, KeyError):
    """A model name with no card."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise VaelinkError(f"model card has unknown keys: {sorted(unknown)}")
        return cls(**data)


def _load_cards() -> dict[str, ModelCard]:
    cards = {}
    for entry in resources.files("vaelink.models").iterdir():
        if entry.name.endswith(".toml"):
            card = ModelCard.from_dict(tomllib.loads(entry.read_text()))
            cards[card.name] = card
    return cards


_CARDS = _load_cards()


def list_cards() -> list[ModelCard]:
    return sorted(_CARDS.values(), key=lambda c: c.name)


def get_card(name: str) -> ModelCard:
    try:
        return _CARDS[name]
    except KeyError:
        known = ", ".join(sorted(_CARDS))
        raise UnknownModelError(f"unknown model {name!r}; known models: {known}") from None

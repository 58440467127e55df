"""Model cards: what vaelink knows about each VAE it supports, kept in `vaelink/models/*.toml`.

Latent normalisation constants live in the cards: `latents = (z - shift_factor) * scaling_factor`
after encoding, the inverse before decoding (`ModelCard.scaling`). An export's card (in its
manifest) takes them from the source's `config.json` where it states them (`fit_card`); a VAE that
is none of the cards gets a card derived from its config (`card_from_config`)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from .errors import ModelMismatchError, UnknownModelError, VaelinkError

__all__ = [
    "DEFAULT_MODEL",
    "IDENTITY",
    "ModelCard",
    "Scaling",
    "card_from_config",
    "check_fits",
    "fit_card",
    "get_card",
    "list_cards",
    "memory_config",
    "read_config",
]

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
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    """Per-channel statistics from the VAE's `config.json`, for the families whose pipelines
    normalise latents with them (`(z - mean) * scaling_factor / std`); recorded, not applied."""

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
        stats = {k: tuple(data[k]) for k in ("latents_mean", "latents_std") if data.get(k)}
        return cls(**{**data, **stats})


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
        raise UnknownModelError(f"unknown model {name!r}; {known_models_hint(name)}") from None


def known_models_hint(name: str) -> str:
    """ "did you mean 'sdxl'? known models: ..." for a name with no card."""
    known = sorted(_cards())
    close = difflib.get_close_matches(str(name).lower(), known, n=1, cutoff=0.6)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f"{guess}known models: {', '.join(known)}"


# -- cards from a diffusers config.json ------------------------------------------------------------

_STRUCTURE = ("architecture", "latent_channels", "spatial_factor")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    return float(value)


def _config_constants(config: dict[str, Any], channels: int) -> dict[str, Any]:
    """The constants a config states (keys it lacks or leaves null are left out)."""
    found: dict[str, Any] = {}
    try:
        for key in ("scaling_factor", "shift_factor"):
            if config.get(key) is not None:
                found[key] = _number(config[key])
        for key in ("latents_mean", "latents_std"):
            value = config.get(key)
            if value is not None:
                if not isinstance(value, list | tuple) or len(value) != channels:
                    raise ValueError(f"{key} is not a list of {channels} numbers")
                found[key] = tuple(_number(v) for v in value)
    except ValueError as e:
        raise VaelinkError(f"bad constants: {e}") from None
    if found.get("scaling_factor", 1.0) <= 0:
        raise VaelinkError(f"scaling_factor must be positive, not {found['scaling_factor']}")
    return found


def read_config(path: Path) -> dict[str, Any]:
    """A diffusers `config.json` as written (keys it lacks stay unknown)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VaelinkError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise VaelinkError(f"{path} is not a JSON object")
    return config


def memory_config(config: dict[str, Any], card: ModelCard) -> dict[str, Any]:
    """What the engine's memory model needs from a VAE's config: the widest full-resolution block
    and whether the mid-block has attention (exported as MultiHeadAttention, which holds no score
    matrix: `flash_attention`)."""
    widths = config.get("block_out_channels") or config.get("encoder_block_out_channels") or [128]
    attention = card.has_posterior and bool(config.get("mid_block_add_attention", True))
    return {"full_res_channels": int(widths[0]), "attention": attention, "flash_attention": True}


def card_from_config(name: str, config: dict[str, Any], *, where: str = "config.json") -> ModelCard:
    """The card of a diffusers VAE described by its `config.json` (a fine-tune, a custom VAE): the
    architecture, latent channels, the spatial factor (from the blocks: each block but the last
    halves the size) and the constants; `ModelMismatchError` for a VAE vaelink cannot run."""
    architecture = config.get("_class_name")
    if architecture not in ("AutoencoderKL", "AutoencoderTiny"):
        raise ModelMismatchError(
            f"{where} describes a {architecture or 'model of no known class'}; vaelink runs "
            "AutoencoderKL and AutoencoderTiny VAEs"
        )
    blocks = config.get(
        "block_out_channels" if architecture == "AutoencoderKL" else "encoder_block_out_channels"
    )
    channels = config.get("latent_channels")
    if (
        not isinstance(blocks, list | tuple)
        or not blocks
        or not isinstance(channels, int)
        or channels < 1
    ):
        raise ModelMismatchError(f"{where} lacks the latent channels or the blocks of a VAE")
    try:
        constants = _config_constants(config, channels)
    except VaelinkError as e:
        raise ModelMismatchError(f"{where}: {e}") from None
    default = 0.18215 if architecture == "AutoencoderKL" else 1.0  # diffusers' own defaults
    return ModelCard(
        name=name,
        description=f"{architecture} with {channels} latent channels, from its config.json",
        architecture=architecture,
        latent_channels=channels,
        spatial_factor=2 ** (len(blocks) - 1),
        **{"scaling_factor": default, **constants},
    )


def check_fits(card: ModelCard, config: dict[str, Any], where: str = "config.json") -> None:
    """`ModelMismatchError`, in one sentence naming the difference, when the VAE `config` describes
    is of another structure than `card`'s: architecture, latent channels, spatial factor."""
    derived = card_from_config(card.name, config, where=where)
    for key in _STRUCTURE:
        ours, theirs = getattr(card, key), getattr(derived, key)
        if ours != theirs:
            raise ModelMismatchError(
                f"{where} does not fit the card {card.name!r}: its {key.replace('_', ' ')} is "
                f"{theirs}, {card.name}'s is {ours} (export it under a card that fits, or with "
                "--name as a custom VAE)"
            )


def fit_card(
    card: ModelCard, config: dict[str, Any], where: str = "config.json"
) -> tuple[ModelCard, dict[str, Any]]:
    """`card` with the constants its source's `config.json` states (the card's own stand in for
    those it does not), and what the two disagreed on (`{key: {"card": ..., "config": ...}}`);
    `check_fits` first."""
    check_fits(card, config, where)
    stated = _config_constants(config, card.latent_channels)
    disagreements = {
        key: {"card": getattr(card, key), "config": value}
        for key, value in stated.items()
        if getattr(card, key) != value
    }
    values = {key: stated[key] for key in disagreements}
    return dataclasses.replace(card, **values), disagreements

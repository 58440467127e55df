"""Model cards: the eight supported VAEs with the constants their pipelines use, and `vaelink models`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from vaelink import cli
from vaelink.cards import IDENTITY, ModelCard, Scaling, get_card, list_cards
from vaelink.errors import UnknownModelError, VaelinkError

# name: (architecture, latent channels, scaling factor, shift factor, packed latents, repo)
EXPECTED = {
    "sd15": ("AutoencoderKL", 4, 0.18215, 0.0, False, "stabilityai/sd-vae-ft-mse"),
    "sdxl": ("AutoencoderKL", 4, 0.13025, 0.0, False, "madebyollin/sdxl-vae-fp16-fix"),
    "sd3": (
        "AutoencoderKL",
        16,
        1.5305,
        0.0609,
        False,
        "stabilityai/stable-diffusion-3-medium-diffusers",
    ),
    "flux1": ("AutoencoderKL", 16, 0.3611, 0.1159, True, "black-forest-labs/FLUX.1-schnell"),
    "taesd": ("AutoencoderTiny", 4, 1.0, 0.0, False, "madebyollin/taesd"),
    "taesdxl": ("AutoencoderTiny", 4, 1.0, 0.0, False, "madebyollin/taesdxl"),
    "taesd3": ("AutoencoderTiny", 16, 1.0, 0.0, False, "madebyollin/taesd3"),
    "taef1": ("AutoencoderTiny", 16, 1.0, 0.0, True, "madebyollin/taef1"),
}


def test_all_cards_load() -> None:
    names = [card.name for card in list_cards()]
    assert names == sorted(names)
    assert set(EXPECTED) <= set(names)  # vaelink's own bundled model has a card too


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_card_constants(name: str) -> None:
    architecture, channels, scaling, shift, packed, repo = EXPECTED[name]
    card = get_card(name)
    assert card.name == name
    assert card.architecture == architecture
    assert card.latent_channels == channels
    assert card.scaling_factor == scaling
    assert card.shift_factor == shift
    assert card.packed_latents is packed
    assert card.repo == repo
    assert card.spatial_factor == 8
    assert card.has_posterior is (architecture == "AutoencoderKL")
    assert card.description
    # The hub layout: the full pipelines keep the VAE in a subfolder.
    assert card.subfolder == ("vae" if name in ("sd3", "flux1") else None)


def test_cards_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_card("sd15").scaling_factor = 1.0  # type: ignore[misc]


def test_card_round_trips_through_a_dict() -> None:
    for card in list_cards():
        assert ModelCard.from_dict(dataclasses.asdict(card)) == card


def test_card_with_unknown_keys_is_refused() -> None:
    data = dataclasses.asdict(get_card("sdxl")) | {"scale": 0.5}
    with pytest.raises(VaelinkError, match="unknown keys: \\['scale'\\]"):
        ModelCard.from_dict(data)


def test_unknown_model() -> None:
    with pytest.raises(UnknownModelError) as info:
        get_card("sd2")
    error = info.value
    assert isinstance(error, KeyError) and isinstance(error, VaelinkError)
    message = str(error)
    assert message.startswith("unknown model 'sd2'")  # not quoted as KeyError would
    assert "known models: flux1, sd15, sd3, sdxl, taef1, taesd, taesd3, taesdxl" in message
    with pytest.raises(UnknownModelError) as far:
        get_card("wan-2.1")
    assert "did you mean" not in str(far.value)  # nothing close enough to guess


@pytest.mark.parametrize(("typed", "meant"), [("sdx", "sdxl"), ("SD15", "sd15"), ("tasd", "taesd")])
def test_unknown_model_suggests_the_nearest_name(typed: str, meant: str) -> None:
    with pytest.raises(UnknownModelError, match=f"did you mean '{meant}'\\? known models: "):
        get_card(typed)


def test_models_json_lists_every_card_with_its_exports(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VAELINK_HOME", str(tmp_path))  # nothing exported there
    assert cli.main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [entry["name"] for entry in listing] == [card.name for card in list_cards()]
    for entry in listing:
        exported = entry.pop("exported")
        assert ModelCard.from_dict(entry) == get_card(entry["name"])  # the whole card, as data
        # Only the bundled model is exported here, and it holds both variants.
        assert exported == (["float32", "float16"] if entry["name"] == "vaelink-tiny" else None)


def test_models_command_lists_the_cards(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VAELINK_HOME", str(tmp_path))  # nothing exported there
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, rows = lines[0], lines[1:]
    assert header.split()[:4] == ["model", "architecture", "latent", "exported"]
    assert [row.split()[0] for row in rows] == [card.name for card in list_cards()]
    for row in rows:
        name, architecture, channels, exported, *description = row.split()
        if name not in EXPECTED:
            continue
        assert architecture == EXPECTED[name][0]
        assert int(channels) == EXPECTED[name][1]
        assert exported == "-"
        assert " ".join(description) == get_card(name).description


# -- Scaling: one definition of the latent normalisation --------------------------------------------


def test_scaling_applies_and_inverts_the_cards_factors() -> None:
    card = get_card("flux1")
    z = np.random.default_rng(0).standard_normal((1, 16, 4, 4)).astype(np.float32)
    latents = card.scaling.apply(z)
    assert latents.dtype == np.float32
    assert np.array_equal(latents, (z - np.float32(0.1159)) * np.float32(0.3611))
    assert np.allclose(card.scaling.invert(latents), z, rtol=1e-6, atol=1e-6)


def test_the_identity_scaling_returns_its_input() -> None:
    z = np.ones((1, 4, 2, 2), np.float32)
    assert IDENTITY.is_identity and IDENTITY.apply(z) is z and IDENTITY.invert(z) is z
    assert get_card("taesd").scaling == IDENTITY
    assert not Scaling(0.13025).is_identity

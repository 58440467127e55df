"""`vaelink.diffusers.vae` inside real diffusers pipelines, assembled offline from tiny configs with
seeded weights (no text encoders: prompt embeddings are passed in). Every pipeline runs twice with the
same generator seed - once with the vaelink VAE, once with the torch VAE of the same weights - and the
images must agree within the engine's float32 tolerance; locally, through `vaelink serve` on loopback,
and through a fallback list."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import engine_fixtures as ef
import numpy as np
import pytest
import torch
from client_fixtures import FakeEndpoint, Seen, closed_port_url, tensor_answer
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from server_fixtures import LiveServer

import vaelink
import vaelink.diffusers
from vaelink._native import HttpClient
from vaelink.diffusers import LatentsOnlyPosterior
from vaelink.errors import RemoteError, TensorError
from vaelink.exports import Model
from vaelink.server import Batching, create_app

TOL = 1e-4  # float32, relative to the torch VAE's largest magnitude (tests/test_engine.py)
SIZE = 32  # pixels
EMBED = 32  # width of the prompt embeddings the tiny denoisers take
STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with ef.one_torch_thread():
        yield


def _exported(key: str) -> Any:
    """A module fixture: the tiny model `key` of `engine_fixtures`, exported."""

    def fixture(tmp_path_factory: pytest.TempPathFactory) -> ef.Exported:
        return ef.exported(key, tmp_path_factory)

    return pytest.fixture(scope="module")(fixture)


sd15_vae = _exported("sd15-like")
sdxl_vae = _exported("sdxl-like")
sd3_vae = _exported("sd3-like")
flux_vae = _exported("flux-like")


@pytest.fixture(scope="module")
def photo(photos: dict[str, np.ndarray]) -> torch.Tensor:
    """A SIZE x SIZE crop of a photo, float NCHW in [0, 1] (what pipelines take as `image`)."""
    pixels = ef.photo_batch(photos["astronaut"], 1, SIZE, SIZE)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def embeds(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=generator(seed))


def unet(in_channels: int = 4, **extra: Any) -> UNet2DConditionModel:
    torch.manual_seed(ef.SEED)
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=EMBED,
        attention_head_dim=2,
        norm_num_groups=4,
        **extra,
    ).eval()


def ddim() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def no_text_encoders(count: int) -> dict[str, None]:
    """`text_encoder`, `tokenizer`, `text_encoder_2`, ... as None: embeddings are passed in."""
    kinds = ("text_encoder", "tokenizer")
    return dict.fromkeys(
        f"{k}{f'_{i}' if i > 1 else ''}" for i in range(1, count + 1) for k in kinds
    )


def sd_pipeline(cls: Any, vae: Any, in_channels: int = 4) -> Any:
    return cls(
        vae=vae,
        unet=unet(in_channels),
        scheduler=ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **no_text_encoders(1),
    )


def sd_call(**extra: Any) -> dict[str, Any]:
    return dict(
        prompt_embeds=embeds(1, 4, EMBED),
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        height=SIZE,
        width=SIZE,
        output_type="pt",
        **extra,
    )


_REFERENCES: dict[str, AutoencoderKL] = {}


def torch_vae(model: ef.Exported) -> AutoencoderKL:
    """The torch VAE of the export, its config's factors the card's (as a real model's are)."""
    if model.key not in _REFERENCES:
        vae = copy.deepcopy(model.vae)
        card = model.card
        vae.register_to_config(scaling_factor=card.scaling_factor, shift_factor=card.shift_factor)
        _REFERENCES[model.key] = vae
    return _REFERENCES[model.key]


def both(pipe: Any, link: Any, model: ef.Exported, **call: Any) -> tuple[Any, Any]:
    """The pipeline's images with the vaelink VAE, then with the torch VAE of the same weights,
    from the same generator seed."""
    pipe.vae = link
    ours = pipe(generator=generator(), **call).images
    pipe.vae = torch_vae(model)
    theirs = pipe(generator=generator(), **call).images
    pipe.vae = link
    return ours, theirs


def assert_same_images(ours: Any, theirs: Any) -> None:
    assert ours.shape == theirs.shape == (1, 3, SIZE, SIZE)
    assert float(theirs.std()) > 1e-3  # a picture, not a flat field
    assert ef.rel_err(ours, theirs) <= TOL


# -- the VAE's surface ----------------------------------------------------------------------------


def test_config_and_scale_factor(sd15_vae: ef.Exported, flux_vae: ef.Exported) -> None:
    for model in (sd15_vae, flux_vae):
        link = vaelink.diffusers.vae(model.folder, provider="cpu")
        card = model.card
        config = link.config
        assert 2 ** (len(config.block_out_channels) - 1) == card.spatial_factor
        assert config.latent_channels == card.latent_channels
        assert config.scaling_factor == card.scaling_factor
        assert config.shift_factor == card.shift_factor
        assert config.force_upcast is False
        assert link.dtype == torch.float32 and link.device == torch.device("cpu")
    assert link.config.latents_mean is None and link.config.latents_std is None
    stats = dataclasses.replace(flux_vae.card, latents_mean=(0.5,) * 16, latents_std=(2.0,) * 16)
    config = vaelink.diffusers.vae(Model(stats, flux_vae.folder)).config
    assert config.latents_mean == [0.5] * 16 and config.latents_std == [2.0] * 16
    pipe = sd_pipeline(StableDiffusionPipeline, vaelink.diffusers.vae(sd15_vae.folder))
    assert pipe.vae_scale_factor == sd15_vae.card.spatial_factor == 2
    assert isinstance(pipe.vae, vaelink.diffusers.PipelineVAE)


def test_importing_it_imports_neither_diffusers_nor_torch() -> None:
    code = "import sys, vaelink.diffusers; print(sorted({'diffusers', 'torch'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_posterior_sample_equals_the_torch_vaes_for_the_same_generator(
    sd3_vae: ef.Exported, photo: torch.Tensor
) -> None:
    link = vaelink.diffusers.vae(sd3_vae.folder)
    x = photo * 2 - 1
    ours = link.encode(x).latent_dist
    with torch.no_grad():
        theirs = sd3_vae.vae.encode(x).latent_dist
    for name in ("mean", "std"):
        assert ef.rel_err(getattr(ours, name), getattr(theirs, name)) <= TOL, name
    assert ef.rel_err(ours.mode(), theirs.mode()) <= TOL
    sample = ours.sample(generator(7))
    assert ef.rel_err(sample, theirs.sample(generator(7))) <= TOL
    assert not torch.allclose(sample, ours.sample(generator(8)))
    (tuple_dist,) = link.encode(x, return_dict=False)
    assert torch.equal(tuple_dist.mean, ours.mean)


def test_decode_undoes_the_scaling_once(sd3_vae: ef.Exported) -> None:
    link = vaelink.diffusers.vae(sd3_vae.folder)
    z = embeds(1, 16, 8, 8)  # unscaled, as pipelines hand them
    with torch.no_grad():
        expected = sd3_vae.vae.decode(z).sample
    assert ef.rel_err(link.decode(z).sample, expected) <= TOL
    (images,) = link.decode(z, return_dict=False)
    assert ef.rel_err(images, expected) <= TOL


def test_dtype_follows_to(sd15_vae: ef.Exported, photo: torch.Tensor) -> None:
    link = vaelink.diffusers.vae(sd15_vae.folder)
    assert link.to(torch.float16) is link
    assert link.dtype == torch.float16
    assert link.decode(embeds(1, 4, 8, 8)).sample.dtype == torch.float16
    assert link.encode(photo.half() * 2 - 1).latent_dist.sample().dtype == torch.float16
    link.to(dtype=torch.float32)
    assert link.decode(embeds(1, 4, 8, 8)).sample.dtype == torch.float32
    half = vaelink.diffusers.vae(sd15_vae.folder, dtype=torch.float16)
    assert half.dtype == torch.float16
    assert half.decode(embeds(1, 4, 8, 8)).sample.dtype == torch.float16


def test_tiling_and_slicing_switches(sd15_vae: ef.Exported) -> None:
    link = vaelink.diffusers.vae(sd15_vae.folder)
    link.enable_tiling()
    link.enable_slicing()
    assert link.use_tiling and link.use_slicing
    link.disable_tiling()
    link.disable_slicing()
    assert not link.use_tiling and not link.use_slicing


def test_bad_input_is_a_clear_error(sd15_vae: ef.Exported) -> None:
    link = vaelink.diffusers.vae(sd15_vae.folder)
    with pytest.raises(TensorError, match=r"latents must be \[B, 4, H, W\]"):
        link.decode(embeds(1, 16, 8, 8))
    with pytest.raises(TensorError, match="torch tensor"):
        link.decode(np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(TensorError, match="multiple of 2"):
        link.encode(torch.zeros(1, 3, 9, 9))
    with pytest.raises(TypeError, match="endpoint"):
        vaelink.diffusers.vae(vaelink.VAE(sd15_vae.folder), "http://127.0.0.1:1/")


# -- pipelines ------------------------------------------------------------------------------------


def test_sd15_txt2img(sd15_vae: ef.Exported) -> None:
    link = vaelink.diffusers.vae(sd15_vae.folder)
    pipe = sd_pipeline(StableDiffusionPipeline, link)
    assert_same_images(*both(pipe, link, sd15_vae, **sd_call()))


def test_sd15_img2img(sd15_vae: ef.Exported, photo: torch.Tensor) -> None:
    """The init image is encoded with a posterior sample from the pipeline's generator."""
    link = vaelink.diffusers.vae(sd15_vae.folder)
    pipe = sd_pipeline(StableDiffusionImg2ImgPipeline, link)
    call = sd_call(image=photo, strength=0.5)
    del call["height"], call["width"]
    ours, theirs = both(pipe, link, sd15_vae, **call)
    assert_same_images(ours, theirs)


def test_sd15_inpaint(sd15_vae: ef.Exported, photo: torch.Tensor) -> None:
    link = vaelink.diffusers.vae(sd15_vae.folder)
    pipe = sd_pipeline(StableDiffusionInpaintPipeline, link, in_channels=9)
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 8:24, 8:24] = 1
    assert_same_images(*both(pipe, link, sd15_vae, **sd_call(image=photo, mask_image=mask)))


def test_sdxl(sdxl_vae: ef.Exported) -> None:
    link = vaelink.diffusers.vae(sdxl_vae.folder)
    pooled = 32
    text_time = dict(addition_embed_type="text_time", addition_time_embed_dim=8)
    denoiser = unet(
        **text_time,
        projection_class_embeddings_input_dim=6 * 8 + pooled,
        use_linear_projection=True,
    )
    pipe = StableDiffusionXLPipeline(
        vae=link, unet=denoiser, scheduler=ddim(), **no_text_encoders(2)
    )
    assert pipe.vae_scale_factor == 4
    call = sd_call(pooled_prompt_embeds=embeds(1, pooled, seed=2))
    assert_same_images(*both(pipe, link, sdxl_vae, **call))


def seeded(cls: Any, **config: Any) -> Any:
    """A model with seeded random weights, attending over EMBED-wide prompt embeddings."""
    torch.manual_seed(ef.SEED)
    return cls(patch_size=1, num_layers=1, joint_attention_dim=EMBED, **config).eval()


def flow_matching(cls: Any, model: ef.Exported, transformer: Any, encoders: int) -> None:
    """SD3 and FLUX.1: a transformer, flow matching, pooled embeddings."""
    link = vaelink.diffusers.vae(model.folder)
    scheduler = FlowMatchEulerDiscreteScheduler()
    pipe = cls(transformer=transformer, scheduler=scheduler, vae=link, **no_text_encoders(encoders))
    assert pipe.vae_scale_factor == model.card.spatial_factor
    call = sd_call(pooled_prompt_embeds=embeds(1, EMBED, seed=2))
    if cls is FluxPipeline:
        del call["guidance_scale"]
    assert_same_images(*both(pipe, link, model, **call))


def test_sd3(sd3_vae: ef.Exported) -> None:
    transformer = seeded(
        SD3Transformer2DModel,
        sample_size=8,
        in_channels=16,
        out_channels=16,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        pooled_projection_dim=EMBED,
    )
    flow_matching(StableDiffusion3Pipeline, sd3_vae, transformer, encoders=3)


def test_flux(flux_vae: ef.Exported) -> None:
    transformer = seeded(
        FluxTransformer2DModel,
        in_channels=64,  # 16 latent channels packed 2 x 2
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        pooled_projection_dim=EMBED,
        axes_dims_rope=(4, 4, 8),
    )
    flow_matching(FluxPipeline, flux_vae, transformer, encoders=2)


def test_cpu_offload_and_pipe_to(sd15_vae: ef.Exported, photo: torch.Tensor) -> None:
    """`enable_model_cpu_offload` hooks the VAE as any model (with the CPU as the accelerator here),
    and `pipe.to` moves it: the images stay the torch VAE's."""
    link = vaelink.diffusers.vae(sd15_vae.folder)
    pipe = sd_pipeline(StableDiffusionImg2ImgPipeline, link)
    call = sd_call(image=photo, strength=0.5)
    del call["height"], call["width"]
    _, theirs = both(pipe, link, sd15_vae, **call)
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(link, "_hf_hook")
    assert_same_images(pipe(generator=generator(), **call).images, theirs)
    pipe.remove_all_hooks()
    pipe.to("cpu")
    assert link.device == torch.device("cpu") and pipe.device == torch.device("cpu")
    assert_same_images(pipe(generator=generator(), **call).images, theirs)


def test_from_pretrained_takes_it(sd15_vae: ef.Exported, tmp_path: Path) -> None:
    """A saved pipeline loaded with `vae=` the vaelink VAE: diffusers checks that a component
    passed in has the class the pipeline expects (a `ModelMixin`)."""
    sd_pipeline(StableDiffusionPipeline, sd15_vae.vae).save_pretrained(tmp_path)
    link = vaelink.diffusers.vae(sd15_vae.folder)
    none = dict.fromkeys(("text_encoder", "tokenizer", "safety_checker", "feature_extractor"))
    pipe = StableDiffusionPipeline.from_pretrained(
        tmp_path, vae=link, local_files_only=True, requires_safety_checker=False, **none
    )
    assert pipe.vae is link
    assert_same_images(*both(pipe, link, sd15_vae, **sd_call()))


# -- remotely -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_server(sd15_vae: ef.Exported) -> Iterator[LiveServer]:
    app = create_app({"tiny-sd15": sd15_vae.engine()}, batching=Batching(enabled=False))
    with LiveServer(app) as live:
        yield live


FAST = HttpClient(backoff=0.01, max_backoff=0.05)


def test_img2img_through_vaelink_serve_with_a_fallback_list(
    sd15_vae: ef.Exported, vae_server: LiveServer, photo: torch.Tensor
) -> None:
    """The server gives the posterior's moments (`moments=True`): the pipeline's generator draws
    the torch VAE's noise remotely too. The dead endpoint first in the list is skipped."""
    link = vaelink.diffusers.vae(sd15_vae.folder, [closed_port_url(), vae_server.url], client=FAST)
    pipe = sd_pipeline(StableDiffusionImg2ImgPipeline, link)
    call = sd_call(image=photo, strength=0.5)
    del call["height"], call["width"]
    assert_same_images(*both(pipe, link, sd15_vae, **call))
    x = photo * 2 - 1
    with torch.no_grad():
        theirs = sd15_vae.vae.encode(x).latent_dist.sample(generator(3))
    assert ef.rel_err(link.encode(x).latent_dist.sample(generator(3)), theirs) <= TOL


def test_an_endpoint_that_answers_latents_only(sd15_vae: ef.Exported, photo: torch.Tensor) -> None:
    """An endpoint that ignores `moments`: its latents are the mean; `sample` asks again with
    `sample=True` and a seed from the generator; `std` is unknown."""
    card = sd15_vae.card
    latents = np.full((1, 4, SIZE // 2, SIZE // 2), 0.5, np.float32)

    def answer(seen: Seen) -> Any:
        sampled = seen.query.get("sample") == ["True"]
        return tensor_answer(latents * (2 if sampled else 1))

    with FakeEndpoint(answer=answer) as fake:
        link = vaelink.diffusers.vae(sd15_vae.folder, fake.url, client=FAST)
        dist = link.encode(photo * 2 - 1).latent_dist
        assert isinstance(dist, LatentsOnlyPosterior)
        assert fake.posts[0].query["moments"] == ["True"]
        assert fake.posts[0].query["scaling_factor"] == ["1.0"]
        assert torch.equal(dist.mode(), torch.from_numpy(latents))
        with pytest.raises(RemoteError, match="std is unknown"):
            _ = dist.std
        expected_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator(4)))
        sample = dist.sample(generator(4))
        query = fake.posts[-1].query
        assert query["sample"] == ["True"] and query["seed"] == [str(expected_seed)]
        scaled = latents * 2  # the endpoint scales with the factor sent: the card's
        assert query["scaling_factor"] == [repr(card.scaling_factor)]
        np.testing.assert_allclose(sample.numpy(), scaled / card.scaling_factor, rtol=1e-6)

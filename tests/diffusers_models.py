"""Small random diffusers transformers and pipelines for the tests (nothing is downloaded).

Every tensor of every model is drawn from N(0, 0.02): diffusers' own initialisation zeroes the
adaLN gates and output projections, which would make every caching method trivially exact.
Text-conditioned pipelines run without text encoders: the tests pass prompt embeddings. Shapes are
tiny (16 image tokens, 5 text tokens, 2 heads × 16) so that a capture takes seconds.
"""

from __future__ import annotations

import pytest
import torch

from graphcache.diffusers_models import FLUX_SCHEDULER_SETTINGS, SD3_SCHEDULER_SETTINGS

diffusers = pytest.importorskip("diffusers")

STD = 0.02
DEPTH = 2


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=g) * STD)
    return module.eval()


def dit_transformer(seed: int = 0, num_classes: int = 1000):
    """diffusers' DiT: 2 blocks of 2 heads × 16, 16 tokens of an 8×8×4 latent, 1000 classes (the
    pipeline's null class is 1000)."""
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                            out_channels=8, num_layers=DEPTH, sample_size=8, patch_size=2,
                                            num_embeds_ada_norm=num_classes)
    return randomize_(model, seed)


def pixart_transformer(seed: int = 0):
    """PixArt-α's transformer: adaLN-single, cross-attention over 24-wide caption embeddings."""
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=DEPTH,
        sample_size=8, patch_size=2, cross_attention_dim=32, caption_channels=24, norm_type="ada_norm_single",
        use_additional_conditions=False)
    return randomize_(model, seed)


def flux_transformer(seed: int = 0):
    """FLUX.1-dev's transformer: 2 double-stream and 2 single-stream blocks of 2 heads × 16 (rotary
    axes 4 + 6 + 6), 16 packed tokens of 2×2 patches of a 4-channel latent, guidance embedding."""
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=DEPTH, num_single_layers=DEPTH, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6))
    return randomize_(model, seed)


def sd3_transformer(seed: int = 0):
    """SD3's MMDiT: 2 joint blocks (the last one updates the image stream only: context_pre_only),
    16 tokens of an 8×8×16 latent, 24-wide text embeddings and 16-wide pooled ones."""
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=DEPTH, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=16,
        pos_embed_max_size=8)
    return randomize_(model, seed)


def wan_transformer(seed: int = 0):
    """Wan 2.1's video transformer: 2 blocks (self-attention, cross-attention, MLP), 1×2×2 patches."""
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=32, ffn_dim=64, num_layers=DEPTH)
    return randomize_(model, seed)


def hunyuan_video_transformer(seed: int = 0):
    """HunyuanVideo's transformer: a 1-block token refiner, 2 double-stream and 2 single-stream
    blocks, guidance embedding."""
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=DEPTH,
        num_single_layers=DEPTH, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        text_embed_dim=24, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6), guidance_embeds=True)
    return randomize_(model, seed)


def vae(seed: int = 1, latent_channels: int = 4):
    """A VAE that halves the resolution once: 16×16 images, 8×8 latents."""
    model = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                    latent_channels=latent_channels, layers_per_block=1, norm_num_groups=4,
                                    sample_size=16)
    return randomize_(model, seed)


def dit_pipeline():
    pipe = diffusers.DiTPipeline(transformer=dit_transformer(), vae=vae(), scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_pipeline():
    pipe = diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae(), transformer=pixart_transformer(),
                                         scheduler=diffusers.DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline():
    """FLUX without its CLIP and T5 encoders, with FLUX.1-dev's resolution-dependent shift."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_SETTINGS)
    pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae(latent_channels=4), text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=flux_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipeline():
    """SD3 without its two CLIP encoders and T5."""
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=sd3_transformer(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_SETTINGS),
        vae=vae(latent_channels=16), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_inputs(batch: int = 2, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor([700] * batch),
                class_labels=torch.arange(batch) + 1)


def pixart_inputs(batch: int = 2, seed: int = 3, text: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 24, generator=g), timestep=torch.tensor([700] * batch),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def flux_inputs(batch: int = 1, seed: int = 3, text: int = 5) -> dict:
    """A FLUX call as FluxPipeline makes it: packed latents, positions of the 4×4 patches and of the
    text tokens (without a batch dimension), timesteps in [0, 1], the guidance scale."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    img_ids = torch.stack([torch.zeros(16), rows.flatten(), cols.flatten()], dim=-1)
    return dict(hidden_states=torch.randn(batch, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
                pooled_projections=torch.randn(batch, 16, generator=g), timestep=torch.full((batch,), 0.7),
                img_ids=img_ids, txt_ids=torch.zeros(text, 3), guidance=torch.full((batch,), 3.5))


def sd3_inputs(batch: int = 2, seed: int = 3, text: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 16, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
                pooled_projections=torch.randn(batch, 16, generator=g), timestep=torch.full((batch,), 700.0))


def wan_inputs(batch: int = 1, seed: int = 3, text: int = 5, frames: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, 8, 8, generator=g), timestep=torch.full((batch,), 700.0),
                encoder_hidden_states=torch.randn(batch, text, 24, generator=g))


def hunyuan_video_inputs(batch: int = 1, seed: int = 3, text: int = 5, frames: int = 1) -> dict:
    """A HunyuanVideo call: the text's attention mask hides its last token."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text, dtype=torch.long)
    mask[:, -1] = 0
    return dict(hidden_states=torch.randn(batch, 4, frames, 8, 8, generator=g), timestep=torch.full((batch,), 700.0),
                encoder_hidden_states=torch.randn(batch, text, 24, generator=g), encoder_attention_mask=mask,
                pooled_projections=torch.randn(batch, 16, generator=g), guidance=torch.full((batch,), 6000.0))


def flow_matching_call() -> dict:
    """The FLUX or SD3 pipeline arguments of a seeded run from random prompt and negative embeddings
    (5 tokens) at 16×16 pixels; FLUX guides by its guidance embedding unless the call adds
    true_cfg_scale > 1, SD3 by classifier-free guidance in one batch."""
    g = torch.Generator().manual_seed(1)
    prompt, negative = torch.randn(1, 5, 24, generator=g), torch.randn(1, 5, 24, generator=g)
    pooled, negative_pooled = torch.randn(1, 16, generator=g), torch.randn(1, 16, generator=g)
    return dict(prompt_embeds=prompt, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
                negative_pooled_prompt_embeds=negative_pooled, height=16, width=16)


def run_pipeline(pipe, steps: int = 6, **call):
    """One seeded sampling run: (what the pipeline returns, the transformer's prediction at every
    call). The global RNG is seeded too: ToCa's random score and ClusCa's K-means start and picks
    draw from it. DiT's pipeline always decodes (images in [0, 1]), so its predictions are where
    methods differ visibly; the others return latents. `call` adds pipeline arguments."""
    predictions = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, out: predictions.append((out[0] if isinstance(out, tuple) else out.sample).clone()))
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    try:
        if isinstance(pipe, diffusers.DiTPipeline):
            out = pipe(class_labels=[1, 3], num_inference_steps=steps, generator=generator, output_type="np",
                       **call).images
            return torch.from_numpy(out), predictions
        if isinstance(pipe, (diffusers.FluxPipeline, diffusers.StableDiffusion3Pipeline)):
            out = pipe(**flow_matching_call(), num_inference_steps=steps, generator=generator,
                       output_type="latent", **call).images
            return out, predictions
        g = torch.Generator().manual_seed(1)
        prompt, negative = torch.randn(1, 5, 24, generator=g), torch.randn(1, 5, 24, generator=g)
        mask = torch.ones(1, 5)
        out = pipe(negative_prompt=None, prompt_embeds=prompt, prompt_attention_mask=mask,
                   negative_prompt_embeds=negative, negative_prompt_attention_mask=mask, num_inference_steps=steps,
                   guidance_scale=4.5, height=16, width=16, use_resolution_binning=False, generator=generator,
                   output_type="latent", **call).images
        return out, predictions
    finally:
        hook.remove()

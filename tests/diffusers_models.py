"""Small random diffusers transformers and pipelines for the tests (nothing is downloaded).

Every tensor of every model is drawn from N(0, 0.02): diffusers' own initialisation zeroes the
adaLN gates and output projections, which would make every caching method trivially exact.
Text-conditioned pipelines run without text encoders: the tests pass prompt embeddings.
"""

from __future__ import annotations

import pytest
import torch

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


def vae(seed: int = 1):
    model = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                    latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=16)
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


def dit_inputs(batch: int = 2, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor([700] * batch),
                class_labels=torch.arange(batch) + 1)


def pixart_inputs(batch: int = 2, seed: int = 3, text: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 24, generator=g), timestep=torch.tensor([700] * batch),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def run_pipeline(pipe, steps: int = 6):
    """One seeded sampling run: (what the pipeline returns, the transformer's prediction at every
    step). The global RNG is seeded too: ToCa's random score and ClusCa's K-means start and picks
    draw from it. DiT's pipeline always decodes (images in [0, 1]), so its predictions are where
    methods differ visibly."""
    predictions = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, out: predictions.append((out[0] if isinstance(out, tuple) else out.sample).clone()))
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    try:
        if isinstance(pipe, diffusers.DiTPipeline):
            out = pipe(class_labels=[1, 3], num_inference_steps=steps, generator=generator, output_type="np").images
            return torch.from_numpy(out), predictions
        g = torch.Generator().manual_seed(1)
        prompt, negative = torch.randn(1, 5, 24, generator=g), torch.randn(1, 5, 24, generator=g)
        mask = torch.ones(1, 5)
        out = pipe(negative_prompt=None, prompt_embeds=prompt, prompt_attention_mask=mask,
                   negative_prompt_embeds=negative, negative_prompt_attention_mask=mask, num_inference_steps=steps,
                   guidance_scale=4.5, height=16, width=16, use_resolution_binning=False, generator=generator,
                   output_type="latent").images
        return out, predictions
    finally:
        hook.remove()

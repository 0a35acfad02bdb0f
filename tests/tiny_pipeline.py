"""A tiny, randomly initialised Stable-Diffusion-style pipeline, built offline in a couple of seconds.

Its images are noise, but it runs the whole diffusers path (tokenizer, text encoder, UNet, scheduler, VAE) on CPU,
so tests can load it from a directory exactly as the GPU worker loads a real model. Nothing is downloaded.

Example:
    path = build_tiny_text_to_image_pipeline(tmp_path / "tiny-sd")
    request = MediaRequest(kind="image", model=str(path), prompt="a cat", width=64, height=64)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SEED = 0
HIDDEN = 32  # text encoder width == the UNet's cross_attention_dim
VOCAB_SIZE = 1000  # > the tokenizer's 514 entries
MAX_TOKENS = 16


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's byte-to-unicode table: one printable symbol per byte, the base alphabet of byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _tokenizer() -> CLIPTokenizer:
    # No merges: every word splits into single bytes, which is enough to exercise the text encoder.
    symbols = _byte_symbols()
    tokens = [*symbols, *(f"{s}</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory(prefix="tiny-clip-tokenizer-") as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TOKENS, local_files_only=True)


def _scheduler() -> DDIMScheduler:
    # Stable Diffusion's own settings; the defaults make the pipeline rewrite them with deprecation warnings.
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def build_tiny_text_to_image_pipeline(path: Path) -> Path:
    """Build a tiny random text-to-image pipeline and save it as a diffusers model directory.

    Args:
        path: the directory to write (created if missing); load it with `DiffusionPipeline.from_pretrained`.

    Returns:
        `path`.

    Example:
        >>> build_tiny_text_to_image_pipeline(Path("/tmp/tiny-sd"))
        PosixPath('/tmp/tiny-sd')
    """
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=2, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS, bos_token_id=512, eos_token_id=513, pad_token_id=513,
    ))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(), unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path

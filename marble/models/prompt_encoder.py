"""What CLIP's and BERT's text encoders share: a prompt becomes a fixed-length row of token ids,
and a batch of prompts becomes a float32 context (B, max_tokens, width). This is the `TextEncoder`
interface of marble.models.text; a family adds its tokenizer, its network and `forward(tokens)`."""
from __future__ import annotations

import torch
from torch import nn

from marble.models.tokenizer import fit


class PromptEncoder(nn.Module):
    def __init__(self, config, tokenizer, pad_id: int):
        super().__init__()
        self.config = config
        self.max_tokens = config.max_tokens      # T, the special tokens included
        self.dim = config.width                  # D, the context width
        self.tokenizer = tokenizer
        self.pad_id = pad_id

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenizer.encode(prompt))

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_tokens) ids: start token, the first max_tokens-2 text tokens, end token, then pad_id."""
        return torch.tensor([fit(self.tokenizer.encode(p), self.max_tokens, self.pad_id) for p in prompts],
                            dtype=torch.long)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.parameters()).device
        return self(self.tokenize(prompts).to(device)).float()

"""What CLIP's and BERT's text encoders share: a prompt becomes a fixed-length row of token ids,
and a batch of prompts becomes a float32 context (B, max_tokens, width). This is the `TextEncoder`
interface of marble.models.text; a family adds its tokenizer, its network and `forward(tokens)`.

Long and weighted prompts (marble.prompts.encode) use the same rows one window at a time:
`text_ids` gives a text's ids without the start/end tokens, `chunk_row` makes a row of a window."""
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

    def text_ids(self, text: str) -> list[int]:
        """The text's token ids without the start and end tokens, untruncated."""
        return self.tokenizer.encode(text)[1:-1]

    def chunk_row(self, ids: list[int]) -> list[int]:
        """One window of at most max_tokens - 2 text ids as a full row: start, ids, end, pad_id
        (the row `tokenize` makes of a prompt of those ids)."""
        start, end = self.tokenizer.encode("")
        return fit([start, *ids, end], self.max_tokens, self.pad_id)

    @property
    def comma_id(self) -> int | None:
        """The id of ",", after which a long prompt's window may end early (A1111's comma backtrack)."""
        ids = self.text_ids(",")
        return ids[0] if len(ids) == 1 else None

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgelm.layers.linear import default_weight_loader, linear


class VocabEmbedding(nn.Module):
    """Token embedding; also the LM head's weight when the model ties them."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype, device=device))
        self.weight.weight_loader = default_weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LogitsProcessor(nn.Module):
    """Hidden states → float32 logits, for each request's last token only (a prefill of 4k tokens
    needs one row of logits, not 4k), unless the batch asks for every position."""

    def forward(self, hidden: torch.Tensor, head, forward_batch) -> torch.Tensor:
        """head: the 16-bit weight [vocab, hidden], or a module that makes float32 logits itself
        (int8_head.Int8Head, --quantize-lm-head)."""
        if forward_batch.forward_mode.is_extend() and not forward_batch.return_all_logits:
            last = forward_batch.extend_start_loc + forward_batch.extend_seq_lens - 1
            hidden = hidden.index_select(0, last.long())
        if isinstance(head, torch.Tensor):
            return linear(hidden, head).float()
        return head(hidden)

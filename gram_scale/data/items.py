"""Item catalogue (ids and texts) and the packed token cache built from it once per run."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Catalogue:
    """Every item of a data set in a fixed order: row ``i`` of every item tensor is ``ids[i]``."""

    ids: list[str]
    texts: list[str]
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.index:
            self.index = {item_id: i for i, item_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TokenCache:
    """Each item's tokens, packed in one tensor so batches carry item rows and never re-tokenize."""

    # [n_items, max_len] int64, right-padded with pad_id whatever the tokenizer's padding side:
    # a token's position, and so its keyed dropout mask, must not depend on the chunk's width
    input_ids: torch.Tensor
    lengths: torch.Tensor  # [n_items] int64
    pad_id: int

    @classmethod
    def build(cls, tokenizer, texts: list[str], max_tokens: int, chunk: int = 4096) -> TokenCache:
        """Tokenize all texts once (truncated to ``max_tokens``) and pack them."""
        rows: list[list[int]] = []
        for start in range(0, len(texts), chunk):
            enc = tokenizer(texts[start : start + chunk], truncation=True, max_length=max_tokens)
            rows.extend(enc["input_ids"])
        width = max((len(r) for r in rows), default=1)
        # the padding is masked out, but a real id keeps it a valid embedding row
        pad_id = next(
            (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0
        )
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return cls(ids, lengths, pad_id)

    def rows(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask for the given item rows, trimmed to their longest text."""
        items = items.cpu()
        lengths = self.lengths[items]
        width = int(lengths.max()) if len(items) else 1
        ids = self.input_ids[items, :width]
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return ids, mask

    def cut(
        self, items: torch.Tensor, max_rows: int, max_tokens: int = 0, order: str = "length"
    ) -> list[torch.Tensor]:
        """The chunk rule of every encode: positions into ``items``, sorted by token length
        (stable; ``order="given"``: in the items' own order, no sort), cut where a chunk would
        pass ``max_rows`` rows or ``max_tokens`` padded tokens (rows x its longest text; 0 = no
        cap). Sorting keeps short texts from being padded to long ones; a text longer than the
        cap gets a chunk of its own."""
        lengths = self.lengths[items.cpu()]
        if order == "length":
            ranked = torch.argsort(lengths, stable=True)
        elif order == "given":
            ranked = torch.arange(len(lengths))
        else:  # the options allow only these (config.CHUNK_ORDERS)
            raise ValueError(f"chunk order must be 'length' or 'given', got {order!r}")
        sizes, rows, longest = [], 0, 0
        for length in lengths[ranked].tolist():
            wide = max(longest, length)  # the chunk's longest text with this row in it
            if rows and (rows == max_rows or (max_tokens and (rows + 1) * wide > max_tokens)):
                sizes.append(rows)
                rows, wide = 0, length
            rows, longest = rows + 1, wide
        if rows:
            sizes.append(rows)
        return list(ranked.split(sizes))

    def padded_tokens(self, items: torch.Tensor) -> tuple[int, int]:
        """``(real, padded)`` tokens of one encoder call over ``items``: their lengths summed,
        and rows x the longest (what the call computes)."""
        lengths = self.lengths[items.cpu()]
        if not len(lengths):
            return 0, 0
        return int(lengths.sum()), len(lengths) * int(lengths.max())

    def attention_pairs(self, items: torch.Tensor) -> int:
        """Query-key pairs each attention layer of one encoder call over ``items`` computes:
        rows x the longest text squared (every row padded to it)."""
        lengths = self.lengths[items.cpu()]
        return len(lengths) * int(lengths.max()) ** 2 if len(lengths) else 0

    def mean_tokens(self) -> float:
        """Average tokens per item (drives the encoder cost per item)."""
        return float(self.lengths.float().mean()) if len(self.lengths) else 0.0

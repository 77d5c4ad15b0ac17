"""News recommendation: NRMS user encoder over clicked news vectors, softmax CE over 1+K."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from gram_scale.data.batches import Batch, gather
from gram_scale.data.mind import Impression
from gram_scale.errors import InputError
from gram_scale.exchange import Comm, my_share
from gram_scale.metrics import impression_rows, mean_rows
from gram_scale.tasks.base import Lookup


class NRMSUser(nn.Module):
    """Multi-head self-attention then additive attention over the clicked news vectors.

    A learned start vector is always present in the history, so users with no clicks get a
    defined (learned) user vector instead of a softmax over nothing."""

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.1, query_dim: int = 200):
        super().__init__()
        self.start = nn.Parameter(torch.zeros(1, 1, dim))
        # no biases, as in NRMS: the key bias and the score bias cannot change a softmax
        self.mhsa = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.att = nn.Sequential(
            nn.Linear(dim, query_dim), nn.Tanh(), nn.Linear(query_dim, 1, bias=False)
        )

    def forward(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """User vectors [B, d] from history vectors [B, H, d] and mask [B, H]."""
        b = hist.shape[0]
        x = torch.cat([self.start.expand(b, 1, -1).to(hist.dtype), hist], dim=1)
        m = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask], dim=1)
        y, _ = self.mhsa(x, x, x, key_padding_mask=~m, need_weights=False)
        y = self.drop(y)
        a = self.att(y).squeeze(-1).masked_fill(~m, float("-inf"))
        return (torch.softmax(a, dim=1).unsqueeze(-1) * y).sum(1)


def _history(h: torch.Tensor, length: int) -> torch.Tensor:
    out = torch.full((length,), -1, dtype=torch.long)
    h = h[-length:]
    out[: len(h)] = h
    return out


class NewsTask:
    """Batches, loss and metrics for MIND-style news recommendation."""

    name = "news"
    main_metric = "auc"
    default_sizes = {"n_users": 300, "n_news": 400, "impressions_per_user": 3, "n_candidates": 5}

    @staticmethod
    def write_default(folder, seed: int, **sizes) -> None:
        """Generate the built-in synthetic set into ``folder``."""
        from gram_scale.data.synth import write_mind

        write_mind(folder, seed=seed, **sizes)

    @staticmethod
    def load(folder, opts):
        """Read a MIND folder into splits."""
        from gram_scale.data.mind import load_mind

        return load_mind(folder, use_abstract=opts.use_abstract, seed=opts.seed)

    @staticmethod
    def data_files(folder) -> list:
        """The files ``load`` reads (test/ only with its behaviors.tsv)."""
        from pathlib import Path

        splits = ["train", "dev"]
        if (Path(folder) / "test" / "behaviors.tsv").is_file():
            splits.append("test")
        return [f"{split}/{name}" for split in splits for name in ("news.tsv", "behaviors.tsv")]

    @staticmethod
    def cf_summary(opts) -> str:
        """The CF model in words (for the run record a resume compares)."""
        return f"{opts.cf_heads} heads"

    @staticmethod
    def split_summary(opts) -> str:
        """The splits in words: MIND's folders, without test/ dev cut in halves by --seed."""
        return "MIND folders"

    @staticmethod
    def size_stats(data) -> dict:
        """Training-set size figures for ``gram_scale.stats``."""
        return {"impressions": len(data.train)}

    def __init__(self, data, opts, dim: int):
        if dim % opts.cf_heads:
            raise InputError(
                "--cf-heads", None, f"encoder dim {dim} is not divisible by {opts.cf_heads}"
            )
        self.data = data
        self.opts = opts
        self.model = NRMSUser(dim, opts.cf_heads, opts.cf_dropout)
        self.samples = [
            (i, int(p))
            for i, imp in enumerate(data.train)
            for p in torch.nonzero(imp.labels).flatten()
        ]

    def num_train_batches(self) -> int:
        """Global batches per epoch."""
        return -(-len(self.samples) // self.opts.batch_size)

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        """Each clicked news with up to K non-clicked ones of its impression, drawn without
        replacement; fixed by seed. An impression that showed fewer than K non-clicked news
        gives all of them and the missing candidates are padding (masked out of the loss)."""
        g = torch.Generator().manual_seed(self.opts.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.samples), generator=g).tolist()
        k, h, bs = self.opts.negatives, self.opts.history_len, self.opts.batch_size
        n_items = len(self.data.catalogue)
        for start in range(0, len(order), bs):
            rows = []
            for j in order[start : start + bs]:
                imp_i, pos = self.samples[j]
                imp = self.data.train[imp_i]
                negs = imp.candidates[imp.labels == 0]
                if len(negs):
                    pick = negs[torch.randperm(len(negs), generator=g)[:k]]
                else:  # no shown non-clicked news: fall back to random catalogue items
                    pick = torch.randperm(n_items, generator=g)[:k]
                cands = torch.full((1 + k,), -1, dtype=torch.long)
                cands[0] = imp.candidates[pos]
                cands[1 : 1 + len(pick)] = pick
                rows.append(torch.cat([_history(imp.history, h), cands]))
            items = torch.stack(rows)
            width = int((items[:, h:] >= 0).sum(1).max())  # drop columns that are all padding
            yield Batch(items[:, : h + width])

    def loss(self, batch: Batch, vecs: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed cross-entropy with the clicked news at index 0, number of samples)."""
        h = self.opts.history_len
        user = self.model(vecs[:, :h], (batch.items[:, :h] >= 0).to(vecs.device))
        scores = (vecs[:, h:] * user.unsqueeze(1)).sum(-1)
        scores = scores.masked_fill(batch.items[:, h:].to(scores.device) < 0, float("-inf"))
        target = torch.zeros(len(scores), dtype=torch.long, device=scores.device)
        return nn.functional.cross_entropy(scores, target, reduction="sum"), len(scores)

    def unscorable(self, split: str) -> str | None:
        """Why a split has nothing to score (None when it has): metrics need impressions with
        both a click and a non-click."""
        imps = getattr(self.data, split)
        if not imps:
            return f"no impressions in the {split} split"
        clicks = [int(imp.labels.sum()) for imp in imps]
        if not any(clicks):
            return f"no impressions with a click in the {split} split"
        if not any(0 < c < len(imp.labels) for c, imp in zip(clicks, imps)):
            return f"no impressions with both a click and a non-click in the {split} split"
        return None

    def histories(self, imps: list[Impression]) -> torch.Tensor:
        """Each impression's latest ``--history-len`` clicks as item rows [N, H], -1 = padding."""
        h = self.opts.history_len
        if not imps:
            return torch.zeros(0, h, dtype=torch.long)
        return torch.stack([_history(imp.history, h) for imp in imps])

    @torch.no_grad()
    def user_vectors(self, hist: torch.Tensor, items: torch.Tensor, rows: torch.Tensor):
        """User vectors [N, d] of histories [N, H] (item rows, -1 = padding) in evaluation
        batches, given the vectors ``rows`` of the sorted unique item rows ``items``."""
        was_training = self.model.training
        self.model.eval()
        out = []
        for start in range(0, len(hist), self.opts.eval_batch_size):
            part = hist[start : start + self.opts.eval_batch_size]
            index = torch.where(part >= 0, torch.searchsorted(items, part), len(items))
            out.append(self.model(gather(rows, index), (part >= 0).to(rows.device)))
        self.model.train(was_training)
        return torch.cat(out) if out else rows.new_zeros(0, rows.shape[1])

    @torch.no_grad()
    def predict(self, imps: list[Impression], lookup: Lookup) -> list[torch.Tensor]:
        """Each impression's candidate scores (float32, candidate order), the user vector of its
        history dotted with each candidate's vector, from the item vectors ``lookup`` fetches
        (a collective: every rank calls it, with or without impressions)."""
        hists = self.histories(imps)
        used = [x for imp, hist in zip(imps, hists) for x in (hist[hist >= 0], imp.candidates)]
        items = torch.unique(torch.cat(used)) if used else torch.zeros(0, dtype=torch.long)
        rows = lookup(items)
        users = self.user_vectors(hists, items, rows)
        return [
            (rows[torch.searchsorted(items, imp.candidates).to(rows.device)] @ u).float().cpu()
            for imp, u in zip(imps, users)
        ]

    def evaluate(self, split: str, lookup: Lookup, comm: Comm) -> dict[str, float]:
        """AUC, MRR, nDCG@5 and nDCG@10 per impression, averaged. Each rank scores its share of
        the impressions with the item vectors ``lookup`` fetches; the per-impression values of
        every rank are gathered and averaged, so the metrics equal one process's."""
        imps = getattr(self.data, split)
        share = my_share(comm, len(imps))
        mine = imps[share.start : share.stop]
        return self.metrics(mine, self.predict(mine, lookup), comm)

    def metrics(self, imps: list[Impression], scores: list[torch.Tensor], comm: Comm) -> dict:
        """The metrics of ``evaluate`` from each rank's impressions and their ``predict`` scores."""
        scored, cold = [], []
        cold_items = self.data.cold_items
        for imp, s in zip(imps, scores):
            scored.append((imp.labels, s))
            c = cold_items[imp.candidates]
            if c.any():
                cold.append((imp.labels[c], s[c]))
        out = mean_rows(comm.gather_rows(impression_rows(scored)))
        out["cold_auc"] = mean_rows(comm.gather_rows(impression_rows(cold)))["auc"]
        return out

"""Knowledge tracing: DKT-style 2-layer LSTM over item vectors, BCE, AUC / accuracy / cold AUC."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from gram_scale.data.batches import Batch, epoch_order, gather
from gram_scale.data.kt import Sequence
from gram_scale.exchange import Comm, my_share
from gram_scale.metrics import accuracy, auc
from gram_scale.tasks.base import Lookup


class DKT(nn.Module):
    """Input at t: item vector of t-1 split by its correctness; logit at t: state . item t."""

    def __init__(self, dim: int, layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.lstm = nn.LSTM(
            2 * dim, dim, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0
        )
        self.out = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, vecs: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
        """Logits [B, T] for vectors [B, T, d] and correctness [B, T]."""
        c = correct.unsqueeze(-1).to(vecs.dtype)
        x = torch.cat([vecs * c, vecs * (1 - c)], dim=-1)
        x = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)  # shift: see only the past
        h, _ = self.lstm(x)
        return (self.out(h) * vecs).sum(-1) + self.bias


def _windows(seqs, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for items, correct in seqs:
        for start in range(0, len(items), length):
            out.append((items[start : start + length], correct[start : start + length]))
    return out


def _collate(windows) -> Batch:
    t = max(len(w[0]) for w in windows)
    items = torch.full((len(windows), t), -1, dtype=torch.long)
    correct = torch.zeros((len(windows), t), dtype=torch.long)
    for i, (it, c) in enumerate(windows):
        items[i, : len(it)] = it
        correct[i, : len(c)] = c
    return Batch(items, {"correct": correct})


class KTTask:
    """Batches, loss and metrics for knowledge tracing."""

    name = "kt"
    main_metric = "auc"
    # Built-in default set: large enough that the text signal is learnable and the batch
    # repetition (R_batch) is real, small enough that the default job runs in minutes on 2 cores.
    default_sizes = {
        "n_users": 300,
        "n_items": 300,
        "mean_len": 50,
        "n_unused_items": 10,
        "zipf": 1.0,
    }

    @staticmethod
    def write_default(folder, seed: int, **sizes) -> None:
        """Generate the built-in synthetic set into ``folder``."""
        from gram_scale.data.synth import write_kt

        write_kt(folder, seed=seed, **sizes)

    @staticmethod
    def load(folder, opts):
        """Read a KT folder (items.csv, interactions.csv) into splits."""
        from gram_scale.data.kt import load_kt

        return load_kt(
            folder,
            seed=opts.seed,
            valid_frac=opts.valid_frac,
            test_frac=opts.test_frac,
            cold_frac=opts.cold_frac,
        )

    @staticmethod
    def data_files(folder) -> list:
        """The files ``load`` reads."""
        return ["items.csv", "interactions.csv"]

    @staticmethod
    def cf_summary(opts) -> str:
        """The CF model in words (for the run record a resume compares)."""
        return f"{opts.cf_layers} LSTM layers"

    @staticmethod
    def split_summary(opts) -> str:
        """The user split and cold items in words (for the run record a resume compares)."""
        return f"users valid {opts.valid_frac}, test {opts.test_frac}; cold items {opts.cold_frac}"

    @staticmethod
    def size_stats(data) -> dict:
        """Training-set size figures for ``gram_scale.stats``."""
        return {"interactions": int(sum(len(items) for items, _ in data.train))}

    def __init__(self, data, opts, dim: int):
        self.data = data
        self.opts = opts
        self.model = DKT(dim, opts.cf_layers, opts.cf_dropout)
        self.train_windows = _windows(data.train, opts.seq_len)
        self.split_windows = {
            "valid": _windows(data.valid, opts.seq_len),
            "test": _windows(data.test, opts.seq_len),
        }

    def num_train_batches(self) -> int:
        """Global batches per epoch (the last one may be smaller)."""
        return -(-len(self.train_windows) // self.opts.batch_size)

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        """The epoch's global batches, in an order fixed by (seed, epoch)."""
        order = epoch_order(len(self.train_windows), self.opts.seed, epoch).tolist()
        bs = self.opts.batch_size
        for start in range(0, len(order), bs):
            yield _collate([self.train_windows[i] for i in order[start : start + bs]])

    def loss(self, batch: Batch, vecs: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed BCE over real positions, number of positions)."""
        correct = batch.fields["correct"].to(vecs.device)
        logits = self.model(vecs, correct)
        mask = (batch.items >= 0).to(vecs.device)
        bce = nn.functional.binary_cross_entropy_with_logits(
            logits[mask], correct[mask].to(logits.dtype), reduction="sum"
        )
        return bce, int(mask.sum())

    @torch.no_grad()
    def unscorable(self, split: str) -> str | None:
        """Why a split has nothing to score (None when it has): AUC needs both kinds of answer."""
        windows = self.split_windows[split]
        if not windows:
            return f"no users in the {split} split"
        answers = torch.unique(torch.cat([correct for _, correct in windows]))
        if len(answers) < 2:
            return f"every answer in the {split} split is {'correct' if answers[0] else 'wrong'}"
        return None

    @torch.no_grad()
    def predict(self, windows: list[Sequence], lookup: Lookup) -> list[torch.Tensor]:
        """P(correct) at each position of each window (float64), in evaluation batches, from
        the item vectors ``lookup`` fetches (a collective: every rank calls it, with or without
        windows). A position's probability depends on the window's earlier positions only."""
        was_training = self.model.training
        self.model.eval()
        items = (
            torch.unique(torch.cat([w[0] for w in windows])) if windows else torch.zeros(0).long()
        )
        rows = lookup(items)
        out = []
        for start in range(0, len(windows), self.opts.eval_batch_size):
            chunk = windows[start : start + self.opts.eval_batch_size]
            batch = _collate(chunk)
            mask = batch.items >= 0
            index = torch.where(mask, torch.searchsorted(items, batch.items), len(items))
            vecs = gather(rows, index)
            correct = batch.fields["correct"].to(vecs.device)
            p = torch.sigmoid(self.model(vecs, correct)).double().cpu()
            out.extend(p[i, : len(w[0])] for i, w in enumerate(chunk))
        self.model.train(was_training)
        return out

    def evaluate(self, split: str, lookup: Lookup, comm: Comm) -> dict[str, float]:
        """AUC, accuracy and cold-start AUC on a split. Each rank scores its share of the
        sequences with the item vectors ``lookup`` fetches; the metrics come from every rank's
        (label, probability) pairs gathered, so they equal one process's."""
        windows = self.split_windows[split]
        share = my_share(comm, len(windows))
        mine = windows[share.start : share.stop]
        return self.metrics(mine, self.predict(mine, lookup), comm)

    def metrics(self, windows: list[Sequence], probs: list[torch.Tensor], comm: Comm) -> dict:
        """The metrics of ``evaluate`` from each rank's windows and their ``predict`` output."""
        cold_items = self.data.cold_items
        pairs = [
            torch.stack([correct.double(), p, cold_items[items].double()], 1)
            for (items, correct), p in zip(windows, probs)
        ]
        local = torch.cat(pairs) if pairs else torch.zeros(0, 3, dtype=torch.double)
        every = comm.gather_rows(local)
        if not len(every):
            return {"auc": float("nan"), "acc": float("nan"), "cold_auc": float("nan")}
        y, p, c = every[:, 0].long(), every[:, 1], every[:, 2].bool()
        return {
            "auc": auc(y, p),
            "acc": accuracy(y, p),
            "cold_auc": auc(y[c], p[c]) if c.any() else float("nan"),
            "interactions": int(len(y)),
        }

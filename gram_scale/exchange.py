"""Collectives, item ownership, padding and the sharded item exchange: the only place that
knows about ranks.

- ``Comm``: rank, world size and the collectives GRAM needs; one process short-circuits every
  call. It counts the bytes of item ids, rows and gradients this rank sends to and receives
  from *other* ranks (what crosses the wire), per phase (training or evaluation).
- ``owner_of``: the owner of an item is a fixed hash of its catalogue row modulo the world
  size, the same on every rank and every step, so item state (Multi-step's table, evaluation
  vectors) can be sharded and never moves between owners.
- ``ItemExchange``: one step's all-to-all plan. Each rank sends its unique items to their
  owners; the owner serves the union of what it was asked; rows go back to each asker (only
  the rows it asked for), gradients come back to the owner and are summed there. Per-rank
  traffic follows the rank's own items, not the global batch.
- ``pieces``: the encoder calls a rank makes on its owned items, padded so that every rank
  makes the same number of calls (ZeRO-3 gathers parameters collectively inside each call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Knuth's multiplicative constant: neighbouring catalogue rows land on different owners, so
# ownership does not follow the catalogue's order (popular items often sit together).
_HASH = 2654435761
ID_BYTES = 8  # item ids travel as int64


def owner_of(items: torch.Tensor, world: int) -> torch.Tensor:
    """Owner rank of each catalogue row: a fixed hash modulo ``world``."""
    return ((items.long() * _HASH) % (1 << 32)) % world


class Comm:
    """Collectives over all ranks (no-ops on one process), with per-phase traffic counters."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | str = "cpu"):
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.phase = "train"
        self.traffic: dict[str, list[int]] = {"train": [0, 0], "eval": [0, 0]}  # sent, received
        self._taken = [0, 0]

    def _count(self, sent: int, received: int) -> None:
        t = self.traffic[self.phase]
        t[0] += sent
        t[1] += received

    def take_train_traffic(self) -> tuple[int, int]:
        """Training bytes (sent, received) since the last call."""
        now = self.traffic["train"]
        out = (now[0] - self._taken[0], now[1] - self._taken[1])
        self._taken = list(now)
        return out

    def sum_int(self, value: int) -> int:
        """Sum of an integer over ranks."""
        return self.sum_ints([value])[0]

    def sum_ints(self, values: list[int]) -> list[int]:
        """Element-wise sums of integers over ranks, in one collective."""
        if self.world == 1:
            return [int(v) for v in values]
        t = torch.tensor(values, dtype=torch.long, device=self.device)
        dist.all_reduce(t)
        return [int(v) for v in t.tolist()]

    def sum_floats(self, values: list[float]) -> list[float]:
        """Element-wise float64 sums over ranks, in one collective (integers stay exact up to
        2**53, so counts ride along with losses)."""
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def per_rank(self, value: int) -> list[int]:
        """Slots for a per-rank value inside a summed vector: ``value`` at this rank's slot."""
        out = [0] * self.world
        out[self.rank] = int(value)
        return out

    def max_int(self, value: int) -> int:
        """Max of an integer over ranks."""
        if self.world == 1:
            return int(value)
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def max_ints(self, values: list[int]) -> list[int]:
        """Element-wise maxima of integers over ranks, in one collective."""
        if self.world == 1:
            return [int(v) for v in values]
        t = torch.tensor(values, dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def all_reduce_(self, tensors) -> None:
        """In-place sum over ranks."""
        if self.world == 1:
            return
        for t in tensors:
            if t is None:
                continue
            moved = t.to(self.device)
            dist.all_reduce(moved)
            if moved is not t:
                t.copy_(moved)

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's rows (any first-dim length) in rank order, on every rank.

        Only for small per-rank results (evaluation scores, checkpointed tables)."""
        if self.world == 1:
            return rows
        padded, counts = self._padded(rows)
        out = [torch.zeros_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded)
        return torch.cat([o[:c] for o, c in zip(out, counts)]).to(rows.device)

    def gather_to_main(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Every rank's rows concatenated in rank order on rank 0; None elsewhere."""
        if self.world == 1:
            return rows
        padded, counts = self._padded(rows)
        out = [torch.zeros_like(padded) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(padded, out, dst=0)
        if self.rank != 0:
            return None
        return torch.cat([o[:c] for o, c in zip(out, counts)]).to(rows.device)

    def gather_ragged_to_main(self, parts: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Every rank's list of 1-D tensors (any lengths), concatenated in rank order on rank 0
        as float64; None elsewhere."""
        lengths = torch.tensor([len(p) for p in parts], dtype=torch.long)
        flat = torch.cat([p.double().cpu() for p in parts]) if parts else torch.zeros(0).double()
        if self.world == 1:
            return list(flat.split(lengths.tolist()))
        every_length = self.gather_to_main(lengths)
        every_flat = self.gather_to_main(flat)
        if every_length is None or every_flat is None:
            return None
        return list(every_flat.cpu().split(every_length.tolist()))

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world > 1:
            dist.barrier()

    def _padded(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """This rank's rows padded to the longest rank's count (collectives need equal
        shapes), and every rank's count."""
        count = torch.tensor([len(rows)], dtype=torch.long, device=self.device)
        counts = [torch.zeros_like(count) for _ in range(self.world)]
        dist.all_gather(counts, count)
        n = max(1, *(int(c) for c in counts))  # never a 0-row collective
        padded = rows.new_zeros((n, *rows.shape[1:])).to(self.device)
        padded[: len(rows)] = rows.to(self.device)
        return padded, [int(c) for c in counts]

    def all_to_all(
        self, rows: torch.Tensor, send: list[int], recv: list[int], counted: bool = True
    ) -> torch.Tensor:
        """Rows ``send[r]`` at a time to rank r, in rank order; receives ``recv[r]`` from r.
        ``counted=False``: the caller has already accounted for the bytes."""
        if self.world == 1:
            return rows
        if counted:
            self._count(*self.a2a_bytes(rows, send, recv))
        out = rows.new_empty((sum(recv), *rows.shape[1:]), device=self.device)
        dist.all_to_all_single(out, rows.to(self.device).contiguous(), recv, send)
        return out.to(rows.device)

    def a2a_bytes(self, rows: torch.Tensor, send: list[int], recv: list[int]) -> tuple[int, int]:
        """Bytes (sent, received) an ``all_to_all`` of such rows moves to and from other ranks."""
        if self.world == 1:
            return 0, 0
        per_row = math.prod(rows.shape[1:]) * rows.element_size()
        r = self.rank
        return per_row * (sum(send) - send[r]), per_row * (sum(recv) - recv[r])

    def counts_to_all(self, send: list[int]) -> list[int]:
        """How many rows each rank will send to this one, given what this rank sends each."""
        if self.world == 1:
            return list(send)
        self._count(ID_BYTES * (self.world - 1), ID_BYTES * (self.world - 1))
        out = torch.empty(self.world, dtype=torch.long, device=self.device)
        dist.all_to_all_single(out, torch.tensor(send, dtype=torch.long, device=self.device))
        return [int(v) for v in out.tolist()]


class ItemExchange:
    """One step's routing: this rank's unique items <-> their owners.

    ``served`` are the items this rank owns that any rank asked for, sorted and unique: the
    rows this rank encodes (or reads from its table) once, and the rows whose gradients it
    back-propagates once."""

    def __init__(self, comm: Comm, local: torch.Tensor):
        self.comm = comm
        local = local.cpu().long()
        self.n_local = len(local)
        owners = owner_of(local, comm.world)
        self.order = torch.argsort(owners, stable=True)  # local position of each sent id
        self.send = torch.bincount(owners, minlength=comm.world).tolist()
        self.recv = comm.counts_to_all(self.send)
        asked = comm.all_to_all(local[self.order], self.send, self.recv)
        self.served, self.asked_index = torch.unique(asked, sorted=True, return_inverse=True)
        self._grad_bytes = (0, 0)

    def fetch(self, served_rows: torch.Tensor) -> torch.Tensor:
        """Rows of this rank's local items, given the rows of ``served`` (owner side)."""
        back = self.comm.all_to_all(
            served_rows[self.asked_index.to(served_rows.device)], self.recv, self.send
        )
        out = back.new_empty((self.n_local, *back.shape[1:]))
        out[self.order.to(back.device)] = back
        self._grad_bytes = self.comm.a2a_bytes(out, self.send, self.recv)
        return out

    def grad_traffic(self) -> tuple[int, int]:
        """Bytes (sent, received) ``return_grads`` will move: announced in the step's agreement
        so that a checkpoint after the step holds the step's whole traffic."""
        return self._grad_bytes

    def return_grads(self, local_grads: torch.Tensor) -> torch.Tensor:
        """Per-item gradient sums for ``served``, summed over every asking rank."""
        sent = local_grads[self.order.to(local_grads.device)]
        got = self.comm.all_to_all(sent, self.send, self.recv, counted=False)
        out = got.new_zeros((len(self.served), *got.shape[1:]))
        return out.index_add_(0, self.asked_index.to(got.device), got)


@dataclass
class Piece:
    """One encoder call: the rows to encode and how many of them are real (0: padding), and
    where the real rows sit in the items the calls cover (``index``)."""

    items: torch.Tensor
    real: int
    index: torch.Tensor

    def pad(self, grads: torch.Tensor) -> torch.Tensor:
        """Gradients for every encoded row: zeros for the padding row."""
        if self.real == len(self.items):
            return grads
        return torch.cat([grads, grads.new_zeros(len(self.items) - self.real, *grads.shape[1:])])


_DUMMY = torch.zeros(1, dtype=torch.long)  # catalogue row 0 exists in every catalogue


def pieces(comm: Comm, items: torch.Tensor, cuts: list[torch.Tensor]) -> list[Piece]:
    """Encoder calls over ``items``, one per position tensor of ``cuts``, padded with dummy
    calls so that every rank makes as many (the largest count over ranks; one collective)."""
    return padded_calls(items, cuts, comm.max_int(len(cuts)))


def padded_calls(items: torch.Tensor, cuts: list[torch.Tensor], n: int) -> list[Piece]:
    """``n`` encoder calls: one per position tensor of ``cuts``, then dummy calls (``n`` is the
    agreed count over ranks)."""
    out = [Piece(items[pos], len(pos), pos) for pos in cuts if len(pos)]
    empty = torch.zeros(0, dtype=torch.long)
    return out + [Piece(_DUMMY, 0, empty) for _ in range(n - len(out))]


def in_order(calls: list[Piece], outs: list[torch.Tensor], n: int) -> torch.Tensor:
    """The real rows of the calls' outputs, back in the order of the ``n`` items they cover."""
    first = outs[0]
    out = first.new_empty((n, *first.shape[1:]))
    for piece, h in zip(calls, outs):
        out[piece.index.to(out.device)] = h[: piece.real]
    return out


def by_call(calls: list[Piece], rows: torch.Tensor) -> list[torch.Tensor]:
    """``rows`` (one per covered item, in the items' order) as each call needs them: its real
    rows in its order, then zeros for its padding row."""
    return [c.pad(rows[c.index.to(rows.device)]) for c in calls]


def owned(comm: Comm, items: torch.Tensor) -> torch.Tensor:
    """The given items this rank owns, in their given order."""
    return items[owner_of(items, comm.world) == comm.rank]


def my_share(comm: Comm, n: int) -> range:
    """This rank's contiguous share of ``n`` samples (sequences, impressions, batch rows)."""
    return range(comm.rank * n // comm.world, (comm.rank + 1) * n // comm.world)


class OwnedVectors:
    """Eval-mode vectors of the catalogue items this rank owns; other ranks' rows by exchange."""

    def __init__(self, comm: Comm, items: torch.Tensor, vectors: torch.Tensor):
        self.comm, self.items, self.vectors = comm, items, vectors

    def lookup(self, wanted: torch.Tensor) -> torch.Tensor:
        """Vectors of ``wanted`` (unique catalogue rows), fetched from their owners; every rank
        calls it together."""
        ex = ItemExchange(self.comm, wanted)
        pos = torch.searchsorted(self.items, ex.served)
        return ex.fetch(self.vectors[pos.to(self.vectors.device)])

    def full(self, n_items: int) -> torch.Tensor | None:
        """Every catalogue vector in catalogue order on rank 0 (for the export); None elsewhere."""
        items = self.comm.gather_to_main(self.items.to(self.comm.device))
        vectors = self.comm.gather_to_main(self.vectors)
        if items is None or vectors is None:
            return None
        out = vectors.new_zeros((n_items, vectors.shape[1]))
        out[items.to(out.device)] = vectors
        return out


def shard_rows(comm: Comm, items: torch.Tensor) -> torch.Tensor:
    """Mask of the given items this rank owns (used when restoring a sharded checkpoint)."""
    return owner_of(items, comm.world) == comm.rank

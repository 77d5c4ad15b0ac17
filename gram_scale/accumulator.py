"""The Multi-step item table: rows of the items touched in the current window that this rank
owns (the table is sharded by item owner; see ``gram_scale.exchange``).

Each touched item keeps the encoder vector it was cached with (``base``) and the sum of the
gradients the CF model sent it (``grads``). Its table row, the value later CF steps read, is
``base - lr * grads``: the cached vector moved by plain SGD. The window-end regression target is
that row, with the loss ``0.5 / lr * ||h - row||^2``: its gradient ``(h - base) / lr + grads`` is
exactly the accumulated CF gradient where the encoder still gives the cached vector, whatever the
rate (so a 1-step window equals Single-step at any rate), and it is computed in that form so the
small gradient is not lost in the cancellation of two nearly equal vectors. Only touched
items are stored, so memory grows with this rank's share of the window's items, not the
catalogue. The rows live on the encoder's device (the GPU when there is one, else CPU memory),
where the CF model reads them: no host copies, so no pinned memory is involved.
"""

from __future__ import annotations

import torch


class ItemTable:
    """Sparse per-window item rows: value and summed gradient, keyed by catalogue row."""

    def __init__(
        self,
        dim: int,
        lr: float = 1.0,
        target_lr: float | None = None,
        capacity: int = 1024,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.dim = dim
        self.dtype = dtype
        self.lr = lr
        self.target_lr = target_lr or lr
        self.device = torch.device(device)
        self._keys = torch.empty(0, dtype=torch.long)  # sorted item rows
        self._slots = torch.empty(0, dtype=torch.long)  # slot of each sorted key
        self._items = torch.empty(0, dtype=torch.long)  # item of each slot, insertion order
        self.base = self._alloc(capacity)
        self.grads = self._alloc(capacity)

    def _alloc(self, n: int) -> torch.Tensor:
        return torch.zeros(n, self.dim, dtype=self.dtype, device=self.device)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> torch.Tensor:
        """Touched item rows in insertion order."""
        return self._items.clone()

    def slots(self, items: torch.Tensor) -> torch.Tensor:
        """Slot of each item, -1 where the item is not in the table."""
        items = items.cpu().long()
        if len(self._keys) == 0:
            return torch.full_like(items, -1)
        pos = torch.searchsorted(self._keys, items).clamp(max=len(self._keys) - 1)
        found = self._keys[pos] == items
        return torch.where(found, self._slots[pos], torch.full_like(items, -1))

    def missing(self, items: torch.Tensor) -> torch.Tensor:
        """The given (unique) items that the table does not hold yet."""
        return items.cpu()[self.slots(items) < 0]

    def insert(self, items: torch.Tensor, vectors: torch.Tensor) -> None:
        """Add new items with their freshly encoded vectors (zero gradient so far)."""
        if len(items) == 0:
            return
        n = len(self._items)
        need = n + len(items)
        if need > len(self.base):
            cap = max(need, 2 * len(self.base))
            for name in ("base", "grads"):
                new = self._alloc(cap)
                new[:n] = getattr(self, name)[:n]
                setattr(self, name, new)
        self.base[n:need] = vectors.detach().to(self.device, self.dtype)
        self.grads[n:need] = 0
        self._items = torch.cat([self._items, items.cpu().long()])
        keys = torch.cat([self._keys, items.cpu().long()])
        slots = torch.cat([self._slots, torch.arange(n, need)])
        order = torch.argsort(keys)
        self._keys, self._slots = keys[order], slots[order]

    def rows(self, items: torch.Tensor) -> torch.Tensor:
        """Current table rows (cached vector moved by SGD) of held items."""
        s = self.slots(items).to(self.device)
        return self.base[s] - self.lr * self.grads[s]

    def apply(self, items: torch.Tensor, grads: torch.Tensor) -> None:
        """Accumulate the CF gradients of held items (their rows move by plain SGD)."""
        self.grads.index_add_(
            0, self.slots(items).to(self.device), grads.detach().to(self.device, self.dtype)
        )

    def base_and_grads(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached vectors and summed gradients of held items."""
        s = self.slots(items).to(self.device)
        return self.base[s], self.grads[s]

    def regression_grad(self, items: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """d/dh of 0.5 / target_lr * ||h - target||^2 for freshly encoded ``h`` of held items,
        where target = cached - target_lr * summed gradient (the row itself when target_lr is
        lr). At the cached vector it is the summed gradient, whatever the rate."""
        base, grads = self.base_and_grads(items)
        return (h.detach() - base.to(h.device)) / self.target_lr + grads.to(h.device)

    def truncate(self, n: int) -> None:
        """Forget every row inserted after the first ``n`` (undo a skipped step's inserts)."""
        self._items = self._items[:n]
        keep = self._slots < n
        self._keys, self._slots = self._keys[keep], self._slots[keep]

    def clear(self) -> None:
        """Forget every row (end of window); capacity is kept for the next window."""
        self._keys = torch.empty(0, dtype=torch.long)
        self._slots = torch.empty(0, dtype=torch.long)
        self._items = torch.empty(0, dtype=torch.long)

    def state_dict(self) -> dict:
        """The rows held now, for checkpoints."""
        n = len(self._items)
        return {
            "items": self._items.clone(),
            "base": self.base[:n].cpu().clone(),
            "grads": self.grads[:n].cpu().clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore rows saved by ``state_dict``."""
        self.clear()
        self.insert(state["items"], state["base"])
        self.grads[: len(state["items"])] = state["grads"].to(self.device, self.dtype)

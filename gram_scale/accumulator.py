"""The Multi-step item table: rows of the items touched in the current window that this rank
owns (the table is sharded by item owner; see ``gram_scale.exchange``).

Each touched item keeps the encoder vector it was cached with (``base``), the sum of the
gradients the CF model sent it (``grads``) and the number of steps that touched it. Its table
row, the value later CF steps read, is the cached vector moved by the row optimizer:

- ``sgd`` (the paper's rule): ``base - lr * grads``;
- ``adam``: ``base + delta``, ``delta`` moved by Adam with state for the touched rows only,
  each row stepping (and counting its steps for the bias correction) only when a step touches
  it, as ``torch.optim.Adam`` on that one row would.

The window-end regression pulls the encoder's fresh vector ``h`` of each item towards a target.
With a target rate ``r`` the target is ``base - r * grads`` and the loss ``0.5 / r * ||h -
target||^2``: its gradient ``(h - base) / r + grads`` is exactly the accumulated CF gradient
where the encoder still gives the cached vector, whatever the rate (so a 1-step window equals
Single-step at any rate), and it is computed in that form so the small gradient is not lost in
the cancellation of two nearly equal vectors. Without a target rate (``target_lr=None``) the
target is the row itself, with the loss ``0.5 * ||h - row||^2`` (for ``sgd`` rows: ``0.5 / lr``,
the same identity). The caller may weight each item's loss (``--regress-weights``).

Only touched items are stored, so memory grows with this rank's share of the window's items, not
the catalogue. The rows live on the encoder's device (the GPU when there is one, else CPU
memory), where the CF model reads them: no host copies, so no pinned memory is involved.
"""

from __future__ import annotations

import torch

TABLE_OPTIMIZERS = ("sgd", "adam")
BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as the CF model's AdamW uses
EPS = 1e-8


class ItemTable:
    """Sparse per-window item rows: value, summed gradient and steps, keyed by catalogue row."""

    def __init__(
        self,
        dim: int,
        lr: float = 1.0,
        target_lr: float | None = None,
        capacity: int = 1024,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        optimizer: str = "sgd",
    ):
        if optimizer not in TABLE_OPTIMIZERS:
            raise ValueError(f"unknown table optimizer {optimizer!r}")
        self.dim = dim
        self.dtype = dtype
        self.lr = lr
        self.optimizer = optimizer
        # None: the targets are the rows themselves
        self.target_lr = target_lr or (lr if optimizer == "sgd" else None)
        self.device = torch.device(device)
        self._keys = torch.empty(0, dtype=torch.long)  # sorted item rows
        self._slots = torch.empty(0, dtype=torch.long)  # slot of each sorted key
        self._items = torch.empty(0, dtype=torch.long)  # item of each slot, insertion order
        self._names = (
            ("base", "grads", "delta", "m", "v") if optimizer == "adam" else ("base", "grads")
        )
        for name in self._names:
            setattr(self, name, self._alloc(capacity))
        self.steps = torch.zeros(capacity, dtype=torch.long, device=self.device)

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
        """Add new items with their freshly encoded vectors (no gradient, no step so far)."""
        if len(items) == 0:
            return
        n = len(self._items)
        need = n + len(items)
        if need > len(self.base):
            cap = max(need, 2 * len(self.base))
            for name in self._names:
                new = self._alloc(cap)
                new[:n] = getattr(self, name)[:n]
                setattr(self, name, new)
            steps = torch.zeros(cap, dtype=torch.long, device=self.device)
            steps[:n] = self.steps[:n]
            self.steps = steps
        self.base[n:need] = vectors.detach().to(self.device, self.dtype)
        for name in self._names[1:]:
            getattr(self, name)[n:need] = 0
        self.steps[n:need] = 0
        self._items = torch.cat([self._items, items.cpu().long()])
        keys = torch.cat([self._keys, items.cpu().long()])
        slots = torch.cat([self._slots, torch.arange(n, need)])
        order = torch.argsort(keys)
        self._keys, self._slots = keys[order], slots[order]

    def rows(self, items: torch.Tensor) -> torch.Tensor:
        """Current table rows (the cached vectors moved by the row optimizer) of held items."""
        s = self.slots(items).to(self.device)
        if self.optimizer == "adam":
            return self.base[s] + self.delta[s]
        return self.base[s] - self.lr * self.grads[s]

    def apply(self, items: torch.Tensor, grads: torch.Tensor) -> None:
        """One step's CF gradients of held (unique) items: summed, and their rows moved."""
        s = self.slots(items).to(self.device)
        g = grads.detach().to(self.device, self.dtype)
        self.grads.index_add_(0, s, g)
        self.steps[s] += 1
        if self.optimizer == "adam":
            b1, b2 = BETAS
            m = self.m[s].mul_(b1).add_(g, alpha=1 - b1)
            v = self.v[s].mul_(b2).addcmul_(g, g, value=1 - b2)
            t = self.steps[s].to(self.dtype).unsqueeze(1)
            # torch.optim.Adam's arithmetic: lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            self.delta[s] -= (self.lr / bc1) * m / (v.sqrt() / bc2.sqrt() + EPS)
            self.m[s], self.v[s] = m, v

    def base_and_grads(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached vectors and summed gradients of held items."""
        s = self.slots(items).to(self.device)
        return self.base[s], self.grads[s]

    def step_counts(self, items: torch.Tensor) -> torch.Tensor:
        """Steps of the window that touched each held item."""
        return self.steps[self.slots(items).to(self.device)]

    def norms(self) -> tuple[float, float, float]:
        """Sums over the held rows of |cached vector|, |summed gradient| and |cached vector| x
        sqrt(steps that touched the row)."""
        n = len(self._items)
        base = self.base[:n].norm(dim=1)
        touches = self.steps[:n].to(base.dtype).sqrt()
        return (
            float(base.sum()),
            float(self.grads[:n].norm(dim=1).sum()),
            float((base * touches).sum()),
        )

    def regression_grad(
        self, items: torch.Tensor, h: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """d/dh of the regression loss for freshly encoded ``h`` of held items (see the module
        docstring), each item's loss scaled by ``weights`` when given."""
        s = self.slots(items).to(self.device)
        h = h.detach()
        if self.target_lr is None:  # the rows themselves, 0.5 x squared error
            g = h - self.rows(items).to(h.device)
        else:
            base, grads = self.base[s].to(h.device), self.grads[s].to(h.device)
            g = (h - base) / self.target_lr + grads
        return g if weights is None else g * weights.to(g.device, g.dtype).unsqueeze(1)

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
        out = {"items": self._items.clone(), "steps": self.steps[:n].cpu().clone()}
        for name in self._names:
            out[name] = getattr(self, name)[:n].cpu().clone()
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore rows saved by ``state_dict``."""
        self.clear()
        self.insert(state["items"], state["base"])
        n = len(state["items"])
        for name in self._names[1:]:
            getattr(self, name)[:n] = state[name].to(self.device, self.dtype)
        if "steps" in state:
            self.steps[:n] = state["steps"].to(self.device)

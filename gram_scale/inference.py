"""A finished run loaded for use: its exported encoder and CF model, with the trainer's own
pieces (token cache, encoder runner, task) doing the encoding and the scoring.

``load_run(folder)`` returns a ``Run``; ``run.encode_items(texts)`` gives item vectors as the
run's evaluation made them, ``run.score(...)`` scores vectors with the CF model, and
``run.task_for(data)`` is the run's task over another data set (its CF model shared), so that
``gram_scale.predict`` scores and measures with exactly the trainer's evaluation code. With a
``comm`` over several ranks (``predict`` launched on several processes) each rank encodes only
the catalogue items it owns, as the trainer's evaluation does; alone, one process encodes all.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from gram_scale.config import Options
from gram_scale.data.items import Catalogue, TokenCache
from gram_scale.encoder.loading import load_encoder
from gram_scale.encoder.model import ContentEncoder
from gram_scale.encoder.saving import POOLING_FILE
from gram_scale.errors import InputError
from gram_scale.exchange import Comm, OwnedVectors
from gram_scale.export import CF_FILE, ENCODER_DIR, METRICS_FILE, OPTIONS_FILE, VECTORS_FILE
from gram_scale.runner import EncoderRunner
from gram_scale.tasks import make_task


def read_options(path: Path) -> Options:
    """The options a run wrote (``options.json``); fields this version does not know are
    ignored and missing ones take their defaults."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, None, f"cannot read the run's options ({exc})") from None
    if not isinstance(raw, dict):
        raise InputError(path, None, "not a run's options (expected a JSON object)")
    known = {f.name for f in dataclasses.fields(Options)}
    return Options(**{k: v for k, v in raw.items() if k in known})


def check_run_folder(folder: Path) -> None:
    """Refuse a folder that holds no finished run with exported models."""
    if not folder.exists():
        raise InputError(folder, None, "run folder not found")
    if not folder.is_dir():
        raise InputError(folder, None, "is a file, not a run's output folder")
    if not (folder / OPTIONS_FILE).is_file():
        raise InputError(
            folder,
            None,
            f"not a finished gram-scale run (no {OPTIONS_FILE}; a "
            "run writes it with its exports when it ends)",
        )
    missing = [n for n in (f"{ENCODER_DIR}/config.json", CF_FILE) if not (folder / n).is_file()]
    if missing:
        raise InputError(
            folder,
            None,
            f"the run exported no models (no {', '.join(missing)}; "
            "was it trained with --no-export?)",
        )


def default_device() -> torch.device:
    """``$GRAM_DEVICE``, else the GPU when there is one, else the CPU."""
    if os.environ.get("GRAM_DEVICE"):
        return torch.device(os.environ["GRAM_DEVICE"])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ranks_comm(device: str | torch.device | None = None) -> Comm:
    """This process's ranks: launched on several processes (``WORLD_SIZE`` > 1, as
    ``accelerate launch`` and torchrun set it), the process group is joined (gloo on CPU, NCCL
    with each rank on GPU ``LOCAL_RANK``) and the Comm spans every rank; otherwise this process
    alone, on ``device`` (default: ``default_device()``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Comm(device=torch.device(device) if device is not None else default_device())
    import datetime

    import torch.distributed as dist

    from gram_scale.engine import _init_process_group

    _init_process_group(datetime.timedelta(seconds=1800))
    if device is None:
        gpu = dist.get_backend() == "nccl"
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if gpu else "cpu"
    return Comm(dist.get_rank(), dist.get_world_size(), torch.device(device))


def empty_data(task: str, catalogue: Catalogue | None = None, test: list | None = None) -> object:
    """A task's data object with nothing to train on: ``test`` holds the samples to score, and
    no item counts as cold (that needs the run's training data)."""
    catalogue = catalogue if catalogue is not None else Catalogue([], [])
    cold = torch.zeros(len(catalogue), dtype=torch.bool)
    if task == "kt":
        from gram_scale.data.kt import KTData

        return KTData(catalogue, [], [], list(test or []), cold)
    from gram_scale.data.mind import NewsData

    return NewsData(catalogue, [], [], list(test or []), cold)


@dataclasses.dataclass
class Run:
    """A finished run's exported models, ready to encode items and score users."""

    folder: Path
    opts: Options  # the options the run was trained with
    metrics: dict  # its metrics.json
    encoder: ContentEncoder
    tokenizer: object
    cf_model: nn.Module
    device: torch.device
    comm: Comm | None = None  # the ranks that share the encoding; None: this process alone

    def __post_init__(self):
        if self.comm is None:
            self.comm = Comm(device=self.device)

    @property
    def task(self) -> str:
        """``kt`` or ``news``."""
        return self.opts.task

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the item vectors and the CF model (float64 for an fp64 run)."""
        return self.opts.vector_dtype()

    def catalogue_vectors(self, texts: list[str]) -> OwnedVectors:
        """Vectors of ``texts`` (one item each) as the run's evaluation encodes its catalogue:
        eval mode, the run's ``--max-tokens`` and ``--encoder-batch-size`` chunks; each rank of
        ``comm`` encodes the items it owns (every rank calls this together)."""
        tokens = TokenCache.build(self.tokenizer, list(texts), self.opts.max_tokens)
        runner = EncoderRunner(self.encoder, tokens, self.comm, self.opts)
        try:
            return runner.owned_vectors(len(texts))
        finally:
            self.encoder.eval()  # the runner leaves it in train mode, ready for a next step

    def encode_items(self, texts: list[str]) -> torch.Tensor:
        """Item vectors [len(texts), dim] from the fine-tuned encoder (eval mode); over several
        ranks, every rank gets them all."""
        owned = self.catalogue_vectors(texts)
        if self.comm.world == 1:
            return owned.vectors
        return owned.lookup(torch.arange(len(texts)))

    def task_for(self, data):
        """The run's task over ``data`` (a task data object), sharing this run's CF model."""
        task = make_task(self.opts, data, self.encoder.dim)
        task.model = self.cf_model
        return task

    def exported_vectors(self) -> tuple[list[str], torch.Tensor]:
        """The item ids and vectors the run exported (``item_vectors.safetensors``)."""
        from safetensors import safe_open

        with safe_open(str(self.folder / VECTORS_FILE), "pt") as f:
            return json.loads(f.metadata()["ids"]), f.get_tensor("vectors")

    @torch.no_grad()
    def score(
        self,
        *,
        items: torch.Tensor | None = None,
        correct: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Score item vectors with the CF model (one user, or a batch along a first dimension).

        KT run: ``score(items=[T, d], correct=[T])`` -> P(correct) at each of the T positions;
        a position's probability reads only the items and answers before it. News run:
        ``score(history=[H, d], candidates=[C, d])`` -> the C candidates' scores for a user who
        clicked ``history``, oldest first (the latest ``--history-len`` are used)."""
        if self.task == "kt":
            if items is None or correct is None or history is not None or candidates is not None:
                raise InputError(None, None, "this is a kt run: score(items=..., correct=...)")
            vecs = torch.as_tensor(items).to(self.device, self.dtype)
            answers = torch.as_tensor(correct).to(self.device).long()
            single = vecs.dim() == 2
            if single:
                vecs, answers = vecs.unsqueeze(0), answers.unsqueeze(0)
            p = torch.sigmoid(self.cf_model(vecs, answers))
            return p[0] if single else p
        if history is None or candidates is None or items is not None or correct is not None:
            raise InputError(None, None, "this is a news run: score(history=..., candidates=...)")
        hist = torch.as_tensor(history).to(self.device, self.dtype)
        cands = torch.as_tensor(candidates).to(self.device, self.dtype)
        single = hist.dim() == 2
        if single:
            hist, cands = hist.unsqueeze(0), cands.unsqueeze(0)
        hist = hist[:, -self.opts.history_len :]
        mask = torch.ones(hist.shape[:2], dtype=torch.bool, device=self.device)
        user = self.cf_model(hist, mask)
        s = (cands * user.unsqueeze(1)).sum(-1)
        return s[0] if single else s


def load_run(
    path: str | os.PathLike, device: str | torch.device | None = None, comm: Comm | None = None
) -> Run:
    """Load a finished run's exported models (the best evaluation's with ``--save-best``: the
    run put them in place of the last ones) on ``device`` (default: ``default_device()``);
    ``comm``: the ranks that share its encoding (default: this process alone)."""
    folder = Path(path)
    check_run_folder(folder)
    opts = read_options(folder / OPTIONS_FILE)
    metrics_file = folder / METRICS_FILE
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    device = torch.device(device) if device is not None else default_device()
    pooling_file = folder / ENCODER_DIR / POOLING_FILE
    pooling = (
        json.loads(pooling_file.read_text())["pooling"] if pooling_file.is_file() else opts.pooling
    )
    # as the run held it: bf16 weights under DeepSpeed, float64 for fp64 (the autocast of bf16
    # without DeepSpeed comes with the encoder runner)
    dtype = torch.bfloat16 if opts.precision == "bf16" and opts.config.lower() != "none" else None
    encoder, tokenizer = load_encoder(
        str(folder / ENCODER_DIR), pooling, dtype, opts.attn_implementation, opts.keyed_dropout
    )
    if opts.precision == "fp64":
        encoder.double()
    encoder.requires_grad_(False)
    encoder.to(device).eval()
    task = make_task(opts, empty_data(opts.task), encoder.dim)
    from safetensors.torch import load_file

    try:
        task.model.load_state_dict(load_file(str(folder / CF_FILE)))
    except RuntimeError as exc:
        raise InputError(
            folder / CF_FILE, None, f"does not fit the run's CF model ({str(exc).splitlines()[0]})"
        ) from None
    task.model.to(device, opts.vector_dtype()).eval()
    return Run(folder, opts, metrics, encoder, tokenizer, task.model, device, comm)

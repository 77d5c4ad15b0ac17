"""Outputs a user takes downstream: encoder folder, CF weights, item vectors, metrics, options.

Everything is first written into a hidden folder inside the output folder and then moved into
place, so an interrupted run never leaves a half-written export behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from gram_scale.atomic import OLD, move_entries, replace_folder, temp_folder
from gram_scale.checkpoint import BEST_DIR, link_or_copy, link_tree
from gram_scale.encoder.lora import save_lora_encoder
from gram_scale.encoder.saving import save_encoder
from gram_scale.errors import InputError
from gram_scale.history import HISTORY_FILE

ENCODER_DIR = "encoder"
ADAPTER_DIR = "adapter"
CF_FILE = "cf_model.safetensors"
VECTORS_FILE = "item_vectors.safetensors"
METRICS_FILE = "metrics.json"
OPTIONS_FILE = "options.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_RECORD = "best.json"  # inside it: the step it is of
# What a run leaves in its output folder (trackers included: wandb/, and TensorBoard's run
# folder named after the project). An earlier run is recognised by these, and
# --overwrite-output-dir removes exactly these; anything else in the folder is left alone.
RUN_ENTRIES = (
    METRICS_FILE,
    OPTIONS_FILE,
    ENCODER_DIR,
    ADAPTER_DIR,
    CF_FILE,
    VECTORS_FILE,
    CHECKPOINTS_DIR,
    HISTORY_FILE,
    BEST_DIR,
    "wandb",
    "gram-scale",
)


def nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else its nearest existing parent (what creating it would use)."""
    while not path.exists():
        path = path.parent
    return path


def check_output_dir(opts) -> None:
    """Refuse an output folder the run could not write at its end, or one holding an earlier
    run (unless resuming it or asked to overwrite it); creates nothing."""
    out = Path(opts.output_dir)
    if out.exists() and not out.is_dir():
        raise InputError("--output-dir", None, f"{out} is a file, not a folder")
    existing = nearest_existing(out)
    if not existing.is_dir():
        raise InputError("--output-dir", None, f"{out} cannot be created: {existing} is a file")
    try:  # os.access says yes to root even on a read-only file system: try it for real
        os.rmdir(tempfile.mkdtemp(prefix=".gram-write-test-", dir=existing))
    except OSError as exc:
        raise InputError(
            "--output-dir", None, f"{out} is not writable ({existing}: {exc.strerror})"
        ) from None
    if opts.resume or opts.overwrite_output_dir or not out.is_dir():
        return
    earlier = [name for name in RUN_ENTRIES if (out / name).exists()]
    if earlier:
        how = "--overwrite-output-dir to replace it"
        if CHECKPOINTS_DIR in earlier:
            how += " or --resume latest to continue it"
        raise InputError(
            "--output-dir", None, f"{out} holds an earlier run ({', '.join(earlier)}); add {how}"
        )


def check_writable(folder: str | Path, flag: str) -> None:
    """Refuse a folder that is a file or could not be created or written; creates nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(flag, None, f"{folder} is a file, not a folder")
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise InputError(flag, None, f"{folder} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise InputError(flag, None, f"{folder} is not writable ({existing})")


def _sees(marker: Path) -> bool:
    """Whether ``marker`` is listed in its folder, waiting up to ``$GRAM_SHARED_DIR_WAIT``
    seconds (default 30: a network file system's client may cache the folder's listing that
    long); listing the folder, rather than looking the name up, makes an NFS client revalidate
    its cached view."""
    import time

    deadline = time.monotonic() + float(os.environ.get("GRAM_SHARED_DIR_WAIT", "30"))
    while True:
        try:
            if marker.name in os.listdir(marker.parent):
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def check_shared_output_dir(comm, output_dir: str | Path) -> None:
    """Refuse, on every rank, an output folder that is not the same folder on every node (a
    node-local disk): the main process writes a marker file in the folder (or its nearest
    existing parent, so nothing is created) and every rank looks for it. Only checkpoints and
    exports of the main process are written there, and a resume on another node would not find
    them. Every rank calls it; one node checks nothing."""
    if comm.world == int(os.environ.get("LOCAL_WORLD_SIZE", comm.world)):
        return
    import secrets

    folder = nearest_existing(Path(output_dir))
    token = comm.sum_ints([secrets.randbits(62) if comm.rank == 0 else 0])[0]
    marker = folder / f".gram-shared-{token:x}"
    try:
        if comm.rank == 0:
            marker.touch()
        comm.barrier()
        blind = comm.sum_ints(comm.per_rank(not _sees(marker)))
    finally:
        comm.barrier()
        if comm.rank == 0:
            marker.unlink(missing_ok=True)
    if any(blind):
        import socket

        who = [r for r, b in enumerate(blind) if b]
        here = f" (this is rank {comm.rank} on {socket.gethostname()})" if blind[comm.rank] else ""
        raise InputError(
            "--output-dir",
            None,
            f"{output_dir} is not the same folder on every "
            f"node: rank(s) {', '.join(map(str, who))} cannot see what the main "
            f"process writes there{here}; use a folder on a file system that every "
            "node shares",
        )


def clear_output_dir(output_dir: str | Path) -> None:
    """Remove an earlier run's outputs (``RUN_ENTRIES`` and unfinished exports)."""
    out = Path(output_dir)
    if not out.is_dir():
        return
    for entry in out.iterdir():
        if entry.name in RUN_ENTRIES or entry.name.startswith(".partial-"):
            _remove(entry)


def remove_partials(output_dir: str | Path) -> None:
    """Remove the unfinished exports (``.partial-*``, and ``.old-*`` left by a replacement)
    that an interrupted run left behind."""
    out = Path(output_dir)
    if out.is_dir():
        for entry in [*out.glob(".partial-*"), *out.glob(OLD + "*")]:
            _remove(entry, tolerant=True)


def _remove(entry: Path, tolerant: bool = False) -> None:
    """Delete a file, link or folder tree (``tolerant``: ignore what cannot be removed of a
    tree, or a file already gone)."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=tolerant)
    else:
        entry.unlink(missing_ok=tolerant)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _share_like_json(folder: Path) -> None:
    """Give every file the mode an ordinary ``open`` gives (0666 less the umask), as the JSON
    files have: some writers (safetensors) create theirs 0600, unreadable to teammates."""
    mask = _umask()
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def publish(output_dir: str | Path, write) -> None:
    """Call ``write(tmp_folder)``, then move each entry it made into ``output_dir``."""
    out = Path(output_dir)
    tmp = temp_folder(out, ".partial-")
    try:
        write(tmp)
        _share_like_json(tmp)
        move_entries(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stage_best(output_dir: str | Path, step: int, write) -> None:
    """Call ``write(tmp_folder)`` and make that folder ``OUTPUT/.best`` (the best-so-far export
    of ``step``). The previous one is renamed away first and deleted only once the new one is in
    place (``replace_folder``); a crash in between leaves a ``.partial-`` or ``.old-`` folder
    that the next start removes, and a resume takes its best from the checkpoint anyway."""
    out = Path(output_dir)
    tmp = temp_folder(out, ".partial-")
    try:
        write(tmp)
        write_json(tmp / BEST_RECORD, {"step": step})
        _share_like_json(tmp)
        replace_folder(tmp, out / BEST_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def best_step(output_dir: str | Path) -> int | None:
    """The step of the staged best export, None when there is none."""
    path = Path(output_dir) / BEST_DIR / BEST_RECORD
    return json.loads(path.read_text())["step"] if path.is_file() else None


def restore_best(output_dir: str | Path, checkpoint: Path | None) -> None:
    """Make ``OUTPUT/.best`` the checkpoint's best export (none: no best yet), dropping one an
    interrupted run staged after that checkpoint."""
    best = Path(output_dir) / BEST_DIR
    shutil.rmtree(best, ignore_errors=True)
    if checkpoint is None:
        return
    kept = checkpoint / BEST_DIR
    if not kept.is_dir():
        kept = checkpoint / "best"  # where checkpoints of gram-scale 0.1.0 keep it
    if kept.is_dir():
        link_tree(kept, best)


def take_best(output_dir: str | Path, folder: Path) -> None:
    """Put the staged best export's files into ``folder`` (as links; ``.best`` stays until the
    export is in place)."""
    best = Path(output_dir) / BEST_DIR
    for entry in best.iterdir():
        if entry.name == BEST_RECORD:
            continue
        if entry.is_dir():
            link_tree(entry, folder / entry.name)
        else:
            link_or_copy(entry, folder / entry.name)


def write_json(path: Path, obj) -> None:
    """Pretty JSON with NaN written as null."""
    path.write_text(json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n")


def _clean(obj):
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def export_run(
    folder: Path,
    encoder,
    tokenizer,
    encoder_state,
    cf_model,
    ids: list[str],
    vectors: torch.Tensor,
    metrics: dict,
    opts,
) -> None:
    """Write every output of a finished run into ``folder``."""
    if encoder is not None:
        if opts.lora:
            save_lora_encoder(
                opts.resolved_encoder(),
                opts,
                tokenizer,
                encoder_state,
                folder / ENCODER_DIR,
                folder / ADAPTER_DIR,
                encoder.pooling,
            )
        else:
            save_encoder(encoder, tokenizer, folder / ENCODER_DIR, state_dict=encoder_state)
        cf_state = {k: v.detach().cpu().contiguous() for k, v in cf_model.state_dict().items()}
        save_file(cf_state, str(folder / CF_FILE))
        save_file(
            {"vectors": vectors.detach().cpu().contiguous()},
            str(folder / VECTORS_FILE),
            metadata={"ids": json.dumps(ids)},
        )
    if metrics is not None:  # None: a staged best export, whose metrics come at the end
        write_json(folder / METRICS_FILE, metrics)
        (folder / OPTIONS_FILE).write_text(opts.to_json() + "\n")

"""Vectors of new items from a run's fine-tuned encoder:
``python -m gram_scale.embed --run RUN --items FILE --out vectors.safetensors``.

FILE is a KT ``items.csv`` (``item_id,text``) or a MIND ``news.tsv`` (title, or title + abstract
when the run used ``--use-abstract``). The output has the export's item-vector format: one row
per item under ``vectors``, in the order of the JSON list in its ``ids`` metadata; the vectors
are those the run's evaluation would give (eval mode, the run's ``--max-tokens``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gram_scale.config import OneLineParser
from gram_scale.errors import InputError, run_command

if TYPE_CHECKING:  # the readers import torch: only when a file is read
    from gram_scale.data.items import Catalogue


def read_catalogue(path: Path, use_abstract: bool) -> Catalogue:
    """The items of a KT items.csv or a MIND news.tsv, by the file's extension."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        from gram_scale.data.kt import read_items

        return read_items(path)
    if suffix == ".tsv":
        from gram_scale.data.mind import read_news

        return read_news(path, use_abstract)
    raise InputError(path, None, "expected a KT items.csv (item_id,text) or a MIND news.tsv")


def embed(
    run_dir: str | os.PathLike,
    items: str | os.PathLike,
    out: str | os.PathLike,
    device: str | None = None,
) -> int:
    """Encode the items of ``items`` with the run's encoder into ``out``; returns their count."""
    from safetensors.torch import save_file

    from gram_scale.export import VECTORS_FILE, check_writable, publish
    from gram_scale.inference import check_run_folder, load_run

    check_run_folder(Path(run_dir))
    out = Path(out)
    if out.is_dir():
        raise InputError(
            "--out", None, f"{out} is a folder; name the file to write (e.g. {out / VECTORS_FILE})"
        )
    check_writable(out.parent, "--out")
    path = Path(items)
    if not path.is_file():
        raise InputError(path, None, "items file not found")
    run = load_run(run_dir, device)
    catalogue = read_catalogue(path, run.opts.use_abstract)
    vectors = run.encode_items(catalogue.texts).detach().cpu().contiguous()

    def write(folder: Path) -> None:  # written beside the target, then renamed into place
        save_file(
            {"vectors": vectors},
            str(folder / out.name),
            metadata={"ids": json.dumps(catalogue.ids)},
        )

    publish(out.parent, write)
    print(f"wrote {len(catalogue)} vectors of dimension {vectors.shape[1]} to {out}", flush=True)
    return len(catalogue)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m gram_scale.embed``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = OneLineParser(
        prog="python -m gram_scale.embed",
        description="Vectors of new items from a run's fine-tuned encoder.",
    )
    parser.add_argument("--run", required=True, help="a finished run's output folder")
    parser.add_argument("--items", required=True, help="items.csv (item_id,text) or news.tsv")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--device", help="cpu, cuda ... (default: the GPU when there is one)")

    def body() -> None:
        a = parser.parse_args(argv)
        embed(a.run, a.items, a.out, a.device)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())

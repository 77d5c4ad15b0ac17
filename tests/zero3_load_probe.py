"""Launched on 2 CPU processes by tests/test_partitioned.py: loads each encoder folder given
under ZeRO-3 (``ds_configs/zero3.json``, bf16) as the trainer does, and checks every parameter,
gathered, against the folder's checkpoint. Prints, on rank 0, one line per folder:
``FOLDER read_by_module=B partitioned=B max_diff=X unchecked=N`` (N: parameters the checkpoint
lacks)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gram_scale.encoder.loading import load_encoder  # noqa: E402
from gram_scale.encoder.partitioned import checkpoint_files  # noqa: E402
from gram_scale.engine import make_accelerator, read_ds_config  # noqa: E402


def stored(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in checkpoint_files(folder):
        out.update(load_file(str(path)))
    return out


def main(folders: list[str]) -> None:
    import deepspeed

    opts = SimpleNamespace(dist_timeout=60, report_to="none", output_dir=None, precision="bf16")
    accelerator = make_accelerator(opts, read_ds_config("ds_configs/zero3.json"))
    for folder in folders:
        encoder, _ = load_encoder(folder, dtype=torch.bfloat16)
        want = stored(Path(folder))
        prefix = getattr(encoder.model, "base_model_prefix", "")
        worst, unchecked = 0.0, 0
        partitioned = True
        for name, p in encoder.model.named_parameters():
            partitioned &= p.ds_tensor.numel() < p.ds_numel
            with deepspeed.zero.GatheredParameters([p]):
                full = p.data.detach().float().clone()
            ref = want.get(name, want.get(f"{prefix}.{name}"))
            if ref is None:  # not in the checkpoint: initialised by transformers
                unchecked += 1
                continue
            ref = ref.to(torch.bfloat16).float()  # loaded in bf16, as --precision bf16 does
            worst = max(worst, float((full - ref).abs().max()))
        if accelerator.is_main_process:
            print(
                f"{folder} read_by_module={encoder.read_by_module} "
                f"partitioned={partitioned and encoder.built_partitioned} max_diff={worst} "
                f"unchecked={unchecked}",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:])

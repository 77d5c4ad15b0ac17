"""LoRA through peft under ZeRO-2 and ZeRO-3: only adapters train, the adapter reloads and
reproduces the evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from launching import metrics, run_many
from safetensors.torch import load_file
from tiny import options

from gram_scale.data.items import TokenCache
from gram_scale.data.load import load_data
from gram_scale.encoder.model import pool
from gram_scale.exchange import Comm
from gram_scale.tasks import make_task


@pytest.fixture(scope="module")
def trained(kt_dir, tiny_encoder, tmp_path_factory) -> dict:
    """``{config: (output folder, failure or None)}``: a LoRA run under ZeRO-2 and one under
    ZeRO-3 on 2 CPU ranks, both in one launch."""
    out = {c: tmp_path_factory.mktemp(f"lora-{c}") for c in ("zero2", "zero3")}
    runs = [
        [
            "--data",
            str(kt_dir),
            "--encoder",
            str(tiny_encoder),
            "--max-tokens",
            "16",
            "--epochs",
            "1",
            "--max-steps",
            "4",
            "--batch-size",
            "8",
            "--seq-len",
            "20",
            "--lora",
            "--lora-r",
            "4",
            "--lr-encoder",
            "1e-2",  # --lora-targets auto: query,value
            "--config",
            f"ds_configs/{config}.json",
            "--no-progress",
            "--output-dir",
            str(folder),
        ]
        for config, folder in out.items()
    ]
    return {c: (out[c], failure) for c, failure in zip(out, run_many(runs, processes=2))}


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_lora_trains_adapters_only_and_reloads(config, trained, kt_dir, tiny_encoder):
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    folder, failure = trained[config]
    assert failure is None, failure
    adapter = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 4 and all(float(v.abs().max()) > 0 for v in lora_b)  # not empty

    base = AutoModel.from_pretrained(str(tiny_encoder), add_pooling_layer=False).state_dict()
    merged = AutoModel.from_pretrained(
        str(folder / "encoder"), add_pooling_layer=False
    ).state_dict()
    assert merged.keys() == base.keys()
    for k in base:
        targeted = ("query" in k or "value" in k) and k.endswith("weight")
        if targeted:
            assert not torch.equal(base[k], merged[k]), k
        else:
            assert torch.equal(base[k], merged[k]), k  # everything else frozen, bit for bit

    # reload: base weights + the saved adapter give the exported vectors and the same metric
    base_model = AutoModel.from_pretrained(str(tiny_encoder), add_pooling_layer=False)
    model = PeftModel.from_pretrained(base_model, str(folder / "adapter"))
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(folder / "encoder"))
    opts = options(data=str(kt_dir), encoder=str(tiny_encoder), batch_size=8, seq_len=20)
    data = load_data(opts)
    tokens = TokenCache.build(tok, data.catalogue.texts, 16)
    ids, mask = tokens.rows(torch.arange(len(data.catalogue)))
    with torch.no_grad():
        vecs = pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask, "mean")
    saved = load_file(str(folder / "item_vectors.safetensors"))["vectors"]
    assert float((vecs - saved).abs().max()) < 1e-5
    task = make_task(opts, data, dim=vecs.shape[1])
    task.model.load_state_dict(load_file(str(folder / "cf_model.safetensors")))
    assert task.evaluate("test", lambda items: vecs[items], Comm())["auc"] == pytest.approx(
        metrics(folder)["test"]["auc"], abs=1e-6
    )
    assert json.loads((folder / "options.json").read_text())["lora"] is True
    # the main process gathered (ZeRO-3) and merged the export: its peak with it is reported
    m = metrics(folder)
    assert m["export_peak_rss_bytes"] >= m["peak_rss_bytes_per_rank"][0] > 0

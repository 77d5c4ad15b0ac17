"""Benchmark workload ``llm-1b``: can a 1B-parameter decoder be fine-tuned on CPU memory?

``python -m gram_scale.bench --workload llm-1b`` builds, once, a randomly initialised
Llama-shaped decoder in the cache folder (hidden 2048, 22 layers, 32 query heads sharing 4
key/value heads, intermediate 5632: TinyLlama-1.1B's shape without its LM head, with the
packaged MiniLM tokenizer's 30,522-token vocabulary, 1.03B parameters, bf16 weights). It then
trains 3 GRAM Single-step steps on 2 CPU processes under DeepSpeed ZeRO-3 with parameters and
optimizer offloaded to CPU, LoRA adapters and bf16, and reports each rank's peak RSS, seconds
per step and the encoder's activation memory. Texts are short (12 tokens) and the batch small
(4 sequences of 4 interactions): the point is memory, not speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gram_scale.config import Options
from gram_scale.history import read_history

NAME = "llm-1b"
ROOT = Path(__file__).resolve().parents[2]
GB = 1e9
RSS_LIMIT = 10 * GB  # per rank
SHAPE = dict(
    vocab_size=30522,
    hidden_size=2048,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    intermediate_size=5632,
    max_position_embeddings=2048,
)
DATA = dict(n_users=40, n_items=16, mean_len=10, n_unused_items=2, seed=0)
TRAIN_ARGS = [
    "--strategy",
    "single",
    "--epochs",
    "1",
    "--max-steps",
    "3",
    "--batch-size",
    "4",
    "--seq-len",
    "4",
    "--max-tokens",
    "12",
    "--encoder-batch-size",
    "8",
    "--eval-batch-size",
    "64",
    "--lora",
    "--config",
    "ds_configs/zero3_offload.json",
    "--precision",
    "bf16",
    "--no-export",
    "--no-progress",
]


def build_model(folder: Path) -> Path:
    """The random 1B Llama folder (bf16 safetensors + a decoder tokenizer); written once."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    from gram_scale.bench.tiny import write_decoder_tokenizer
    from gram_scale.data.load import generate_once

    def write(tmp: Path) -> None:
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built in bf16: half the memory and time
        try:
            model = LlamaModel(LlamaConfig(**SHAPE, dtype="bfloat16"))
        finally:
            torch.set_default_dtype(default)
        model.save_pretrained(str(tmp))
        del model
        write_decoder_tokenizer(tmp, "left")

    return generate_once(folder, write)


def count_parameters(folder: Path) -> int:
    """Parameters stored in a model folder (read from the safetensors headers only)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def run(args) -> int:
    """Build the inputs, train on 2 processes, write ``results.json`` / ``results.md``."""
    from gram_scale.bench.report import machine
    from gram_scale.data import synth
    from gram_scale.data.load import generate_once
    from gram_scale.export import write_json

    cache = Options(cache_dir=args.cache_dir).resolved_cache_dir()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model = build_model(cache / "bench-llm-1b-llama")
    built = time.perf_counter() - t
    data = generate_once(cache / "bench-llm-1b-kt", lambda tmp: synth.write_kt(tmp, **DATA))
    n_params = count_parameters(model)
    print(
        f"bench {NAME}: {n_params / 1e9:.2f}B parameters in {model} ({built:.0f} s to get)",
        file=sys.stderr,
        flush=True,
    )
    run_dir = out / "run"
    cmd = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--num_processes",
        "2",
        str(ROOT / "launch" / "train.py"),
        "--data",
        str(data),
        "--encoder",
        str(model),
        *TRAIN_ARGS,
        "--output-dir",
        str(run_dir),
    ]
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    info = machine()
    t = time.perf_counter()
    with open(out / "train.log", "w", encoding="utf-8") as log:
        code = subprocess.run(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        ).returncode
    wall = time.perf_counter() - t
    if code != 0:
        print(f"error: training failed (exit {code}), log {out / 'train.log'}", file=sys.stderr)
        return 1
    m = json.loads((run_dir / "metrics.json").read_text())
    steps = read_history(run_dir)
    seconds = [h["seconds"] for h in steps]
    rss = m["peak_rss_bytes_per_rank"]
    result = {
        "workload": NAME,
        "description": " ".join(__doc__.split()),
        "machine": info,
        "parameters": n_params,
        "shape": SHAPE,
        "data": DATA,
        "train_args": TRAIN_ARGS,
        "processes": m["processes"],
        "steps": m["steps"],
        "seconds_per_step": seconds,
        "peak_rss_bytes_per_rank": rss,
        "rss_limit_bytes": RSS_LIMIT,
        "rss_met": max(rss) < RSS_LIMIT,
        "encoder_activation_bytes_rank0": m["encoder_peak_activation_bytes"],
        "train_seconds": m["train_seconds"],
        "wall_seconds": wall,
        "model_build_seconds": built,
        "loss": [h["loss"] for h in steps],
    }
    write_json(out / "results.json", result)
    text = markdown(result)
    (out / "results.md").write_text(text)
    print(text, end="")
    return 0


def markdown(r: dict) -> str:
    """The figures as a short Markdown report."""
    from gram_scale.bench.report import machine_line

    steps = ", ".join(f"{s:.1f}" for s in r["seconds_per_step"])
    rss = ", ".join(f"{b / GB:.2f} GB" for b in r["peak_rss_bytes_per_rank"])
    verdict = "met" if r["rss_met"] else "not met"
    return "\n".join(
        [
            f"# Benchmark: {r['workload']}",
            "",
            f"Machine: {machine_line(r['machine'])}; {r['machine']['date']}.",
            "",
            f"{r['parameters'] / 1e9:.2f}B-parameter random Llama (bf16), {r['processes']} CPU "
            f"processes, ZeRO-3 + CPU offload + LoRA + bf16, GRAM Single-step, {r['steps']} steps.",
            "",
            f"- seconds per step: {steps} (mean {sum(r['seconds_per_step']) / len(r['seconds_per_step']):.1f})",
            f"- peak RSS per rank: {rss}",
            f"- encoder activation memory (rank 0, largest forward): "
            f"{r['encoder_activation_bytes_rank0'] / 2**20:,.1f} MiB",
            f"- whole run: {r['wall_seconds']:.0f} s wall (start-up, 3 steps, 2 evaluations)",
            f"- {verdict}: peak RSS per rank under {r['rss_limit_bytes'] / GB:.0f} GB",
            "",
        ]
    )

"""Memory workloads ``llm-1b`` and ``llm-3b``: can a 1B or 3B decoder be fine-tuned on CPU
memory?

``python -m gram_scale.bench --workload llm-1b`` (or ``llm-3b``) builds, once, a randomly
initialised Llama-shaped decoder in the cache folder, written in bf16 one shard at a time (no
copy of the whole model, in float32 or otherwise, is ever held): ``llm-1b`` has TinyLlama-1.1B's
shape without its LM head (hidden 2048, 22 layers, 32 query heads sharing 4 key/value heads,
intermediate 5632) with the packaged MiniLM tokenizer's 30,522-token vocabulary, 1.03B
parameters; ``llm-3b`` has Llama-3.2-3B's shape without its LM head (hidden 3072, 28 layers, 24
query heads sharing 8 key/value heads, intermediate 8192, its 128,256-row embedding), 3.21B
parameters, with the same tokenizer (rows past 30,522 are never looked up). Each run trains on
2 CPU processes under DeepSpeed ZeRO-3 with parameters and optimizer offloaded to CPU, LoRA
adapters and bf16: ``llm-1b`` 3 GRAM Single-step steps, ``llm-3b`` 3 Single-step and 3
Multi-step steps (a 3-step window, so the last step's catch-up trains the encoder) with gradient
checkpointing. It reports each rank's peak RSS, the same per parameter, seconds per step and the
encoder's activation memory. Texts are short (12 tokens) and the batch small (4 sequences of 4
interactions): the point is memory, not speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gram_scale.config import Options
from gram_scale.history import read_history

ROOT = Path(__file__).resolve().parents[2]
GB = 1e9
SHARD_BYTES = 1 << 30  # the random checkpoints are written in shards of at most 1 GiB
DATA = dict(n_users=40, n_items=16, mean_len=10, n_unused_items=2, seed=0)
COMMON_ARGS = [
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
SINGLE = ("single", ["--strategy", "single"])
MULTI = ("multi", ["--strategy", "multi", "--window", "3"])


@dataclass(frozen=True)
class LLMWorkload:
    """A memory workload: the decoder's shape, what it trains, and the per-rank RSS limit."""

    name: str
    shape: dict
    runs: tuple[tuple[str, list[str]], ...]  # (label, the strategy's flags)
    extra_args: tuple[str, ...]  # added to COMMON_ARGS for every run
    rss_limit: float  # bytes per rank

    def train_args(self, strategy_args: list[str]) -> list[str]:
        return [*strategy_args, *COMMON_ARGS, *self.extra_args]


LLM_WORKLOADS = {
    w.name: w
    for w in (
        LLMWorkload(
            "llm-1b",
            dict(
                vocab_size=30522,
                hidden_size=2048,
                num_hidden_layers=22,
                num_attention_heads=32,
                num_key_value_heads=4,
                intermediate_size=5632,
                max_position_embeddings=2048,
            ),
            (SINGLE,),
            (),
            4 * GB,
        ),
        LLMWorkload(
            "llm-3b",
            dict(
                vocab_size=128256,
                hidden_size=3072,
                num_hidden_layers=28,
                num_attention_heads=24,
                num_key_value_heads=8,
                intermediate_size=8192,
                max_position_embeddings=2048,
            ),
            (SINGLE, MULTI),
            ("--gradient-checkpointing",),
            9 * GB,
        ),
    )
}


def shard_plan(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Tensor names cut, in order, into shards of at most ``limit`` bytes (a larger tensor
    alone in its shard)."""
    shards, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > limit:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


def write_random_llama(folder: Path, shape: dict, shard_bytes: int = SHARD_BYTES) -> None:
    """A random bf16 Llama checkpoint in ``folder``, written shard by shard: the model's shapes
    come from a copy on the meta device (no memory), and each tensor is drawn in bf16 (normal,
    std ``initializer_range``, as Llama initialises its linear and embedding weights; norms 1)
    only when its shard is written, so the memory held is one shard."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(**shape, dtype="bfloat16")
    config.architectures = ["LlamaModel"]
    with torch.device("meta"):
        meta = LlamaModel(config)
    shapes = {n: tuple(p.shape) for n, p in meta.named_parameters()}
    sizes = {n: p.numel() * 2 for n, p in meta.named_parameters()}
    plan = shard_plan(sizes, shard_bytes)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(plan, 1):
        file = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for name in names:
            t = torch.empty(shapes[name], dtype=torch.bfloat16)
            if name.endswith("norm.weight"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, config.initializer_range, generator=gen)
            tensors[name] = t
            weight_map[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(str(folder))


def build_model(folder: Path, shape: dict) -> Path:
    """The random Llama folder (sharded bf16 safetensors + a decoder tokenizer); written once."""
    from gram_scale.bench.tiny import write_decoder_tokenizer
    from gram_scale.data.load import generate_once

    def write(tmp: Path) -> None:
        write_random_llama(tmp, shape)
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
    """Build the inputs, train each run on 2 processes, write ``results.json`` / ``.md``."""
    from gram_scale.bench.report import machine
    from gram_scale.data import synth
    from gram_scale.data.load import generate_once
    from gram_scale.export import write_json

    w = LLM_WORKLOADS[args.workload]
    cache = Options(cache_dir=args.cache_dir).resolved_cache_dir()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model = (
        Path(args.encoder)
        if args.encoder
        else build_model(cache / f"bench-{w.name}-sharded", w.shape)
    )
    built = time.perf_counter() - t
    data = generate_once(cache / "bench-llm-kt", lambda tmp: synth.write_kt(tmp, **DATA))
    n_params = count_parameters(model)
    print(
        f"bench {w.name}: {n_params / 1e9:.2f}B parameters in {model} ({built:.0f} s to get)",
        file=sys.stderr,
        flush=True,
    )
    info = machine()
    runs = []
    for label, strategy_args in w.runs:
        r = train_one(w, label, strategy_args, model, data, out)
        if r is None:
            return 1
        runs.append(r)
    rss = [max(r["peak_rss_bytes_per_rank"][i] for r in runs) for i in range(2)]
    result = {
        "workload": w.name,
        "description": " ".join(__doc__.split()),
        "machine": info,
        "load_average_at_end": os.getloadavg()[0],
        "parameters": n_params,
        "shape": w.shape,
        "data": DATA,
        "runs": runs,
        "peak_rss_bytes_per_rank": rss,
        "bytes_per_parameter_per_rank": [b / n_params for b in rss],
        "rss_limit_bytes": w.rss_limit,
        "rss_met": max(rss) <= w.rss_limit,
        "model_build_seconds": built,
    }
    write_json(out / "results.json", result)
    text = markdown(result)
    (out / "results.md").write_text(text)
    print(text, end="")
    return 0


def train_one(w: LLMWorkload, label: str, strategy_args, model: Path, data: Path, out: Path):
    """One training run on 2 CPU processes; its figures, or None (said on stderr) if it failed."""
    run_dir = out / label
    train_args = w.train_args(strategy_args)
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
        *train_args,
        "--output-dir",
        str(run_dir),
        "--overwrite-output-dir",
    ]
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    t = time.perf_counter()
    log_path = out / f"train-{label}.log"
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.run(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        ).returncode
    wall = time.perf_counter() - t
    if code != 0:
        print(f"error: {label} training failed (exit {code}), log {log_path}", file=sys.stderr)
        return None
    m = json.loads((run_dir / "metrics.json").read_text())
    steps = read_history(run_dir)
    return {
        "label": label,
        "train_args": train_args,
        "processes": m["processes"],
        "steps": m["steps"],
        "seconds_per_step": [h["seconds"] for h in steps],
        "encoder_updates": sum(bool(h.get("encoder_updated")) for h in steps),
        "peak_rss_bytes_per_rank": m["peak_rss_bytes_per_rank"],
        "encoder_activation_bytes_rank0": m["encoder_peak_activation_bytes"],
        "encoder_numerics": m["encoder_numerics"],
        "train_seconds": m["train_seconds"],
        "wall_seconds": wall,
        "loss": [h["loss"] for h in steps],
    }


def markdown(r: dict) -> str:
    """The figures as a short Markdown report."""
    from gram_scale.bench.report import machine_line

    w = LLM_WORKLOADS[r["workload"]]
    extra = " + gradient checkpointing" if "--gradient-checkpointing" in w.extra_args else ""
    lines = [
        f"# Benchmark: {r['workload']}",
        "",
        f"Machine: {machine_line(r['machine'])}; {r['machine']['date']} (load average "
        f"{r['machine']['load_average_at_start']:.1f} at the start, "
        f"{r['load_average_at_end']:.1f} at the end).",
        "",
        f"{r['parameters'] / 1e9:.2f}B-parameter random Llama (bf16), 2 CPU processes, ZeRO-3 + "
        f"CPU offload + LoRA + bf16{extra}.",
        "",
        "| run | steps | seconds per step (rank 0) | peak RSS per rank | bytes / parameter / rank "
        "| encoder activations (rank 0) | weights | wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    n = r["parameters"]
    for run in r["runs"]:
        secs = run["seconds_per_step"]
        rss = run["peak_rss_bytes_per_rank"]
        lines.append(
            f"| {run['label']} | {run['steps']} ({run['encoder_updates']} encoder updates) | "
            f"{', '.join(f'{s:.1f}' for s in secs)} (mean {sum(secs) / len(secs):.1f}) | "
            f"{', '.join(f'{b / GB:.2f} GB' for b in rss)} | "
            f"{', '.join(f'{b / n:.2f}' for b in rss)} | "
            f"{run['encoder_activation_bytes_rank0'] / 2**20:,.1f} MiB | "
            f"{run['encoder_numerics']['weights']} | {run['wall_seconds']:.0f} s |"
        )
    verdict = "met" if r["rss_met"] else "not met"
    lines += [
        "",
        f"Peak RSS per rank over the runs: "
        f"{', '.join(f'{b / GB:.2f} GB' for b in r['peak_rss_bytes_per_rank'])} "
        f"({', '.join(f'{b:.2f}' for b in r['bytes_per_parameter_per_rank'])} bytes per "
        f"parameter); {verdict}: at most {r['rss_limit_bytes'] / GB:.0f} GB per rank.",
        "",
    ]
    return "\n".join(lines)

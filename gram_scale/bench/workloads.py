"""The benchmark's workloads: what each trains on, with which encoder and options, and which
runs it compares; the generated data and encoder they need, prepared in the cache folder."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple


class Run(NamedTuple):
    """One training run of a workload: a strategy, its window, whether the encoder is frozen,
    and the chunk rule's order (None: --chunk-order's default, sorted by length)."""

    strategy: str
    window: str | None = None
    frozen: bool = False
    chunk_order: str | None = None

    @property
    def label(self) -> str:
        """Row name: ``e2e``, ``frozen``, ``single``, ``multi 0.5E`` ..., and ``e2e unsorted``
        ... for a run whose calls are cut in the items' own order."""
        if self.frozen:
            name = "frozen"
        else:
            name = self.strategy if self.window is None else f"{self.strategy} {self.window}"
        return name + UNSORTED if self.chunk_order == "given" else name


# the label's mark of a run cut in the given order; the run without it is its sorted twin
UNSORTED = " unsorted"
E2E, SINGLE = Run("e2e"), Run("single")
# A frozen encoder is trained by Single-step: its accuracy is E2E's with a frozen encoder (the
# two are equal), at Single-step's cost.
FROZEN = Run("single", frozen=True)
MULTI_10, MULTI_HALF, MULTI_1E = Run("multi", "10"), Run("multi", "0.5E"), Run("multi", "1E")
# the same runs with the encoder's calls cut in the items' own order (--chunk-order given)
E2E_UNSORTED, SINGLE_UNSORTED = Run("e2e", chunk_order="given"), Run("single", chunk_order="given")
MULTI_1E_UNSORTED = Run("multi", "1E", chunk_order="given")
# the runs of most workloads, in the order they alternate when repeated
RUNS: tuple[Run, ...] = (E2E, SINGLE, MULTI_10, MULTI_HALF, MULTI_1E)
# the fine-tuning workloads: E2E against the frozen encoder, and how much of the gain each
# Multi-step window keeps (Single-step's accuracy is E2E's: a tested identity)
FINETUNE_RUNS: tuple[Run, ...] = (E2E, FROZEN, MULTI_10, MULTI_HALF, MULTI_1E)


@dataclass(frozen=True)
class Workload:
    """One benchmark setting: generated data, encoder, training options and the runs compared."""

    doc: str
    task: str
    generator: dict  # keyword arguments of the data writer
    encoder: str  # "tiny" (a random 2-layer BERT built in the cache) or "minilm"
    options: dict = field(default_factory=dict)  # Options fields shared by the runs
    words_per_item: int = 0  # KT only: lengthen every item text to this many words (0 = keep)
    # KT only: cut or lengthen each item text to a length drawn (seeded per item) from this range
    words_range: tuple[int, int] | None = None
    e2e_steps: int = 0  # default --e2e-steps (0 = train the capped runs fully)
    capped: tuple[str, ...] = ("e2e",)  # runs that train only --e2e-steps steps (extrapolated)
    runs: tuple[Run, ...] = RUNS
    writer: str = ""  # the gram_scale.data.synth function; empty = write_kt / write_mind
    min_1e_speedup: float = 0.0  # a speed-up target of multi 1E over e2e (0 = none)


# Training options of both news workloads (they differ only in data)
NEWS_OPTIONS = dict(
    max_tokens=32,
    batch_size=8,
    history_len=10,
    negatives=4,
    epochs=2,
    lr_encoder=5e-5,
    lr_cf=1e-3,
    encoder_batch_size=16,
)

WORKLOADS: dict[str, Workload] = {
    "tiny": Workload(
        doc="""Smoke test of the benchmark itself (used by tests/test_bench.py), not a speed
        figure: a random 2-layer hidden-32 BERT, so the CF model costs as much as the encoder.
        write_kt(n_users=60, n_items=60, mean_len=30, n_unused_items=4, seed=1); 16 max tokens,
        batch 4 x seq 12: 27 steps per epoch, so windows of 10 steps, 0.5E (14) and 1E differ
        and 10-step windows straddle epochs. 2 epochs, lr encoder 1e-3, lr CF 1e-3. Includes
        the frozen-encoder run, so the test covers it.""",
        task="kt",
        generator=dict(n_users=60, n_items=60, mean_len=30, n_unused_items=4, seed=1),
        encoder="tiny",
        options=dict(
            max_tokens=16,
            batch_size=4,
            seq_len=12,
            epochs=2,
            lr_encoder=1e-3,
            lr_cf=1e-3,
            encoder_batch_size=16,
        ),
        runs=(E2E, FROZEN, SINGLE, MULTI_10, MULTI_HALF, MULTI_1E),
    ),
    "kt-small": Workload(
        doc="""Knowledge tracing with the real all-MiniLM-L6-v2 encoder on short texts (8-20
        words, 32 max tokens): write_kt(n_users=120, n_items=80, mean_len=30, n_unused_items=4,
        seed=0). 2,726 training interactions over 68 distinct items per epoch, batch 6 x seq
        20: 30 steps per epoch, R_batch 2.8, R_epoch 40. 2 epochs, lr encoder 5e-5, lr CF 1e-3,
        encoder chunks of 16 (a small CE batch as in the paper: the chunk, not the CF batch,
        bounds Multi-step's encoder memory).""",
        task="kt",
        generator=dict(n_users=120, n_items=80, mean_len=30, n_unused_items=4, seed=0),
        encoder="minilm",
        options=dict(
            max_tokens=32,
            batch_size=6,
            seq_len=20,
            epochs=2,
            lr_encoder=5e-5,
            lr_cf=1e-3,
            encoder_batch_size=16,
        ),
    ),
    "news-small": Workload(
        doc="""MIND-style news recommendation (NRMS) with all-MiniLM-L6-v2 on titles (32 max
        tokens): write_mind(n_users=100, n_news=150, impressions_per_user=2, n_candidates=5,
        history_len=10, n_dev_only_news=10, seed=0); histories of 10, 4 negatives, batch 8: 26
        steps and 2,955 item occurrences over 137 distinct news per epoch. Histories and
        candidates repeat less within a batch than KT items do (R_batch 2.0, R_epoch 22): the
        workload where Single-step buys least. 2 epochs, lr encoder 5e-5, lr CF 1e-3, encoder
        chunks of 16.""",
        task="news",
        generator=dict(
            n_users=100,
            n_news=150,
            impressions_per_user=2,
            n_candidates=5,
            history_len=10,
            n_dev_only_news=10,
            seed=0,
        ),
        encoder="minilm",
        options=NEWS_OPTIONS,
    ),
    "news-medium": Workload(
        doc="""The news accuracy check: the same generator as news-small with 8 times the users
        and half of the impressions held out (the last of 2 days), so valid and test hold about
        410 impressions each where news-small has 16 and one impression moves AUC by several
        points. write_mind(n_users=800, n_news=300, impressions_per_user=2, n_candidates=5,
        history_len=10, n_dev_only_news=15, days=2, dev_days=1, seed=0); histories of 10, 4 negatives, batch 8: 115 steps and 13,345 item
        occurrences over 284 distinct news per epoch (R_batch 1.7, R_epoch 47). 2 epochs, lr
        encoder 5e-5, lr CF 1e-3, encoder chunks of 16.""",
        task="news",
        generator=dict(
            n_users=800,
            n_news=300,
            impressions_per_user=2,
            n_candidates=5,
            history_len=10,
            n_dev_only_news=15,
            days=2,
            dev_days=1,
            seed=0,
        ),
        encoder="minilm",
        options=NEWS_OPTIONS,
    ),
    "kt-skewed": Workload(
        doc="""A TOEIC-like catalogue, where Multi-step pays most: few items, many
        interactions per item, long texts. write_kt(n_users=300, n_items=100, mean_len=50,
        n_unused_items=5, zipf=1.0, seed=0), then every item text is lengthened to 64 words by
        appending words drawn (seeded per item) from its own text, so the level/topic signal
        keeps its share of the words and every item fills 64 tokens. 11,364 training
        interactions over 85 distinct items per epoch (R_epoch 134), batch 8 x seq 50: 43 steps
        per epoch, R_batch 4.4. E2E would take several minutes per epoch on 2 CPU cores, so it
        trains --e2e-steps (default 4) steps and its epoch time is extrapolated; no E2E
        accuracy. 1 epoch (--epochs 2 or more on a GPU), lr encoder 5e-5, lr CF 1e-3, encoder
        chunks of 16.""",
        task="kt",
        generator=dict(n_users=300, n_items=100, mean_len=50, n_unused_items=5, zipf=1.0, seed=0),
        encoder="minilm",
        options=dict(
            max_tokens=64,
            batch_size=8,
            seq_len=50,
            epochs=1,
            lr_encoder=5e-5,
            lr_cf=1e-3,
            encoder_batch_size=16,
        ),
        words_per_item=64,
        e2e_steps=4,
    ),
    "kt-finetune": Workload(
        doc="""Knowledge tracing where fine-tuning the encoder matters: write_kt_finetune, whose
        difficulty levels are spelled by ordinary nouns dealt to the levels at random ("spoon"
        hard, "horse" easy), so all-MiniLM-L6-v2's pretrained vectors know nothing of them.
        write_kt_finetune(n_users=400, n_items=800, mean_len=25, n_unused_items=10, zipf=0.5,
        seed=0): about 4,600 training interactions over about 700 distinct items per epoch
        (R_epoch about 6.5): many items, each answered a few times, so the CF model cannot learn
        items one by one and must read difficulty from the text; 25% of the users each for
        valid and test (about 2,400 interactions each). Batch 8 x seq 20 (40 steps per epoch),
        4 epochs (E2E peaks in the second; a one-epoch window gets four encoder updates), lr
        encoder 2e-4, lr CF 1e-3, encoder chunks of 16, 32 max tokens. Every run evaluates
        valid every 10 steps and reports its best valid model (--save-best). Measures the
        fine-tuning gain (e2e against the frozen encoder) and how much of it Multi-step keeps
        on the trainer's defaults.""",
        task="kt",
        writer="write_kt_finetune",
        generator=dict(n_users=400, n_items=800, mean_len=25, n_unused_items=10, zipf=0.5, seed=0),
        encoder="minilm",
        options=dict(
            max_tokens=32,
            batch_size=8,
            seq_len=20,
            epochs=4,
            lr_encoder=2e-4,
            lr_cf=1e-3,
            encoder_batch_size=16,
            valid_frac=0.25,
            test_frac=0.25,
            eval_every=10,
            save_best=True,
        ),
        runs=FINETUNE_RUNS,
    ),
    "kt-often": Workload(
        doc="""Fine-tuning on a catalogue answered often: write_kt_finetune (hidden level words,
        as kt-finetune) with 300 items drawn with Zipf weights 1.0, so popular items are
        answered many times a window (R_epoch about 20, where kt-finetune has 6.5) and a frozen
        encoder's vectors can be learnt item by item for them, while the tail needs the text.
        write_kt_finetune(n_users=400, n_items=300, mean_len=30, n_unused_items=4, zipf=1.0,
        seed=0): about 5,600 training interactions a epoch, 47 steps of batch 8 x seq 20; 25% of
        the users each for valid and test (about 3,000 interactions each); 6 epochs, lr encoder
        2e-4, lr CF 1e-3, encoder chunks of 16, 32 max tokens, best valid model of evaluations
        every 15 steps. 6 epochs, not 3, because a 1E run of 3 epochs makes only 2 encoder
        updates: E2E's and the frozen encoder's best valid models come within 3 epochs on most
        seeds, Multi-step 1E's later (median step 180 against E2E's 120, about 48 steps an epoch;
        docs/multistep.md).""",
        task="kt",
        writer="write_kt_finetune",
        generator=dict(n_users=400, n_items=300, mean_len=30, n_unused_items=4, zipf=1.0, seed=0),
        encoder="minilm",
        options=dict(
            max_tokens=32,
            batch_size=8,
            seq_len=20,
            epochs=6,
            lr_encoder=2e-4,
            lr_cf=1e-3,
            encoder_batch_size=16,
            valid_frac=0.25,
            test_frac=0.25,
            eval_every=15,
            save_best=True,
        ),
        runs=FINETUNE_RUNS,
    ),
    "news-finetune": Workload(
        doc="""News recommendation where fine-tuning the encoder matters: write_mind_finetune,
        whose 8 topics are spelled by ordinary nouns dealt to them at random, 2-3 of them per
        title among 8-14 filler words, so two titles of a topic rarely share a word and the
        pretrained vectors do not group them. Topics differ in popularity (users pick their
        preferred topics with Zipf weights 1.5), so a title's topic also says how likely anyone
        clicks it. write_mind_finetune(n_topics=8, topic_zipf=1.5, n_users=1350, n_news=500,
        impressions_per_user=2, n_candidates=5, history_len=8, n_dev_only_news=25, days=6,
        dev_days=4, title_topic_words=(2, 3), seed=0): about 900 training impressions (about 130
        steps per epoch) and about 900 valid and 900 test impressions (4,500 candidate labels
        each: with fewer, one run's valid AUC swung by 2 points between evaluations). Histories
        of 8, 4 negatives, batch 8, 3 epochs, lr encoder 5e-5 (2e-4 made e2e unstable), lr CF
        1e-3, encoder chunks of 16. Every run evaluates valid every 25 steps and reports (and
        exports) its best valid model (--save-best).""",
        task="news",
        writer="write_mind_finetune",
        generator=dict(
            n_topics=8,
            topic_zipf=1.5,
            n_users=1350,
            n_news=500,
            impressions_per_user=2,
            n_candidates=5,
            history_len=8,
            n_dev_only_news=25,
            days=6,
            dev_days=4,
            title_topic_words=(2, 3),
            seed=0,
        ),
        encoder="minilm",
        options=dict(
            max_tokens=32,
            batch_size=8,
            history_len=8,
            negatives=4,
            epochs=3,
            lr_encoder=5e-5,
            lr_cf=1e-3,
            encoder_batch_size=16,
            eval_every=25,
            save_best=True,
        ),
        runs=FINETUNE_RUNS,
    ),
    "kt-varied": Workload(
        doc="""Knowledge tracing with texts of very different lengths, where how the encoder's
        calls are cut matters (each call is padded to its longest text): write_kt(n_users=100,
        n_items=120, mean_len=20, n_unused_items=4, seed=0), each item text cut or lengthened
        to a length drawn (seeded per item) between 14 and 150 words: 18 to 152 tokens, mean
        81 (160 max). Batch 4 x seq 20, 1 epoch, lr encoder 5e-5, lr CF 1e-3, encoder chunks of
        16. The table's items / s and encoder tokens / s compare the strategies' throughput,
        and padded / real the tokens the calls compute per real token. Each strategy also runs
        with its calls cut in the items' own order (--chunk-order given, "unsorted"), so the
        report sets the sort's saving beside it: encoder seconds and padded / real tokens
        unsorted over sorted (target: 1.3x on the encoder's time) and both runs' AUCs, which
        only float rounding may part. --e2e-steps caps both e2e runs.""",
        task="kt",
        generator=dict(n_users=100, n_items=120, mean_len=20, n_unused_items=4, seed=0),
        encoder="minilm",
        options=dict(
            max_tokens=160,
            batch_size=4,
            seq_len=20,
            epochs=1,
            lr_encoder=5e-5,
            lr_cf=1e-3,
            encoder_batch_size=16,
        ),
        words_range=(14, 150),
        capped=("e2e", "e2e unsorted"),
        runs=(E2E, E2E_UNSORTED, SINGLE, SINGLE_UNSORTED, MULTI_1E, MULTI_1E_UNSORTED),
    ),
    "toeic-like": Workload(
        doc="""The paper's TOEIC case, where Multi-step pays most: a small catalogue of long
        texts answered very often. write_kt(n_users=760, n_items=75, mean_len=125,
        n_unused_items=5, zipf=1.0, seed=0), every item text lengthened to 150 words (about 150
        tokens, 160 max) as in kt-skewed. 71,306 training interactions over 63 distinct items
        per epoch: R_epoch 1,132 (R_batch 3.9), 431 steps per epoch. Batch 4 x seq 50 keeps an
        E2E step's encoder graph (up to 200 texts of 160 tokens) within a few GiB. E2E and
        Single-step would
        take hours per epoch on 2 CPU cores, so they train --e2e-steps (default 3) steps and
        their epoch times are extrapolated; no E2E accuracy. Multi-step 0.5E and 1E train 1
        epoch. lr encoder 5e-5, lr CF 1e-3, encoder chunks of 16. Target: 1E at least 150x
        faster than E2E per epoch (the paper's best is 146x).""",
        task="kt",
        generator=dict(n_users=760, n_items=75, mean_len=125, n_unused_items=5, zipf=1.0, seed=0),
        encoder="minilm",
        options=dict(
            max_tokens=160,
            batch_size=4,
            seq_len=50,
            epochs=1,
            lr_encoder=5e-5,
            lr_cf=1e-3,
            encoder_batch_size=16,
        ),
        words_per_item=150,
        e2e_steps=3,
        capped=("e2e", "single"),
        runs=(E2E, SINGLE, MULTI_HALF, MULTI_1E),
        min_1e_speedup=150.0,
    ),
}


# ---- inputs: data and encoder ---------------------------------------------------------------
def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def lengthen_items(
    folder: Path, words: int, seed: int, span: tuple[int, int] | None = None
) -> None:
    """Rewrite ``items.csv`` so every text has ``words`` words, the extra ones drawn from it
    (with ``span``: a length drawn per item from that range, a longer text cut to it)."""
    path = folder / "items.csv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    out = []
    for n, (item_id, text) in enumerate(body):
        own = text.split()
        rng = random.Random(seed * 1_000_003 + n)  # per item, so the result is order-stable
        want = rng.randint(*span) if span else words
        more = [rng.choice(own) for _ in range(want - len(own))]
        out.append([item_id, " ".join((own + more)[:want])])
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(out)


def prepare_data(name: str, workload: Workload, cache: Path) -> Path:
    """The workload's generated data folder in the cache; generated on first use."""
    from gram_scale.data import synth
    from gram_scale.data.load import generate_once

    writer = workload.writer or ("write_kt" if workload.task == "kt" else "write_mind")
    spec = {
        "task": workload.task,
        "generator": workload.generator,
        "words_per_item": workload.words_per_item,
    }
    if workload.writer:  # so the folders of workloads written before the field keep their names
        spec["writer"] = writer
    if workload.words_range:
        spec["words_range"] = list(workload.words_range)
    folder = cache / f"bench-{name}-{_digest(spec)}"

    def write(tmp: Path) -> None:
        getattr(synth, writer)(tmp, **workload.generator)
        if workload.words_per_item or workload.words_range:
            lengthen_items(
                tmp,
                workload.words_per_item,
                workload.generator.get("seed", 0),
                workload.words_range,
            )

    return generate_once(folder, write)


def prepare_encoder(workload: Workload, cache: Path, override: str) -> str:
    """The encoder folder: ``--encoder`` if given, else the workload's."""
    from gram_scale.bench.tiny import make_tiny_bert
    from gram_scale.encoder.loading import default_encoder_path

    if override:
        return override
    if workload.encoder == "tiny":
        return str(make_tiny_bert(cache / "bench-tiny-bert"))
    return default_encoder_path()

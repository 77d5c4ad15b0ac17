"""Shared fixtures: a tiny encoder folder and small generated data sets, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """A 2-layer hidden-32 BERT with dropout 0.1 and the MiniLM tokenizer."""
    from tiny import make_tiny_encoder

    return make_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_encoder_nodrop(tmp_path_factory) -> Path:
    """The same tiny BERT with every dropout off."""
    from tiny import make_tiny_encoder

    return make_tiny_encoder(tmp_path_factory.mktemp("enc0") / "tiny-bert", dropout=0.0)


@pytest.fixture(scope="session")
def kt_dir(tmp_path_factory) -> Path:
    """A small generated knowledge-tracing set."""
    from gram_scale.data.synth import write_kt

    folder = tmp_path_factory.mktemp("kt") / "data"
    write_kt(folder, n_users=60, n_items=60, mean_len=30, n_unused_items=4, seed=1)
    return folder


@pytest.fixture(scope="session")
def news_dir(tmp_path_factory) -> Path:
    """A small generated MIND-format set."""
    from gram_scale.data.synth import write_mind

    folder = tmp_path_factory.mktemp("news") / "data"
    write_mind(
        folder,
        n_users=60,
        n_news=80,
        impressions_per_user=2,
        n_candidates=5,
        history_len=8,
        n_dev_only_news=6,
        seed=1,
    )
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer hidden-32 Llama (attention dropout 0.1); its tokenizer has no pad token and pads
    on the left."""
    from tiny import make_tiny_decoder

    return make_tiny_decoder(tmp_path_factory.mktemp("llama") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer hidden-32 GPT-2 (dropout 0.1); its tokenizer has no pad token, pads right."""
    from tiny import make_tiny_decoder

    return make_tiny_decoder(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2", "gpt2")

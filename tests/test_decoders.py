"""Decoder-only encoders (tiny random Llama and GPT-2 built locally): pad and pooling rules, LoRA
targets, every strategy, Single-step == E2E with dropout on, 2 ranks == 1 under ZeRO-3 + LoRA
with an LR schedule and clipping, and the exported merged model and adapter."""

from __future__ import annotations

import json

import pytest
import torch
from launching import history, max_diff, run, run_many
from safetensors.torch import load_file
from test_distributed import ZERO_ARGS, ZERO_PARAM_REL, worst_excess
from test_equivalence import TOL as EXACT_TOL
from test_equivalence import run_steps
from tiny import options, params, replace

from gram_scale.data.items import TokenCache
from gram_scale.data.load import load_data
from gram_scale.encoder.loading import load_encoder
from gram_scale.encoder.lora import lora_targets
from gram_scale.encoder.model import ContentEncoder, pool, position_ids
from gram_scale.errors import InputError
from gram_scale.schedule import Schedule
from gram_scale.trainer import setup, train

TEXTS = ["find the area of the triangle", "count the apples", "a", "add two more apples now"]


@pytest.fixture(params=["llama", "gpt2"])
def decoder(request, tiny_llama, tiny_gpt2):
    return request.param, str(tiny_llama if request.param == "llama" else tiny_gpt2)


def test_pad_falls_back_to_eos_and_auto_pooling_is_last(decoder):
    kind, folder = decoder
    encoder, tok = load_encoder(folder)
    assert encoder.causal and encoder.pooling == "last"
    assert tok.padding_side == ("left" if kind == "llama" else "right")
    assert tok.pad_token_id == tok.eos_token_id == 102  # the saved tokenizer has no pad token
    cache = TokenCache.build(tok, TEXTS, 16)
    assert cache.pad_id == 102 and int(cache.input_ids[2, -1]) == 102  # the short text is padded


def test_last_pooling_takes_the_last_real_token_on_either_padding_side(decoder):
    _, folder = decoder
    encoder, tok = load_encoder(folder)
    encoder.eval()
    alone = []
    with torch.no_grad():
        for text in TEXTS:  # unpadded: the last token is the last position
            enc = tok([text], return_tensors="pt")
            alone.append(encoder(enc["input_ids"], enc["attention_mask"])[0])
        for side in ("left", "right"):
            tok.padding_side = side
            enc = tok(TEXTS, padding=True, return_tensors="pt")
            assert int(enc["attention_mask"].sum()) < enc["attention_mask"].numel()  # padded
            vecs = encoder(enc["input_ids"], enc["attention_mask"])
            assert float((vecs - torch.stack(alone)).abs().max()) < 1e-5, side


def test_pool_last_and_position_ids_by_hand():
    hidden = torch.arange(2 * 4, dtype=torch.float).view(2, 4, 1)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])  # left- and right-padded rows
    assert pool(hidden, mask, "last").flatten().tolist() == [3.0, 5.0]
    assert position_ids(mask).tolist() == [[0, 0, 1, 2], [0, 1, 1, 1]]


def test_cls_pooling_on_a_decoder_is_refused_in_one_line_exit_2(tiny_llama, kt_dir, tmp_path):
    r = run(
        [
            "--data",
            str(kt_dir),
            "--encoder",
            str(tiny_llama),
            "--pooling",
            "cls",
            "--no-progress",
            "--output-dir",
            str(tmp_path / "out"),
        ],
        check=False,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: --pooling: cls") and "decoder-only (llama)" in lines[0]
    assert not (tmp_path / "out").exists()


def test_lora_auto_targets_by_architecture_and_unknown_names_refused(
    tiny_llama, tiny_gpt2, tiny_encoder
):
    from transformers import AutoModel

    expected = {
        tiny_llama: ["q_proj", "v_proj"],
        tiny_gpt2: ["c_attn"],
        tiny_encoder: ["query", "value"],
    }
    for folder, targets in expected.items():
        model = AutoModel.from_pretrained(str(folder))
        assert lora_targets(model, "auto") == targets
        assert lora_targets(model, ",".join(targets)) == targets
    llama = AutoModel.from_pretrained(str(tiny_llama))
    with pytest.raises(InputError) as err:
        lora_targets(llama, "q_proj,value")
    message = str(err.value)
    assert "\n" not in message and message.startswith("--lora-targets: 'value' matches no module")
    assert "q_proj" in message and "v_proj" in message  # names what would match


@pytest.mark.parametrize("strategy", ["e2e", "single", "multi"])
def test_every_strategy_trains_a_decoder(decoder, strategy, kt_dir):
    _, folder = decoder
    opts = options(data=str(kt_dir), encoder=folder, strategy=strategy, window="2")
    data = load_data(opts)
    before = params(setup(opts, data))
    s = setup(opts, data)
    batches = s.task.train_batches(0)
    results = [s.strategy.step(next(batches), step) for step in range(4)]
    assert all(r.loss == r.loss and not r.skipped for r in results)
    enc = [k for k in before if k.startswith("enc.")]
    assert max(float((before[k] - p).abs().max()) for k, p in params(s).items() if k in enc) > 1e-4


def _single_vs_e2e(
    kind: str, folder: str, kt_dir, n_steps: int, scale_one_item=None, **kw
) -> float:
    """Largest parameter difference between E2E and Single-step, over its allowance (<= 1 is
    equal). Llama's RMSNorm computes in float32 whatever the model's dtype, so its rounding
    (~6e-8 relative) reaches every gradient: AdamW blows that up on near-zero coordinates
    (measured 1.2e-6), plain SGD keeps it rounding-sized (measured 1.6e-8 after 3 steps;
    allowed: 8 float32 ulps of the largest parameter). GPT-2 computes in float64 throughout:
    AdamW, within 1e-9 as in test_equivalence."""
    opts = options(data=str(kt_dir), encoder=folder, cf_dropout=0.1, precision="fp64")
    if kind == "llama":
        opts = replace(opts, optimizer="sgd", lr_encoder=0.1, lr_cf=0.1)
    data = load_data(opts)
    e2e = params(run_steps(replace(opts, strategy="e2e", **kw), data, n_steps)[0])
    single = params(
        run_steps(replace(opts, strategy="single", **kw), data, n_steps, scale_one_item)[0]
    )
    assert max_diff(e2e, params(setup(opts, data))) > 1e-4  # the steps moved the parameters
    allowed = EXACT_TOL
    if kind == "llama":
        allowed = ZERO_PARAM_REL * max(float(v.abs().max()) for v in e2e.values())
    return max_diff(e2e, single) / allowed


@pytest.mark.parametrize("n_steps", [1, 3])
def test_single_equals_e2e_with_dropout_on(decoder, kt_dir, n_steps):
    kind, folder = decoder
    assert _single_vs_e2e(kind, folder, kt_dir, n_steps) <= 1
    # the guards: with keyed dropout off the masks differ, and so do the results; one item's
    # summed gradient off by 1e-3 in Single-step is caught too
    assert _single_vs_e2e(kind, folder, kt_dir, n_steps, keyed_dropout=False) > 10
    assert _single_vs_e2e(kind, folder, kt_dir, n_steps, scale_one_item=1 + 1e-3) > 2


def _lora_args(kt_dir, encoder, out, config: str) -> list[str]:
    # CF dropout off: its masks come from each rank's RNG (the encoder's are keyed and stay on)
    return [
        "--data",
        str(kt_dir),
        "--encoder",
        str(encoder),
        "--max-tokens",
        "16",
        "--epochs",
        "1",
        "--max-steps",
        "5",
        "--batch-size",
        "8",
        "--seq-len",
        "20",
        "--cf-dropout",
        "0",
        "--lora",
        "--lora-r",
        "4",
        "--lora-dropout",
        "0.1",
        "--lr-schedule",
        "cosine",
        "--warmup-steps",
        "2",
        "--max-grad-norm",
        "0.5",
        "--config",
        config,
        "--precision",
        "fp64",
        *ZERO_ARGS,
        "--no-progress",
        "--output-dir",
        str(out),
    ]


@pytest.fixture(scope="module")
def zero3_lora(kt_dir, tiny_llama, tiny_gpt2, tmp_path_factory) -> dict:
    """``{decoder: (output folder, failure or None)}``: the 2-rank ZeRO-3 LoRA run of the tiny
    Llama and of the tiny GPT-2, both in one launch."""
    encoders = {"llama": tiny_llama, "gpt2": tiny_gpt2}
    out = {k: tmp_path_factory.mktemp(f"zero3-lora-{k}") for k in encoders}
    runs = [_lora_args(kt_dir, encoders[k], out[k], "ds_configs/zero3.json") for k in encoders]
    return {k: (out[k], failure) for k, failure in zip(encoders, run_many(runs, processes=2))}


def _lrs(folder) -> list[float]:
    return [lr for h in history(folder) for lr in (h["lr_encoder"], h["lr_cf"])]


def test_two_ranks_equal_one_under_zero3_lora_with_schedule_and_clipping(
    zero3_lora, tiny_llama, kt_dir, tmp_path
):
    (two, failure), one = zero3_lora["llama"], tmp_path / "one"
    assert failure is None, failure
    run(_lora_args(kt_dir, tiny_llama, one, "ds_configs/zero3.json"))
    # float64 and plain SGD, compared as in test_distributed (ZeRO's float32 master weights)
    assert worst_excess(one, two, "zero3") <= 1
    # the same options with plain torch optimizers in this process: the same run again, so the
    # engine's scheduler and clipping act as the torch ones do
    plain = tmp_path / "plain"
    train(
        options(
            data=str(kt_dir),
            encoder=str(tiny_llama),
            max_steps=5,
            cf_dropout=0.0,
            lora=True,
            lora_r=4,
            lora_dropout=0.1,
            lr_encoder=0.1,
            lr_cf=0.1,
            optimizer="sgd",
            precision="fp64",
            lr_schedule="cosine",
            warmup_steps=2,
            max_grad_norm=0.5,
            export=True,
            output_dir=str(plain),
        )
    )
    assert worst_excess(plain, one, "zero3") <= 1
    # one scheduler step per optimizer step, on 2 processes as on 1 (5 steps, 2 of warmup)
    factors = [Schedule("cosine", 2, 5)(k) for k in range(5)]
    expected = [lr for f in factors for lr in (0.1 * f, 0.1 * f)]
    for folder in (two, one, plain):
        assert _lrs(folder) == pytest.approx(expected, rel=1e-6), folder
    assert factors[:3] == [0.5, 1.0, 1.0] and 0 < factors[4] < factors[3] < 1


def test_gpt2_lora_export_reloads_merged_and_adapter(zero3_lora, tiny_gpt2, kt_dir):
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    out, failure = zero3_lora["gpt2"]
    assert failure is None, failure
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 2 and all(float(v.abs().max()) > 0 for v in lora_b)  # c_attn x 2 layers
    base = AutoModel.from_pretrained(str(tiny_gpt2)).state_dict()
    merged = AutoModel.from_pretrained(str(out / "encoder")).state_dict()
    assert merged.keys() == base.keys()
    for k in base:
        if "c_attn.weight" in k:
            assert not torch.equal(base[k], merged[k]), k
        else:
            assert torch.equal(base[k], merged[k]), k  # everything else frozen, bit for bit
    pooling = json.loads((out / "encoder" / "gram_pooling.json").read_text())["pooling"]
    assert pooling == "last"

    # the exported tokenizer pads with eos; padded batches give the saved vectors, from the
    # merged model and from the base model + adapter alike
    tok = AutoTokenizer.from_pretrained(str(out / "encoder"))
    assert tok.pad_token == tok.eos_token == "[SEP]"
    data = load_data(options(data=str(kt_dir), batch_size=8, seq_len=20))
    enc = tok(
        data.catalogue.texts, truncation=True, max_length=16, padding=True, return_tensors="pt"
    )
    saved = load_file(str(out / "item_vectors.safetensors"))["vectors"]
    with_adapter = PeftModel.from_pretrained(
        AutoModel.from_pretrained(str(tiny_gpt2)), str(out / "adapter")
    )
    for model in (AutoModel.from_pretrained(str(out / "encoder")), with_adapter):
        encoder = ContentEncoder(model.eval(), pooling)
        with torch.no_grad():
            vecs = encoder(enc["input_ids"], enc["attention_mask"])
        assert float((vecs - saved).abs().max()) < 1e-5


def test_llama_adapter_reloads_with_left_padding(tiny_llama, kt_dir, tmp_path):
    """The Llama tokenizer pads on the left; the reloaded adapter reproduces the vectors."""
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "run"
    train(
        options(
            data=str(kt_dir),
            encoder=str(tiny_llama),
            max_steps=3,
            lora=True,
            lr_encoder=1e-2,
            export=True,
            output_dir=str(out),
        )
    )
    tok = AutoTokenizer.from_pretrained(str(out / "encoder"))
    assert tok.padding_side == "left" and tok.pad_token == "[SEP]"
    data = load_data(options(data=str(kt_dir), batch_size=8, seq_len=20))
    enc = tok(
        data.catalogue.texts, truncation=True, max_length=16, padding=True, return_tensors="pt"
    )
    assert int(enc["attention_mask"][:, 0].min()) == 0  # some rows really are left-padded
    saved = load_file(str(out / "item_vectors.safetensors"))["vectors"]
    merged = AutoModel.from_pretrained(str(out / "encoder"))
    with_adapter = PeftModel.from_pretrained(
        AutoModel.from_pretrained(str(tiny_llama)), str(out / "adapter")
    )
    for model in (merged, with_adapter):
        with torch.no_grad():
            vecs = ContentEncoder(model.eval(), "last")(enc["input_ids"], enc["attention_mask"])
        assert float((vecs - saved).abs().max()) < 1e-5


def test_lora_with_checkpointing_needs_no_gradient_at_the_embeddings(tiny_llama, kt_dir):
    """transformers and peft make the embedding output require a gradient when checkpointing
    is on (reentrant checkpointing needs it; under ZeRO-3 it makes every backward gather the
    embedding table again). It is turned off, and LoRA with non-reentrant checkpointing trains
    the adapters as without checkpointing."""
    opts = options(
        data=str(kt_dir),
        encoder=str(tiny_llama),
        strategy="single",
        lora=True,
        lora_r=4,
        cf_dropout=0.1,
        optimizer="sgd",
        lr_encoder=0.1,
        lr_cf=0.1,
        precision="fp64",
    )
    data = load_data(opts)
    plain = params(run_steps(opts, data, 2)[0])
    s, _ = run_steps(replace(opts, gradient_checkpointing=True), data, 2)
    seen = []
    embeddings = s.encoder.model.get_base_model().get_input_embeddings()
    embeddings.register_forward_hook(lambda m, i, out: seen.append(out.requires_grad))
    s.runner.encode(torch.arange(3), salt=0, grad=True)
    s.runner.drop_graphs()
    assert seen == [False]
    checkpointed = params(s)
    assert max_diff(plain, params(setup(opts, data))) > 1e-4  # the adapters moved
    allowed = ZERO_PARAM_REL * max(float(v.abs().max()) for v in plain.values())
    assert max_diff(plain, checkpointed) <= allowed

"""Content encoder: a Hugging Face model folder loaded offline, pooled to one vector per item.

The modules, by concern: ``model`` (the encoder module, decoder position ids, pooling),
``loading`` (loading a folder offline, the attention kernel), ``checks`` (a folder's config,
tokenizer and weight files checked before loading), ``dropout`` (keyed dropout, its replay in
gradient checkpointing, row keys), ``lora`` (LoRA targets, wrapping and export) and ``saving``
(a trained encoder written as a Hugging Face folder). The common names are re-exported here.
"""

from gram_scale.encoder.checks import check_encoder_folder, check_tokenizer
from gram_scale.encoder.dropout import enable_gradient_checkpointing, keyed_dropout, row_keys
from gram_scale.encoder.loading import default_encoder_path, load_encoder, resolve_attention
from gram_scale.encoder.lora import apply_lora, save_lora_encoder
from gram_scale.encoder.model import ContentEncoder, pool, position_ids
from gram_scale.encoder.saving import POOLING_FILE, save_encoder

__all__ = [
    "POOLING_FILE",
    "ContentEncoder",
    "apply_lora",
    "check_encoder_folder",
    "check_tokenizer",
    "default_encoder_path",
    "enable_gradient_checkpointing",
    "keyed_dropout",
    "load_encoder",
    "pool",
    "position_ids",
    "resolve_attention",
    "row_keys",
    "save_encoder",
    "save_lora_encoder",
]

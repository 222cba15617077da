"""Tiny models and a character tokenizer for engine tests: built from configs, no download."""

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHARS = string.ascii_letters + string.digits + " .,:;!?+-*/=()[]{}\\\n"
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; ids 0..2 are <pad>, <eos>, <unk>."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_qwen2(seed: int = 0, vocab_size: int | None = None, hidden: int = 32, layers: int = 2) -> Qwen2ForCausalLM:
    """A random Qwen2 (GQA, qkv bias, tied embeddings) small enough for CPU tests."""
    vocab_size = vocab_size or len(SPECIALS) + len(CHARS)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    # Random init gives near-uniform logits; sharpen them so samples differ from greedy but are not noise.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)
    return model


def teacher_forced_logprobs(model, prompt_ids, response_ids, temperature: float) -> list[float]:
    """log_softmax(logits / T) of each response token from one unpadded forward pass (T == 0 -> raw logits)."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    scale = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits / scale, dim=-1)
    start = len(prompt_ids) - 1
    return [logp[start + i, tok].item() for i, tok in enumerate(response_ids)]

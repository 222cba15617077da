"""A character-level tokenizer for the arithmetic-chain task, built offline (no hub download).

Every printable ASCII character and the newline is one token, and `\\boxed{` is one more, so any prompt or
solution of the task (indeed any ASCII text) encodes and decodes back exactly. The tiny demo policy uses it.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
BOXED = "\\boxed{"
_CHARACTERS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))  # printable ASCII, space and newline


def arith_tokenizer():
    """A transformers PreTrainedTokenizerFast (bos/eos/pad/unk set) with a character vocabulary plus `\\boxed{`."""
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate([PAD, BOS, EOS, UNK, BOXED, *_CHARACTERS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Each `\boxed{` and each single character becomes its own piece; the WordLevel model maps pieces to ids.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="left"
    )

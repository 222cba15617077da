"""How a PromptItem becomes the policy's input text: the tokenizer's chat template for chat data, a plain
`problem + newline` for the synthetic arithmetic task (its tiny character-level policy has no chat template).
The warm-up, the trainer and validation all render through this one function.
"""

from __future__ import annotations

from fapo_megatron.config import Config
from fapo_megatron.data.items import PromptItem


def render_prompt(item: PromptItem, tokenizer) -> str:
    if item.messages is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(item.messages, tokenize=False, add_generation_prompt=True)
    return item.prompt + "\n"


def encode_prompt(item: PromptItem, tokenizer) -> list[int]:
    """Token ids of the rendered prompt, with BOS first where the tokenizer has one and the template left it out."""
    ids = tokenizer(render_prompt(item, tokenizer), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def load_tokenizer(cfg: Config):
    """The policy's tokenizer: model.tokenizer, else model.path, else the arithmetic task's character tokenizer
    (what the random tiny policy speaks)."""
    path = cfg.model.tokenizer or cfg.model.path
    if not path:
        from fapo_megatron.data.arith_tokenizer import arith_tokenizer

        return arith_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)

"""The offline character-level tokenizer of the arithmetic task."""

import random

from transformers import AutoTokenizer

from fapo_megatron.data import FLAWS, arith_solution, arith_tokenizer, make_arith_items


def _texts():
    items = make_arith_items(40, seed=11, min_steps=1, max_steps=6) + make_arith_items(10, 11, 1, 6, split="val")
    rng = random.Random(1)
    texts = [item.prompt for item in items]
    texts += [arith_solution(item, flaw=flaw, rng=rng) for item in items for flaw in (None, *FLAWS)]
    return texts + [item.prompt + "\n" + arith_solution(item) for item in items]


def test_round_trips_every_prompt_and_solution():
    tokenizer = arith_tokenizer()
    for text in _texts():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_special_tokens_and_boxed_token():
    tokenizer = arith_tokenizer()
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    assert len(special) == 4 and None not in special
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("12\n\n\\boxed{12}", add_special_tokens=False)["input_ids"])
    assert tokens == ["1", "2", "\n", "\n", "\\boxed{", "1", "2", "}"]
    ids = tokenizer("7 + 5", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "7 + 5"
    assert len(tokenizer) < 128


def test_save_and_load(tmp_path):
    tokenizer = arith_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    for text in _texts()[:50]:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text

"""EmbeddedEngine against independent references: an unpadded teacher-forced forward pass and HF `generate`."""

import pytest
import torch
from engine_fixtures import char_tokenizer, teacher_forced_logprobs, tiny_qwen2

from fapo_megatron.engine_protocol import EngineError, SamplingParams
from fapo_megatron.engines.embedded import EmbeddedEngine, _truncate
from fapo_megatron.engines.weight_sync import bucket_named_tensors

PROMPTS = ["abc", "hello world", "1+1=", "The answer is"]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def engine(tok):
    eng = EmbeddedEngine(model=tiny_qwen2(seed=0), tokenizer=tok)
    eng.start()
    yield eng
    eng.shutdown()


@pytest.mark.parametrize(
    "temperature,top_p,top_k", [(1.0, 1.0, -1), (0.8, 0.9, -1), (1.2, 1.0, 5), (1.0, 1.0, 1), (0.0, 1.0, -1)]
)
def test_logprobs_equal_teacher_forced_pass(engine, tok, temperature, top_p, top_k):
    params = SamplingParams(max_new_tokens=24, temperature=temperature, top_p=top_p, top_k=top_k, n=3, seed=7)
    gens = engine.generate(PROMPTS, params)
    # prompt-major order, each sample paired with its own prompt
    assert [g.prompt_index for g in gens] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    for g in gens:
        assert g.prompt_token_ids == tok(PROMPTS[g.prompt_index], add_special_tokens=False)["input_ids"]
        assert len(g.logprobs) == len(g.token_ids) > 0
        ref = teacher_forced_logprobs(engine.model, g.prompt_token_ids, g.token_ids, temperature)
        assert max(abs(a - b) for a, b in zip(ref, g.logprobs)) <= 1e-5
        assert g.finish_reason == ("length" if len(g.token_ids) == 24 else "stop")
        assert g.text == tok.decode(g.token_ids, skip_special_tokens=True)


def test_top_k_one_samples_greedy_but_reports_untruncated_logprobs(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0))
    top1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.0, top_k=1, seed=3))
    for g, t in zip(greedy, top1):
        assert t.token_ids == g.token_ids
        assert max(abs(a - b) for a, b in zip(t.logprobs, g.logprobs)) <= 1e-5  # T=1: same distribution
        assert min(t.logprobs) < -1e-3  # not the log(1) of the truncated distribution


def test_truncation_hand_computed():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])  # softmax = [0.644, 0.237, 0.087, 0.032]
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(_truncate(logits, top_k=-1, top_p=0.6)) == [True, False, False, False]
    assert kept(_truncate(logits, top_k=-1, top_p=0.8)) == [True, True, False, False]
    assert kept(_truncate(logits, top_k=-1, top_p=0.9)) == [True, True, True, False]
    assert kept(_truncate(logits, top_k=3, top_p=1.0)) == [True, True, True, False]
    assert kept(_truncate(logits, top_k=3, top_p=0.8)) == [True, True, False, False]


def test_greedy_equals_hf_generate(engine, tok):
    gens = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=0.0))
    for g, prompt in zip(gens, PROMPTS):
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        assert g.token_ids == out[0, ids.shape[1] :].tolist()


def test_seed_reproducible_and_batch_rows_split(tok):
    model = tiny_qwen2(seed=0)
    whole = EmbeddedEngine(model=model, tokenizer=tok)
    whole.start()
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=11)
    a, b = whole.generate(PROMPTS, params), whole.generate(PROMPTS, params)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    c = whole.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=12))
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    split = EmbeddedEngine(model=model, tokenizer=tok, max_batch_rows=3)
    split.start()
    for g in split.generate(PROMPTS, params):  # chunks of 3 rows: still exact and prompt-major
        ref = teacher_forced_logprobs(model, g.prompt_token_ids, g.token_ids, 1.0)
        assert max(abs(x - y) for x, y in zip(ref, g.logprobs)) <= 1e-5
    assert [g.prompt_index for g in split.generate(PROMPTS, params)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_stream_reports_each_row_once_as_it_finishes_with_generate_samples(tok):
    """Rows leave the stream the step they stop (shorter first within a batch), each once, with the very samples
    `generate` gives at the same seed; the batch's unfinished rows come last."""
    engine = EmbeddedEngine(model=tiny_qwen2(seed=0), tokenizer=tok, max_batch_rows=5)
    engine.start()
    params = SamplingParams(max_new_tokens=20, temperature=1.0, n=3, seed=5, stop=["e", "o"])
    reference = engine.generate(PROMPTS, params)
    chunks = list(engine.generate_stream(PROMPTS, params))
    streamed = [item for chunk in chunks for item in chunk]
    assert sorted(position for position, _ in streamed) == list(range(len(reference)))
    for position, generation in streamed:
        assert generation == reference[position]
    for start in range(0, len(reference), 5):  # per batch of max_batch_rows: in order of finishing
        batch = [g for position, g in streamed if start <= position < start + 5]
        assert [len(g.token_ids) for g in batch] == sorted(len(g.token_ids) for g in batch)
    reasons = {g.finish_reason for g in reference}
    assert reasons == {"stop", "length"} and len(chunks) == len(reference)


def test_stop_string_ends_generation_at_first_match(engine):
    free = engine.generate(["hello"], SamplingParams(max_new_tokens=30, temperature=1.0, seed=4))[0]
    assert free.finish_reason == "length" and len(free.text) == 30  # one char per token, no specials
    stop = free.text[6:9]
    expected = free.text[: free.text.find(stop) + len(stop)]
    got = engine.generate(["hello"], SamplingParams(max_new_tokens=30, temperature=1.0, seed=4, stop=[stop, "@@"]))[0]
    assert got.text == expected and got.finish_reason == "stop"
    assert got.token_ids == free.token_ids[: len(expected)]


def test_eos_stops_and_is_kept_in_tokens(tok):
    model = tiny_qwen2(seed=0)
    greedy_first = EmbeddedEngine(model=model, tokenizer=tok)
    greedy_first.start()
    first = greedy_first.generate(["hello world"], SamplingParams(max_new_tokens=5, temperature=0.0))[0].token_ids[0]
    model.generation_config.eos_token_id = first
    g = greedy_first.generate(["hello world"], SamplingParams(max_new_tokens=5, temperature=0.0))[0]
    assert g.token_ids == [first] and g.finish_reason == "stop"


def test_update_weights_serves_new_weights(tok):
    engine = EmbeddedEngine(model=tiny_qwen2(seed=0), tokenizer=tok)
    reference = EmbeddedEngine(model=tiny_qwen2(seed=1), tokenizer=tok)
    engine.start()
    reference.start()
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=9)
    before = engine.generate(PROMPTS, params)
    new_weights = list(reference.model.state_dict().items())
    engine.update_weights(bucket_named_tensors(new_weights, bucket_bytes=8 * 1024))
    assert engine.weight_version == 1
    after, expected = engine.generate(PROMPTS, params), reference.generate(PROMPTS, params)
    assert [g.token_ids for g in after] == [g.token_ids for g in expected]
    assert [g.token_ids for g in after] != [g.token_ids for g in before]
    for a, e in zip(after, expected):
        assert max(abs(x - y) for x, y in zip(a.logprobs, e.logprobs)) <= 1e-6


def test_update_weights_bad_input_names_the_tensor(engine):
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj.weight"):
        engine.update_weights([[("model.layers.9.mlp.up_proj.weight", torch.zeros(2, 2))]])
    with pytest.raises(ValueError, match="shape mismatch for 'model.norm.weight'"):
        engine.update_weights([[("model.norm.weight", torch.zeros(3))]])


def test_release_resume_keeps_generation(engine):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=2)
    before = engine.generate(PROMPTS, params)
    engine.release_memory()
    assert not engine.healthy()
    with pytest.raises(EngineError, match="released"):
        engine.generate(PROMPTS, params)
    engine.resume_memory()
    assert engine.healthy()
    assert [g.token_ids for g in engine.generate(PROMPTS, params)] == [g.token_ids for g in before]


def test_staged_release_resume_serves_only_once_every_part_is_back(engine):
    """The colocated weight push's stages: weights back first (a push lands), KV cache and graphs after."""
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=4)
    before = engine.generate(PROMPTS, params)
    engine.release_memory(["kv_cache", "cuda_graph"])
    with pytest.raises(EngineError, match=r"\['cuda_graph', 'kv_cache'\]"):
        engine.generate(PROMPTS, params)
    engine.release_memory()  # the rest: the weights
    engine.resume_memory(["weights"])
    assert not engine.healthy()
    engine.resume_memory(["kv_cache"])
    with pytest.raises(EngineError, match=r"\['cuda_graph'\]"):
        engine.generate(PROMPTS, params)
    engine.resume_memory(["kv_cache", "cuda_graph"])  # only what is still released comes back
    assert engine.healthy()
    assert [g.token_ids for g in engine.generate(PROMPTS, params)] == [g.token_ids for g in before]
    with pytest.raises(ValueError, match="unknown engine memory tags \\['kv'\\]"):
        engine.release_memory(["kv"])


def test_bad_requests_are_named(tok):
    no_tok = EmbeddedEngine(model=tiny_qwen2(seed=0))
    no_tok.start()
    with pytest.raises(EngineError, match="prompt 0 is text"):
        no_tok.generate(["abc"], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="prompt 1 has token ids outside"):
        no_tok.generate([[3, 4], [5, 10_000]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="top_p"):
        no_tok.generate([[3, 4]], SamplingParams(max_new_tokens=2, top_p=0.0))
    gens = no_tok.generate([[3, 4, 5]], SamplingParams(max_new_tokens=3, temperature=0.0))
    assert gens[0].text == "" and len(gens[0].token_ids) == 3

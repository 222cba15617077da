"""PromptSampler: shuffled full batches epoch after epoch, resumable from (epoch, position)."""

import json

import pytest

from fapo_megatron.data import PromptSampler

ITEMS = list(range(10))


def test_epochs_are_permutations_of_full_batches():
    sampler = PromptSampler(ITEMS, batch_size=3, seed=5)
    epochs = []
    for _ in range(4):
        batches = [sampler.next_batch() for _ in range(sampler.batches_per_epoch)]
        assert all(len(batch) == 3 for batch in batches)
        served = [item for batch in batches for item in batch]
        assert len(set(served)) == 9 and set(served) <= set(ITEMS)
        epochs.append(served)
    assert len({tuple(epoch) for epoch in epochs}) == 4
    assert sampler.epoch == 3


def test_same_seed_same_stream_other_seed_other_stream():
    first = [next(iter(PromptSampler(ITEMS, 4, seed=1))) for _ in range(2)]
    assert first[0] == first[1]
    assert next(iter(PromptSampler(ITEMS, 4, seed=2))) != first[0]


@pytest.mark.parametrize("num_before", [0, 2, 3, 4, 7])
def test_resume_continues_with_exactly_the_next_batch(num_before):
    reference = PromptSampler(ITEMS, batch_size=3, seed=9)
    stream = [reference.next_batch() for _ in range(12)]
    interrupted = PromptSampler(ITEMS, batch_size=3, seed=9)
    for _ in range(num_before):
        interrupted.next_batch()
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = PromptSampler(ITEMS, batch_size=3, seed=9)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(12 - num_before)] == stream[num_before:]


def test_bad_arguments_and_mismatched_state():
    with pytest.raises(ValueError, match="larger than the 10 items"):
        PromptSampler(ITEMS, batch_size=11, seed=0)
    state = PromptSampler(ITEMS, batch_size=3, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed=0 but this sampler has seed=1"):
        PromptSampler(ITEMS, batch_size=3, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_items"):
        PromptSampler(list(range(12)), batch_size=3, seed=0).load_state_dict(state)

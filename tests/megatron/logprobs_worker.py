"""One rank of the log-prob path checks (launched by test_megatron_logprobs.py): fused, all-in-graph and chunked
(3 positions at a time) on the same TP-split logits, also with an entropy term in the loss."""

import os
import sys

import torch

from fapo_megatron.megatron import model as mcore
from fapo_megatron.megatron import platform
from fapo_megatron.megatron.logprobs import vocab_parallel_logprobs

platform.setup("cpu")
world = int(os.environ["WORLD_SIZE"])
mcore.init_model_parallel(world, 1, seed=0)
rank = int(os.environ["RANK"])
vocab, padded = 50, 52  # two padded rows beyond the real vocabulary
gen = torch.Generator().manual_seed(0)
full = torch.randn(2, 5, padded, generator=gen) * 3
targets = torch.randint(0, vocab, (2, 5), generator=gen)
weights = torch.randn(2, 5, generator=gen)
entropy_weights = torch.randn(2, 5, generator=gen)
rows = padded // world
out = {}
# name: (entropy_grad, chunk_tokens, the loss has an entropy term)
variants = {
    "fused": (False, 0, False),
    "graph": (True, 0, False),
    "chunked": (False, 3, False),
    "graph_entropy": (True, 0, True),
    "chunked_entropy": (True, 3, True),
}
for name, (entropy_grad, chunk, entropy_loss) in variants.items():
    local = full[..., rank * rows : (rank + 1) * rows].clone().requires_grad_(True)
    logprobs, entropy = vocab_parallel_logprobs(
        local, targets, temperature=0.7, vocab_size=vocab, entropy_grad=entropy_grad, chunk_tokens=chunk
    )
    loss = (logprobs * weights).sum() + ((entropy * entropy_weights).sum() if entropy_loss else 0)
    loss.backward()
    grads = [torch.empty_like(local.grad) for _ in range(world)]
    torch.distributed.all_gather(grads, local.grad)
    out[name] = {"logprobs": logprobs.detach(), "entropy": entropy.detach(), "grad": torch.cat(grads, dim=-1)}
reference = torch.log_softmax(full[..., :vocab] / 0.7, dim=-1)
out["reference"] = {
    "logprobs": reference.gather(-1, targets[..., None])[..., 0],
    "entropy": -(reference.exp() * reference).sum(-1),
}
if rank == 0:
    torch.save(out, sys.argv[1])

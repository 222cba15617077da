"""The colocated phase machine: what each role holds on the device in each phase of a step, in one table.

A colocated step time-shares every device between the Megatron actor, the rollout engine and a colocated GenRM
engine. RESIDENCY says, per phase, which of the actor's kinds (megatron/offload.KINDS: params, grads, optimizer)
and which parts of each engine (MEMORY_TAGS, SGLang's memory types) are on the device. Whoever enters a phase
frees what the phase does not hold first and brings back what it needs after, so the order of a step is:

  update        the actor holds everything; the engines are released
  weight_sync   gradients freed, optimizer state offloaded, allocator cache emptied; the rollout engine resumes
                its weights only and takes the push (actor parameters and engine weights side by side)
  rollout       the actor's parameters leave; the rollout engine resumes KV cache and graphs, then generates
  genrm         the rollout engine is released; a colocated GenRM engine runs with the actor fully off the device
  logprobs      the GenRM engine is released; the actor brings back parameters only
  checkpoint    parameters and optimizer state, never gradients; the rollout engine keeps its weights (nothing
                would restore them) and frees KV cache and graphs meanwhile

The roles (roles/policy.PolicyWorker for the actor and the rollout engine, roles/genrm.GenRMWorker for GenRM
engines) enter phases through it, and cluster/sizing prices each phase from it, so no second ordering exists. With
`rollout.placement=separate` the actor's devices host no rollout engine: the rollout column has nothing to hold
there (the engines on their own pool keep all their memory), and the actor follows its own column as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from fapo_megatron.engine_protocol import MEMORY_TAGS as ENGINE_ALL


@dataclass(frozen=True)
class Residency:
    actor: tuple[str, ...]
    """The actor's kinds on the device (with parallel.offload_actor; without it the actor keeps everything)."""
    rollout: tuple[str, ...]
    """The rollout engine's memory parts on the device."""
    genrm: tuple[str, ...]
    """A colocated GenRM engine's parts: all in its phase, elsewhere released (an engine whose weights nothing
    re-pushes gives back what it can without losing them: engines decide that in release_memory)."""


RESIDENCY: dict[str, Residency] = {
    "rollout": Residency(actor=(), rollout=ENGINE_ALL, genrm=()),
    "genrm": Residency(actor=(), rollout=(), genrm=ENGINE_ALL),
    "logprobs": Residency(actor=("params",), rollout=(), genrm=()),
    "update": Residency(actor=("params", "grads", "optimizer"), rollout=(), genrm=()),
    "weight_sync": Residency(actor=("params",), rollout=("weights",), genrm=()),
    "checkpoint": Residency(actor=("params", "optimizer"), rollout=("weights",), genrm=()),
}
"""Phase -> what is on the device. The rollout engine starts in the rollout phase, GenRM engines in the genrm phase
(the rollout engine released), the actor off the device for both, so each sizes its KV pool on a free device."""


def actor_holds(phase: str, offload_actor: bool) -> tuple[str, ...]:
    """The actor's kinds on the device in `phase`: the table's with parallel.offload_actor, else all of them."""
    return RESIDENCY[phase].actor if offload_actor else RESIDENCY["update"].actor

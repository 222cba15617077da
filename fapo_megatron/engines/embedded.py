"""In-process HF-transformers engine: runs anywhere (the default on CPU), same protocol as SGLang.

Generation is our own sampling loop over the model with a KV cache (not `generate`) so that the
log-probs are exactly what the trainer recomputes: log_softmax(logits / temperature) of the sampled
token, taken before top-p / top-k truncation (raw logits when temperature == 0, which is greedy).

Shapes: B = rows in a batch (prompts x samples), T = sequence length, V = vocabulary.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Iterable, Iterator, Sequence

import torch

from fapo_megatron.engine_protocol import MEMORY_TAGS, Engine, EngineError, Generation, SamplingParams, WeightBucket


class EmbeddedEngine(Engine):
    """A causal LM held in this process.

    Either `model_path` (an HF checkpoint folder, loaded on `start()`) or a ready `model`
    (+ optional `tokenizer`). Without a tokenizer, prompts must be token ids and `text` is empty.
    """

    def __init__(
        self,
        model_path: str | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer=None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_rows: int = 64,
    ):
        if (model_path is None) == (model is None):
            raise ValueError("EmbeddedEngine needs exactly one of model_path or model")
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        self.model_path = model_path
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch_rows = max_batch_rows
        self.weight_version = 0
        """Bumped by every update_weights call."""
        self._model = model
        self._tokenizer = tokenizer
        self._released: set[str] = set()
        """Memory parts given back (MEMORY_TAGS); the engine serves only when none is."""
        self._started = False

    # ----------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._started:
            return
        if self._model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self._model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype)
            if self._tokenizer is None:
                try:
                    self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
                except (OSError, ValueError):
                    self._tokenizer = None  # token-id prompts only
        self._model.to(device=self.device, dtype=self.dtype).eval()
        self._started = True

    def healthy(self) -> bool:
        return self._started and self._model is not None and not self._released

    def shutdown(self) -> None:
        self._model = None
        self._tokenizer = None
        self._started = False
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def model(self) -> torch.nn.Module:
        self._check_serving()
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    def _check_serving(self) -> None:
        if not self._started or self._model is None:
            raise EngineError("EmbeddedEngine is not started (call start())")
        if self._released:
            raise EngineError(f"EmbeddedEngine memory is released ({sorted(self._released)}); call resume_memory()")

    # ----------------------------------------------------------------------------------------- generation
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        finished = [item for chunk in self.generate_stream(prompts, params) for item in chunk]
        return [generation for _, generation in sorted(finished, key=lambda item: item[0])]

    def generate_stream(
        self, prompts: Sequence[str] | Sequence[Sequence[int]], params: SamplingParams
    ) -> Iterator[list[tuple[int, Generation]]]:
        """Each row the moment it stops (EOS or a stop string), the rest when the batch's budget runs out; the
        sampling is the same as `generate`'s (one generator, rows in the same batches)."""
        self._check_serving()
        _check_params(params)
        prompt_ids = self._tokenize(prompts)
        rows = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(params.n)]
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        for start in range(0, len(rows), self.max_batch_rows):
            for b, generation in self._generate_batch(rows[start : start + self.max_batch_rows], params, generator):
                yield [(start + b, generation)]

    def _tokenize(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str):
            raise TypeError("generate() takes a list of prompts, not one string")
        vocab_size = self._model.get_input_embeddings().num_embeddings
        max_positions = getattr(self._model.config, "max_position_embeddings", None)
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if self._tokenizer is None:
                    raise EngineError(f"prompt {i} is text but the engine has no tokenizer; pass token ids")
                ids = self._tokenizer(prompt, add_special_tokens=False)["input_ids"]
            else:
                ids = [int(t) for t in prompt]
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
            if max_positions is not None and len(ids) >= max_positions:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; the model takes at most {max_positions}")
            out.append(ids)
        return out

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self._model, "generation_config", None), self._model.config, self._tokenizer):
            eos = getattr(source, "eos_token_id", None) if source is not None else None
            if eos is None:
                continue
            ids.update([eos] if isinstance(eos, int) else eos)
        return ids

    def _pad_id(self) -> int:
        pad = getattr(self._tokenizer, "pad_token_id", None) if self._tokenizer is not None else None
        return 0 if pad is None else int(pad)

    def _generate_batch(
        self, rows, params: SamplingParams, generator: torch.Generator
    ) -> Iterator[tuple[int, Generation]]:
        """(row, generation) of the batch's rows as they finish (the model runs in inference mode between yields)."""
        from transformers import DynamicCache

        num_rows = len(rows)
        prompt_lens = [len(ids) for _, ids in rows]
        max_len = max(prompt_lens)
        pad_id = self._pad_id()
        input_ids_BT = torch.full((num_rows, max_len), pad_id, dtype=torch.long)
        mask_BT = torch.zeros((num_rows, max_len), dtype=torch.long)
        for b, (_, ids) in enumerate(rows):
            input_ids_BT[b, max_len - len(ids) :] = torch.tensor(ids)
            mask_BT[b, max_len - len(ids) :] = 1
        input_ids_BT, mask_BT = input_ids_BT.to(self.device), mask_BT.to(self.device)
        positions_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)

        eos_ids = self._eos_ids()
        max_positions = getattr(self._model.config, "max_position_embeddings", None)
        budget = params.max_new_tokens
        if max_positions is not None:
            budget = min(budget, max_positions - max_len)
        tokens: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        finish: list[str | None] = [None] * num_rows
        cache_kwargs = self._cache_kwargs(DynamicCache())
        step_ids_BT, step_pos_BT = input_ids_BT, positions_BT

        def finished(b: int) -> tuple[int, Generation]:
            index, ids = rows[b]
            return b, Generation(
                prompt_index=index,
                token_ids=tokens[b],
                text=self._decode(tokens[b]),
                logprobs=logprobs[b],
                finish_reason=finish[b] or "length",
                prompt_token_ids=list(ids),
                weight_version=self.weight_version,
            )

        for _ in range(budget):
            with torch.inference_mode():
                out = self._model(
                    input_ids=step_ids_BT,
                    attention_mask=mask_BT,
                    position_ids=step_pos_BT,
                    use_cache=True,
                    **cache_kwargs,
                )
                next_B, logp_B = _sample(out.logits[:, -1, :].float(), params, generator)
            next_list, logp_list = next_B.tolist(), logp_B.tolist()
            for b in range(num_rows):
                if finish[b] is not None:
                    next_list[b] = pad_id
                    continue
                tokens[b].append(next_list[b])
                logprobs[b].append(logp_list[b])
                if next_list[b] in eos_ids or self._hit_stop(tokens[b], params.stop):
                    finish[b] = "stop"
                    yield finished(b)
            if all(f is not None for f in finish):
                return
            step_ids_BT = torch.tensor(next_list, device=self.device).unsqueeze(1)
            step_pos_BT = step_pos_BT[:, -1:] + 1
            alive_B1 = torch.tensor([f is None for f in finish], device=self.device, dtype=torch.long).unsqueeze(1)
            mask_BT = torch.cat([mask_BT, alive_B1], dim=1)
        for b in range(num_rows):
            if finish[b] is None:
                yield finished(b)

    def _cache_kwargs(self, cache) -> dict:
        """KV-cache keyword (`cache` in transformers 5.x, `past_key_values` before); logits of the last token only."""
        accepted = inspect.signature(self._model.forward).parameters
        kwargs = {"cache" if "cache" in accepted else "past_key_values": cache}
        if "logits_to_keep" in accepted:
            kwargs["logits_to_keep"] = 1
        return kwargs

    def _hit_stop(self, token_ids: list[int], stops: list[str]) -> bool:
        """True when the newest token completes a stop string (a window long enough to hold any stop string)."""
        if not stops or self._tokenizer is None:
            return False
        window = max(len(s) for s in stops) + 8
        tail = self._tokenizer.decode(token_ids[-window:], skip_special_tokens=False)
        return any(s in tail for s in stops)

    def _decode(self, token_ids: list[int]) -> str:
        if self._tokenizer is None:
            return ""
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

    # ----------------------------------------------------------------------------------------- weights / memory
    def update_weights(self, buckets: Iterable[WeightBucket]) -> None:
        """Copy each (HF name, full tensor) into the model; a bad bucket is rejected before any copy."""
        if not self._started or self._model is None:
            raise EngineError("EmbeddedEngine is not started (call start())")
        params = dict(self._model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for bucket in buckets:
                for name, tensor in bucket:
                    if name not in params:
                        raise ValueError(f"update_weights: unknown parameter name {name!r}")
                    if tuple(tensor.shape) != tuple(params[name].shape):
                        raise ValueError(
                            f"update_weights: shape mismatch for {name!r}: "
                            f"got {tuple(tensor.shape)}, model has {tuple(params[name].shape)}"
                        )
                for name, tensor in bucket:
                    params[name].data.copy_(tensor, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.weight_version += 1

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Give back the parts `tags` names (None: all). Weights are this engine's only device memory between calls
        (KV caches live per call, there are no graphs): releasing them moves them to (pinned, on CUDA) host memory,
        keeping their values; released KV cache or graphs only mean it serves nothing until they are resumed."""
        wanted = _tags(tags) - self._released
        if not self._started or not wanted:
            return
        if "weights" in wanted and self.device.type != "cpu":
            self._move_tensors(torch.device("cpu"), pin=self.device.type == "cuda")
            torch.cuda.empty_cache()
        self._released |= wanted

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        wanted = (self._released if tags is None else _tags(tags)) & self._released
        if not self._started or not wanted:
            return
        if "weights" in wanted and self.device.type != "cpu":
            self._move_tensors(self.device, pin=False)
        self._released -= wanted

    def _move_tensors(self, device: torch.device, *, pin: bool) -> None:
        for module in self._model.modules():
            for param in module._parameters.values():
                if param is not None and param.device != device:
                    param.data = _to_device(param.data, device, pin)
            for key, buf in module._buffers.items():
                if buf is not None and buf.device != device:
                    module._buffers[key] = _to_device(buf, device, pin)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _tags(tags: Sequence[str] | None) -> set[str]:
    if tags is None:
        return set(MEMORY_TAGS)
    unknown = set(tags) - set(MEMORY_TAGS)
    if unknown:
        raise ValueError(f"unknown engine memory tags {sorted(unknown)}; known: {list(MEMORY_TAGS)}")
    return set(tags)


def _to_device(tensor: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    if pin:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host
    return tensor.to(device, non_blocking=True)


def _check_params(params: SamplingParams) -> None:
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if params.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k == 0 or params.top_k < -1:
        raise ValueError(f"top_k must be -1 (off) or >= 1, got {params.top_k}")
    if params.n < 1:
        raise ValueError(f"n must be >= 1, got {params.n}")


def _sample(logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator):
    """Next token per row and its log-prob under log_softmax(logits / T), before any truncation."""
    if params.temperature == 0:
        next_B = logits_BV.argmax(dim=-1)
        logp_B = torch.log_softmax(logits_BV, dim=-1).gather(-1, next_B[:, None]).squeeze(-1)
        return next_B, logp_B
    scaled_BV = logits_BV / params.temperature
    logp_BV = torch.log_softmax(scaled_BV, dim=-1)
    filtered_BV = _truncate(scaled_BV, params.top_k, params.top_p)
    probs_BV = torch.softmax(filtered_BV, dim=-1)
    next_B = torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
    return next_B, logp_BV.gather(-1, next_B[:, None]).squeeze(-1)


def _truncate(scaled_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k and outside the smallest set whose mass reaches top_p."""
    if top_k > 0 and top_k < scaled_BV.shape[-1]:
        kth_B1 = torch.topk(scaled_BV, top_k, dim=-1).values[:, -1:]
        scaled_BV = scaled_BV.masked_fill(scaled_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(scaled_BV, dim=-1, descending=True)
        cum_BV = torch.softmax(sorted_BV, dim=-1).cumsum(dim=-1)
        drop_sorted_BV = (cum_BV - torch.softmax(sorted_BV, dim=-1)) >= top_p  # mass before this token already enough
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
        scaled_BV = scaled_BV.masked_fill(drop_BV, float("-inf"))
    return scaled_BV

"""Pick the flaw detector a run's config asks for: `build_judge(cfg.genrm, engine)`.

| genrm.backend | judge                                                             |
|---------------|-------------------------------------------------------------------|
| program       | ProgramJudge: exact step checker for the arithmetic-chain task    |
| embedded      | GenRMClient over the given in-process engine (EngineTransport)    |
| sglang        | GenRMClient over the given SGLang engine (EngineTransport)        |
| external      | GenRMClient over genrm.url: OpenAI chat or SGLang(-router) /generate |

Engines are built by the caller (only `engines/` talks to SGLang); this module only wires them in.
"""

from __future__ import annotations

from pathlib import Path

from fapo_megatron.config import GenRMConfig
from fapo_megatron.engine_protocol import Engine
from fapo_megatron.genrm.client import GenRMClient
from fapo_megatron.genrm.prompt import encode_chat, render_chatml
from fapo_megatron.genrm.transports import (
    EngineTransport,
    Messages,
    OpenAIChatTransport,
    RenderFn,
    SGLangGenerateTransport,
)
from fapo_megatron.genrm.types import Judge


def build_judge(genrm_cfg: GenRMConfig, engine: Engine | None = None, *, render: RenderFn | None = None) -> Judge:
    """The judge for `genrm_cfg.backend`; `engine` is required for embedded / sglang and ignored otherwise.

    `render` turns chat messages into the prompt: by default token ids from the engine's tokenizer (external
    SGLang: the tokenizer at `genrm.model_path` when it is a local folder; `encode_chat`), else Qwen ChatML text.
    """
    backend = genrm_cfg.backend
    if backend == "program":
        from fapo_megatron.genrm.program_judge import ProgramJudge

        return ProgramJudge(max_steps=genrm_cfg.max_steps)
    sampling = {"max_new_tokens": genrm_cfg.max_new_tokens, "temperature": genrm_cfg.temperature}
    if backend in ("embedded", "sglang"):
        if engine is None:
            raise ValueError(
                f"genrm.backend={backend} needs a started engine serving genrm.model_path "
                f"({genrm_cfg.model_path or 'unset'}); build it with fapo_megatron.engines and pass it as `engine`"
            )
        transport = EngineTransport(engine, render=render or engine_chat_renderer(engine), **sampling)
    elif backend == "external":
        if genrm_cfg.api == "openai":
            model = genrm_cfg.model_path or "default"
            transport = OpenAIChatTransport(genrm_cfg.url, model=model, **sampling)
        else:
            render = render or _local_tokenizer_renderer(genrm_cfg.model_path) or render_chatml
            transport = SGLangGenerateTransport(genrm_cfg.url, render=render, **sampling)
    else:
        raise ValueError(f"genrm.backend={backend!r}: expected program, embedded, sglang or external")
    return GenRMClient(
        transport,
        max_steps=genrm_cfg.max_steps,
        concurrency=genrm_cfg.concurrency,
        request_timeout_s=genrm_cfg.request_timeout_s,
        deadline_s=genrm_cfg.deadline_s,
        retries=genrm_cfg.retries,
    )


def engine_chat_renderer(engine: Engine) -> RenderFn:
    """Token ids from the engine's tokenizer (looked up at call time, after `start()` loaded it; its chat template,
    else Qwen ChatML, FAPO-GenRM-4B's layout), so the solution's text cannot become special tokens; ChatML text
    for an engine without a tokenizer."""

    def render(messages: Messages) -> str | list[int]:
        tokenizer = getattr(engine, "tokenizer", None)
        return render_chatml(messages) if tokenizer is None else encode_chat(tokenizer, messages)

    return render


def _local_tokenizer_renderer(model_path: str) -> RenderFn | None:
    if not model_path or not Path(model_path).is_dir():
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return lambda messages: encode_chat(tokenizer, messages)

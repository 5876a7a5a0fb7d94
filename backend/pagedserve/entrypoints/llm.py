"""The offline API: ``LLM(model).generate(prompts, sampling_params)``, as in vLLM."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from tqdm.auto import tqdm

from pagedserve.config import EngineArgs
from pagedserve.engine.llm_engine import LLMEngine, PromptType
from pagedserve.engine.metrics_reader import Metric, metrics_from_stats
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

Conversation = Sequence[Mapping[str, Any]]  # [{"role": ..., "content": ...}, ...]


class LLM:
    """Owns an LLMEngine and runs batches of prompts to completion."""

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineArgs.from_dict({"model": model, **kwargs}))

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_metrics(self) -> list[Metric]:
        """The engine's counters, gauges and histograms now, as vLLM's ``LLM.get_metrics()``
        returns them (Counter, Gauge, Histogram, Vector from ``pagedserve.engine.metrics_reader``);
        with ``speculative_config``, vLLM's spec_decode counters too."""
        config = self.engine.config
        speculative = config.speculative
        return metrics_from_stats(
            self.engine.get_stats(), config.args.model,
            None if speculative is None else speculative.num_speculative_tokens,
        )

    def reset_prefix_cache(self) -> None:
        """Drops every cached prefix block that no request holds (vLLM's name)."""
        self.engine.reset_prefix_cache()

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates completions for every prompt; outputs come back in prompt order.

        If one request fails on its own (a RequestError), the others are aborted and that
        error is raised, as vLLM raises a request's failure from ``generate``."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(prompts)} prompts"
                )
        engine = self.engine
        ids: list[str] = []
        try:
            for prompt, params in zip(prompts, params_list):
                request_id = engine.next_request_id()
                final_only = params.clone(output_kind=RequestOutputKind.FINAL_ONLY)
                engine.add_request(request_id, prompt, final_only)
                ids.append(request_id)
        except Exception:
            engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: Union[Conversation, Sequence[Conversation]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Optional[list[dict[str, Any]]] = None,
        chat_template_kwargs: Optional[dict[str, Any]] = None,
    ) -> list[RequestOutput]:
        """Generates a reply to each conversation (a list of ``{"role", "content"}`` messages,
        or a list of such lists), rendered by the tokenizer's chat template or by
        ``chat_template``; as vLLM's ``LLM.chat``. ``RequestOutput.prompt`` is the rendered
        text. A tokenizer without a chat template, given none, is a ValueError."""
        tokenizer = self.get_tokenizer()
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template: pass chat_template=... (a Jinja template) "
                "or use a checkpoint whose tokenizer_config.json has one"
            )
        if add_generation_prompt and continue_final_message:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be "
                             "true (set add_generation_prompt=False to continue a message)")
        many = isinstance(messages, (list, tuple)) and bool(messages) and isinstance(
            messages[0], (list, tuple))
        conversations = list(messages) if many else [messages]
        texts = [
            tokenizer.apply_chat_template(
                _text_messages(conversation),
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                tokenize=False,
                **(chat_template_kwargs or {}),
            )
            for conversation in conversations
        ]
        # The template writes the special tokens (BOS included) itself.
        prompts = [{"prompt_token_ids": tokenizer(text, add_special_tokens=False).input_ids}
                   for text in texts]
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        for output, text in zip(outputs, texts):
            output.prompt = text
        return outputs

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while len(done) < len(ids):
                for output in self.engine.step():
                    if output.finished and output.request_id in wanted:
                        done[output.request_id] = output
                        bar.update(1)
                if self.engine.request_errors:
                    raise self.engine.take_request_errors()[0]
        except BaseException:
            self.engine.abort_request([i for i in ids if i not in done])
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]


def _text_messages(conversation: Conversation) -> list[dict[str, Any]]:
    """The messages with their content as a string: OpenAI-style content parts of type
    "text" are joined with newlines (vLLM's "string" content format)."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("a conversation must be a non-empty list of messages")
    out = []
    for message in conversation:
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"a chat message must be a dict with a 'role', got {message!r}")
        message = dict(message)
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            if any(not isinstance(p, Mapping) or p.get("type") != "text" for p in content):
                raise ValueError("only text content parts ({'type': 'text', ...}) are supported")
            message["content"] = "\n".join(str(p.get("text", "")) for p in content)
        out.append(message)
    return out

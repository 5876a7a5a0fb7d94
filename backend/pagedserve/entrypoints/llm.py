"""The offline API: ``LLM(model).generate(prompts, sampling_params)``, as in vLLM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

from tqdm.auto import tqdm

from pagedserve.config import EngineArgs
from pagedserve.engine.llm_engine import LLMEngine, PromptType
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """Owns an LLMEngine and runs batches of prompts to completion."""

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineArgs.from_dict({"model": model, **kwargs}))

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> None:
        """Drops every cached prefix block that no request holds (vLLM's name)."""
        self.engine.reset_prefix_cache()

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates completions for every prompt; outputs come back in prompt order."""
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
        except BaseException:
            self.engine.abort_request([i for i in ids if i not in done])
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]

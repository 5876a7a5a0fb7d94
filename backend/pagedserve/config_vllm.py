"""vLLM's engine arguments that pagedserve does not implement, so that a model.json written for
vllm_backend gets "not supported by pagedserve" for them rather than "unknown".

Each maps to the values that ask for nothing pagedserve lacks (vLLM's defaults that leave the
feature off); such a value is accepted and has no effect. Any other value is an error naming
the argument. The names are those of vLLM's ``EngineArgs``/``AsyncEngineArgs``, current and
recent (a model.json may be older than the vLLM it was written for).
"""

from __future__ import annotations

from typing import Any

_OFF = (None, False)
_ONE = (1, None)

# argument -> values that change nothing here
UNSUPPORTED_ENGINE_ARGS: dict[str, tuple[Any, ...]] = {
    # The model and its loading.
    "served_model_name": (None,),
    "hf_config_path": (None,),
    "runner": ("auto", "generate"),
    "convert": ("auto", "none"),
    "task": (None, "auto", "generate"),
    "skip_tokenizer_init": (False,),
    "enable_prompt_embeds": (False,),
    "tokenizer_mode": ("auto",),
    "allowed_local_media_path": ("", None),
    "allowed_media_domains": (None,),
    "safetensors_load_strategy": ("lazy", None),
    "load_format": ("auto", "safetensors"),
    "config_format": ("auto", "hf"),
    "code_revision": (None,),
    "rope_scaling": (None, {}),
    "rope_theta": (None,),
    "hf_token": _OFF,
    "hf_overrides": (None, {}),
    "model_loader_extra_config": (None, {}),
    "ignore_patterns": (None, [], ["original/**/*"]),
    "generation_config": ("auto", "vllm"),
    "override_generation_config": (None, {}),
    "model_impl": ("auto",),
    "override_attention_dtype": (None,),
    "logits_processor_pattern": (None,),
    "logits_processors": (None, []),
    "logprobs_mode": ("raw_logprobs",),
    "use_tqdm_on_load": (True, False),
    "pt_load_map_location": ("cpu",),
    "io_processor_plugin": (None,),
    "pooler_config": (None,),
    "override_pooler_config": (None,),
    "max_seq_len_to_capture": (8192,),
    # Parallelism beyond tensor parallelism on one machine.
    "pipeline_parallel_size": _ONE,
    "decode_context_parallel_size": _ONE,
    "data_parallel_size": _ONE,
    "data_parallel_rank": (None,),
    "data_parallel_start_rank": (None,),
    "data_parallel_size_local": (None,),
    "data_parallel_address": (None,),
    "data_parallel_rpc_port": (None,),
    "data_parallel_hybrid_lb": _OFF,
    "data_parallel_backend": ("mp",),
    "enable_expert_parallel": _OFF,
    "all2all_backend": (None,),
    "enable_dbo": _OFF,
    "dbo_decode_token_threshold": (),
    "dbo_prefill_token_threshold": (),
    "disable_nccl_for_dp_synchronization": _OFF,
    "eplb_config": (None,),
    "enable_eplb": _OFF,
    "expert_placement_strategy": ("linear",),
    "num_redundant_experts": (0,),
    "eplb_window_size": (),
    "eplb_step_interval": (),
    "eplb_log_balancedness": _OFF,
    "max_parallel_loading_workers": (None,),
    "disable_custom_all_reduce": (False, True),
    "ray_workers_use_nsight": _OFF,
    "worker_cls": ("auto",),
    "worker_extension_cls": ("",),
    "worker_use_ray": _OFF,
    "engine_use_ray": _OFF,
    # KV cache and scheduling.
    "calculate_kv_scales": _OFF,
    "prefix_caching_hash_algo": ("sha256", "builtin", "sha256_cbor"),
    "disable_cascade_attn": (False, True),
    "swap_space": (0, 4),
    "cpu_offload_gb": (0,),
    "max_num_partial_prefills": (1,),
    "max_long_partial_prefills": (1,),
    "long_prefill_token_threshold": (0,),
    "num_lookahead_slots": (0,),
    "disable_chunked_mm_input": _OFF,
    "disable_hybrid_kv_cache_manager": _OFF,
    "scheduling_policy": ("fcfs",),
    "scheduler_cls": (None,),
    "external_parameters": (None,),
    "kv_sharing_fast_prefill": _OFF,
    "kv_transfer_config": (None,),
    "kv_events_config": (None,),
    "mamba_cache_dtype": ("auto",),
    "mamba_ssm_cache_dtype": ("auto",),
    "mamba_block_size": (None,),
    "use_v2_block_manager": (True, False),
    "num_scheduler_steps": (1,),
    "multi_step_stream_outputs": (True, False),
    "scheduler_delay_factor": (0, 0.0),
    "preemption_mode": (None, "recompute"),
    "disable_async_output_proc": (False, True),
    "enable_sleep_mode": _OFF,
    "compilation_config": (None, {}),
    "cuda_graph_sizes": (None,),
    "cudagraph_capture_sizes": (None,),
    "max_cudagraph_capture_size": (None,),
    # Multimodal, LoRA, structured outputs, speculative decoding.
    "limit_mm_per_prompt": (None, {}),
    "enable_mm_embeds": _OFF,
    "interleave_mm_strings": _OFF,
    "media_io_kwargs": (None, {}),
    "mm_processor_kwargs": (None, {}),
    "disable_mm_preprocessor_cache": _OFF,
    "mm_processor_cache_gb": (),
    "mm_processor_cache_type": (None,),
    "mm_shm_cache_max_object_size_mb": (),
    "mm_encoder_tp_mode": ("weights",),
    "mm_encoder_attn_backend": (None,),
    "skip_mm_profiling": _OFF,
    "video_pruning_rate": (),
    "enable_multimodal_encoder_data_parallel": _OFF,
    "enable_lora": _OFF,
    "enable_lora_bias": _OFF,
    "max_loras": (),
    "max_lora_rank": (),
    "default_mm_loras": (None,),
    "fully_sharded_loras": _OFF,
    "max_cpu_loras": (None,),
    "lora_dtype": (None, "auto"),
    "lora_extra_vocab_size": (),
    "long_lora_scaling_factors": (None,),
    "enable_prompt_adapter": _OFF,
    "max_prompt_adapters": (),
    "max_prompt_adapter_token": (),
    "structured_outputs_config": (None,),
    "reasoning_parser": ("", None),
    "guided_decoding_backend": (None,),
    "guided_decoding_disable_fallback": _OFF,
    "guided_decoding_disable_any_whitespace": _OFF,
    "guided_decoding_disable_additional_properties": _OFF,
    "speculative_model": (None,),
    "num_speculative_tokens": (None,),
    # Observability (pagedserve's metrics are Triton's; see the README).
    "show_hidden_metrics_for_version": (None,),
    "otlp_traces_endpoint": (None,),
    "collect_detailed_traces": (None,),
    "aggregate_engine_logging": _OFF,
    "max_log_len": (None,),
    "additional_config": (None, {}),
}


def check_unsupported(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without the unsupported vLLM arguments whose value changes nothing; any other
    value of one is a ValueError naming it."""
    kept = {}
    for key, value in values.items():
        if key not in UNSUPPORTED_ENGINE_ARGS:
            kept[key] = value
            continue
        neutral = UNSUPPORTED_ENGINE_ARGS[key]
        if any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutral):
            continue
        hint = f"; remove it or set it to {neutral[0]!r}" if neutral else "; remove it"
        raise ValueError(
            f"engine argument {key!r} (vLLM's) is not supported by pagedserve, got "
            f"{value!r}{hint}"
        )
    return kept

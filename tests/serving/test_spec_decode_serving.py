"""Speculative decoding over Triton: a model.json with ``speculative_config`` (n-gram, or the
shipped EAGLE-3 head named relative to model.json) serves the same greedy text as one without,
and vLLM's spec_decode counters appear on the metrics endpoint, for those models only, adding
up.

The models are loaded into the shared server with the shipped trained checkpoint (the tiny
random one never repeats itself, so n-gram lookup would find nothing to draft)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests
from serving_client import metrics, wait_for_metrics

pytestmark = pytest.mark.triton_server

TRAINED = Path(__file__).resolve().parents[2] / "model_repository/llm/1"
TRAINED_MODEL = TRAINED / "default_model"
MAX_TOKENS = 48
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2,
        "prompt_lookup_max": 4, "adaptive": False}
# Code that the trained model goes on repeating, so drafts are found and accepted.
PROMPT = "def add(a, b):\n    return a + b\n\n\n" * 2 + "def add(a, b):\n"
DRAFTS = "vllm:spec_decode_num_drafts_total"
DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens_total"
ACCEPTED = "vllm:spec_decode_num_accepted_tokens_total"
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos_total"


def _add_model(triton_server, name: str, engine_args: dict) -> None:
    target = triton_server.repository / name
    shutil.copytree(triton_server.repository / "llm", target,
                    ignore=shutil.ignore_patterns("default_model"))
    shutil.copytree(TRAINED_MODEL, target / "1" / "default_model")
    shutil.copytree(TRAINED / "eagle3_head", target / "1" / "eagle3_head")
    (target / "1" / "model.json").write_text(json.dumps(engine_args))


def test_ngram_speculation_serves_the_same_text_and_counts_drafts(triton_server):
    base = {"model": "default_model", "kv_cache_memory_bytes": 1 << 24}
    # The EAGLE-3 head named relative to model.json, as the README shows.
    eagle3 = {"method": "eagle3", "model": "eagle3_head", "num_speculative_tokens": 3,
              "adaptive": False}
    models = {"llm_spec": {**base, "speculative_config": SPEC}, "llm_no_spec": base,
              "llm_eagle3": {**base, "speculative_config": eagle3}}
    repository = f"{triton_server.http_url}/v2/repository/models"
    texts = {}
    with requests.Session() as http:
        try:
            for name, engine_args in models.items():
                _add_model(triton_server, name, engine_args)
                # A load on the loaded 2-core machine can take minutes.
                loaded = http.post(f"{repository}/{name}/load", timeout=600)
                assert loaded.status_code == 200, loaded.text
                r = http.post(
                    f"{triton_server.http_url}/v2/models/{name}/generate",
                    json={"text_input": PROMPT, "exclude_input_in_output": True,
                          "sampling_parameters": json.dumps(
                              {"max_tokens": MAX_TOKENS, "temperature": 0})},
                    timeout=120,
                )
                assert r.status_code == 200, r.text
                texts[name] = r.json()["text_output"]
            assert texts["llm_spec"] == texts["llm_no_spec"] == texts["llm_eagle3"]
            assert "return a + b" in texts["llm_spec"], texts  # it did repeat the prompt

            # One snapshot with nothing running holds the request's final counts.
            values = wait_for_metrics(
                triton_server.metrics_url,
                lambda m: m.get("vllm:generation_tokens_total", 0) > 0
                and m.get("vllm:num_requests_running") == 0 and m.get(DRAFTS, 0) > 0,
                timeout=30, model="llm_spec")
            per_pos = {key: value for key, value in values.items()
                       if key.startswith(f"{PER_POS}{{")}
            assert sorted(per_pos) == [f"{PER_POS}{{position={j}}}" for j in range(3)]
            accepted_by_pos = [per_pos[f"{PER_POS}{{position={j}}}"] for j in range(3)]
            drafts, draft_tokens, accepted = values[DRAFTS], values[DRAFT_TOKENS], values[ACCEPTED]
            assert 0 < drafts <= draft_tokens <= 3 * drafts
            assert 0 < accepted <= draft_tokens
            assert sum(accepted_by_pos) == accepted
            assert accepted_by_pos == sorted(accepted_by_pos, reverse=True)
            # Each token after the first comes from a decode step: a drafted one gives
            # 1 + its accepted drafts.
            assert values["vllm:generation_tokens_total"] == MAX_TOKENS
            assert drafts + accepted <= MAX_TOKENS - 1

            eagle3_values = wait_for_metrics(
                triton_server.metrics_url,
                lambda m: m.get("vllm:num_requests_running") == 0 and m.get(DRAFTS, 0) > 0,
                timeout=30, model="llm_eagle3")
            assert 0 < eagle3_values[ACCEPTED] <= eagle3_values[DRAFT_TOKENS]

            # Models that do not speculate have no spec_decode series, as in vLLM.
            for name in ("llm_no_spec", "llm"):
                assert metrics(triton_server.metrics_url, name), name
                assert not [k for k in metrics(triton_server.metrics_url, name)
                            if k.startswith("vllm:spec_decode")], name
        finally:
            for name in models:
                http.post(f"{repository}/{name}/unload", timeout=600)
                # Not loaded again by a restart of the shared server.
                shutil.rmtree(triton_server.repository / name, ignore_errors=True)

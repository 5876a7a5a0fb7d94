"""model.json with ``kv_cache_dtype``: an fp8 KV cache serves over Triton, a bad value fails
the load naming the argument."""

from __future__ import annotations

import json
import shutil

import pytest
import requests

pytestmark = pytest.mark.triton_server


def _copy_llm(triton_server, name: str, engine_args: dict) -> None:
    target = triton_server.repository / name
    shutil.copytree(triton_server.repository / "llm", target)
    (target / "1" / "model.json").write_text(json.dumps(engine_args))


def test_model_json_with_fp8_kv_cache_serves(start_triton_server):
    """The fp8 model serves the offline engine's greedy text for the same arguments. A server
    of its own: the model that fails to load would leave the shared one not ready (strict
    readiness)."""
    from pagedserve import LLM, SamplingParams

    triton_server = start_triton_server()
    args = {"model": "default_model", "kv_cache_dtype": "fp8", "kv_cache_memory_bytes": 1 << 22}
    _copy_llm(triton_server, "llm_fp8_kv", args)
    _copy_llm(triton_server, "llm_bad_kv_dtype", {**args, "kv_cache_dtype": "int8"})
    repository = f"{triton_server.http_url}/v2/repository/models"
    # A load on the loaded 2-core machine can take minutes.
    with requests.Session() as http:
        bad = http.post(f"{repository}/llm_bad_kv_dtype/load", timeout=600)
        assert bad.status_code == 400, bad.text
        assert "'kv_cache_dtype' must be one of auto, fp8, fp8_e4m3, fp8_e5m2" in bad.text
        loaded = http.post(f"{repository}/llm_fp8_kv/load", timeout=600)
        assert loaded.status_code == 200, loaded.text
        r = http.post(
            f"{triton_server.http_url}/v2/models/llm_fp8_kv/generate",
            json={"text_input": "Hello world", "exclude_input_in_output": True,
                  "sampling_parameters": json.dumps({"max_tokens": 12, "temperature": 0})},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        checkpoint = triton_server.repository / "llm_fp8_kv" / "1" / "default_model"
        llm = LLM(str(checkpoint), **{k: v for k, v in args.items() if k != "model"})
        offline = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=12),
                               use_tqdm=False)[0].outputs[0].text
        assert r.json()["text_output"] == offline
        unloaded = http.post(f"{repository}/llm_fp8_kv/unload", timeout=600)
        assert unloaded.status_code == 200, unloaded.text

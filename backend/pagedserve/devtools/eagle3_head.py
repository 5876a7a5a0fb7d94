"""Builds a random-weight EAGLE-3 head for a target checkpoint, in the published format.

The directory holds config.json (``architectures: ["LlamaForCausalLMEagle3"]``, one hidden
layer, the target's vocab_size, ``draft_vocab_size``) and model.safetensors with the published
tensor names: ``fc.weight``, ``midlayer.*``, ``norm.weight``, ``lm_head.weight``, ``d2t`` (int64
offsets: target id = draft id + d2t[draft id]) and ``t2d`` (bool, which target ids are in the
draft vocabulary); ``embed_tokens.weight`` only when asked (published heads share the target's).
The draft vocabulary is a random sorted subset of the target's ids. The output depends only on
the arguments::

    python -m pagedserve.devtools.eagle3_head OUT_DIR --target TARGET_DIR --draft-vocab-size 512
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any, Optional, Union

from pagedserve.devtools.tiny_model import DEFAULT_FINAL_NORM_SCALE, DEFAULT_INITIALIZER_RANGE_AT_64

_DTYPES = ("float32", "float16", "bfloat16")


def _target_config(target_dir: pathlib.Path) -> dict[str, Any]:
    path = target_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{target_dir} is not a model directory: it has no config.json")
    return json.loads(path.read_text())


def _rope_keys(target: dict[str, Any]) -> dict[str, Any]:
    """The target's rope, written as published heads write it (rope_theta, rope_scaling)."""
    params = target.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        theta = params["rope_theta"]
    else:
        theta, scaling = target.get("rope_theta", 10000.0), target.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return {"rope_theta": float(theta), "rope_scaling": scaling}


def build_eagle3_head(
    out_dir: Union[str, pathlib.Path],
    target_dir: Union[str, pathlib.Path],
    *,
    draft_vocab_size: Optional[int] = None,
    hidden_size: Optional[int] = None,
    num_attention_heads: Optional[int] = None,
    num_key_value_heads: Optional[int] = None,
    head_dim: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    aux_layer_ids: Optional[list[int]] = None,
    norm_before_residual: bool = False,
    with_embedding: bool = False,
    seed: int = 0,
    torch_dtype: str = "float32",
    initializer_range: Optional[float] = None,
    config_overrides: Optional[dict[str, Any]] = None,
) -> pathlib.Path:
    """Writes a random EAGLE-3 head for the checkpoint at ``target_dir`` into ``out_dir``.

    Shapes default to the target's (hidden size, heads, KV heads, head_dim, intermediate size);
    ``draft_vocab_size`` defaults to half the target's vocabulary. A ``hidden_size`` other than
    the target's writes ``target_hidden_size``. ``aux_layer_ids`` are written as
    ``eagle_aux_hidden_state_layer_ids`` (absent: the reader's default). Weights are normal
    with std ``initializer_range`` (default 0.2 * sqrt(64 / hidden_size), as the tiny models,
    so that greedy drafts have few near-ties); norm weights are U(0.5, 1.5), the final norm
    scaled as the tiny models'. ``config_overrides`` are written into config.json last (for
    building deliberately broken heads)."""
    import torch
    from safetensors.torch import save_file

    target_dir = pathlib.Path(target_dir)
    target = _target_config(target_dir)
    if torch_dtype not in _DTYPES:
        raise ValueError(f"unknown torch_dtype {torch_dtype!r}; expected one of {_DTYPES}")
    vocab = int(target["vocab_size"])
    target_hidden = int(target["hidden_size"])
    hidden = hidden_size or target_hidden
    heads = num_attention_heads or int(target["num_attention_heads"])
    kv_heads = num_key_value_heads or int(target.get("num_key_value_heads") or heads)
    if head_dim is None:
        head_dim = (int(target.get("head_dim") or target_hidden // heads)
                    if hidden == target_hidden and heads == target["num_attention_heads"]
                    else hidden // heads)
    inter = intermediate_size or int(target["intermediate_size"])
    n_draft = draft_vocab_size or max(1, vocab // 2)
    if not 1 <= n_draft <= vocab:
        raise ValueError(f"draft_vocab_size must be in [1, {vocab}] (the target's vocab_size), "
                         f"got {n_draft}")
    std = initializer_range or DEFAULT_INITIALIZER_RANGE_AT_64 * (64 / hidden) ** 0.5

    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, torch_dtype)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    def norm_weight(scale: float = 1.0) -> torch.Tensor:
        return (torch.empty(hidden).uniform_(0.5, 1.5, generator=gen) * scale).to(dtype)

    draft_ids = torch.randperm(vocab, generator=gen)[:n_draft].sort().values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[draft_ids] = True
    q, kv = heads * head_dim, kv_heads * head_dim
    tensors = {
        "fc.weight": normal(hidden, 3 * target_hidden),
        "midlayer.input_layernorm.weight": norm_weight(),
        "midlayer.hidden_norm.weight": norm_weight(),
        "midlayer.self_attn.q_proj.weight": normal(q, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": normal(kv, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": normal(kv, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": normal(hidden, q),
        "midlayer.post_attention_layernorm.weight": norm_weight(),
        "midlayer.mlp.gate_proj.weight": normal(inter, hidden),
        "midlayer.mlp.up_proj.weight": normal(inter, hidden),
        "midlayer.mlp.down_proj.weight": normal(hidden, inter),
        "norm.weight": norm_weight(DEFAULT_FINAL_NORM_SCALE),
        "lm_head.weight": normal(n_draft, hidden),
        "d2t": draft_ids - torch.arange(n_draft),
        "t2d": t2d,
    }
    if with_embedding:
        tensors["embed_tokens.weight"] = normal(vocab, hidden)

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "draft_vocab_size": n_draft,
        "rms_norm_eps": target.get("rms_norm_eps", 1e-6),
        "max_position_embeddings": target.get("max_position_embeddings", 2048),
        **_rope_keys(target),
        "bos_token_id": target.get("bos_token_id"),
        "eos_token_id": target.get("eos_token_id"),
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
    }
    if hidden != target_hidden:
        config["target_hidden_size"] = target_hidden
    if norm_before_residual:
        config["norm_before_residual"] = True
    if aux_layer_ids is not None:
        config["eagle_aux_hidden_state_layer_ids"] = list(aux_layer_ids)
    config.update(config_overrides or {})

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; a server running as another user reads
    return out


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--target", required=True, help="the target checkpoint directory")
    parser.add_argument("--draft-vocab-size", type=int, default=None)
    parser.add_argument("--aux-layer-ids", type=int, nargs=3, default=None)
    parser.add_argument("--with-embedding", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=_DTYPES, default="float32")
    args = parser.parse_args(argv)
    print(build_eagle3_head(args.out_dir, args.target, draft_vocab_size=args.draft_vocab_size,
                            aux_layer_ids=args.aux_layer_ids, with_embedding=args.with_embedding,
                            seed=args.seed, torch_dtype=args.dtype))


if __name__ == "__main__":
    main()

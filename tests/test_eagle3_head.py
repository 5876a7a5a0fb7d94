"""EAGLE-3 heads (models/eagle3.py) built locally in the published format (devtools/eagle3_head):
loading, the forward through paged attention against a plain-torch reference of the published
architecture, the d2t map, the target's auxiliary hidden states against HF's, and bad
checkpoints."""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Optional

import pytest
import torch
from hf_reference import load_hf_model
from paged_steps import step_metadata
from safetensors.torch import load_file, save_file

from pagedserve.attention.torch_backend import TorchAttentionBackend
from pagedserve.devtools.eagle3_head import build_eagle3_head
from pagedserve.models.eagle3 import Eagle3Config, Eagle3Hidden
from pagedserve.models.loader import load_eagle3_head, load_model
from pagedserve.models.model_config import ModelConfig
from pagedserve.models.registry import model_class

BLOCK_SIZE = 4
NUM_BLOCKS = 64
DRAFT_VOCAB = 300
# fp32 (pagedserve) against fp64 (reference): relative to the size of the compared values.
RTOL, ATOL = 1e-4, 1e-4

# Head variants: the published default (the target's shapes, its embedding shared), and a
# narrower head with its own embedding, GQA of 2 heads per KV head, norm_before_residual.
HEADS = {
    "shared-embedding": dict(),
    "own-embedding-narrow": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=8, intermediate_size=80, with_embedding=True,
                                 norm_before_residual=True),
}


@pytest.fixture(scope="module")
def target_dir(tiny_model_dir) -> pathlib.Path:
    # Six layers, as the default model: vLLM's default aux ids (2, 3, 3) repeat a layer.
    return tiny_model_dir("llama", num_hidden_layers=6)


@pytest.fixture(scope="module")
def head_dirs(target_dir, tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("eagle3_heads")
    return {name: build_eagle3_head(root / name, target_dir, draft_vocab_size=DRAFT_VOCAB,
                                    seed=i + 3, **kwargs)
            for i, (name, kwargs) in enumerate(HEADS.items())}


def _backend(config: ModelConfig) -> TorchAttentionBackend:
    return TorchAttentionBackend(config.num_heads, config.num_kv_heads, config.head_dim,
                                 config.head_dim ** -0.5, BLOCK_SIZE)


def _load(target_dir: pathlib.Path, head_dir: pathlib.Path):
    target_config = ModelConfig.from_pretrained(target_dir)
    target = load_model(target_config, torch.float32, torch.device("cpu"),
                        _backend(target_config))
    head_config = Eagle3Config.from_pretrained(head_dir, target_config)
    head = load_eagle3_head(head_config, target, target_dir, torch.float32,
                            torch.device("cpu"), _backend(head_config.model_config))
    return target_config, target, head_config, head


def _dense(layer: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight [out, in], read through its forward (the CPU drops the dense
    copy once oneDNN holds the weight)."""
    with torch.inference_mode():
        return layer(torch.eye(layer.input_size)).T


def _kv_cache(config: ModelConfig) -> torch.Tensor:
    return torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, config.num_kv_heads, config.head_dim)


# ---- the reference: the published EAGLE-3 head in plain torch, one sequence, no cache ----


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """HF's rotate-half rotary embedding on x [tokens, heads, head_dim]."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None, :]
    rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def reference_head(w: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor,
                   positions: torch.Tensor, hidden: torch.Tensor):
    """(pre-norm hidden, normed hidden, draft logits) at every input of one sequence, all in
    float64: [norm(embed); hidden_norm(hidden)] -> causal GQA attention with rope -> + residual
    (the hidden input, or its norm) -> post-attention norm -> SiLU-gated MLP -> + residual ->
    final norm -> lm_head."""
    eps, hd = cfg["rms_norm_eps"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    p = "midlayer."
    tokens = ids.shape[0]
    hidden = hidden.double()
    embeds = _rms(w["embed_tokens.weight"][ids], w[p + "input_layernorm.weight"], eps)
    normed_hidden = _rms(hidden, w[p + "hidden_norm.weight"], eps)
    residual = normed_hidden if cfg.get("norm_before_residual") else hidden
    x = torch.cat([embeds, normed_hidden], -1)
    q = (x @ w[p + "self_attn.q_proj.weight"].T).view(tokens, nh, hd)
    k = (x @ w[p + "self_attn.k_proj.weight"].T).view(tokens, nkv, hd)
    v = (x @ w[p + "self_attn.v_proj.weight"].T).view(tokens, nkv, hd)
    q, k = _rope(q, positions, cfg["rope_theta"]), _rope(k, positions, cfg["rope_theta"])
    k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
    scores = torch.einsum("thd,shd->hts", q, k) * hd ** -0.5
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    attn = torch.einsum("hts,shd->thd", probs, v).reshape(tokens, nh * hd)
    h = attn @ w[p + "self_attn.o_proj.weight"].T + residual
    m = _rms(h, w[p + "post_attention_layernorm.weight"], eps)
    gate, up = m @ w[p + "mlp.gate_proj.weight"].T, m @ w[p + "mlp.up_proj.weight"].T
    pre = (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T + h
    normed = _rms(pre, w["norm.weight"], eps)
    return pre, normed, normed @ w["lm_head.weight"].T


def _reference_weights(head_dir: pathlib.Path, target_dir: pathlib.Path) -> dict:
    w = {k: v.double() for k, v in load_file(head_dir / "model.safetensors").items()
         if k != "t2d"}
    if "embed_tokens.weight" not in w:  # shared with the target
        target = load_file(target_dir / "model.safetensors")
        w["embed_tokens.weight"] = target["model.embed_tokens.weight"].double()
    return w


# ---- tests ----------------------------------------------------------------------------------


def test_built_head_is_in_the_published_format(head_dirs, target_dir, tmp_path):
    head_dir = head_dirs["shared-embedding"]
    config = json.loads((head_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["num_hidden_layers"] == 1 and config["draft_vocab_size"] == DRAFT_VOCAB
    tensors = load_file(head_dir / "model.safetensors")
    assert "embed_tokens.weight" not in tensors
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert tensors["fc.weight"].shape == (64, 3 * 64)
    assert tensors["midlayer.self_attn.q_proj.weight"].shape == (64, 2 * 64)
    assert tensors["lm_head.weight"].shape == (DRAFT_VOCAB, 64)
    # t2d marks exactly the targets of d2t.
    targets = torch.arange(DRAFT_VOCAB) + tensors["d2t"]
    assert torch.equal(tensors["t2d"].nonzero().flatten(), targets)
    # Deterministic by seed.
    again = build_eagle3_head(tmp_path / "again", target_dir, draft_vocab_size=DRAFT_VOCAB,
                              seed=3)
    other = build_eagle3_head(tmp_path / "other", target_dir, draft_vocab_size=DRAFT_VOCAB,
                              seed=4)
    assert (again / "model.safetensors").read_bytes() == (
        head_dir / "model.safetensors").read_bytes()
    assert (again / "config.json").read_text() == (head_dir / "config.json").read_text()
    assert (other / "model.safetensors").read_bytes() != (
        head_dir / "model.safetensors").read_bytes()


@pytest.mark.parametrize("variant", list(HEADS))
def test_head_loads(head_dirs, target_dir, variant):
    target_config, target, head_config, head = _load(target_dir, head_dirs[variant])
    kwargs = HEADS[variant]
    mc = head_config.model_config
    assert (mc.num_layers, mc.num_kv_heads, mc.head_dim) == (
        1, kwargs.get("num_key_value_heads", 2), kwargs.get("head_dim", 16))
    assert mc.max_position_embeddings >= target_config.max_position_embeddings
    assert head_config.aux_layer_ids == (2, 3, 3)  # vLLM's default for 6 layers
    assert head_config.draft_vocab_size == DRAFT_VOCAB
    assert head.owns_embedding == bool(kwargs.get("with_embedding"))
    if not head.owns_embedding:
        assert head.embed_tokens is target.model.embed_tokens
    tensors = load_file(head_dirs[variant] / "model.safetensors")
    qkv = torch.cat([tensors[f"midlayer.self_attn.{n}_proj.weight"] for n in "qkv"])
    torch.testing.assert_close(_dense(head.midlayer.self_attn.qkv_proj), qkv)
    torch.testing.assert_close(_dense(head.fc), tensors["fc.weight"])
    assert torch.equal(head.lm_head.weight, tensors["lm_head.weight"])
    assert torch.equal(head.midlayer.hidden_norm.weight, tensors["midlayer.hidden_norm.weight"])


def test_d2t_maps_draft_ids_to_target_ids(head_dirs, target_dir):
    _, _, _, head = _load(target_dir, head_dirs["shared-embedding"])
    tensors = load_file(head_dirs["shared-embedding"] / "model.safetensors")
    ids = torch.tensor([0, 1, 7, DRAFT_VOCAB - 1, 7])
    expected = ids + tensors["d2t"][ids]
    assert torch.equal(head.map_to_target(ids), expected)
    assert torch.equal(head.map_to_target(torch.arange(DRAFT_VOCAB)),
                       tensors["t2d"].nonzero().flatten())
    # Target-vocabulary logits: the draft logits at the mapped ids, -inf elsewhere.
    hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    draft = head.compute_draft_logits(hidden)
    full = head.compute_logits(hidden)
    assert draft.shape == (3, DRAFT_VOCAB) and full.shape == (3, 1024)
    assert torch.equal(full[:, head.map_to_target(torch.arange(DRAFT_VOCAB))], draft)
    assert torch.isneginf(full[:, ~tensors["t2d"]]).all()
    assert torch.equal(head.map_to_target(draft.argmax(-1)), full.argmax(-1))


@pytest.mark.parametrize("variant", list(HEADS))
def test_forward_matches_reference(head_dirs, target_dir, variant):
    """Prefill of three sequences, a mixed step (a chunk after cached context), then greedy
    single-token draft steps feeding back next_hidden, all through the paged KV cache, against
    the reference run over each sequence's whole input at once."""
    target_config, _, head_config, head = _load(target_dir, head_dirs[variant])
    raw = json.loads((head_dirs[variant] / "config.json").read_text())
    weights = _reference_weights(head_dirs[variant], target_dir)
    gen = torch.Generator().manual_seed(11)
    cache = _kv_cache(head_config.model_config)
    # Scattered, interleaved blocks per sequence.
    order = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables = [order[i::3][:8] for i in range(3)]
    vocab, aux_width = target_config.vocab_size, 3 * target_config.hidden_size
    inputs: list[list[tuple[int, torch.Tensor]]] = [[], [], []]  # per sequence: (id, hidden)
    outputs: list[list[tuple[torch.Tensor, ...]]] = [[], [], []]
    ctx = [0, 0, 0]

    def run(q_lens: list[int], ids: torch.Tensor, hidden: torch.Tensor) -> Eagle3Hidden:
        meta, positions = step_metadata(q_lens, ctx, tables, BLOCK_SIZE)
        head.midlayer.self_attn.attn.backend.prepare(meta)
        with torch.inference_mode():
            out = head(ids, positions, hidden, [cache], meta)
            logits = head.compute_draft_logits(out.logits_hidden)
        start = 0
        for i, q in enumerate(q_lens):
            for t in range(start, start + q):
                inputs[i].append((int(ids[t]), hidden[t]))
                outputs[i].append((out.next_hidden[t], out.logits_hidden[t], logits[t]))
            start += q
            ctx[i] += q
        return out

    def target_features(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, vocab, (n,), generator=gen)
        aux = torch.randn(n, aux_width, generator=gen)
        with torch.inference_mode():
            hidden = head.combine_hidden_states(aux)
        torch.testing.assert_close(hidden.double(), aux.double() @ weights["fc.weight"].T,
                                   rtol=RTOL, atol=ATOL)
        return ids, hidden

    run([5, 11, 3], *target_features(19))
    out = run([3, 1, 2], *target_features(6))
    last = torch.tensor([2, 3, 5])
    for _ in range(4):
        with torch.inference_mode():
            drafted = head.map_to_target(head.compute_draft_logits(out.logits_hidden[last])
                                         .argmax(-1))
        out = run([1, 1, 1], drafted, out.next_hidden[last].clone())
        last = torch.arange(3)

    for seq_inputs, seq_outputs in zip(inputs, outputs):
        ids = torch.tensor([i for i, _ in seq_inputs])
        hidden = torch.stack([h for _, h in seq_inputs])
        ref = reference_head(weights, raw, ids, torch.arange(len(ids)), hidden)
        for got, want in zip(zip(*seq_outputs), ref):
            got = torch.stack(got).double()
            scale = float(want.abs().max())
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL * scale)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_target_aux_hidden_states_match_hf(tiny_model_dir, arch):
    """Aux layer i is the residual stream entering layer i: HF's hidden_states[i] (index 0 is
    the embedding output, index i the output of layer i - 1)."""
    model_dir = tiny_model_dir(arch, num_hidden_layers=6)
    config = ModelConfig.from_pretrained(model_dir)
    model = load_model(config, torch.float32, torch.device("cpu"), _backend(config))
    assert model.get_eagle3_aux_hidden_state_layers() == (2, 3, 3)
    prompts = [[5 + (7 * i) % 900 for i in range(n)] for n in (9, 4)]
    ids = torch.tensor([t for p in prompts for t in p])
    tables = [list(range(0, 8)), list(range(8, 16))]

    def forward(layers: tuple[int, ...]):
        model.set_aux_hidden_state_layers(layers)
        meta, positions = step_metadata([len(p) for p in prompts], [0, 0], tables, BLOCK_SIZE)
        model.model.layers[0].self_attn.attn.backend.prepare(meta)
        caches = [_kv_cache(config) for _ in range(config.num_layers)]
        with torch.inference_mode():
            return model(ids, positions, caches, meta)

    plain = forward(())
    assert isinstance(plain, torch.Tensor)
    hf = load_hf_model(str(model_dir))
    for layers in [(2, 3, 3), (0, 1, 5)]:
        hidden, aux = forward(layers)
        assert torch.equal(hidden, plain)
        assert aux.shape == (len(ids), 3 * config.hidden_size)
        for i, prompt in enumerate(prompts):
            with torch.no_grad():
                states = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states
            rows = slice(0 if i == 0 else len(prompts[0]), sum(map(len, prompts[: i + 1])))
            for j, layer in enumerate(layers):
                got = aux[rows, j * config.hidden_size:(j + 1) * config.hidden_size]
                torch.testing.assert_close(got, states[layer][0], rtol=1e-4, atol=1e-4)


def test_aux_layer_ids_out_of_range(tiny_model_dir, tmp_path):
    small = tiny_model_dir("llama")  # two layers: vLLM's default ids do not fit
    head = build_eagle3_head(tmp_path / "head", small, draft_vocab_size=DRAFT_VOCAB)
    with pytest.raises(ValueError, match="eagle_aux_hidden_state_layer_ids"):
        Eagle3Config.from_pretrained(head, ModelConfig.from_pretrained(small))
    pinned = build_eagle3_head(tmp_path / "pinned", small, draft_vocab_size=DRAFT_VOCAB,
                               aux_layer_ids=[0, 1, 1])
    assert Eagle3Config.from_pretrained(pinned, ModelConfig.from_pretrained(
        small)).aux_layer_ids == (0, 1, 1)
    config = ModelConfig.from_pretrained(small)
    model = load_model(config, torch.float32, torch.device("cpu"), _backend(config))
    with pytest.raises(ValueError, match="eagle_aux_hidden_state_layer_ids.*out of range"):
        model.set_aux_hidden_state_layers([0, 1, 2])


def _broken(head_dir: pathlib.Path, dst: pathlib.Path, *, drop: Optional[str] = None,
            tensors: Optional[dict] = None, config: Optional[dict] = None,
            remove_keys: tuple[str, ...] = ()) -> pathlib.Path:
    shutil.copytree(head_dir, dst)
    weights = load_file(dst / "model.safetensors")
    if drop:
        weights.pop(drop)
    weights.update(tensors or {})
    save_file(weights, dst / "model.safetensors")
    raw = json.loads((dst / "config.json").read_text())
    raw.update(config or {})
    for key in remove_keys:
        raw.pop(key)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


def test_bad_checkpoints_fail_naming_the_field(head_dirs, target_dir, tmp_path):
    target_config = ModelConfig.from_pretrained(target_dir)
    good = head_dirs["shared-embedding"]
    narrow = head_dirs["own-embedding-narrow"]
    cases = [
        (_broken(good, tmp_path / "vocab", config={"draft_vocab_size": 1025}),
         "draft_vocab_size 1025 exceeds vocab_size 1024"),
        (_broken(narrow, tmp_path / "target-hidden", config={"target_hidden_size": 48}),
         "target_hidden_size 48 differs from the target's hidden_size 64"),
        (_broken(narrow, tmp_path / "hidden", remove_keys=("target_hidden_size",)),
         r"hidden_size \(no target_hidden_size given\) 32 differs"),
        (_broken(good, tmp_path / "layers", config={"num_hidden_layers": 2}),
         "num_hidden_layers must be 1"),
        (_broken(good, tmp_path / "target-vocab", config={"vocab_size": 2048}),
         "vocab_size 2048 differs from the target's vocab_size 1024"),
        (_broken(good, tmp_path / "arch", config={"architectures": ["LlamaForCausalLM"]}),
         "not an EAGLE-3 head"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            Eagle3Config.from_pretrained(path, target_config)

    d2t = load_file(good / "model.safetensors")["d2t"]
    weight_cases = [
        (_broken(good, tmp_path / "no-d2t", drop="d2t"), "no 'd2t' tensor.*draft_vocab_size"),
        (_broken(good, tmp_path / "d2t-range", tensors={"d2t": d2t + 1024}),
         "'d2t' maps draft ids outside"),
        (_broken(good, tmp_path / "d2t-dup", tensors={"d2t": torch.zeros_like(d2t)
                                                      .index_fill_(0, torch.tensor([1]), -1)}),
         "'d2t' maps two draft ids to one"),
        (_broken(good, tmp_path / "d2t-shape", tensors={"d2t": d2t[:-1].contiguous()}),
         r"'d2t' must be integer offsets of shape \(300,\)"),
        (_broken(good, tmp_path / "lm-head", tensors={"lm_head.weight": torch.zeros(299, 64)}),
         "draft_vocab_size is 300"),
    ]
    for path, message in weight_cases:
        with pytest.raises(ValueError, match=message):
            _load(target_dir, path)
    # A full draft vocabulary needs no d2t: the identity.
    full = _broken(good, tmp_path / "full-vocab", drop="d2t", config={"draft_vocab_size": 1024},
                   tensors={"lm_head.weight": torch.zeros(1024, 64)})
    _, _, _, head = _load(target_dir, full)
    assert torch.equal(head.map_to_target(torch.arange(1024)), torch.arange(1024))


def test_a_head_is_not_served_as_a_target(head_dirs):
    config = ModelConfig.from_pretrained(head_dirs["shared-embedding"])
    with pytest.raises(ValueError, match="EAGLE-3 draft head.*speculative_config"):
        model_class(config.architecture)

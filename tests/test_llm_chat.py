"""LLM.chat: the tokenizer's chat template, as vLLM's LLM.chat uses it."""

from __future__ import annotations

import shutil

import pytest

from pagedserve import LLM, SamplingParams

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
OTHER = [{"role": "user", "content": [{"type": "text", "text": "Two"},
                                      {"type": "text", "text": "parts"}]}]


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir, tmp_path_factory):
    """The tiny llama, its tokenizer given a chat template."""
    path = tmp_path_factory.mktemp("chat") / "llama-chat"
    shutil.copytree(tiny_model_dir("llama"), path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llm(chat_model):
    return LLM(str(chat_model), max_model_len=128, kv_cache_memory_bytes=16 << 20)


def _by_hand(llm: LLM, conversation, params=GREEDY, **kw):
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(conversation, tokenize=False, **kw)
    ids = tok(text, add_special_tokens=False).input_ids
    return text, llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]


def test_chat_equals_the_template_applied_by_hand(llm):
    text, expected = _by_hand(llm, CHAT, add_generation_prompt=True)
    assert text.startswith("<s><|system|>Be brief.\n<|user|>Hello there\n<|assistant|>")
    (out,) = llm.chat(CHAT, GREEDY, use_tqdm=False)
    assert out.prompt == text
    assert out.prompt_token_ids == expected.prompt_token_ids
    assert out.prompt_token_ids.count(llm.get_tokenizer().bos_token_id) == 1  # no second BOS
    assert out.outputs[0].token_ids == expected.outputs[0].token_ids
    assert out.outputs[0].text == expected.outputs[0].text


def test_a_list_of_conversations_with_params_each(llm):
    short = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    outs = llm.chat([CHAT, OTHER], [GREEDY, short], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [10, 3]
    flat = [{"role": "user", "content": "Two\nparts"}]
    assert outs[1].prompt == _by_hand(llm, flat, add_generation_prompt=True)[0]
    assert outs[1].outputs[0].token_ids == _by_hand(llm, flat, short,
                                                    add_generation_prompt=True)[1].outputs[
                                                        0].token_ids


def test_template_options(llm):
    partial = CHAT + [{"role": "assistant", "content": "Sure"}]
    text, expected = _by_hand(llm, partial, add_generation_prompt=False,
                              continue_final_message=True)
    (out,) = llm.chat(partial, GREEDY, use_tqdm=False, add_generation_prompt=False,
                      continue_final_message=True)
    assert out.prompt == text and text.endswith("Sure")
    assert out.outputs[0].token_ids == expected.outputs[0].token_ids
    custom = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    (out,) = llm.chat(CHAT, GREEDY, use_tqdm=False, chat_template=custom)
    assert out.prompt == "[Be brief.][Hello there]"
    with pytest.raises(ValueError, match="cannot both be true"):
        llm.chat(CHAT, GREEDY, use_tqdm=False, continue_final_message=True)


def test_bad_messages_are_value_errors(llm):
    for bad in ([], [{"content": "no role"}], [{"role": "user",
                                               "content": [{"type": "image_url"}]}]):
        with pytest.raises(ValueError):
            llm.chat(bad, GREEDY, use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks


def test_a_tokenizer_without_a_template_is_a_clear_error(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), max_model_len=128, kv_cache_memory_bytes=16 << 20)
    assert not llm.get_tokenizer().chat_template
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat(CHAT, GREEDY, use_tqdm=False)

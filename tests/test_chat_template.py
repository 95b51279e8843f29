"""Chat templates: the model's own template against ``apply_chat_template``, every builtin's exact
strings, interactive continuations that tokenize like the whole conversation, config JSON, bad input."""
import random

import pytest
from transformers import AutoTokenizer

from lmdeploy_jax.chat_template import (BaseChatTemplate, ChatTemplateConfig, HFChatTemplate, get_chat_template,
                                        list_templates, match_template_name)
from lmdeploy_jax.checkpoint.source import resolve_model
from lmdeploy_jax.tokenizer import Tokenizer

SMOL_SYSTEM = 'You are a helpful AI assistant named SmolLM, trained by Hugging Face'
_WORDS = ['Paris', 'capital', 'France', 'quantum', 'river', '你好', '世界', '🎉', 'naïve', 'café', '42', '\n', '  ']


def _random_text(rng: random.Random, n: int) -> str:
    return ' '.join(rng.choice(_WORDS) for _ in range(n)).strip() or 'x'


def _conversations(seed: int):
    """The five shapes the engine sees, with fresh random contents."""
    rng = random.Random(seed)
    t = lambda: _random_text(rng, rng.randrange(3, 9))  # noqa: E731
    return {
        'single_turn': [{'role': 'user', 'content': t()}],
        'with_system': [{'role': 'system', 'content': t()}, {'role': 'user', 'content': t()}],
        'multi_turn': [{'role': 'user', 'content': t()}, {'role': 'assistant', 'content': t()},
                       {'role': 'user', 'content': t()}],
        'assistant_prefix': [{'role': 'user', 'content': t()}, {'role': 'assistant', 'content': t()}],
        'str_prompt': t(),
    }


@pytest.fixture(scope='module')
def tok():
    return Tokenizer(resolve_model(None).hf_dir)


def _hf_render(hf, messages, tokenize):
    if isinstance(messages, str):
        messages = [{'role': 'user', 'content': messages}]
    kw = ({'continue_final_message': True} if messages[-1]['role'] == 'assistant'
          else {'add_generation_prompt': True})
    out = hf.apply_chat_template(messages, tokenize=tokenize, **kw)
    return list(out['input_ids']) if tokenize and not isinstance(out, list) else out


@pytest.mark.parametrize('seed', [0, 1])
def test_default_model_template_matches_apply_chat_template(tok, seed):
    template = get_chat_template(None, resolve_model(None).given, tok)
    assert isinstance(template, HFChatTemplate) and template.stop_words == ['<|im_end|>']
    # LMDeploy's ChatML builtin with SmolLM's default system prompt renders the same strings
    chatml = get_chat_template(ChatTemplateConfig('chatml', meta_instruction=SMOL_SYSTEM), None, tok)
    for name, conv in _conversations(seed).items():
        expected = _hf_render(tok.hf_tokenizer, conv, tokenize=False)
        assert template.messages2prompt(conv) == expected, name
        assert chatml.messages2prompt(conv) == expected, name
        assert tok.encode(expected) == _hf_render(tok.hf_tokenizer, conv, tokenize=True), name


@pytest.mark.parametrize('builtin', [False, True])
def test_continuation_tokenizes_like_whole_conversation(tok, builtin):
    """History (prompt + reply + the EOS the model generated) + the next turn == the whole render."""
    template = (get_chat_template(ChatTemplateConfig('qwen', meta_instruction=SMOL_SYSTEM), None, tok) if builtin
                else get_chat_template(None, None, tok))
    rng = random.Random(7)
    conv = [{'role': 'user', 'content': _random_text(rng, 6)}]
    history = tok.encode(template.messages2prompt(conv))
    for turn in range(3):
        reply = _random_text(rng, 5)
        history += tok.encode(reply, add_bos=False) + [tok.eos_token_id]
        conv.append({'role': 'assistant', 'content': reply})
        if turn == 0:
            first_exchange = (list(history), list(conv))
        question = _random_text(rng, 4)
        nxt = question if turn % 2 else [{'role': 'user', 'content': question}]
        history += tok.encode(template.messages2prompt(nxt, sequence_start=False), add_bos=False)
        conv.append({'role': 'user', 'content': question})
        assert history == _hf_render(tok.hf_tokenizer, conv, tokenize=True)
    # an assistant prefix to continue, in the middle of a session
    history, conv = first_exchange
    prefix = [{'role': 'user', 'content': 'Name a river'}, {'role': 'assistant', 'content': 'The'}]
    cont = template.messages2prompt(prefix, sequence_start=False)
    assert cont == '\n<|im_start|>user\nName a river<|im_end|>\n<|im_start|>assistant\nThe'
    assert history + tok.encode(cont, add_bos=False) == _hf_render(tok.hf_tokenizer, conv + prefix, tokenize=True)


def test_hf_template_closing_turns_with_another_special_token(tok):
    """A template whose turns end with a special token that is not the EOS (as Llama 3's
    <|eot_id|>): it is a stop word, and the history the model ended with it continues exactly."""
    hf = AutoTokenizer.from_pretrained(resolve_model(None).hf_dir)
    hf.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    template = get_chat_template(None, None, hf)
    assert template.stop_words == ['<|im_end|>', '<|endoftext|>']
    conv = [{'role': 'user', 'content': 'Hi there'}, {'role': 'assistant', 'content': 'Hello!'}]
    history = tok.encode(template.messages2prompt(conv[:1])) + tok.encode('Hello!', add_bos=False) + [0]
    history += tok.encode(template.messages2prompt('Bye', sequence_start=False), add_bos=False)
    assert history == _hf_render(hf, conv + [{'role': 'user', 'content': 'Bye'}], tokenize=True)


CONV = [{'role': 'system', 'content': 'SYS'}, {'role': 'user', 'content': 'Hi'},
        {'role': 'assistant', 'content': 'Yo'}, {'role': 'user', 'content': 'Q2'}]
CHATML_CONV = ('<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo'
               '<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n')
L3 = '<|start_header_id|>{}<|end_header_id|>\n\n'
# name: (conversation render, str 'Hi' render, str 'Q2' continuation, stop words)
EXPECTED = {
    'qwen': (CHATML_CONV,
             '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
             '<|im_start|>assistant\n',
             '\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n', ['<|im_end|>']),
    'internlm2': (CHATML_CONV, None, '\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n',
                  ['<|im_end|>', '<|action_end|>']),
    'llama3': ('<|begin_of_text|>' + L3.format('system') + 'SYS<|eot_id|>' + L3.format('user') + 'Hi<|eot_id|>'
               + L3.format('assistant') + 'Yo<|eot_id|>' + L3.format('user') + 'Q2<|eot_id|>' + L3.format('assistant'),
               '<|begin_of_text|>' + L3.format('user') + 'Hi<|eot_id|>' + L3.format('assistant'),
               L3.format('user') + 'Q2<|eot_id|>' + L3.format('assistant'), ['<|eot_id|>', '<|end_of_text|>']),
    'llama2': ('[INST] <<SYS>>\nSYS\n<</SYS>>\n\nHi [/INST] Yo</s><s>[INST] Q2 [/INST] ', None,
               '<s>[INST] Q2 [/INST] ', []),
    'mistral': ('SYS[INST] Hi [/INST]Yo</s>[INST] Q2 [/INST]', '[INST] Hi [/INST]', '[INST] Q2 [/INST]', []),
    'vicuna': ('SYS USER: Hi ASSISTANT: Yo</s>USER: Q2 ASSISTANT:', None, 'USER: Q2 ASSISTANT:', ['</s>']),
    'deepseek': ('SYSUser: Hi\n\nAssistant: Yo<｜end▁of▁sentence｜>User: Q2\n\nAssistant:', 'User: Hi\n\nAssistant:',
                 'User: Q2\n\nAssistant:', []),
    'gemma': ('SYS<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n'
              '<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\n',
              '<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n',
              '\n<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\n', ['<end_of_turn>']),
    'base': ('SYSHiYoQ2', 'Hi', 'Q2', []),
}
META_STARTS = {'internlm2': 'You are an AI assistant whose name is InternLM (书生·浦语).',
               'llama2': 'You are a helpful, respectful and honest assistant.',
               'vicuna': 'A chat between a curious user and an artificial intelligence assistant.'}


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_builtin_renderings(name):
    conv_text, hi_text, cont_text, stop_words = EXPECTED[name]
    t = ChatTemplateConfig(name).chat_template
    assert t.name == name and t.stop_words == stop_words
    assert t.messages2prompt(CONV) == conv_text
    assert t.messages2prompt('Q2', sequence_start=False) == cont_text
    assert t.messages2prompt([{'role': 'user', 'content': 'Q2'}], sequence_start=False) == cont_text
    if hi_text is None:   # a long default system prompt: check where it goes
        hi_text = t.messages2prompt([{'role': 'system', 'content': t.meta_instruction},
                                     {'role': 'user', 'content': 'Hi'}])
        assert t.meta_instruction.startswith(META_STARTS[name])
    assert t.messages2prompt('Hi') == hi_text
    # the whole render is the first turns' render, the reply (with the space vicuna and deepseek
    # leave to the model), its end-of-answer and the continuation
    first = t.messages2prompt(CONV[:2])
    reply = t.assistant[len(t.generation_prompt()):] + 'Yo'
    assert conv_text == first + reply + t.eoa + t.messages2prompt('Q2', sequence_start=False)
    # an assistant message last is a prefix to continue
    assert t.messages2prompt(CONV[:3]) == first + reply


def test_assistant_prefix_and_completion():
    qwen = ChatTemplateConfig('qwen').chat_template
    assert qwen.messages2prompt([{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'The'}]) == (
        '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
        '<|im_start|>assistant\nThe')
    completion = ChatTemplateConfig('qwen', capability='completion').chat_template
    assert completion.messages2prompt('raw text') == 'raw text'
    parts = [{'role': 'user', 'content': [{'type': 'text', 'text': 'a'}, {'type': 'text', 'text': 'b'}]}]
    assert ChatTemplateConfig('base').chat_template.messages2prompt(parts) == 'ab'


def test_config_overrides_and_custom_template():
    t = ChatTemplateConfig('qwen', meta_instruction='Be brief.', stop_words=['<|endoftext|>']).chat_template
    assert t.messages2prompt('Hi').startswith('<|im_start|>system\nBe brief.<|im_end|>\n')
    assert t.stop_words == ['<|endoftext|>']
    custom = ChatTemplateConfig('my-model', user='<u>', eoh='</u>', assistant='<a>', eoa='</a>', separator='|',
                                stop_words=['</a>']).chat_template
    assert isinstance(custom, BaseChatTemplate) and custom.name == 'my-model'
    assert custom.messages2prompt(CONV[1:]) == '<u>Hi</u><a>Yo</a>|<u>Q2</u><a>'
    assert custom.messages2prompt('Q3', sequence_start=False) == '|<u>Q3</u><a>'


@pytest.mark.parametrize('path,name', [('meta-llama/Meta-Llama-3-8B-Instruct', 'llama3'),
                                       ('/m/Llama-2-7b-chat-hf', 'llama2'), ('Qwen/Qwen2.5-7B-Instruct', 'qwen'),
                                       ('internlm/internlm2-chat-7b', 'internlm2'),
                                       ('mistralai/Mistral-7B-Instruct-v0.2', 'mistral'),
                                       ('lmsys/vicuna-7b-v1.5', 'vicuna'),
                                       ('deepseek-ai/deepseek-llm-7b-chat', 'deepseek'),
                                       ('google/gemma-7b-it', 'gemma'), ('/models/my-gpt', None)])
def test_match_from_model_path(path, name):
    assert match_template_name(path) == name
    assert get_chat_template(None, path, None).name == (name or 'base')


def test_get_chat_template_choices(tok):
    hf = AutoTokenizer.from_pretrained(resolve_model(None).hf_dir)
    hf.chat_template = None   # a model without its own template: matched from its path
    assert get_chat_template(None, 'Qwen/Qwen2-7B-Instruct', hf).name == 'qwen'
    assert get_chat_template(None, 'anything', hf).messages2prompt('as it is') == 'as it is'
    hf.chat_template = "{{ raise_exception('no assistant turns here') }}"   # a template that cannot serve
    assert get_chat_template(None, 'google/gemma-2b-it', hf).name == 'gemma'
    hf.chat_template = None
    # a config wins over the model's own template; 'hf' asks for the model's own one
    assert get_chat_template(ChatTemplateConfig('llama3'), None, tok).name == 'llama3'
    assert isinstance(get_chat_template(ChatTemplateConfig('hf'), None, tok), HFChatTemplate)
    with pytest.raises(ValueError, match='no chat template'):
        get_chat_template(ChatTemplateConfig('hf'), None, hf)
    names = list_templates()
    assert {'base', 'llama2', 'llama3', 'internlm2', 'qwen', 'chatml', 'mistral', 'vicuna', 'deepseek',
            'gemma', 'hf'} <= set(names)


def test_json_round_trip(tmp_path):
    cfg = ChatTemplateConfig('internlm2', meta_instruction='你是助手', separator='\n', stop_words=['<|im_end|>'])
    assert ChatTemplateConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / 'template.json'
    cfg.to_json(str(path))
    assert ChatTemplateConfig.from_json(str(path)) == cfg
    assert '你是助手' in path.read_text(encoding='utf-8')
    unnamed = ChatTemplateConfig.from_json('{"user": "<u>", "assistant": "<a>"}')
    assert unnamed.chat_template.messages2prompt('x') == '<u>x<a>'


@pytest.mark.parametrize('bad,match', [
    (lambda: ChatTemplateConfig('no-such-template'), r"'no-such-template'.*qwen"),
    (lambda: ChatTemplateConfig.from_json('{"model_name": "nope"}'), "'nope'"),
    (lambda: ChatTemplateConfig.from_json('not json at all'), 'neither a file nor valid JSON'),
    (lambda: ChatTemplateConfig.from_json('{"model_name": "qwen", "colour": 1}'), 'colour'),
    (lambda: ChatTemplateConfig('qwen', capability='poetry'), 'poetry'),
    (lambda: ChatTemplateConfig('hf', user='<u>'), 'no field overrides'),
    (lambda: ChatTemplateConfig('qwen').chat_template.messages2prompt([]), 'non-empty list'),
    (lambda: ChatTemplateConfig('qwen').chat_template.messages2prompt([{'role': 'robot', 'content': 'x'}]),
     "'robot'"),
    (lambda: ChatTemplateConfig('qwen').chat_template.messages2prompt([{'content': 'x'}]), 'role'),
])
def test_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_hf_template_bad_role(tok):
    with pytest.raises(ValueError, match="'robot'"):
        HFChatTemplate(tok.hf_tokenizer).messages2prompt([{'role': 'robot', 'content': 'x'}])

"""Tokenizer: encode/decode against the HF tokenizer, and streaming detokenization that adds up to
``decode`` on the default model's byte-level BPE and on a sentencepiece-style tokenizer (Metaspace
pre-tokenizer, byte fallback) built here."""
import json
import random

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lmdeploy_jax.checkpoint.source import resolve_model
from lmdeploy_jax.tokenizer import DetokenizeState, Tokenizer

TEXTS = ['The capital of France is Paris.', '你好，世界！今天天气很好。', '🎉👍🏽 emoji 🇫🇷 flags',
         'mixed: naïve café 東京 🍣 and  double  spaces\nnew line', ' leading space and trailing ']


@pytest.fixture(scope='module')
def smol():
    return Tokenizer(resolve_model(None).hf_dir)


@pytest.fixture(scope='module')
def spm(tmp_path_factory):
    """A sentencepiece-style tokenizer: BPE with byte fallback, '▁' for spaces, a BOS added.
    Trained on English (and '你好'), so other Chinese characters and emoji fall back to bytes."""
    corpus = ['hello world, the quick brown fox jumps over the lazy dog.', 'hello there, 你好 friend',
              'a b c the end, well done'] * 20
    trained = RustTokenizer(models.BPE(unk_token='<unk>'))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='first')
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=150, special_tokens=['<unk>', '<s>', '</s>']))
    model = json.loads(trained.to_str())['model']
    vocab = dict(model['vocab'])
    vocab.update({f'<0x{b:02X}>': len(vocab) + b for b in range(256)})
    merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in model['merges']]
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token='<unk>', byte_fallback=True,
                                   fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='first')
    tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(' ', 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', vocab['<s>'])])
    tok.add_special_tokens(['<unk>', '<s>', '</s>'])
    path = tmp_path_factory.mktemp('spm')
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>',
                            unk_token='<unk>').save_pretrained(str(path))
    return Tokenizer(str(path))


def _stream(tok, ids, rng, skip_special_tokens=True, state=None, start=0, flush_end=False):
    """Feed ``ids`` a few at a time from ``start``, as the engine does; return the deltas."""
    state, deltas, n = state or DetokenizeState(), [], start
    while n < len(ids):
        n = min(len(ids), n + rng.choice([1, 1, 1, 2, 3]))
        delta, state = tok.detokenize_incrementally(ids[:n], state, skip_special_tokens=skip_special_tokens,
                                                    flush=flush_end and n == len(ids))
        deltas.append(delta)
    return deltas


def test_properties_and_round_trip(smol):
    hf = smol.hf_tokenizer
    assert (smol.bos_token_id, smol.eos_token_id, smol.vocab_size) == (1, 2, 49152)
    assert smol.chat_template == hf.chat_template and '<|im_start|>' in smol.chat_template
    for text in TEXTS:
        ids = smol.encode(text)
        assert ids == hf.encode(text) and smol.decode(ids) == text
        assert smol.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    # ChatML: the BOS '<|im_start|>' is written by the template, never added a second time
    assert smol.encode('<|im_start|>user\nhi')[:2] == [1, 4093]
    assert smol.encode('<|im_start|>user\nhi', add_bos=False)[0] == 1


def test_encode_adds_one_bos_only(spm):
    bos = spm.bos_token_id
    ids = spm.encode('hello world')
    assert ids[0] == bos and ids[1] != bos and spm.encode('hello world', add_bos=False) == ids[1:]
    assert spm.encode('<s>hello world').count(bos) == 1
    assert spm.decode(ids) == 'hello world'
    assert spm.decode(ids, skip_special_tokens=False) == spm.hf_tokenizer.decode(ids) == '<s> hello world'
    assert spm.chat_template is None


def test_indexes_containing_token(smol):
    assert smol.indexes_containing_token('<|im_end|>') == [2]
    hf = smol.hf_tokenizer
    rare = smol.indexes_containing_token('Paris')
    assert rare and all('Paris' in hf.decode([i]) for i in rare)
    # a word in many tokens stands for the last token of its encoding (LMDeploy's rule)
    assert smol.indexes_containing_token('the') == smol.encode('the', add_bos=False)[-1:]


@pytest.mark.parametrize('which', ['smol', 'spm'])
def test_streaming_adds_up_to_decode(which, request):
    tok = request.getfixturevalue(which)
    rng = random.Random(0)
    rng_text = random.Random(5)
    shuffled = [''.join(rng_text.sample(''.join(TEXTS), 40)) for _ in range(5)]   # fresh mixed texts
    for text in TEXTS + [''.join(TEXTS)] + shuffled:
        ids = tok.encode(text)
        for skip in (True, False):
            deltas = _stream(tok, ids, rng, skip_special_tokens=skip)
            assert ''.join(deltas) == tok.decode(ids, skip_special_tokens=skip), (text, skip)
            assert not any('\ufffd' in d for d in deltas), (text, deltas)
    # one id at a time over a character split into several byte tokens
    ids = tok.encode('世界🎉', add_bos=False)
    assert len(ids) > 2, tok.convert_ids_to_tokens(ids)
    state, deltas = DetokenizeState(), []
    for n in range(1, len(ids) + 1):
        delta, state = tok.detokenize_incrementally(ids[:n], state)
        deltas.append(delta)
    assert ''.join(deltas) == '世界🎉' and not any('\ufffd' in d for d in deltas)
    held = [n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith('\ufffd')]
    assert held and all(deltas[n - 1] == '' for n in held)
    # a sequence that ends inside a character: flush lets the held text out as decode renders it
    cut = held[-1]
    text, state = tok.detokenize_incrementally(ids[:cut], DetokenizeState())
    rest, _ = tok.detokenize_incrementally(ids[:cut], state, flush=True)
    assert rest.endswith('\ufffd') and text + rest == tok.decode(ids[:cut])


def test_spm_spaces_stream_as_in_the_whole_text(spm):
    ids = spm.encode('hello world the end', add_bos=False)
    assert spm.convert_ids_to_tokens(ids)[1].startswith('▁')
    deltas = _stream(spm, ids, random.Random(1))
    assert ''.join(deltas) == 'hello world the end' and any(d.startswith(' ') for d in deltas)
    # streaming a reply after its prompt keeps the reply's leading space
    prompt = spm.encode('hello there,')
    reply = spm.encode('the quick fox 世界', add_bos=False)
    deltas = _stream(spm, prompt + reply, random.Random(2), state=DetokenizeState.after(len(prompt)),
                     start=len(prompt))
    assert ''.join(deltas) == ' the quick fox 世界'


def test_special_tokens_skipped_or_kept(smol):
    ids = smol.encode('<|im_start|>assistant\nBonjour 👋<|im_end|>')
    assert ''.join(_stream(smol, ids, random.Random(3))) == 'assistant\nBonjour 👋'
    assert ''.join(_stream(smol, ids, random.Random(3), skip_special_tokens=False)) == (
        '<|im_start|>assistant\nBonjour 👋<|im_end|>')


def test_streaming_random_ids(smol):
    """Any ids, invalid byte sequences included, on byte-level BPE: the deltas add up to decode,
    the text held at the end (ids ending inside a character) flushed by the last call."""
    tok, rng = smol, random.Random(11)
    for _ in range(40):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 25))]
        for skip in (True, False):
            deltas = _stream(tok, ids, rng, skip_special_tokens=skip, flush_end=True)
            assert ''.join(deltas) == tok.decode(ids, skip), (ids, skip)

"""GGUF conversions in the cache (``checkpoint/conversion_cache.py``): under ``LMDEPLOY_JAX_CACHE``,
one per version of a file; converting a new version removes the file's earlier ones (and those of
the earlier naming), never another file's, nor a conversion another process is writing now.
A tiny random Llama GGUF keeps each conversion to a moment."""
from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from lmdeploy_jax.checkpoint import conversion_cache
from lmdeploy_jax.checkpoint.gguf import gguf_to_hf_dir

VOCAB, HIDDEN, FF = 64, 16, 32


def write_tiny_llama_gguf(path, rng, extra=None) -> np.ndarray:
    """A one-layer Llama GGUF with random float32 weights and a byte-free gpt2 tokenizer; returns its
    embedding. ``extra(writer)``, when given, adds fields or tensors before the file is written."""
    import gguf
    writer = gguf.GGUFWriter(str(path), 'llama')
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model('gpt2')
    writer.add_token_list([f't{i}' for i in range(VOCAB)])
    writer.add_token_types([1] * VOCAB)
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_merges([])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    embed = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    shapes = {'output_norm.weight': (HIDDEN,), 'output.weight': (VOCAB, HIDDEN), 'blk.0.attn_norm.weight': (HIDDEN,),
              'blk.0.ffn_norm.weight': (HIDDEN,), 'blk.0.attn_q.weight': (HIDDEN, HIDDEN),
              'blk.0.attn_k.weight': (HIDDEN, HIDDEN), 'blk.0.attn_v.weight': (HIDDEN, HIDDEN),
              'blk.0.attn_output.weight': (HIDDEN, HIDDEN), 'blk.0.ffn_gate.weight': (FF, HIDDEN),
              'blk.0.ffn_up.weight': (FF, HIDDEN), 'blk.0.ffn_down.weight': (HIDDEN, FF)}
    writer.add_tensor('token_embd.weight', embed)
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    if extra is not None:
        extra(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return embed


def _new_version(path, rng) -> np.ndarray:
    """Rewrite ``path`` with fresh weights and a later modification time."""
    before = os.stat(path).st_mtime_ns
    embed = write_tiny_llama_gguf(path, rng)
    os.utime(path, ns=(before + 10**9, before + 10**9))
    return embed


def _embedding(hf_dir) -> np.ndarray:
    return load_file(os.path.join(hf_dir, 'model.safetensors'))['model.embed_tokens.weight']


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv('LMDEPLOY_JAX_CACHE', str(tmp_path / 'cache'))
    return tmp_path / 'cache' / 'gguf'


def test_a_new_version_replaces_the_files_earlier_conversions_only(cache, tmp_path, rng):
    path, other = tmp_path / 'a' / 'tiny.gguf', tmp_path / 'b' / 'tiny.gguf'
    path.parent.mkdir()
    other.parent.mkdir()
    write_tiny_llama_gguf(other, rng)                  # same name, another folder: another file
    other_dir = gguf_to_hf_dir(str(other))
    first_embed = write_tiny_llama_gguf(path, rng)
    first = gguf_to_hf_dir(str(path))
    assert os.path.dirname(first) == str(cache) and os.path.dirname(other_dir) == str(cache)
    np.testing.assert_array_equal(_embedding(first), first_embed)
    legacy = cache / f'tiny-{os.path.getsize(path)}-{os.stat(path).st_mtime_ns - 5}'   # the earlier naming
    unrelated = cache / 'tinyx-123-456'
    for folder in (legacy, unrelated):
        folder.mkdir()
        (folder / 'config.json').write_text('{}')

    second_embed = _new_version(path, rng)
    second = gguf_to_hf_dir(str(path))
    assert second != first and not os.path.exists(first) and not legacy.exists()
    np.testing.assert_array_equal(_embedding(second), second_embed)
    assert os.path.exists(os.path.join(other_dir, 'config.json')) and unrelated.exists()
    assert sorted(os.listdir(cache)) == sorted(os.path.basename(p) for p in (second, other_dir, unrelated))
    assert gguf_to_hf_dir(str(path)) == second          # the next start finds it


def test_abandoned_work_is_removed_and_work_in_progress_kept(cache, tmp_path, rng):
    path = tmp_path / 'tiny.gguf'
    write_tiny_llama_gguf(path, rng)
    dead, alive = conversion_cache.work_dir(str(path)), conversion_cache.work_dir(str(path))
    dead_elsewhere = cache / f'{conversion_cache.WORK_PREFIX}of-another-file'
    dead_elsewhere.mkdir()
    old = os.stat(dead).st_mtime - conversion_cache.ABANDONED_SECONDS - 60
    for folder in (dead, dead_elsewhere):
        os.utime(folder, (old, old))
    half_removed = cache / f'{conversion_cache.TRASH_PREFIX}x'
    half_removed.mkdir()
    done = gguf_to_hf_dir(str(path))
    assert not os.path.exists(dead) and not dead_elsewhere.exists() and not half_removed.exists()
    assert os.path.isdir(alive)
    assert sorted(os.listdir(cache)) == sorted(os.path.basename(p) for p in (done, alive))


def test_a_conversion_another_process_finished_first_is_kept(cache, tmp_path, rng):
    """Two processes converting one version: the second's rename finds the first's, drops its own."""
    path = tmp_path / 'tiny.gguf'
    embed = write_tiny_llama_gguf(path, rng)
    out_dir = gguf_to_hf_dir(str(path))
    late = conversion_cache.work_dir(str(path))
    open(os.path.join(late, 'config.json'), 'w').close()
    conversion_cache.publish(late, out_dir)
    assert not os.path.exists(late)
    np.testing.assert_array_equal(_embedding(out_dir), embed)
    conversion_cache.remove_replaced(str(path))       # a second remover finds nothing left to remove
    assert os.listdir(cache) == [os.path.basename(out_dir)]


def test_a_conversion_of_an_earlier_format_is_not_reused_but_replaced(cache, tmp_path, rng):
    """Earlier code read less of a file's metadata: its conversion of the very same file is redone."""
    path = tmp_path / 'tiny.gguf'
    embed = write_tiny_llama_gguf(path, rng)
    current = conversion_cache.conversion_dir(str(path))
    marker = f'-v{conversion_cache.FORMAT}-'
    earlier = [current.replace(marker, '-'), current.replace(marker, f'-v{conversion_cache.FORMAT - 1}-')]
    for folder in earlier:
        os.makedirs(folder)
        with open(os.path.join(folder, 'config.json'), 'w') as f:
            f.write('{}')
    assert gguf_to_hf_dir(str(path)) == current
    np.testing.assert_array_equal(_embedding(current), embed)
    assert os.listdir(cache) == [os.path.basename(current)]

"""The benchmark scripts run on a CPU (the same code measures the GPU): each as a user runs it,
in its own process on the default model or on small kernel shapes, and its ``RESULT`` lines
carry the figures it promises."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL_ENGINE = ['--max-batch-size', '4', '--session-len', '256', '--max-prefill-token-num', '64']


def run_benchmark(*args: str, timeout: int = 600, env: dict[str, str] | None = None) -> str:
    """What a benchmark script prints, run as a user runs it (``env``: added variables); it must succeed."""
    out = subprocess.run([sys.executable, *args], cwd=ROOT / 'benchmark', capture_output=True, text=True,
                         timeout=timeout, check=False, env={**os.environ, 'PYTHONPATH': str(ROOT), **(env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def run_script(*args: str, prefix: str = 'RESULT ', timeout: int = 600,
               env: dict[str, str] | None = None) -> list[dict]:
    """The JSON records a benchmark script prints (lines starting with ``prefix``)."""
    return [json.loads(line[line.index('{'):]) for line in run_benchmark(*args, timeout=timeout, env=env).splitlines()
            if line.startswith(prefix)]


def test_profile_throughput_reports_rates_latencies_and_engine_counters():
    (record,) = run_script('profile_throughput.py', '--num-prompts', '6', '--input-len', '20', '--output-len', '18',
                           '--warmup', '1', *SMALL_ENGINE)
    assert record['num_prompts'] == 6 and record['output_tok_per_s'] > 0 and record['startup_s'] > 0
    assert record['output_tok_per_s'] == pytest.approx(6 * 18 / record['seconds'], rel=0.02)
    assert set(record['ttft_ms']) == {'mean', 'p50', 'p99'} and record['tpot_ms']['p50'] > 0
    counters = record['engine_counters']
    assert counters['calls'] > 0 and 0 <= counters['chained_calls'] < counters['calls']
    assert counters['result_wait_s'] > 0


def test_profile_throughput_trace_names_the_host_threads_busiest_events(tmp_path):
    """On a CPU the trace has no device plane, so only the host part of the summary prints; a
    kept trace (``--trace DIR``) reads the same through ``trace_summary.py DIR``."""
    out = run_benchmark('profile_throughput.py', '--num-prompts', '2', '--input-len', '12', '--output-len', '4',
                        '--warmup', '0', '--trace', str(tmp_path), *SMALL_ENGINE)
    assert '-- host thread' in out and 'ThunkExecutor::Execute' in out
    assert json.loads(out[out.index('RESULT ') + 7:].splitlines()[0])['traced'] is True
    summary = run_benchmark('trace_summary.py', str(tmp_path), '--top', '40')
    assert '-- host thread' in summary and 'ThunkExecutor::Execute' in summary


def test_bench_allreduce_sums_across_devices_under_each_variant():
    """Two simulated CPU devices: every variant's all-reduces give the mean over devices plus the
    step count (the GPU-only XLA options are ignored here), and the timing fields are filled."""
    out = run_benchmark('bench_allreduce.py', '--tp', '2', '--sizes', '64', '8192', '--reps', '4', '--iters', '1',
                        '--variants', 'default', 'nccl_sync_graph',
                        env={'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
    records = [json.loads(line) for line in out.splitlines() if line.startswith('{')]
    assert [(r['size'], r['variant']) for r in records] == [(64, 'default'), (64, 'nccl_sync_graph'),
                                                            (8192, 'default'), (8192, 'nccl_sync_graph')]
    for r in records:
        assert 'failed' not in r, r
        assert r['rel_error'] < 0.02 and r['call_us'] > 0 and r['loop_only_us'] > 0


def test_profile_generation_reports_each_batch_and_length():
    """With the read bandwidth measured first: a decode step's KV bytes grow with the batch and with
    the mean keys a row attends over the decode (input_len + 1 .. input_len + 8: input_len + 4.5),
    and each record sets the bandwidth its bytes and decode rate imply against the measured one."""
    records = run_script('profile_generation.py', '--batch-sizes', '1', '3', '--input-lens', '16', '40',
                         '--output-len', '9', '--read-bandwidth', '--read-gib', '0.002', *SMALL_ENGINE)
    assert [(r['batch_size'], r['input_len']) for r in records] == [(1, 16), (3, 16), (1, 40), (3, 40)]
    kv = {(r['batch_size'], r['input_len']): r['step_kv_bytes'] for r in records}
    assert kv[3, 16] == pytest.approx(3 * kv[1, 16]) and kv[3, 40] == pytest.approx(3 * kv[1, 40])
    assert kv[1, 40] / kv[1, 16] == pytest.approx((40 + 4.5) / (16 + 4.5))
    for r in records:
        assert r['decode_tok_per_s_per_request'] > 0 and r['total_tok_per_s'] > 0
        assert r['first_token_ms']['p50'] > 0
        assert r['step_weight_bytes'] == records[0]['step_weight_bytes'] > 0
        assert r['step_read_bytes'] == pytest.approx(r['step_weight_bytes'] + r['step_kv_bytes'])
        assert r['implied_read_tbps'] == pytest.approx(r['step_read_bytes'] * r['decode_tok_per_s_per_request'] / 1e12)
        assert r['read_tbps'] > 0 and r['read_probe']['gib'] <= 0.002
        assert r['ratio_to_read_bandwidth'] == pytest.approx(r['implied_read_tbps'] / r['read_tbps'])


def test_bench_kernels_checks_and_times_every_op_in_interpret_mode():
    """Each case also has its rate over the read bandwidth measured first (``--read-gib`` sizes it)."""
    ops = ('decode', 'prefill', 'kv_write', 'decode_step', 'rms_norm', 'add_rms_norm')
    read, *records = run_script('bench_kernels.py', '--ops', *ops, '--impls', 'reference',
                                'pallas_interpret', '--batches', '2', '--contexts', '96', '--tokens', '5', '--heads',
                                '4', '--kv-heads', '2', '--head-dim', '32', '--block-size', '16', '--iters', '2',
                                '--calls', '2', '--no-copy', '--read-gib', '0.002', '--dtype', 'float32', prefix='{')
    assert read['op'] == 'read' and 0.99 * 0.002 * 2**30 < read['bytes'] <= 0.002 * 2**30
    assert read['tbps'] == max(r['tbps'] for r in read['reductions'].values()) > 0
    assert {(r['op'], r['impl']) for r in records} == {(op, impl) for op in ops
                                                      for impl in ('reference', 'pallas_interpret')}
    for r in records:
        assert 'failed' not in r, r
        assert r['time_us'] > 0 and (r['impl'] == 'reference' or r['rel_error'] < 1e-4)
        assert r['ratio_to_measured_read'] == pytest.approx(r['tbps'] / read['tbps'])


def test_read_bandwidth_sums_the_array_and_reports_its_fastest_reduction(rng):
    """Each reduction sums what it names; the bandwidth is the array's bytes over each one's time,
    the ceiling the fastest; an unknown reduction is refused by name."""
    import jax.numpy as jnp
    import numpy as np
    read_bandwidth = _benchmark_module('read_bandwidth')
    host = rng.standard_normal((16, read_bandwidth.COLUMNS)).astype(np.float32)
    x = jnp.asarray(host)
    for name, want in (('all', host.sum()), ('rows', host.sum(axis=1)), ('columns', host.sum(axis=0))):
        np.testing.assert_allclose(read_bandwidth.REDUCTIONS[name](x), want, rtol=1e-4, atol=1e-2)
    record = read_bandwidth.measure_read(x, calls=2, iters=2, warmup=1)
    rates = record['reductions']
    assert record['bytes'] == host.nbytes and set(rates) == set(read_bandwidth.REDUCTIONS)
    assert record['tbps'] == rates[record['reduction']]['tbps'] == max(r['tbps'] for r in rates.values())
    for r in rates.values():
        assert r['tbps'] == pytest.approx(host.nbytes / (r['time_us'] * 1e6))
    with pytest.raises(ValueError, match='cubes'):
        read_bandwidth.measure_read(x, reductions=('cubes',))


def test_trace_summary_counts_busy_time_and_attributes_idle_gaps():
    """``device_gaps`` on a hand-made trace: overlapping kernels on two streams count once, a gap
    of at least ``min_gap_us`` is attributed to the modules around it (a kernel without one by its
    name), shorter ones are summed."""
    sys.path.insert(0, str(ROOT / 'benchmark'))
    import trace_summary
    from types import SimpleNamespace as NS

    def kernel(start_ms, length_ms, module):
        return NS(name='graph_kernel', start_ns=int(start_ms * 1e6), duration_ns=int(length_ms * 1e6),
                  stats=[('hlo_module', module)] if module else [])
    stream_a = [kernel(0, 10, 'decode'), kernel(11, 4, 'decode'), kernel(40, 10, 'prefill')]
    stream_b = [kernel(2, 6, 'decode'), kernel(100, 1, '')]            # inside the first kernel
    data = NS(planes=[NS(name='/device:GPU:0', lines=[NS(name='Stream #1', events=stream_a),
                                                      NS(name='Stream #2', events=stream_b)]),
                      NS(name='/host:CPU', lines=[])])
    gaps = trace_summary.device_gaps(data, min_gap_us=2000)
    # busy [0, 10], [11, 15], [40, 50], [100, 101]: 25 ms of a 101 ms span
    assert (gaps['span_ms'], gaps['busy_ms'], gaps['idle_ms']) == (101.0, 25.0, 76.0)
    assert gaps['gaps'] == {'prefill -> graph_kernel': [1, 50.0], 'decode -> prefill': [1, 25.0]}
    assert gaps['small_gaps_ms'] == 1.0                     # [10, 11]: under min_gap_us
    assert trace_summary.device_gaps(NS(planes=[])) == {}
    around = trace_summary.around_a_gap(data, min_gap_us=20000, context=1)   # the second of two: [50, 100]
    assert (around['gaps'], around['gap_us']) == (2, 50000.0)
    assert around['kernels'] == [(-10000.0, 10000.0, 'Stream #1', 'graph_kernel'),
                                 (50000.0, 1000.0, 'Stream #2', 'graph_kernel')]


def test_compare_results_by_tp_sets_each_size_against_tp1_of_the_same_model(tmp_path):
    """The summary ``run_tensor_parallel.sh`` prints: ratios to tp=1 of the same model only, an
    expert-parallel line apart from the same tp's."""
    def line(model, tp, bench, value, ep=1):
        record = dict(engine='lmdeploy_jax-turbomind', bench=bench, model=model, tp=tp, ep=ep)
        if bench == 'throughput':
            record['output_tok_per_s'] = value
        else:
            record.update(batch_size=1, decode_tok_per_s_per_request=value)
        return 'RESULT ' + json.dumps(record)
    log = tmp_path / 'run.log'
    log.write_text('\n'.join(['noise', line('/m', 1, 'throughput', 100.0), line('/m', 1, 'generation', 10.0),
                              line('/m', 2, 'throughput', 150.0), line('/m', 2, 'generation', 16.0),
                              line('/m', 2, 'throughput', 180.0, ep=2), line('/big', 4, 'throughput', 70.0)]) + '\n')
    out = run_benchmark('compare_results.py', '--by-tp', str(log)).splitlines()
    assert out == ['/big tp=4: throughput 70.0 tok/s, batch1 None tok/s',
                   '/m tp=1: throughput 100.0 tok/s, batch1 10.0 tok/s',
                   '/m tp=2: throughput 150.0 tok/s (1.50 x tp=1), batch1 16.0 tok/s (1.60 x tp=1)',
                   '/m tp=2 ep=2: throughput 180.0 tok/s (1.80 x tp=1), batch1 None tok/s']


def test_executable_report_counts_the_thunk_kinds_of_a_dumped_thunk_sequence():
    """On a synthetic thunk-sequence dump (a CPU compiles no thunks): each kind counted."""
    sys.path.insert(0, str(ROOT / 'benchmark'))
    from executable_report import thunk_kinds
    sequence = '\n'.join(['000: kWhile  while.36', '  000: kCommandBuffer  command_buffer',
                          '  001: kCollectiveKernel  all-reduce.1', '  002: kAsyncStart  all-reduce-start',
                          '  003: kCommandBuffer  command_buffer.1', '001: kAllGather  all-gather'])
    assert thunk_kinds(sequence) == {'kCommandBuffer': 2, 'kWhile': 1, 'kCollectiveKernel': 1, 'kAsyncStart': 1,
                                     'kAllGather': 1}


def test_executable_report_shows_the_options_each_executable_was_compiled_with():
    """tp=3 over 3 simulated CPU devices (the default model's 9 heads): every executable was
    compiled with its own options (``engine/xla_flags.py``, read back from XLA's dump of each
    module), the small-batch decode ones with the command-buffer options too."""
    from lmdeploy_jax.engine.xla_flags import GPU_STEP_OPTIONS, SMALL_BATCH_TP_OPTIONS, SMALL_DECODE_ROWS
    records = run_script('executable_report.py', '--tp', '3', '--max-batch-size', '8', '--session-len', '256',
                         '--max-prefill-token-num', '64', '--batch-1-tokens', '5',
                         env={'XLA_FLAGS': '--xla_force_host_platform_device_count=3'})
    (timed,) = [r for r in records if r['bench'] == 'generation']
    assert timed['output_len'] == 5 and timed['decode_tok_per_s_per_request'] > 0
    records.remove(timed)
    assert {(r['kind'], r['rows']) for r in records} >= {('prefill', 1), ('decode', 1), ('greedy_decode', 8)}
    for r in records:
        assert r['module'] is not None and r['thunks'] == {} and r['all_reduces'] > 0, r
        assert r['xla_options']['xla_gpu_enable_dynamic_slice_fusion'] == 'true'
        small = r['kind'] != 'prefill' and r['rows'] <= SMALL_DECODE_ROWS
        assert set(r['options']) == set(GPU_STEP_OPTIONS) | (set(SMALL_BATCH_TP_OPTIONS) if small else set()), r
        applied = r['xla_options'].get('xla_gpu_disable_async_collectives', '')
        assert sorted(applied.split(',')) == (['ALLGATHER', 'ALLREDUCE'] if small else ['']), r
        assert ('COLLECTIVES' in r['xla_options'].get('xla_gpu_enable_command_buffer', '')) == small, r


def _benchmark_module(name: str):
    sys.path.insert(0, str(ROOT / 'benchmark'))
    return __import__(name)


def test_workloads_are_deterministic_and_sharegpt_lengths_follow_the_published_means():
    """``make_requests``: the same generator seed gives the same requests (every engine sees the same
    prompts), another seed others; the fixed workload has exactly its lengths; the ShareGPT one draws
    lengths inside vLLM's filter range whose means are the published ones, spread (not constant)."""
    import numpy as np
    bench_common = _benchmark_module('bench_common')
    seed = int(np.random.default_rng().integers(1 << 30))

    def requests(s, **kw):
        return bench_common.make_requests(np.random.default_rng(s), 8003, 3000, **kw)
    sharegpt = requests(seed, workload='sharegpt')
    assert sharegpt == requests(seed, workload='sharegpt') and sharegpt != requests(seed + 1, workload='sharegpt')
    inputs = np.array([len(ids) for ids, _ in sharegpt])
    outputs = np.array([n for _, n in sharegpt])
    low, high = bench_common.SHAREGPT_RANGE
    for lengths, mean in ((inputs, bench_common.SHAREGPT_INPUT_MEAN), (outputs, bench_common.SHAREGPT_OUTPUT_MEAN)):
        assert lengths.min() >= low and lengths.max() <= high
        assert abs(lengths.mean() - mean) < 0.06 * mean, (lengths.mean(), mean)
        assert lengths.std() > 0.5 * mean and np.median(lengths) < mean      # log-normal: right-skewed
    ids = np.concatenate([ids for ids, _ in sharegpt])
    assert ids.min() >= 16 and ids.max() < 8003
    fixed = requests(seed, workload='fixed', input_len=37, output_len=11)
    assert {(len(ids), n) for ids, n in fixed} == {(37, 11)}
    with pytest.raises(ValueError, match='workload'):
        requests(seed, workload='burst')


def test_poisson_schedule_has_exponential_gaps_at_the_rate():
    """Arrival times start at 0, grow, and their gaps have the rate's mean and an exponential's
    spread (coefficient of variation 1); same seed, same schedule; an infinite rate sends all at once."""
    import numpy as np
    api = _benchmark_module('profile_restful_api')
    seed = int(np.random.default_rng().integers(1 << 30))
    times = np.array(api.poisson_schedule(20000, 40.0, seed))
    gaps = np.diff(times)
    assert times[0] == 0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 40.0, rel=0.03) and gaps.std() / gaps.mean() == pytest.approx(1, rel=0.05)
    assert api.poisson_schedule(50, 3.0, seed) == api.poisson_schedule(50, 3.0, seed)
    assert api.poisson_schedule(50, 3.0, seed) != api.poisson_schedule(50, 3.0, seed + 1)
    assert api.poisson_schedule(4, float('inf'), seed) == [0.0] * 4
    with pytest.raises(ValueError, match='rate'):
        api.poisson_schedule(4, 0.0, seed)



def test_throughput_refuses_lengths_with_the_sharegpt_workload():
    """The ShareGPT workload draws its own lengths: an explicit length flag is an error, not ignored."""
    out = subprocess.run([sys.executable, 'profile_throughput.py', '--workload', 'sharegpt', '--input-len', '64'],
                         cwd=ROOT / 'benchmark', capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode != 0 and '--input-len: not with --workload sharegpt' in out.stderr


def test_compare_results_sets_ours_against_each_peer_per_workload_and_rate(tmp_path):
    """``run_vs_peers.sh``'s summary over the logs of its calls: each peer's throughput per workload and
    batch 1, and the serving lines' p99 latencies per request rate with our ratio to vLLM's."""
    def line(engine, bench, value, **fields):
        return 'RESULT ' + json.dumps(dict(engine=engine, bench=bench, output_tok_per_s=value, startup_s=1.0,
                                           **fields))
    def serving(engine, rate, ttft, tpot):
        return 'SERVING ' + json.dumps(dict(engine=engine, request_rate=rate, ttft_ms={'p99': ttft},
                                            tpot_ms={'p99': tpot}, output_throughput=10.0, failed=0))
    vllm_log, log = tmp_path / 'vllm.log', tmp_path / 'run.log'      # two calls' logs
    vllm_log.write_text('\n'.join([
        line('vllm-0.26.0', 'throughput', 200.0, workload='fixed'), line('vllm-0.26.0', 'batch1', 100.0),
        line('vllm-0.26.0', 'throughput', 50.0, workload='sharegpt')]) + '\n')
    log.write_text('\n'.join([
        line('lmdeploy-0.18.0-pytorch', 'throughput', 100.0),
        line('lmdeploy_jax-turbomind', 'throughput', 150.0, workload='fixed'),
        line('lmdeploy_jax-turbomind', 'generation', None, batch_size=1, total_tok_per_s=90.0),
        line('lmdeploy_jax-turbomind', 'throughput', 60.0, workload='sharegpt'),
        serving('vllm', 4.0, 100.0, 20.0), serving('lmdeploy_jax', 4.0, 50.0, 30.0)]) + '\n')
    assert run_benchmark('compare_results.py', str(vllm_log), str(log)).splitlines() == [
        'throughput ours 150.0 tok/s, LMDeploy 100.0 tok/s, ratio 1.500',
        '           start-up ours 1.0 s, LMDeploy 1.0 s',
        'throughput ours 150.0 tok/s, vLLM 200.0 tok/s, ratio 0.750',
        '           start-up ours 1.0 s, vLLM 1.0 s',
        'throughput-sharegpt ours 60.0 tok/s, LMDeploy None tok/s, ratio n/a',
        'throughput-sharegpt ours 60.0 tok/s, vLLM 50.0 tok/s, ratio 1.200',
        'batch1     ours 90.0 tok/s, LMDeploy None tok/s, ratio n/a',
        'batch1     ours 90.0 tok/s, vLLM 100.0 tok/s, ratio 0.900']
    assert run_benchmark('compare_results.py', '--serving', str(log)).splitlines() == [
        'rate 4.0 req/s: lmdeploy_jax TTFT p99 50.0 ms, TPOT p99 30.0 ms, 10.0 tok/s, 0 failed; '
        'vllm TTFT p99 100.0 ms, TPOT p99 20.0 ms, 10.0 tok/s, 0 failed; ours / vLLM: TTFT p99 0.50 x, TPOT p99 1.50 x']

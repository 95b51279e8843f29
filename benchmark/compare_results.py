#!/usr/bin/env python3
"""Pair our ``RESULT`` lines with each peer engine's (LMDeploy, vLLM) from one or more logs (the
calls of one warm machine) and print the ratios (ours / theirs), per workload;
with ``--by-tp``, our lines of each tensor-parallel size (and expert split) against tp=1 of the same log; with
``--by-quant``, our throughput lines of each KV ``quant_policy`` against quant_policy=0; with
``--serving``, the serving benchmark's p99 latencies per request rate, ours against vLLM's."""
from __future__ import annotations

import json
import sys


def load(*paths: str, prefix: str = 'RESULT ') -> list[dict]:
    """The JSON records of the lines starting with ``prefix`` in the logs, in order."""
    records = []
    for path in paths:
        with open(path) as f:
            records += [json.loads(line.split(prefix, 1)[1]) for line in f if line.startswith(prefix)]
    return records


PEERS = (('lmdeploy-', 'LMDeploy'), ('vllm-', 'vLLM'))


def _key(record: dict) -> str:
    """The measurement a record belongs to: 'throughput' (fixed lengths), 'throughput-<workload>' or 'batch1'."""
    if record['bench'] == 'generation' and record.get('batch_size') == 1:
        return 'batch1'
    workload = record.get('workload', 'fixed')
    return record['bench'] if workload == 'fixed' else f"{record['bench']}-{workload}"


def main(*paths: str) -> None:
    """Our figure against each peer engine of the logs (LMDeploy where none is), per measurement."""
    records = load(*paths)
    ours = {_key(r): r for r in records if r['engine'].startswith('lmdeploy_jax')}
    peers = {label: {_key(r): r for r in records if r['engine'].startswith(prefix)} for prefix, label in PEERS}
    present = [label for label in peers if peers[label]] or ['LMDeploy']
    benches = [b for b in ('throughput', 'throughput-sharegpt', 'batch1')
               if b in ours or any(b in peers[label] for label in present)]
    for bench in benches:
        a = ours.get(bench)
        # batch 1: whole-request tokens over whole-request time, as the peers' scripts count it
        ours_value = a and a['total_tok_per_s' if bench == 'batch1' else 'output_tok_per_s']
        for label in present:
            b = peers[label].get(bench)
            peer_value = b and b['output_tok_per_s']
            ratio = f'{ours_value / peer_value:.3f}' if ours_value and peer_value else 'n/a'
            print(f'{bench:10s} ours {ours_value} tok/s, {label} {peer_value} tok/s, ratio {ratio}')
            if bench == 'throughput' and a and b:
                print(f'{"":10s} start-up ours {a["startup_s"]} s, {label} {b["startup_s"]} s')


def serving(*paths: str) -> None:
    """The serving lines (``SERVING {json}``, profile_restful_api.py's, with ``--engine``): per request
    rate, each engine's p99 TTFT and TPOT and our ratio to vLLM's (lower is better: under 1 we are ahead)."""
    table = {}
    for r in load(*paths, prefix='SERVING '):
        table.setdefault(r['request_rate'], {})[r['engine']] = r
    for rate, engines in sorted(table.items(), key=lambda item: float('inf') if item[0] is None else item[0]):
        cells = [f"{name} TTFT p99 {r['ttft_ms'].get('p99')} ms, TPOT p99 {r['tpot_ms'].get('p99')} ms, "
                 f"{r['output_throughput']} tok/s, {r['failed']} failed" for name, r in sorted(engines.items())]
        ours, peer = engines.get('lmdeploy_jax'), engines.get('vllm')
        if ours and peer and ours['ttft_ms'] and peer['ttft_ms'] and ours['tpot_ms'] and peer['tpot_ms']:
            cells.append(f"ours / vLLM: TTFT p99 {ours['ttft_ms']['p99'] / peer['ttft_ms']['p99']:.2f} x, "
                         f"TPOT p99 {ours['tpot_ms']['p99'] / peer['tpot_ms']['p99']:.2f} x")
        print(f'rate {rate} req/s: ' + '; '.join(cells))


def by_tp(path: str) -> None:
    """Per model, tp and ep: throughput and batch-1 tok/s, and their ratio to the same model at tp=1
    (an ep=tp line is labelled with its ep: the same tp with the experts split whole)."""
    table = {}
    for r in load(path):
        if not r['engine'].startswith('lmdeploy_jax'):
            continue
        key = (r['model'], r['tp'], r.get('ep', 1))
        if r['bench'] == 'throughput':
            table.setdefault(key, {})['throughput'] = r['output_tok_per_s']
        elif r['bench'] == 'generation' and r.get('batch_size') == 1:
            table.setdefault(key, {})['batch1'] = r['decode_tok_per_s_per_request']
    for (model, tp, ep), values in sorted(table.items()):
        base = table.get((model, 1, 1), {})
        cells = []
        for bench in ('throughput', 'batch1'):
            value, ref = values.get(bench), base.get(bench)
            ratio = f' ({value / ref:.2f} x tp=1)' if value and ref and tp != 1 else ''
            cells.append(f'{bench} {value} tok/s{ratio}')
        print(f'{model} tp={tp}' + (f' ep={ep}' if ep != 1 else '') + ': ' + ', '.join(cells))


def by_quant(path: str) -> None:
    """Per model: each quant_policy's throughput and KV pool tokens against quant_policy=0 of the same log."""
    table = {(r['model'], r.get('quant_policy', 0)): r for r in load(path)
             if r['engine'].startswith('lmdeploy_jax') and r['bench'] == 'throughput'}
    for (model, policy), r in sorted(table.items()):
        base = table.get((model, 0))
        value, tokens = r['output_tok_per_s'], r.get('kv_pool_tokens')
        ratio = (f' ({value / base["output_tok_per_s"]:.2f} x, pool {tokens / base["kv_pool_tokens"]:.2f} x '
                 'quant_policy=0)' if base and policy and tokens and base.get('kv_pool_tokens') else '')
        print(f'{model} quant_policy={policy}: throughput {value} tok/s, KV pool {tokens} tokens{ratio}')


if __name__ == '__main__':
    if sys.argv[1] == '--serving':
        serving(*sys.argv[2:])
    elif sys.argv[1] == '--by-tp':
        by_tp(sys.argv[2])
    elif sys.argv[1] == '--by-quant':
        by_quant(sys.argv[2])
    else:
        main(*sys.argv[1:])

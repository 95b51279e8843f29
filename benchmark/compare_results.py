#!/usr/bin/env python3
"""Pair LMDeploy's and our ``RESULT`` lines from one log and print the ratios (ours / theirs)."""
from __future__ import annotations

import json
import sys


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line.split('RESULT ', 1)[1]) for line in f if line.startswith('RESULT ')]


def main(path: str) -> None:
    records = load(path)
    peer = {r['bench']: r for r in records if r['engine'].startswith('lmdeploy-')}
    ours = {('batch1' if r['bench'] == 'generation' and r.get('batch_size') == 1 else r['bench']): r
            for r in records if r['engine'].startswith('lmdeploy_jax')}
    for bench in ('throughput', 'batch1'):
        a, b = ours.get(bench), peer.get(bench)
        # batch 1: whole-request tokens over whole-request time, as lmdeploy_bench.py counts it
        ours_value = a and a['output_tok_per_s' if bench == 'throughput' else 'total_tok_per_s']
        peer_value = b and b['output_tok_per_s']
        ratio = f'{ours_value / peer_value:.3f}' if ours_value and peer_value else 'n/a'
        print(f'{bench:10s} ours {ours_value} tok/s, LMDeploy {peer_value} tok/s, ratio {ratio}')
        if bench == 'throughput' and a and b:
            print(f'{"":10s} start-up ours {a["startup_s"]} s, LMDeploy {b["startup_s"]} s')


if __name__ == '__main__':
    main(sys.argv[1])

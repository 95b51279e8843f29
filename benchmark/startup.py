"""Start-up of the JAX engine from a Hugging Face directory and from its engine checkpoint
(``lmdeploy_jax convert``), cold (an empty compilation cache) and warm (the cache the cold start
filled), each in a fresh process: the seconds from launching the process to the first generated
token ("ready to serve"), and inside it the seconds of ``pipeline()`` (load + compile).

    python benchmark/startup.py /tmp/llama3-8b [--converted /tmp/llama3-8b-engine] [--tp 1]

The engine checkpoint is written first when ``--converted`` does not exist (its time printed). One
``RESULT {json}`` line per (source, cold|warm), then a summary table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(model: str, cache: str, tp: int, session_len: int) -> None:
    """In the timed process: build the pipeline, answer one token, print the phases' seconds."""
    start = time.perf_counter()
    from lmdeploy_jax import GenerationConfig, TurbomindEngineConfig, pipeline
    imported = time.perf_counter()
    pipe = pipeline(model, backend_config=TurbomindEngineConfig(tp=tp, session_len=session_len,
                                                                compilation_cache_dir=cache))
    built = time.perf_counter()
    [response] = pipe(['w16 w17 w18 w19'], gen_config=GenerationConfig(max_new_tokens=1), do_preprocess=False)
    answered = time.perf_counter()
    assert response.generate_token_len == 1, response
    print('CHILD ' + json.dumps(dict(import_s=imported - start, pipeline_s=built - imported,
                                     first_token_s=answered - built, answered_at=time.time())), flush=True)
    pipe.close()


def timed_start(model: str, cache: str, tp: int, session_len: int) -> dict:
    launched = time.time()
    proc = subprocess.run([sys.executable, __file__, model, '--child', '--cache', cache, '--tp', str(tp),
                           '--session-len', str(session_len)], capture_output=True, text=True,
                          env={**os.environ, 'PYTHONPATH': os.path.dirname(HERE)})
    if proc.returncode:
        raise SystemExit(f'start-up of {model} failed:\n{proc.stderr[-4000:]}')
    line = next(x for x in proc.stdout.splitlines() if x.startswith('CHILD '))
    phases = json.loads(line[len('CHILD '):])
    ready = phases.pop('answered_at') - launched        # launch to first token (the interpreter's start too)
    return dict(ready_s=round(ready, 2), **{k: round(v, 2) for k, v in phases.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model_path', help='Hugging Face directory')
    parser.add_argument('--converted', default=None, help='its engine checkpoint (default: MODEL_PATH-engine)')
    parser.add_argument('--tp', type=int, default=1)
    parser.add_argument('--session-len', type=int, default=4096)
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--cache', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.model_path, args.cache, args.tp, args.session_len)
    converted = args.converted or args.model_path.rstrip('/') + '-engine'
    if not os.path.exists(converted):
        start = time.perf_counter()
        subprocess.run([sys.executable, '-m', 'lmdeploy_jax.cli.main', 'convert', args.model_path,
                        '--dst-path', converted], check=True, env={**os.environ, 'PYTHONPATH': os.path.dirname(HERE)})
        print(f'convert: {time.perf_counter() - start:.1f} s -> {converted}', flush=True)
    rows = []
    for label, model in (('hf', args.model_path), ('converted', converted)):
        cache = tempfile.mkdtemp(prefix=f'startup-cache-{label}-')
        for phase in ('cold', 'warm'):
            result = dict(source=label, phase=phase, tp=args.tp, **timed_start(model, cache, args.tp, args.session_len))
            print('RESULT ' + json.dumps(result), flush=True)
            rows.append(result)
        shutil.rmtree(cache, ignore_errors=True)
    print(f"{'source':10s} {'phase':5s} {'ready s':>8s} {'import':>7s} {'pipeline':>9s} {'1st tok':>8s}")
    for r in rows:
        print(f"{r['source']:10s} {r['phase']:5s} {r['ready_s']:8.1f} {r['import_s']:7.1f} {r['pipeline_s']:9.1f} "
              f"{r['first_token_s']:8.2f}")


if __name__ == '__main__':
    main()

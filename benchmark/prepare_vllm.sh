#!/usr/bin/env bash
# vLLM and the packages the GPU image lacks for it, downloaded here and cut into chunks that one
# device call each can carry (a call carries at most 64 MiB, working tree included).
#
#     bash benchmark/prepare_vllm.sh            # -> .vllm/chunks/01 .. NN (keep .vllm out of git)
#     IMAGE_FREEZE=freeze.txt bash benchmark/prepare_vllm.sh   # the image's `pip freeze` (step 1 of
#                                               # vllm_carry_step.sh writes it to $OUT): exact versions
# Then, in consecutive device calls (the machine stays warm about 30 s between calls), call N
# carries `.vllm/chunks/NN` and runs `bash benchmark/vllm_carry_step.sh N`; the last call installs.
#
# The set carried is pip's own resolution of vllm's requirements, with the image's torch family
# standing in as stubs (their CUDA dependencies are on the image), minus every package the image
# already has, minus OPTIONAL: kernel and media packages vLLM imports only for paths a bf16 Llama on
# Hopper does not take (MLA, CuTe-DSL and TileLang kernels, FlashInfer, video/audio decoding), and
# minus three files of the vllm wheel: FlashAttention 2's library (vLLM uses FlashAttention 3 on
# Hopper and imports FA2 under a try), the MoE kernels' library (imported under a try; dense models
# call none of its ops) and the Rust frontend binary (used only with VLLM_USE_RUST_FRONTEND=1).
# Without FlashInfer, vLLM needs VLLM_USE_FLASHINFER_SAMPLER=0 (run_vs_peers.sh sets it).
# VLLM_FULL=1 keeps all of them (MoE models need it).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${VLLM_VERSION:-0.26.0}
chunk_mib=${CHUNK_MIB:-60}
root=.vllm
rm -rf "$root/stubs" "$root/wheels" "$root/chunks" "$root/resolve"
mkdir -p "$root/dl" "$root/stubs" "$root/wheels" "$root/chunks" "$root/resolve"
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_26_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64
      --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux1_x86_64
      --platform linux_x86_64 --platform any)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$root/dl" "vllm==$version"

# The GPU image's packages (KINDS.md's list, versions where it gives them); IMAGE_FREEZE replaces it.
image_packages='absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet
filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub==1.33.0 humanize hypothesis idna imageio iniconfig interface-meta jax==0.11.2 jax-cuda13-pjrt
jax-cuda13-plugin jaxlib==0.11.2 jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py
mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda
numpy==2.5.2 numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors==0.8.0 scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece==0.2.2
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken==0.14.0 timm tokenizers==0.23.2
toolz torch==2.11.0 torchaudio==2.11.0 torchdiffeq torch-geometric torchmetrics torchvision==0.26.0 tqdm
transformers==5.17.0 treescope triton==3.6.0 typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp'
if [ -n "${IMAGE_FREEZE:-}" ]; then
    image_packages=$(grep -E '^[A-Za-z0-9_.-]+==' "$IMAGE_FREEZE" | tr '\n' ' ')
fi
optional='flashinfer-python flashinfer-cubin tilelang z3-solver tokenspeed-mla tokenspeed-triton quack-kernels
humming-kernels nvidia-cutlass-dsl nvidia-cutlass-dsl-libs-base nvidia-cutlass-dsl-libs-core
nvidia-cutlass-dsl-libs-cu12 nvidia-cutlass-dsl-libs-cu13 nvidia-nvvm nvidia-cuda-nvcc nvidia-cuda-crt
nvidia-cuda-nvdisasm nvidia-cuda-cccl nvidia-cudnn-frontend cuda-tile cuda-python torch-c-dlpack-ext
pynvvideocodec torchcodec'
[ -n "${VLLM_FULL:-}" ] && optional=''

# Stubs (no files, no requirements) of the image's torch family, so that pip resolves the rest
# without fetching CUDA wheels the image already holds; '+image' sorts above the index's build.
python3 - "$root/stubs" <<'EOF'
import sys, zipfile
for name, version in [('torch', '2.11.0'), ('torchaudio', '2.11.0'), ('torchvision', '0.26.0'), ('triton', '3.6.0')]:
    info = f'{name}-{version}+image.dist-info'
    with zipfile.ZipFile(f'{sys.argv[1]}/{name}-{version}+image-py3-none-any.whl', 'w') as z:
        z.writestr(f'{info}/METADATA', f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}+image\n')
        z.writestr(f'{info}/WHEEL', 'Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n')
        z.writestr(f'{info}/RECORD', '')
EOF
python3 -m pip install -q --dry-run --ignore-installed --report "$root/resolve/report.json" "${plat[@]}" \
    --target "$root/resolve/target" --find-links "$root/stubs" --find-links "$root/dl" "vllm==$version"

# The carry set: resolved packages the image lacks (or holds at a version the resolution refuses).
python3 - "$root/resolve/report.json" "$image_packages" "$optional" > "$root/resolve/carry.txt" <<'EOF'
import json, re, sys
from packaging.version import Version
def norm(name):
    return re.sub(r'[-_.]+', '-', name).lower()
image = {}
for item in sys.argv[2].split():
    name, _, version = item.partition('==')
    image[norm(name)] = version or None
optional = {norm(n) for n in sys.argv[3].split()}
for item in json.load(open(sys.argv[1]))['install']:
    name, version = norm(item['metadata']['name']), item['metadata']['version']
    if name in optional or '+image' in version:
        continue
    if name in image:
        if image[name] and Version(image[name]) != Version(version):
            print(f'kept the image\'s {name} {image[name]} (resolved {version})', file=sys.stderr)
        continue
    print(f'{name}=={version}')
EOF
python3 -m pip download -q --no-deps "${plat[@]}" --find-links "$root/dl" -d "$root/wheels" -r "$root/resolve/carry.txt"

if [ -z "${VLLM_FULL:-}" ]; then   # the unused libraries (above) out of the vllm wheel and its RECORD
    whl=$(ls "$root"/wheels/vllm-"$version"-*.whl)
    unused=(vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/_moe_C_stable_libtorch.abi3.so vllm/vllm-rs)
    zip -q -d "$whl" "${unused[@]}"
    tmp=$(mktemp -d)
    record=vllm-$version.dist-info/RECORD
    (cd "$tmp" && unzip -q "$OLDPWD/$whl" "$record" && grep -vF -e "${unused[0]}," -e "${unused[1]}," \
        -e "${unused[2]}," "$record" > RECORD.kept && mv RECORD.kept "$record" && zip -q "$OLDPWD/$whl" "$record")
    rm -rf "$tmp"
fi

# One tar of the wheels, split into chunk directories NN/part, each with the sums of every part and
# of the whole tar (SHA256SUMS) and the chunk count (COUNT).
tar -cf "$root/vllm-wheels.tar" -C "$root/wheels" .
(cd "$root/chunks" && split -d -a 2 --numeric-suffixes=1 -b "${chunk_mib}M" ../vllm-wheels.tar part.)
count=$(ls "$root/chunks" | wc -l)
(cd "$root/chunks" && sha256sum part.* && cd .. && sha256sum vllm-wheels.tar) > "$root/SHA256SUMS"
for part in "$root"/chunks/part.*; do
    n=${part##*.}
    mkdir "$root/chunks/$n"
    mv "$part" "$root/chunks/$n/part"
    cp "$root/SHA256SUMS" "$root/chunks/$n/SHA256SUMS"
    echo "$count" > "$root/chunks/$n/COUNT"
done
rm "$root/vllm-wheels.tar"
echo "$(wc -l < "$root/resolve/carry.txt") wheels, $(du -cb "$root"/wheels/*.whl | tail -1 | cut -f1) bytes," \
     "$count chunks of at most $chunk_mib MiB under $root/chunks (carry .vllm/chunks/NN in call N)"

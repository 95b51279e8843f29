#!/usr/bin/env bash
# One device call of the vLLM carry (benchmark/prepare_vllm.sh made the chunks): call N carries
# `.vllm/chunks/NN` and runs
#     bash benchmark/vllm_carry_step.sh N
# It checks the chunk's sum and keeps it in /tmp/vllm-parts; the call of the last chunk checks
# every part and the whole tar, unpacks the wheels and installs them, without their requirements
# (the carry set is already resolved), into /tmp/vllm-site, lists the carried packages' requirements
# the image does not meet, then imports vLLM's offline and server entry points with
# PYTHONPATH=/tmp/vllm-site. The calls must follow each other while the machine
# is warm (about 30 s): /tmp is gone with it. Step 1 also writes the image's `pip freeze` to
# $OUT/image_freeze.txt (prepare_vllm.sh's IMAGE_FREEZE).
set -euo pipefail
cd "$(dirname "$0")/.."
n=$(printf '%02d' "${1:?usage: vllm_carry_step.sh N}")
chunk=.vllm/chunks/$n
parts=/tmp/vllm-parts
[ -f "$chunk/part" ] || { echo "no $chunk/part: carry .vllm/chunks/$n in this call" >&2; exit 2; }
mkdir -p "$parts"
cp "$chunk/SHA256SUMS" "$chunk/COUNT" "$parts/"
cp "$chunk/part" "$parts/part.$n"
(cd "$parts" && grep " part.$n\$" SHA256SUMS | sha256sum -c --quiet) || { echo "chunk $n: bad sum" >&2; exit 1; }
count=$(cat "$parts/COUNT")
[ "$n" = 01 ] && [ -n "${OUT:-}" ] && python3 -m pip freeze > "$OUT/image_freeze.txt"
if [ "$((10#$n))" -lt "$count" ]; then
    echo "chunk $n of $count kept in $parts ($(du -cb "$parts"/part.* | tail -1 | cut -f1) bytes so far)"
    exit 0
fi
cd "$parts"
for i in $(seq -f '%02g' 1 "$count"); do
    [ -f "part.$i" ] || { echo "part $i missing: the machine was not kept warm between calls" >&2; exit 1; }
done
grep ' part\.' SHA256SUMS | sha256sum -c --quiet
cat part.* > vllm-wheels.tar
grep ' vllm-wheels.tar$' SHA256SUMS | sha256sum -c --quiet
rm -rf wheels /tmp/vllm-site && mkdir wheels && tar -xf vllm-wheels.tar -C wheels && rm vllm-wheels.tar part.*
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/vllm-site wheels/*.whl
# Requirements of the carried packages that the image meets at another version or not at all (the
# optional ones prepare_vllm.sh leaves out among them): leads when an import below fails.
PYTHONPATH=/tmp/vllm-site python3 -c "
import importlib.metadata as md
from packaging.requirements import Requirement
for dist in md.distributions(path=['/tmp/vllm-site']):
    for req in map(Requirement, dist.requires or []):
        if req.marker and not req.marker.evaluate({'extra': ''}):
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            version = None
        if version is None or not req.specifier.contains(version, prereleases=True):
            print(f'unmet: {dist.metadata[\"Name\"]} needs {req}, found {version}')
" | sort -u || echo '(the requirement check did not run)'
PYTHONPATH=/tmp/vllm-site python3 -c "
import vllm, vllm.entrypoints.llm, vllm.entrypoints.openai.api_server
print('vllm', vllm.__version__, 'installed in /tmp/vllm-site')"

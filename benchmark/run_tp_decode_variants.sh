#!/usr/bin/env bash
# Small-batch tensor-parallel decode under several XLA settings, one run on one multi-GPU machine:
# for each variant, what XLA built (thunk kinds and options in effect of every decode executable,
# executable_report.py) and the batch-1 decode speed. tp=1 first, for the ratio.
#
# On the GPU machine (device tool, carry .peer):
#   bash benchmark/run_tp_decode_variants.sh [SHAPE]          # TP=2 (default), VARIANTS="engine nccl ..."
# A variant is a name below; each sets XLA_FLAGS (process-wide) and/or LMDEPLOY_JAX_* variables.
source "$(dirname "$0")/device_workload.sh" run_tp_decode_variants "$@"
export PYTHONPATH=$PWD
NCCL="XLA_FLAGS=${XLA_FLAGS:-} --xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false"
CB_WITHOUT_COLLECTIVES='"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION"'
SYNC='"xla_gpu_disable_async_collectives": "ALLREDUCE,ALLGATHER"'
variant_env() {  # one VARIABLE=value a line
    case $1 in
        engine) ;;                                                    # the engine's own settings
        xla_defaults) echo "LMDEPLOY_JAX_TP_SMALL_BATCH_OPTIONS=0" ;;
        nccl) echo "$NCCL" ;;                                         # NCCL all-reduces inside the graphs
        nccl_outside_graphs) echo "$NCCL"; echo "LMDEPLOY_JAX_TP_SMALL_BATCH_OPTIONS={$CB_WITHOUT_COLLECTIVES, $SYNC}" ;;
        nccl_unrolled) echo "$NCCL"; echo "LMDEPLOY_JAX_LAYER_UNROLL=all"; echo "NCCL_DEBUG=WARN" ;;
        *) echo "unknown variant $1" >&2; return 1 ;;
    esac
}
run() {  # tp variant
    local env_lines env_args=()
    env_lines=$(variant_env "$2") || return
    echo "== tp=$1 $2" | tee -a "$log"
    [ -n "$env_lines" ] && mapfile -t env_args <<< "$env_lines"
    env "${env_args[@]}" python3 benchmark/executable_report.py "$model" --tp "$1" --max-batch-size 4 \
        --session-len 4096 --batch-1-tokens 256 > "$log.part" 2>&1
    grep -E '^RESULT' "$log.part" | grep -vE '"kind": "prefill"' | tee -a "$log"
    grep -qE '^Traceback|Error' "$log.part" && tail -3 "$log.part" | cut -c1-400 | tee -a "$log"
}
run 1 engine
for variant in ${VARIANTS:-engine xla_defaults nccl nccl_outside_graphs nccl_unrolled}; do
    run "${TP:-2}" "$variant"
done
rm -f "$log.part"

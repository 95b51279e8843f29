#!/usr/bin/env bash
# Small-batch tensor-parallel decode under several settings, one run on one multi-GPU machine: the
# reduce_add_rms_norm op's check and speed, then for each variant what XLA built (thunk kinds and
# options in effect of every decode executable, executable_report.py), the batch-1 decode speed and
# the greedy tokens of two prompts. tp=1 first, for the ratio and the tokens.
#
# On the GPU machine (device tool, carry .peer):
#   bash benchmark/run_tp_decode_variants.sh [SHAPE]    # TPS="2" (default), VARIANTS="engine xla_all_reduce ...",
#                                                       # DUMPS=dir for the thunk dumps (default $OUT/dumps)
# A variant is a name below; each sets XLA_FLAGS (process-wide), --communicator and/or the small
# tensor-parallel decode steps' XLA options (executable_report.py --small-batch-tp-options).
source "$(dirname "$0")/device_workload.sh" run_tp_decode_variants "$@"
export PYTHONPATH=$PWD
NCCL="XLA_FLAGS=${XLA_FLAGS:-} --xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false"
CB_WITHOUT_COLLECTIVES='"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION"'
CB_WHILE='"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL'
SYNC='"xla_gpu_disable_async_collectives": "ALLREDUCE,ALLGATHER"'
variant_env() {  # one VARIABLE=value a line, or an executable_report.py option (--name=value)
    case $1 in
        engine) ;;                                                    # the engine's own settings
        xla_all_reduce) echo "--communicator=nccl" ;;       # XLA's all-reduce, not the CUDA kernel
        p2p_no_while) echo "--small-batch-tp-options={$CB_WITHOUT_COLLECTIVES}" ;;  # layer loop on the host
        p2p_sync) echo "--small-batch-tp-options={$CB_WHILE\", $SYNC}" ;;   # the sampler's collectives
        p2p_collectives_in_graphs) echo "--small-batch-tp-options={$CB_WHILE,COLLECTIVES\", $SYNC}" ;;
        xla_defaults) echo "--small-batch-tp-options={}" ;;
        nccl) echo "--communicator=nccl"; echo "$NCCL" ;;  # NCCL all-reduces inside the graphs
        nccl_outside_graphs) echo "--communicator=nccl"; echo "$NCCL"
                             echo "--small-batch-tp-options={$CB_WITHOUT_COLLECTIVES, $SYNC}" ;;
        *) echo "unknown variant $1" >&2; return 1 ;;
    esac
}
run() {  # tp variant
    local lines line env_args=() options=()
    lines=$(variant_env "$2") || return
    echo "== tp=$1 $2" | tee -a "$log"
    while IFS= read -r line; do
        case $line in
            --*) options+=("$line") ;;
            ?*) env_args+=("$line") ;;
        esac
    done <<< "$lines"
    env "${env_args[@]}" timeout "${RUN_TIMEOUT:-200}" python3 benchmark/executable_report.py "$model" --tp "$1" \
        --max-batch-size 4 --session-len 4096 --batch-1-tokens 256 --greedy-tokens 32 "${options[@]}" \
        --keep-dumps "${DUMPS:-${OUT:-/tmp}/dumps}/tp$1-$2" > "$log.part" 2>&1
    echo "rc=$?" | tee -a "$log"
    grep -E '^RESULT' "$log.part" | grep -vE '"kind": "prefill"' | tee -a "$log"
    grep -E 'small tensor-parallel steps' "$log.part" | cut -c1-300 | tee -a "$log"
    grep -qE '^Traceback|Error' "$log.part" && tail -3 "$log.part" | cut -c1-400 | tee -a "$log"
}
run 1 engine
for tp in ${TPS:-2}; do
    echo "== reduce_add_rms_norm tp=$tp" | tee -a "$log"
    timeout 120 python3 benchmark/bench_reduce_add_rms_norm.py --tp "$tp" 2>&1 | grep -E '^RESULT|Error|error' \
        | cut -c1-600 | tee -a "$log"
    for variant in ${VARIANTS:-engine xla_all_reduce}; do
        run "$tp" "$variant"
    done
done
rm -f "$log.part"

#!/usr/bin/env bash
# The checks that need a GPU, as one script (a lent GPU is short-lived: run them all in one go).
#   bash bench/gpu_checks.sh                    # on a CUDA machine; full logs go to $OUT or results/gpu-checks
#   DEVICE=cpu NSAMPLES=4 SEQLEN=128 bash bench/gpu_checks.sh   # a dry run of the same steps on the CPU
#   ONLY="main-stream-save main-load" bash bench/gpu_checks.sh     # some steps only
# 1. bench/memory.py --measure: the allocator's peak and the host's peak RSS against the formula, on
#    demo-mixtral (whole, streamed, with GPTQ) and on a 4x wider random Mixtral, at the paper's 128 x 2048.
# 2. main.py end to end with --stream on the device, saved packed, reloaded and evaluated.
# Steps run most important first; each has its own time limit, a failure does not stop the others,
# and the summary lists the failures.
set -u
DEVICE=${DEVICE:-cuda}
NSAMPLES=${NSAMPLES:-128}
SEQLEN=${SEQLEN:-2048}
LOGS=${OUT:-results/gpu-checks}
PY=${PYTHON:-python3}
export TQDM_DISABLE=1  # progress bars would fill the logs
WORK=$(mktemp -d)
mkdir -p "$LOGS"
failed=()

selected() {  # selected NAME: is step NAME among those ONLY names (all when ONLY is empty)?
    [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]
}

step() {  # step NAME SECONDS command...
    local name=$1 limit=$2
    shift 2
    selected "$name" || return 0
    echo "== $name: $*"
    local t=$SECONDS
    if timeout "$limit" "$@" > "$WORK/step.log" 2>&1; then
        echo "   ok ($((SECONDS - t)) s)"
    else
        echo "   FAILED ($((SECONDS - t)) s), last lines:"
        failed+=("$name")
    fi
    tail -n 12 "$WORK/step.log" | sed 's/^/   | /'
    { echo "== $name: $*"; cat "$WORK/step.log"; } >> "$LOGS/steps.log"
}

"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"

MEASURE=(--nsamples "$NSAMPLES" --seqlen "$SEQLEN" --rotation_tokens 512 --device "$DEVICE" --measure)
step memory-demo 150 "$PY" bench/memory.py --model demo-mixtral "${MEASURE[@]}"
step memory-demo-stream 150 "$PY" bench/memory.py --model demo-mixtral --stream "${MEASURE[@]}"

RUN=(--model demo-mixtral --method duquant --wbits 4 --abits 4 --nsamples "${RUN_NSAMPLES:-32}"
     --seqlen "${RUN_SEQLEN:-512}" --device "$DEVICE" --eval_ppl wikitext2 --ppl_samples 10)
step main-stream-save 200 "$PY" main.py "${RUN[@]}" --stream --save_dir "$WORK/saved" --output_dir "$WORK/runs"
step main-load 100 "$PY" main.py --load "$WORK/saved" --device "$DEVICE" --eval_ppl wikitext2 --ppl_samples 10 \
    --seqlen "${RUN_SEQLEN:-512}" --output_dir "$WORK/runs-load"

step make-wide 60 "$PY" -c "from models.tiny import tiny_model
m, t = tiny_model('mixtral', hidden_size=1024, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4)
m.save_pretrained('$WORK/wide'); t.save_pretrained('$WORK/wide')"
step memory-wide 150 "$PY" bench/memory.py --model "$WORK/wide" "${MEASURE[@]}"
step memory-wide-stream 150 "$PY" bench/memory.py --model "$WORK/wide" --stream "${MEASURE[@]}"
step memory-demo-gptq 150 "$PY" bench/memory.py --model demo-mixtral --gptq "${MEASURE[@]}"
for r in runs runs-load; do cp "$WORK/$r/results.json" "$LOGS/$r.json" 2>/dev/null; done
if selected main-load; then
    "$PY" -c "import json, sys; a, b = (json.load(open(f'$LOGS/{r}.json'))['ppl'] for r in ('runs', 'runs-load'))
print('perplexity after quantizing', a, 'after loading the saved model', b); sys.exit(a != b)" || failed+=(same-ppl)
fi
rm -rf "$WORK"

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all checks passed"

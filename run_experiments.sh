#!/usr/bin/env bash
# Reproduce the DuQuant-vs-RTN and EAQuant component tables on the chosen models.
# Every method runs against pure DuQuant on the same model, data and seed; runs with a
# results.json are skipped, so an interrupted sweep resumes where it stopped.
#
#   bash run_experiments.sh                                  # the zoo on CPU (about 1 h per model on 2 cores)
#   MODELS=demo-mixtral SEEDS=0 bash run_experiments.sh      # one model, one seed
#   MODELS="olmoe deepseek-moe mixtral" COMMON="--device cuda" bash run_experiments.sh   # the paper's checkpoints
# Instances with different BITS or SEEDS can run side by side (results are written atomically).
set -euo pipefail
cd "$(dirname "$0")"
MODELS=${MODELS:-"demo-mixtral demo-olmoe demo-deepseek"}
SEEDS=${SEEDS:-"0 1 2"}
BITS=${BITS:-"4 3"}
OUT=${OUT:-results/experiments}
COMMON=${COMMON:-"--nsamples 32 --seqlen 512 --eval_ppl wikitext2,c4,gutenberg --ppl_samples 40 --rotation_tokens 512"}

run() {  # run NAME ARGS...: one main.py run into $OUT/$model/NAME unless already done
  local name=$1; shift
  local dir="$OUT/$model/$name"
  [ -f "$dir/results.json" ] && return 0
  echo "== $model $name"
  python main.py --model "$model" --output_dir "$dir" $COMMON "$@" > "$OUT/$model/$name.log" 2>&1 \
    || { echo "FAILED: $model $name (see $OUT/$model/$name.log)"; return 1; }
}

for model in $MODELS; do
  if [[ $model == demo-* ]] && [ ! -f "models/zoo/$model/config.json" ]; then
    echo "skipping $model: not trained yet (python -m models.zoo.train --arch ${model#demo-})"; continue
  fi
  mkdir -p "$OUT/$model"
  run fp --method fp
  for w in $BITS; do
    run "rtn-w${w}a4" --method rtn --wbits "$w" --abits 4 --no-compare_fp
    for seed in $SEEDS; do
      s="w${w}a4-s$seed"
      q="--wbits $w --abits 4 --seed $seed --no-compare_fp"
      run "duquant-$s" --method duquant $q
      run "sa-$s" --method duquant --smooth_aggregate maximum $q
      run "ra-$s" --method duquant --router_align $q
      run "cb-$s" --method duquant --calib_balance $q
      run "eaquant-$s" --method eaquant $q
    done
  done
done
python bench/tables.py "$OUT" | tee "$OUT/TABLES.md"

#!/usr/bin/env bash
# Our side of the fidelity comparison (docs/fidelity.md): DuQuant on the two dense zoo Llamas with
# the calibration and evaluation windows the reference runs used (32 x 256 C4 train per seed, the
# first 20 windows of 256 tokens of WikiText-2 and Gutenberg), for the default and official recipes
# and for the default with one official choice at a time. Finished runs are skipped, so an
# interrupted sweep resumes. Summarise with `python bench/parity_table.py results/parity`.
#   bash bench/parity.sh            # everything (about 1 h on 2 idle cores)
#   STAGES=main bash bench/parity.sh   # ABLATION_MODEL (default demo-llama-s) gets the one-at-a-time runs
#   STAGES=ablation ABLATION_WBITS="4 3" bash bench/parity.sh   # the one-at-a-time runs at W4A4 and W3A4
#   STAGES=candidates CANDIDATES="--rotation_stop range" bash bench/parity.sh   # combinations on both models and widths
#   STAGES=eaquant bash bench/parity.sh   # EAQuant W4A4 on demo-olmoe, official and default recipes (about 20 min a run)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/parity}
JOBS=${JOBS:-2}
SEEDS=${SEEDS:-"0 1 2"}
STAGES=${STAGES:-"main ablation"}
COMMON="--nsamples 32 --seqlen 256 --eval_ppl wikitext2,gutenberg --ppl_samples 20"
# One official choice at a time, on top of the default recipe.
ABLATIONS=("--smooth_weight one_reader" "--smooth_stats fp" "--act_absmax_floor 1e-5" "--o_smooth fold_v"
           "--rotation_data mean" "--rotation_seed redraw" "--rotation shared" "--rotation_stop range"
           "--spreading official" "--act_range minmax" "--weight_range minmax" "--qk_clip lac")

runs() {
  if [[ " $STAGES " == *" eaquant "* ]]; then
    for recipe in official default; do
      for seed in $SEEDS; do
        echo "demo-olmoe/eaquant-$recipe-w4a4-s$seed --model demo-olmoe --recipe eaquant,$recipe --wbits 4 --abits 4 --seed $seed"
      done
    done
    for seed in $SEEDS; do  # the block size the published EAQuant code needs on this model (its reference runs)
      echo "demo-olmoe/eaquant-official+block_size=32-w4a4-s$seed --model demo-olmoe --recipe eaquant,official --block_size 32 --wbits 4 --abits 4 --seed $seed"
    done
  fi
  for model in demo-llama-s demo-llama-m; do
    for w in 4 3; do
      [[ " $STAGES " == *" main "* ]] || continue
      echo "$model/rtn-w${w}a4 --model $model --method rtn --wbits $w --abits 4 --seed 0"
      for seed in $SEEDS; do
        for recipe in default official; do
          echo "$model/$recipe-w${w}a4-s$seed --model $model --method duquant --wbits $w --abits 4 --seed $seed --recipe $recipe"
        done
      done
    done
    if [[ " $STAGES " == *" candidates "* ]]; then
      while read -r opt; do
        [ -n "$opt" ] || continue
        tag=$(echo "$opt" | sed 's/^--//; s/ --/+/g; s/ /=/g')
        for w in 4 3; do
          for seed in $SEEDS; do
            echo "$model/default+$tag-w${w}a4-s$seed --model $model --method duquant --wbits $w --abits 4 --seed $seed $opt"
          done
        done
      done <<< "$(echo "${CANDIDATES:-}" | tr ';' '\n')"
    fi
    [[ " $STAGES " == *" ablation "* && $model == "${ABLATION_MODEL:-demo-llama-s}" ]] || continue
    for w in ${ABLATION_WBITS:-4}; do
      for seed in $SEEDS; do
        for opt in "${ABLATIONS[@]}"; do
          tag=$(echo "$opt" | tr -d '-' | tr ' ' '=')
          echo "$model/default+$tag-w${w}a4-s$seed --model $model --method duquant --wbits $w --abits 4 --seed $seed $opt"
        done
      done
    done
  done
}

run_one() {
  name=$1; shift
  dir="$OUT/$name"
  [ -f "$dir/results.json" ] && return 0
  mkdir -p "$dir"
  OMP_NUM_THREADS=1 python main.py "$@" $COMMON --output_dir "$dir" > "$dir/log.txt" 2>&1 \
    || echo "failed: $name (see $dir/log.txt)"
}
export -f run_one
export OUT COMMON
runs | xargs -P "$JOBS" -L 1 bash -c 'run_one "$@"' _

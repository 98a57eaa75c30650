#!/usr/bin/env bash
# Reproduce EAQuant's Tables 1-7 and MoEQuant's R1-R5 on the chosen models, every method next to
# pure DuQuant on the same model, data and seed. Runs with a results.json are skipped, so an
# interrupted sweep resumes where it stopped; at the end $OUT/TABLES.md (default results/experiments/) is written
# and copied to results/TABLES.md.
#
#   bash run_experiments.sh --quick                          # one zoo model, one seed, small sets (9 min on 2 idle CPU cores
#                                                            # before every run also scored the FP model)
#   bash run_experiments.sh                                  # the three zoo models, 3 seeds: hours on 2 CPU cores
#   MODELS=demo-olmoe SEEDS=0 bash run_experiments.sh        # one model, one seed
#   MODELS="olmoe deepseek-moe mixtral" COMMON="--device cuda --nsamples 128 --seqlen 2048" \
#     TASK_LIMIT=0 bash run_experiments.sh                   # the paper's checkpoints and settings on a GPU
#
# Every calibration-dependent run is repeated for each seed in SEEDS and reported as mean ± std;
# ABLATION_SEEDS (default: SEEDS) narrows the single-knob ablations of Tables 4-7 and the MoEQuant runs;
# ABLATIONS=0 stops after Tables 1-3 (FP, RTN, DuQuant, EAQuant and each of its components).
# TASKS (default the paper's five) are lm-eval zero-shot tasks, at most TASK_LIMIT examples each
# (0 = all); TASKS= skips them. Beside another CPU job, run with OMP_NUM_THREADS=1.
# Every quantized run also compares with the FP model on the same windows (main.py's --compare_fp) for its
# KL to FP and top-1 agreement (docs/evaluation.md); the FP evaluation (perplexity, states, zero-shot tasks)
# runs once per model and settings and is reused from $OUT/MODEL/fp-reference (main.py --fp_reference).
# Instances with different MODELS can run side by side (results are written atomically).
set -euo pipefail
cd "$(dirname "$0")"
QUICK=0
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    *) echo "run_experiments.sh: unknown argument $arg (only --quick; everything else is an environment variable)" >&2; exit 2 ;;
  esac
done
if [ $QUICK = 1 ]; then
  MODELS=${MODELS:-demo-mixtral}
  SEEDS=${SEEDS:-0}
  OUT=${OUT:-results/quick}
  # 64 greedy rotation steps instead of DuQuant's 256: a smoke test of the whole sweep, not the paper setting.
  COMMON=${COMMON:-"--nsamples 8 --seqlen 128 --eval_ppl wikitext2,c4,gutenberg --ppl_samples 8 --rotation_tokens 256 --max_rotation_step 64"}
  TASK_LIMIT=${TASK_LIMIT:-20}
  EBSS="--nsamples 8 --seqlen 128 --tau 1.2,0.5 --width 1,4"
else
  MODELS=${MODELS:-"demo-mixtral demo-olmoe demo-deepseek"}
  SEEDS=${SEEDS:-"0 1 2"}
  OUT=${OUT:-results/experiments}
  COMMON=${COMMON:-"--nsamples 16 --seqlen 256 --eval_ppl wikitext2,c4,gutenberg --ppl_samples 20 --rotation_tokens 512"}
  TASK_LIMIT=${TASK_LIMIT:-100}
  EBSS="--nsamples 16 --seqlen 256 --tau 1.2,1.0,0.5 --width 1,2,4"
fi
ABLATION_SEEDS=${ABLATION_SEEDS:-$SEEDS}
ABLATIONS=${ABLATIONS:-1}
TASKS=${TASKS:-arc_challenge,arc_easy,boolq,piqa,winogrande}
ZS=""
[ -n "$TASKS" ] && ZS="--tasks $TASKS"
[ -n "$TASKS" ] && [ "$TASK_LIMIT" != 0 ] && ZS="$ZS --limit $TASK_LIMIT"
START=$(date +%s)

run() {  # run NAME ARGS...: one main.py run into $OUT/$model/NAME unless already done
  local name=$1; shift
  local dir="$OUT/$model/$name"
  [ -f "$dir/results.json" ] && return 0
  echo "== $model $name ($(( ($(date +%s) - START) / 60 )) min)"
  python main.py --model "$model" --output_dir "$dir" --fp_reference "$OUT/$model/fp-reference" $COMMON "$@" \
    > "$OUT/$model/$name.log" 2>&1 \
    || { echo "FAILED: $model $name (see $OUT/$model/$name.log)"; FAILED="$FAILED $model/$name"; }
}
FAILED=""

for model in $MODELS; do
  if [[ $model == demo-* ]] && [ ! -f "models/zoo/$model/config.json" ]; then
    echo "skipping $model: not trained yet (python -m models.zoo.train --arch ${model#demo-})"; continue
  fi
  mkdir -p "$OUT/$model"
  run fp --recipe fp $ZS
  # Tables 1-3: FP, RTN, DuQuant, each EAQuant component alone, all three; W4A4 and W3A4, router W8A8.
  for w in 4 3; do
    run "rtn-w${w}a4" --recipe rtn --wbits $w --abits 4 $ZS
    for seed in $SEEDS; do
      q="--wbits $w --abits 4 --seed $seed"
      run "duquant-w${w}a4-s$seed" --recipe duquant $q $ZS
      run "eaquant-w${w}a4-s$seed" --recipe eaquant $q $ZS
      run "sa-w${w}a4-s$seed" --recipe duquant --smooth_aggregate maximum $q $ZS
      run "ra-w${w}a4-s$seed" --recipe duquant --router_align $q $ZS
      run "cb-w${w}a4-s$seed" --recipe duquant --calib_balance $q $ZS
    done
  done
  [ "$ABLATIONS" = 0 ] && continue
  # RTN W4A16 fits nothing, so it runs once (the seed only picks the calibration text its
  # routing diagnostics are measured on).
  run "rtn-w4a16" --recipe rtn --wbits 4 --abits 16 --seed "${ABLATION_SEEDS%% *}" $ZS
  for seed in $ABLATION_SEEDS; do
    q="--abits 4 --seed $seed $ZS"
    # Table 4: smoothing aggregation rule (W4A4).
    run "saf-w4a4-s$seed" --recipe duquant --smooth_aggregate expert_frequency --wbits 4 $q
    run "sal-w4a4-s$seed" --recipe duquant --smooth_aggregate router_logits --wbits 4 $q
    # Table 5: router precision x router_align (W3A4 with router W3A4 / W4A4; W8A8 rows are Table 3's).
    for r in 3 4; do
      run "r${r}-w3a4-s$seed" --recipe duquant --router_wbits $r --router_abits 4 --wbits 3 $q
      run "r${r}ra-w3a4-s$seed" --recipe duquant --router_align --router_wbits $r --router_abits 4 --wbits 3 $q
    done
    # Table 6: KL span of router alignment (kl_top 0 is Table 3's router_align row).
    for k in 25 50 75 100; do
      run "kl${k}-w4a4-s$seed" --recipe duquant --router_align --kl_top $k --wbits 4 $q
    done
    # Table 7: calibration balance ratio r (r = 0 is DuQuant, r = 2 is Table 3's calib_balance row).
    for r in 1 4 8; do
      run "cb${r}-w4a4-s$seed" --recipe duquant --calib_balance --balance_ratio $r --wbits 4 $q
    done
    # R1/R4/R5: GPTQ W4A16 with AGQ on text calibration sets vs MoEQuant (EBSS + AGQ), gate AGQ on/off.
    m="--wbits 4 --abits 16 --seed $seed $ZS"
    run "gptq-w4a16-s$seed" --recipe gptq $m
    for calib in c4 gutenberg; do
      run "agq-$calib-w4a16-s$seed" --recipe gptq --agq --calib_dataset $calib $m
    done
    run "moequant-w4a16-s$seed" --recipe moequant $m
    run "moequant-nogate-w4a16-s$seed" --recipe moequant --no-agq_gate $m
  done
  # R1-R3: expert-balance std and likelihood of each calibration set (EBSS over tau and width).
  if [ ! -f "$OUT/$model/ebss_balance.json" ]; then
    echo "== $model ebss_balance"
    python bench/ebss_balance.py --model "$model" $EBSS --seed "${SEEDS%% *}" --json "$OUT/$model/ebss_balance.json" \
      > "$OUT/$model/ebss_balance.log" 2>&1 || { echo "FAILED: $model ebss_balance (see its log)"; FAILED="$FAILED $model/ebss_balance"; }
  fi
done
python bench/tables.py "$OUT" --minutes $(( ($(date +%s) - START) / 60 )) > "$OUT/TABLES.md.tmp"
mv "$OUT/TABLES.md.tmp" "$OUT/TABLES.md" && cat "$OUT/TABLES.md"
mkdir -p results && cp "$OUT/TABLES.md" results/TABLES.md.tmp && mv results/TABLES.md.tmp results/TABLES.md  # the latest sweep's tables
[ -z "$FAILED" ] || { echo "failed runs:$FAILED"; exit 1; }

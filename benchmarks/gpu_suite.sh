#!/usr/bin/env bash
# The accelerator measurements recorded in docs/benchmarks.md, stage by stage, as they were taken.
#
#   bash benchmarks/gpu_suite.sh OUT STAGE [STAGE ...]
#
# Stages (each appends JSON lines to OUT/*.jsonl and writes OUT/STAGE.log):
#   check        device, driver and library versions; the cuDNN-vs-XLA attention tests on the GPU
#   muon         benchmarks/muon.py on the 1.4B tree (osp_jax Muon vs optax.contrib.muon vs AdamW)
#   muon_cublas  the same with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false (cuBLAS for every matmul)
#   profile      1.4B, batch 8 x 2048, remat full: OSP and AdamW traced, time per op category
#   remat_osp    1.4B OSP recipe, batch 8 x 2048, remat full / dots / none
#   remat_adamw  1.4B AdamW baseline (configs/adam_1b4.py), the same sweep
#   compare      OSP vs AdamW at 0.5 M tokens per optimizer step (256 x 2048, grad accumulation),
#                remat policy REMAT (default dots)
#   levers       1.4B batch 8 x 2048, remat dots: AdamW, OSP, and AdamW with data.pack_mask=false
#   after        what the levers were not re-measured on: both recipes at full remat, and the
#                0.5 M-token comparison (the 2026-11-22 figures of these predate the levers)
#   attention    AdamW 1.4B, remat dots, batch 8 x 2048: the cuDNN document mask as a dense mask
#                (model.max_segments=0), as the packed layout (16), and none (causal only); 20 steps
#   remat_more   AdamW 1.4B: remat dots_no_batch and save_qkv_out at batch 8, none at batch 4, dots at
#                batch 16 (out of memory on an H100)
#   remat_attn   1.4B batch 8 x 2048, both recipes: remat dots against dots_attn (dots, plus the cuDNN
#                forward's output and softmax statistics, so the backward does not run it again)
#   big_batch    AdamW 1.4B with XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.95} (jax takes 75% of
#                the device by default): dots_attn at batch 16 (loss_chunk 0 and 1024), none at batch 8
#   unrolled     AdamW 1.4B batch 8, dots_attn, model.scan_layers=false (24 layers unrolled, no scan)
#   loss_chunk   AdamW 1.4B batch 8, dots_attn: the loss over 512 positions at a time (model.loss_chunk,
#                the logits recomputed in the backward) against all 2048 at once (the default, 0)
#   documents    AdamW 1.4B batch 8, dots, 4 documents packed in every row (--docs-per-window=4): the
#                packed cuDNN layout (max_segments 16) against the dense mask (0) and causal only
#   profile_dots AdamW 1.4B batch 8, dots_attn, traced: time per op kind and per model part and pass
#   skip_guard   1.4B batch 8, dots, both recipes: the non-finite guard as a lax.cond (this code) against
#                a where() on every state leaf (commit GUARD_BEFORE, default 1e7aa64, run from a git
#                worktree in /tmp), which made the CPU compiler copy the whole state every step
#   unrolled_more  the unrolled layers (model.scan_layers=false) further, at XLA_PYTHON_CLIENT_MEM_FRACTION
#                0.95: AdamW batch 16 with dots_attn and dots; AdamW batch 8 dots_attn with
#                XLA_FLAGS=--xla_gpu_enable_triton_gemm=false; OSP batch 8 dots_attn (third lease, call 2)
#   compare_best OSP vs AdamW at 0.5 M tokens per step with the fastest single-step settings found: 16
#                micro-batches of 16 x 2048, layers unrolled, dots_attn, memory fraction 0.95; then AdamW
#                batch 16 the same with cuBLAS for every matmul (third lease, call 3)
#   profile_unrolled  AdamW 1.4B batch 8, dots_attn, layers unrolled, traced (third lease, call 4)
#   compare_docs compare_best's 0.5 M-token comparison on batches of four documents a row (--docs-per-window=4),
#                where the packed cuDNN layout skips the blocks between documents (prepared, not yet run)
#   no_graphs    AdamW 1.4B batch 8, dots_attn, unrolled, with XLA_FLAGS=--xla_gpu_enable_command_buffer=
#                (no CUDA graphs): its time against profile_unrolled's, and a trace whose every kernel has its
#                own hlo_op, so trace_summary ties the cuBLAS and cuDNN calls too (prepared, not yet run)
#   fused_loss   AdamW 1.4B batch 16, dots_attn, unrolled, memory fraction 0.95: model.loss_fused (the head's
#                gradients formed in the forward pass) whole and 512 positions at a time, against
#                unrolled_more's first row (prepared, not yet run)
#   remat_norms  AdamW 1.4B, unrolled: remat dots_attn_norms (dots_attn, plus the norm outputs and the rotated
#                q and k) at batch 8, and at batch 16 with memory fraction 0.95 with and without
#                model.loss_fused (prepared, not yet run)
#   precast      AdamW 1.4B, dots_attn, unrolled: model.precast_weights (the matmul weights cast to bf16 once
#                a step, not again in the remat's recompute nor in every micro-batch) at batch 8, at batch 16
#                with memory fraction 0.95, then compare_fastest with it (prepared, not yet run)
#   compare_levers  compare_fastest with the three levers prepared without a GPU together: the weights
#                precast, the fused loss (whose float32 logits no longer outlive their chunk) and remat
#                dots_attn_norms (12 GiB more at micro-batch 16, which the fused loss may free) (prepared,
#                not yet run)
#   ablation     experiments/ablation.py --preset=gpu_124m in full (DATA: a prepared directory, default
#                OUT/data, prepared from CORPUS if absent); resumable, so a call cut short goes on
#   epochs       experiments/epochs.py --preset=gpu_124m: Adam and OSP trained 1, 2 and 4 epochs over an
#                8 M-token subset of CORPUS (the probe's params/tokens ratio), 4-bit cost per epoch count
#   m124         the ablation's GPT-2-small shape (vocab 16384, batch 16 x 1024, no remat), both recipes
#
# Needs osp_jax's requirements installed (setup.py; on a bare image: grain, array_record,
# ml_collections, portpicker, tensorboardX, zstandard beside jax/flax/optax/orbax).
# Environment: REMAT (compare's policy), ACCUM (compare's micro-batches, default 32), STEPS (timed
# steps, default 10), COMPARE_STEPS (default 3), REMATS (remat_* policies, default "full dots none"),
# MEM_FRACTION (big_batch), GUARD_BEFORE (skip_guard), DATA and CORPUS (ablation), EPOCHS_OUT,
# EPOCH_TOKENS and EPOCHS (epochs).
set -uo pipefail
OUT=${1:?usage: gpu_suite.sh OUT STAGE...}
shift
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)  # absolute: the stages run from the repository root
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEPS=${STEPS:-10}
BENCH="$PY benchmarks/step_time.py --config=configs/osp_1b4.py --batch=8 --seq-len=2048 --steps=$STEPS --warmup=2"
STEP20="$PY benchmarks/step_time.py --batch=8 --seq-len=2048 --steps=20 --warmup=3"  # 20 timed steps, batch 8
ADAM20="$STEP20 --config=configs/adam_1b4.py"
ADAM_BATCH="$PY benchmarks/step_time.py --config=configs/adam_1b4.py --seq-len=2048 --steps=$STEPS --warmup=2"  # + --batch
export PYTHONUNBUFFERED=1

more_memory() {  # jax takes 75% of the GPU by default; the batch-16 stages give it MEM_FRACTION (0.95)
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.95}
}

stage() {
  local name=$1
  shift
  echo "=== $name $(date -u +%H:%M:%S)"
  ( "$@" ) 2>&1 | tee "$OUT/$name.log" | grep -v -e '^{' -e 'Involuntary' -e '^ *$'
  echo "=== $name done $(date -u +%H:%M:%S)"
}

check() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import jax, jaxlib, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__); print(jax.devices())"
  JAX_PLATFORMS=cuda,cpu $PY -m pytest -q -p no:cacheprovider tests/test_attention.py -k cudnn -rs
}

muon() {
  $PY benchmarks/muon.py --iters=20 | tee -a "$OUT/muon.jsonl"
  $PY benchmarks/muon.py --accuracy | tee -a "$OUT/muon.jsonl"
  $PY benchmarks/muon.py --cost | tee -a "$OUT/muon.jsonl"
}

profile() {
  $BENCH --set model.remat=full --profile="$OUT/trace_osp" --output="$OUT/step_time.jsonl"
  $BENCH --config=configs/adam_1b4.py --set model.remat=full --profile="$OUT/trace_adamw" \
    --output="$OUT/step_time.jsonl"
}

remat() {  # remat RECIPE-FILE
  for policy in ${REMATS:-full dots none}; do
    $BENCH --config="$1" --set model.remat=$policy --output="$OUT/step_time.jsonl" || echo "remat=$policy: FAILED"
  done
}

levers() {
  $BENCH --config=configs/adam_1b4.py --set model.remat=dots --output="$OUT/step_time.jsonl"
  $BENCH --set model.remat=dots --output="$OUT/step_time.jsonl"
  $BENCH --config=configs/adam_1b4.py --set model.remat=dots --set data.pack_mask=false --output="$OUT/step_time.jsonl"
}

attention() {
  local b=$ADAM20
  $b --set model.remat=dots --set model.max_segments=0 --output="$OUT/step_time.jsonl"
  $b --set model.remat=dots --set model.max_segments=16 --output="$OUT/step_time.jsonl"
  $b --set model.remat=dots --set data.pack_mask=false --output="$OUT/step_time.jsonl"
}

remat_more() {
  local b=$ADAM_BATCH
  $b --batch=8 --set model.remat=dots_no_batch --output="$OUT/step_time.jsonl" || echo "dots_no_batch: FAILED"
  $b --batch=8 --set model.remat=save_qkv_out --output="$OUT/step_time.jsonl" || echo "save_qkv_out: FAILED"
  $b --batch=4 --set model.remat=none --output="$OUT/step_time.jsonl" || echo "none, batch 4: FAILED"
  $b --batch=16 --set model.remat=dots --output="$OUT/step_time.jsonl" || echo "dots, batch 16: FAILED"
}

remat_attn() {
  local b=$STEP20
  for recipe in configs/adam_1b4.py configs/osp_1b4.py; do
    for policy in dots dots_attn; do
      $b --config=$recipe --set model.remat=$policy --output="$OUT/step_time.jsonl" || echo "$recipe $policy: FAILED"
    done
  done
}

big_batch() {
  local b=$ADAM_BATCH
  more_memory
  $b --batch=16 --set model.remat=dots_attn --output="$OUT/step_time.jsonl" || echo "dots_attn, batch 16: FAILED"
  $b --batch=16 --set model.remat=dots_attn --set model.loss_chunk=1024 --output="$OUT/step_time.jsonl" \
    || echo "dots_attn, batch 16, loss_chunk 1024: FAILED"
  $b --batch=8 --set model.remat=none --output="$OUT/step_time.jsonl" || echo "none, batch 8: FAILED"
}

unrolled() {
  $BENCH --config=configs/adam_1b4.py --set model.remat=dots_attn --set model.scan_layers=false \
    --output="$OUT/step_time.jsonl" || echo "scan_layers=false: FAILED"
}

loss_chunk() {
  local b=$ADAM20
  $b --set model.remat=dots_attn --set model.loss_chunk=0 --output="$OUT/step_time.jsonl"
  $b --set model.remat=dots_attn --set model.loss_chunk=512 --output="$OUT/step_time.jsonl"
}

documents() {
  local b=$ADAM20
  $b --docs-per-window=4 --set model.remat=dots --set model.max_segments=16 --output="$OUT/step_time.jsonl"
  $b --docs-per-window=4 --set model.remat=dots --set model.max_segments=0 --output="$OUT/step_time.jsonl"
  $b --docs-per-window=4 --set model.remat=dots --set data.pack_mask=false --output="$OUT/step_time.jsonl"
}

profile_dots() {
  $BENCH --config=configs/adam_1b4.py --set model.remat=dots_attn --profile="$OUT/trace_adamw_dots_attn" \
    --output="$OUT/step_time.jsonl"
}

skip_guard() {
  local before=/tmp/osp_jax_${GUARD_BEFORE:-1e7aa64}
  [ -d "$before" ] || git worktree add --detach "$before" "${GUARD_BEFORE:-1e7aa64}" \
    || { echo "skip_guard: FAILED (needs the repository's git history for ${GUARD_BEFORE:-1e7aa64})"; return 1; }
  for recipe in configs/adam_1b4.py configs/osp_1b4.py; do
    (cd "$before" && $STEP20 --config=$recipe --set model.remat=dots --output="$OUT/step_time.jsonl") \
      || echo "$recipe before: FAILED"
    $STEP20 --config=$recipe --set model.remat=dots --output="$OUT/step_time.jsonl" || echo "$recipe: FAILED"
  done
}

UNROLLED="$PY benchmarks/step_time.py --seq-len=2048 --warmup=2 --output=$OUT/step_time.jsonl --set model.scan_layers=false"

unrolled_more() {
  local b="$UNROLLED --steps=10"
  (more_memory
   $b --config=configs/adam_1b4.py --batch=16 --set model.remat=dots_attn || echo "batch 16 dots_attn: FAILED"
   $b --config=configs/adam_1b4.py --batch=16 --set model.remat=dots || echo "batch 16 dots: FAILED")
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
    $b --config=configs/adam_1b4.py --batch=8 --set model.remat=dots_attn || echo "cuBLAS only: FAILED"
  $b --config=configs/osp_1b4.py --batch=8 --set model.remat=dots_attn || echo "OSP: FAILED"
}

# OSP vs AdamW at 0.5 M tokens a step with the fastest single-step settings (+ extra step_time flags)
compare_fastest() {
  more_memory
  $UNROLLED --set model.remat=dots_attn --config=configs/osp_1b4.py --batch=256 --grad-accum=16 \
    --steps="${COMPARE_STEPS:-10}" --warmup=2 "$@" --compare  # 10 steps of ~9 s each, per recipe
}

compare_best() {
  compare_fastest || echo "compare: FAILED"
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" $UNROLLED --set model.remat=dots_attn \
    --config=configs/adam_1b4.py --batch=16 --steps=10 || echo "cuBLAS only, batch 16: FAILED"
}

profile_unrolled() {
  $UNROLLED --config=configs/adam_1b4.py --batch=8 --steps=10 --set model.remat=dots_attn \
    --profile="$OUT/trace_adamw_unrolled"
}

compare_docs() {
  compare_fastest --docs-per-window=4 || echo "compare, 4 documents a row: FAILED"
}

no_graphs() {
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" $UNROLLED --config=configs/adam_1b4.py --batch=8 \
    --steps=10 --set model.remat=dots_attn --profile="$OUT/trace_adamw_unrolled_no_graphs"
}

fused_loss() {
  more_memory
  local b="$UNROLLED --config=configs/adam_1b4.py --batch=16 --steps=10 --set model.remat=dots_attn --set model.loss_fused=true"
  $b || echo "fused loss: FAILED"
  $b --set model.loss_chunk=512 || echo "fused loss, chunks of 512: FAILED"
}

remat_norms() {
  local b="$UNROLLED --config=configs/adam_1b4.py --steps=10 --set model.remat=dots_attn_norms"
  $b --batch=8 || echo "batch 8: FAILED"
  more_memory
  $b --batch=16 || echo "batch 16: FAILED"
  $b --batch=16 --set model.loss_fused=true || echo "batch 16, fused loss: FAILED"
}

precast() {
  local b="$UNROLLED --config=configs/adam_1b4.py --steps=10 --set model.remat=dots_attn --set model.precast_weights=true"
  $b --batch=8 || echo "batch 8: FAILED"
  more_memory
  $b --batch=16 || echo "batch 16: FAILED"
  compare_fastest --set model.precast_weights=true || echo "compare, precast weights: FAILED"
}

compare_levers() {
  compare_fastest --set model.precast_weights=true --set model.loss_fused=true --set model.remat=dots_attn_norms \
    || echo "compare, precast + fused loss + dots_attn_norms: FAILED"
}

compare() {
  $PY benchmarks/step_time.py --config=configs/osp_1b4.py --batch=256 --seq-len=2048 \
    --grad-accum="${ACCUM:-32}" --steps="${COMPARE_STEPS:-10}" --warmup=2 --set model.remat="${REMAT:-dots}" \
    --compare --output="$OUT/step_time.jsonl"
}

after() {
  $BENCH --set model.remat=full --output="$OUT/step_time.jsonl"
  $BENCH --config=configs/adam_1b4.py --set model.remat=full --output="$OUT/step_time.jsonl"
  compare
}

ablation() {
  local data=${DATA:-$OUT/data}
  if [ ! -f "$data/metadata.json" ]; then
    $PY -m osp_jax.data.prepare --input "${CORPUS:-/work/shared/corpus/*.jsonl.xz}" --output "$data" \
      --tokenizer train:16384 --val-fraction 0.02
  fi
  # 25 M tokens (0.70 epoch) a run, rates swept on a quarter of that; not timed as a whole.
  $PY experiments/ablation.py --preset=gpu_124m --out="$OUT/ablation" --data="$data" --tokens=25e6 \
    --lrs=3e-4,1e-3,2e-3,4e-3 --sweep-fraction=0.25 --eval-tokens=524288 --set train.checkpoint_every=500
}

epochs() {
  # 7 epochs of 8 M tokens per arm; resumable, so a call cut short goes on. Not timed as a whole.
  # EPOCHS_OUT: a directory made beforehand with --prepare-only (carried), else OUT/epochs.
  $PY experiments/epochs.py --preset=gpu_124m --out="${EPOCHS_OUT:-$OUT/epochs}" \
    --corpus="${CORPUS:-/work/shared/corpus/*.jsonl.xz}" --train-tokens="${EPOCH_TOKENS:-8e6}" \
    --epochs="${EPOCHS:-1,2,4}" --arms=adam,osp --lrs=adam:1e-3,osp:4e-3 --eval-tokens=524288
}

m124() {
  $PY benchmarks/step_time.py --config=configs/osp_124m.py --batch=16 --seq-len=1024 --steps="$STEPS" \
    --warmup=2 --set model.vocab_size=16384 --set model.remat=none --set model.dtype=bfloat16 --compare \
    --output="$OUT/step_time.jsonl"
}

for s in "$@"; do
  case $s in
    check) stage check check ;;
    muon) stage muon muon ;;
    muon_cublas) XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" stage muon_cublas muon ;;
    profile) stage profile profile ;;
    remat_osp) stage remat_osp remat configs/osp_1b4.py ;;
    remat_adamw) stage remat_adamw remat configs/adam_1b4.py ;;
    compare) stage compare compare ;;
    levers) stage levers levers ;;
    after) stage after after ;;
    attention) stage attention attention ;;
    remat_more) stage remat_more remat_more ;;
    remat_attn) stage remat_attn remat_attn ;;
    big_batch) stage big_batch big_batch ;;
    unrolled) stage unrolled unrolled ;;
    loss_chunk) stage loss_chunk loss_chunk ;;
    documents) stage documents documents ;;
    profile_dots) stage profile_dots profile_dots ;;
    skip_guard) stage skip_guard skip_guard ;;
    unrolled_more) stage unrolled_more unrolled_more ;;
    compare_best) stage compare_best compare_best ;;
    profile_unrolled) stage profile_unrolled profile_unrolled ;;
    precast) stage precast precast ;;
    compare_levers) stage compare_levers compare_levers ;;
    compare_docs) stage compare_docs compare_docs ;;
    no_graphs) stage no_graphs no_graphs ;;
    fused_loss) stage fused_loss fused_loss ;;
    remat_norms) stage remat_norms remat_norms ;;
    ablation) stage ablation ablation ;;
    epochs) stage epochs epochs ;;
    m124) stage m124 m124 ;;
    *) echo "gpu_suite.sh: unknown stage $s" >&2; exit 2 ;;
  esac
done

# Sourced by bench/step.sh and bench/extract.sh: `run REPEATS NAME ARGS...` runs `moco bench step
# ARGS` and `bench_step.py ARGS` REPEATS times, alternating, and prints a table row of medians.
# Builds the binary; both sides get 2 threads.
cargo build --release -q -p moco-cli
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
printf '| model, input | moco-rs img/s | PyTorch img/s | ratio | moco-rs peak RSS | PyTorch peak RSS |\n|---|---|---|---|---|---|\n'
run() { # repeats, name, then the arguments of both step benchmarks
  local reps=$1 name=$2; shift 2
  local ours=() theirs=()
  for _ in $(seq "$reps"); do
    ours+=("$(./target/release/moco bench step "$@" --json | tail -1)")
    theirs+=("$(python3 bench/reference/bench_step.py "$@" --json | tail -1)")
  done
  python3 - "$name" "${#ours[@]}" "${ours[@]}" "${theirs[@]}" <<'PY'
import json, statistics, sys
name, n = sys.argv[1], int(sys.argv[2])
o = [json.loads(x) for x in sys.argv[3 : 3 + n]]
t = [json.loads(x) for x in sys.argv[3 + n :]]
med = lambda rs, k: statistics.median(r[k] for r in rs)
oi, ti = med(o, "images_per_s"), med(t, "images_per_s")
print(f"| {name} | {oi:.1f} | {ti:.1f} | {oi / ti:.3f} | {med(o, 'peak_rss_mb'):.0f} MB | {med(t, 'peak_rss_mb'):.0f} MB |")
PY
}

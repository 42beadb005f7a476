#!/bin/bash
# The GPU checks, as one command on an offline GPU machine (Python 3.12 + CUDA torch), after benchmarks/gpu/pack.sh
# packed .dev/ here; carry .dev and runs/sft/PickCube-v1/checkpoint. Stages: versions and one CPU env; the README's
# command as is (physx_cuda); pi0 size at 320 rgb envs (benchmarks/bench_scale.py); tiny Flow-SDE PPO at 320 envs
# from the SFT checkpoint with whatever time is left of BUDGET_S seconds; one iteration each of tiny Flow-Noise PPO
# and GRPO at 320 envs, and a short SFT from the 20 demos pack.sh copies. STAGES picks and orders them (default
# "1 2 3 4"); SCALE_S / SCALE_ENVS / SCALE_STEPS set stage 3's time limit, envs and decisions per env, S5_S / NENV
# stage 5's per run, S4_ARGS adds options to stage 4's run and S4_SCRIPT=flow_noise_ppo runs Flow-Noise PPO there
# instead. Output also goes to $OUT/log.txt.
set -u
T0=$(date +%s); BUDGET_S=${BUDGET_S:-430}; STAGES=${STAGES:-1 2 3 4}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
el() { echo $(( $(date +%s) - T0 )); }
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
# Vulkan/GL loaders into / (the machine's NVIDIA driver provides the ICD); libX11 only where it is missing.
for f in .dev/gl/lib{vulkan1,egl1,glvnd0,opengl0,gl1,glx0,gles2}_*.deb; do dpkg -x "$f" /; done; ldconfig
if ! ldconfig -p | grep -q libX11.so.6; then
  for f in .dev/gl/*.deb; do dpkg -x "$f" /tmp/x11; done
  export LD_LIBRARY_PATH=/tmp/x11/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
fi
ICD=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json; [ -f $ICD ] && export VK_DRIVER_FILES=$ICD
mkdir -p /tmp/site && tar -C /tmp/site -xJf .dev/site.tar.xz
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
s1() {
echo "== 1: versions, one CPU env ($(el) s)"
timeout 90 python3 - <<'PY'
import os, time, torch, numpy, transformers, sapien, mani_skill, gymnasium as gym
import mani_skill.envs  # noqa: F401
print("torch", torch.__version__, "numpy", numpy.__version__, "transformers", transformers.__version__, "sapien",
      sapien.__version__, "mani_skill", mani_skill.__version__, "cuda", torch.cuda.is_available(), "cores", os.cpu_count())
env = gym.make("PickCube-v1", obs_mode="state", control_mode="pd_ee_delta_pose", render_mode="rgb_array",
               sim_backend="physx_cpu")
env.reset(seed=0)
t = time.time()
for _ in range(200):
    env.step(env.action_space.sample())
print(f"one physx_cpu env: {200 / (time.time() - t):.0f} steps/s (random actions); frame {tuple(env.render().shape)}")
PY
}
s2() {
echo "== 2: the README command as is (physx_cuda) ($(el) s)"
timeout 60 python3 flow_sde_ppo.py --env-id PickCube --num-envs 320 --total-iterations 1 --eval-episodes 0 \
  --output-dir /tmp/r0 2>&1 | tr '\r' '\n' | grep -v "it/s\|s/it" | tail -3
}
s3() {
echo "== 3: pi0 size, 320 rgb envs ($(el) s)"
timeout ${SCALE_S:-200} python3 benchmarks/bench_scale.py --sim-backend physx_cpu --num-envs ${SCALE_ENVS:-320} \
  --num-steps ${SCALE_STEPS:-2} --max-episode-steps $(( ${SCALE_STEPS:-2} * 5 )) \
  --out /tmp/bs 2>&1 | tr '\r' '\n' | grep -v "it/s\|s/it\|WARN" | tail -25
}
s4() {
S4_SCRIPT=${S4_SCRIPT:-flow_sde_ppo}
echo "== 4: tiny $S4_SCRIPT, 320 envs, from the SFT checkpoint ($(el) s)"
LEFT=$(( BUDGET_S - $(el) ))
MIN=$(python3 -c "print(max(0.5, round(($LEFT - 75) / 60, 2)))")
timeout $LEFT python3 $S4_SCRIPT.py --env-id PickCube --num-envs 320 --sim-backend physx_cpu --time-budget-min "$MIN" \
  --total-iterations 100000 --eval-every 3 --num-eval-envs 100 --save-every 100000 --output-dir /tmp/s4 ${S4_ARGS:-} 2>&1 \
  | tr '\r' '\n' | grep -v "it/s\|s/it" | tail -6
cp /tmp/s4/metrics.jsonl "$OUT/${S4_SCRIPT}320_metrics.jsonl" 2>/dev/null
}
s5() {
echo "== 5: tiny Flow-Noise PPO and GRPO at 320 envs, one iteration each with the actor training; SFT ($(el) s)"
rl() {  # script, then its own options
  timeout ${S5_S:-100} python3 $1.py "${@:2}" --env-id PickCube --num-envs ${NENV:-320} --sim-backend physx_cpu \
    --total-iterations 1 --eval-episodes 0 --output-dir /tmp/$1 2>&1 | tr '\r' '\n' | grep -v "it/s\|s/it" | tail -3
  cp /tmp/$1/metrics.jsonl "$OUT/$1_metrics.jsonl" 2>/dev/null
}
rl flow_noise_ppo --critic-warmup-iters 0
rl flow_grpo
timeout ${S5_S:-100} python3 sft_baseline.py --demo-path .dev/demos/mp20.h5 --num-demos 20 --train-steps 2000 \
  --sim-backend physx_cpu --eval-episodes 100 --num-eval-envs 50 --output-dir /tmp/sft 2>&1 \
  | tr '\r' '\n' | grep -v "it/s\|s/it" | tail -3
cp /tmp/sft/metrics.jsonl "$OUT/sft_metrics.jsonl" 2>/dev/null
}
for st in $STAGES; do s$st; done
echo "== done ($(el) s)"; sleep 1

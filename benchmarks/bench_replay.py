"""Rollout throughput against a zero-cost policy that executes the same actions. A policy drives the 64 training
envs (the RL scripts' CPU envs, in their worker processes) for --rounds episodes from fixed seeds, with the policy's
time measured apart; then the same envs replay the recorded actions from the same seeds (envs only: a zero-cost policy
whose actions move the arm as the policy's do); then zero actions (the arm held still, which steps faster because it
moves and touches nothing). The whole sequence runs twice; the first pass includes warm-up.
The policy samples with the deterministic ODE (K Euler steps, as evaluated), so it leaves out the training rollout's
SDE step, value and log-prob, which cost little beside it (compare the runs' rollout_sps).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_replay.py --checkpoint runs/flow_grpo/PickCube-v1_1/checkpoint
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flow_sde_ppo  # noqa: E402


def run(envs, mode: str, rounds: int, decisions: int, C: int, policy=None, normalizer=None, args=None,
        recorded=None, gen=None) -> tuple[float, float]:
    """One pass of `rounds` episodes -> (env steps/s, seconds in the policy); mode "policy" appends to recorded."""
    prompts = getattr(envs, "prompts", [envs.prompt] * envs.num_envs)
    t_policy, n, t0 = 0.0, 0, time.time()
    for r in range(rounds):
        obs = envs.reset(seed=1000 + envs.num_envs * r)
        for d in range(decisions):
            if mode == "policy":
                tp = time.time()
                with torch.no_grad():
                    chunk = flow_sde_ppo.sample_actions(policy, normalizer, obs, prompts, args.denoise_steps,
                                                        envs.action_dim, gen)  # [N, H, A]
                t_policy += time.time() - tp
                recorded.append(chunk[:, :C].clone())  # [N, C, A]
            acts = recorded[r * decisions + d]
            if mode == "zero":
                acts = torch.zeros_like(acts)
            for c in range(C):
                obs, *_ = envs.step(acts[:, c])
                n += envs.num_envs
    return n / (time.time() - t0), t_policy


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a PickCube policy checkpoint (SFT or an RL run's)")
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4, help="episodes per env in each pass")
    a = p.parse_args()
    args = flow_sde_ppo.Args(checkpoint=a.checkpoint)
    policy, normalizer, _, _, _ = flow_sde_ppo.load_policy(args, "PickCube-v1", Path(a.checkpoint), None)
    policy.eval()
    envs = flow_sde_ppo.make_envs(args, a.num_envs, ignore_terminations=True, device=torch.device("cpu"))
    decisions = args.max_episode_steps // args.action_chunk
    gen = torch.Generator().manual_seed(0)
    for rep in range(2):
        recorded = []
        sps_policy, t_policy = run(envs, "policy", a.rounds, decisions, args.action_chunk, policy, normalizer, args,
                                   recorded, gen)
        sps_replay, _ = run(envs, "replay", a.rounds, decisions, args.action_chunk, recorded=recorded)
        sps_zero, _ = run(envs, "zero", a.rounds, decisions, args.action_chunk, recorded=recorded)
        total = a.rounds * decisions * args.action_chunk * a.num_envs / sps_policy
        print(f"pass {rep + 1}: policy + envs {sps_policy:.0f} env steps/s (policy {t_policy:.1f} s of {total:.1f} s), "
              f"its actions replayed {sps_replay:.0f}, zero actions {sps_zero:.0f}; ratio "
              f"{sps_policy / sps_replay:.2f} to the replay, {sps_policy / sps_zero:.2f} to zero actions", flush=True)
    envs.close()


if __name__ == "__main__":
    main()

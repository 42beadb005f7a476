"""CPU env stepping speed with and without torch's inference mode: PickCube-v1 envs in this process
(`--env-workers 1`), driven by uniform random actions (a zero-cost policy), the two modes taking turns.

The scripts step their CPU envs in inference mode (`ManiSkillEnvs.cpu_sim`, and the whole worker process): ManiSkill's
CPU step is mostly small torch ops on one env's tensors, and autograd's bookkeeping is a large share of their cost.

Run: .venv/bin/python benchmarks/bench_env.py [--num-envs 16] [--steps 100] [--rounds 3]
     [--control-modes pd_ee_delta_pose pd_joint_delta_pos]
"""

import argparse
import contextlib
import time
from unittest import mock

import numpy as np
import torch

import flow_sde_ppo


def env_sps(num_envs: int, steps: int, inference: bool, control_mode: str) -> float:
    """Env steps/s of num_envs envs in this process over `steps` steps of random actions, after 5 warm-up steps."""
    off = mock.patch.object(flow_sde_ppo.ManiSkillEnvs, "cpu_sim", lambda self: contextlib.nullcontext())
    with contextlib.nullcontext() if inference else off:
        envs = flow_sde_ppo.ManiSkillEnvs("PickCube-v1", num_envs, "state", control_mode, max_steps=80,
                                          ignore_terminations=False, device=torch.device("cpu"), workers=1)
        envs.reset(seed=0)
        actions = torch.rand(steps + 5, num_envs, envs.action_dim, generator=torch.Generator().manual_seed(0)) * 2 - 1
        for a in actions[:5]:
            envs.step(a)
        t0 = time.perf_counter()
        for a in actions[5:]:
            envs.step(a)
        dt = time.perf_counter() - t0
        envs.close()
    return num_envs * steps / dt


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num-envs", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3, help="alternating measurements of each mode")
    p.add_argument("--control-modes", nargs="+", default=["pd_ee_delta_pose"],
                   help="ManiSkill controllers, measured in turn (pd_joint_delta_pos skips the end-effector pose math)")
    cli = p.parse_args()
    torch.set_num_threads(1)
    res = {(c, i): [] for c in cli.control_modes for i in (True, False)}
    for _ in range(cli.rounds):
        for control in cli.control_modes:
            for inference in (False, True):
                res[control, inference].append(env_sps(cli.num_envs, cli.steps, inference, control))
                print(f"{control} {'inference mode' if inference else 'autograd on':>15}: "
                      f"{res[control, inference][-1]:.0f} env steps/s")
    for control in cli.control_modes:
        on, off = np.mean(res[control, True]), np.mean(res[control, False])
        print(f"mean over {cli.rounds} rounds, {cli.num_envs} envs in one process, {control}: inference mode {on:.0f}, "
              f"autograd on {off:.0f} env steps/s ({on / off:.2f}x)")


if __name__ == "__main__":
    main()

"""CPU env stepping speed with and without torch's inference mode: PickCube-v1 envs in this process
(`--env-workers 1`), driven by uniform random actions (a zero-cost policy), the two modes taking turns.

The scripts step their CPU envs in inference mode (`ManiSkillEnvs.cpu_sim`, and the whole worker process): ManiSkill's
CPU step is mostly small torch ops on one env's tensors, and autograd's bookkeeping is a large share of their cost.

Run: .venv/bin/python benchmarks/bench_env.py [--num-envs 16] [--steps 100] [--rounds 3]
"""

import argparse
import contextlib
import time
from unittest import mock

import numpy as np
import torch

import flow_sde_ppo


def env_sps(num_envs: int, steps: int, inference: bool) -> float:
    """Env steps/s of num_envs envs in this process over `steps` steps of random actions, after 5 warm-up steps."""
    off = mock.patch.object(flow_sde_ppo.ManiSkillEnvs, "cpu_sim", lambda self: contextlib.nullcontext())
    with contextlib.nullcontext() if inference else off:
        envs = flow_sde_ppo.ManiSkillEnvs("PickCube-v1", num_envs, "state", "pd_ee_delta_pose", max_steps=80,
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
    cli = p.parse_args()
    torch.set_num_threads(1)
    res = {True: [], False: []}
    for _ in range(cli.rounds):
        for inference in (False, True):
            res[inference].append(env_sps(cli.num_envs, cli.steps, inference))
            print(f"{'inference mode' if inference else 'autograd on':>15}: {res[inference][-1]:.0f} env steps/s")
    on, off = np.mean(res[True]), np.mean(res[False])
    print(f"mean over {cli.rounds} rounds, {cli.num_envs} envs in one process: inference mode {on:.0f}, autograd on "
          f"{off:.0f} env steps/s ({on / off:.2f}x)")


if __name__ == "__main__":
    main()

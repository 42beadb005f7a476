"""CPU env stepping speed with and without torch's inference mode: PickCube-v1 envs in this process
(`--env-workers 1`), driven by uniform random actions (a zero-cost policy), the two modes taking turns.
With --against-async: the scripts' worker processes (a SyncVectorEnv of many envs in each of 2 processes) against
gymnasium's AsyncVectorEnv (one process per env), their speed and the memory (RSS) of their processes.

The scripts step their CPU envs in inference mode (`ManiSkillEnvs.cpu_sim`, and the whole worker process): ManiSkill's
CPU step is mostly small torch ops on one env's tensors, and autograd's bookkeeping is a large share of their cost.

Run: .venv/bin/python benchmarks/bench_env.py [--num-envs 16] [--steps 100] [--rounds 3]
     [--control-modes pd_ee_delta_pose pd_joint_delta_pos] [--against-async]
"""

import argparse
import contextlib
import time
from functools import partial
from unittest import mock

import gymnasium as gym
import numpy as np
import torch

import environments


def env_sps(num_envs: int, steps: int, inference: bool, control_mode: str) -> float:
    """Env steps/s of num_envs envs in this process over `steps` steps of random actions, after 5 warm-up steps."""
    off = mock.patch.object(environments.ManiSkillEnvs, "cpu_sim", lambda self: contextlib.nullcontext())
    with contextlib.nullcontext() if inference else off:
        envs = environments.ManiSkillEnvs("PickCube-v1", num_envs, "state", control_mode, max_steps=80,
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


def rss_gib(pids) -> float:
    """Resident memory of these processes, in GiB (Linux /proc)."""
    kb = [int(line.split()[1]) for pid in pids for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")]
    return sum(kb) / 2**20


def workers_against_async(num_envs: int, steps: int, control_mode: str):
    """env steps/s and RSS of num_envs envs in the scripts' 2 worker processes, then in one AsyncVectorEnv process
    each (spawned, as the scripts' workers are), auto-resetting in the same step."""
    kw = dict(obs_mode="state", control_mode=control_mode, max_episode_steps=80, reward_mode="normalized_dense",
              render_mode="rgb_array", render_backend="cpu")
    thunks = [partial(environments.maniskill_env, "PickCube-v1", kw, True)] * num_envs
    actions = np.random.default_rng(0).uniform(-1, 1, (steps + 5, num_envs, 7)).astype(np.float32)
    for name in ("scripts' 2 workers", "AsyncVectorEnv"):
        t0 = time.perf_counter()
        if name == "AsyncVectorEnv":
            env = gym.vector.AsyncVectorEnv(thunks, context="spawn", autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
            pids = [p.pid for p in env.processes]
        else:
            env = environments.ProcessVectorEnv(thunks, workers=2)
            pids = [p.pid for p in env.procs]
        env.reset(seed=0)
        built = time.perf_counter() - t0
        for a in actions[:5]:
            env.step(a)
        t0 = time.perf_counter()
        for a in actions[5:]:
            env.step(a)
        sps = num_envs * steps / (time.perf_counter() - t0)
        print(f"{name}, {num_envs} envs: {sps:.0f} env steps/s, {len(pids)} processes holding {rss_gib(pids):.2f} GiB, "
              f"built and reset in {built:.0f} s")
        env.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num-envs", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3, help="alternating measurements of each mode")
    p.add_argument("--control-modes", nargs="+", default=["pd_ee_delta_pose"],
                   help="ManiSkill controllers, measured in turn (pd_joint_delta_pos skips the end-effector pose math)")
    p.add_argument("--against-async", action="store_true", help="worker processes against AsyncVectorEnv instead")
    cli = p.parse_args()
    torch.set_num_threads(1)
    if cli.against_async:
        return workers_against_async(cli.num_envs, cli.steps, cli.control_modes[0])
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

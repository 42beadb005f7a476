"""LIBERO env stepping speed through the scripts' env path (environments.LiberoEnvs: LiberoEnv in --env-workers
processes, torch tensors out), driven by uniform random actions (a zero-cost policy), at 1 and 2 workers: with the
scripts' observations (8-D state and two 128 px cameras, rendered by MuJoCo offscreen every step) and without rendering
(robosuite built with has_offscreen_renderer=False, use_camera_obs=False: state only, what LIBERO allows
without cameras; the images handed on are a 1-pixel placeholder).

Run: .venv/bin/python benchmarks/bench_libero.py [--suite libero_spatial] [--num-envs 4] [--steps 50] [--workers 1 2]
     [--render 1 0] [--rounds 1]
The CPU time per env step (this process and its workers, all threads: MuJoCo's renderer included) is the reading that
holds on a machine other programs share; steps/s needs idle cores. An episode lasts 220 steps in libero_spatial, so a
run of --steps < 220 contains no auto-reset (one costs about 10 settle steps and a state load); env creation (seconds
an env) and the first reset are not timed.
"""

import argparse
import os
import time

import gymnasium as gym
import numpy as np
import torch

import environments as script


class NoRenderLiberoEnv(script.LiberoEnv):
    """The scripts' LiberoEnv, its robosuite env built without an offscreen renderer or camera observations."""

    def __init__(self, *args, **kw):
        import libero.libero.envs as envs
        from libero.libero.envs.env_wrapper import ControlEnv
        offscreen = envs.OffScreenRenderEnv
        envs.OffScreenRenderEnv = lambda **k: ControlEnv(**k, has_offscreen_renderer=False, use_camera_obs=False)
        try:
            super().__init__(*args, **kw)
        finally:
            envs.OffScreenRenderEnv = offscreen
        self.observation_space = gym.spaces.Dict({"state": self.observation_space["state"],
                                                  "images": gym.spaces.Box(0, 255, (2, 1, 1, 3), np.uint8)})

    @staticmethod
    def obs_of(raw: dict) -> dict:
        state = np.concatenate([raw["robot0_eef_pos"], script.quat_xyzw_to_axis_angle(raw["robot0_eef_quat"]),
                                raw["robot0_gripper_qpos"]])
        return {"state": state.astype(np.float32), "images": np.zeros((2, 1, 1, 3), np.uint8)}


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system, all threads) the processes have used so far (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(sum(map(int, open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[11:13])) for pid in pids) / ticks


def env_sps(suite: str, num_envs: int, workers: int, steps: int, render: bool) -> tuple[float, float, float]:
    """-> (env steps/s over `steps` steps after 3 warm-up steps, CPU milliseconds per env step in this process and
    the workers, seconds to build the envs and reset them)."""
    script.LiberoEnv = LiberoEnv if render else NoRenderLiberoEnv  # what LiberoEnvs builds (its workers unpickle it)
    t0 = time.perf_counter()
    envs = script.LiberoEnvs(suite, (0,), num_envs, script.LIBERO_MAX_STEPS[suite], ignore_terminations=False,
                             device=torch.device("cpu"), workers=workers)
    obs = envs.reset(seed=0)
    build = time.perf_counter() - t0
    assert obs["images"].shape[-2] == (128 if render else 1)
    actions = torch.rand(steps + 3, num_envs, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for a in actions[:3]:
        envs.step(a)
    pids = [os.getpid()] + [p.pid for p in getattr(envs.env, "procs", [])]
    t1, c1 = time.perf_counter(), cpu_seconds(pids)
    for a in actions[3:]:
        envs.step(a)
    dt, cpu = time.perf_counter() - t1, cpu_seconds(pids) - c1
    envs.close()
    return num_envs * steps / dt, 1000 * cpu / (num_envs * steps), build


LiberoEnv = script.LiberoEnv


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="libero_spatial")
    p.add_argument("--num-envs", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--render", type=int, nargs="+", default=[1, 0], help="1: cameras rendered, 0: no renderer")
    p.add_argument("--rounds", type=int, default=1, help="repeat each setting, best reading reported")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"{args.suite}, {args.num_envs} envs, {args.steps} steps of random actions, best of {args.rounds}")
    for render in args.render:
        for workers in args.workers:
            runs = [env_sps(args.suite, args.num_envs, workers, args.steps, render) for _ in range(args.rounds)]
            sps, cpu, build = max(r[0] for r in runs), min(r[1] for r in runs), min(r[2] for r in runs)
            what = "state + 2 cameras 128 px" if render else "state only, no renderer"
            print(f"{what:26s} workers {workers}: {sps:6.1f} env steps/s, {cpu:5.1f} CPU ms an env step  "
                  f"(build + reset {build:5.1f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)",
                  flush=True)


if __name__ == "__main__":
    main()

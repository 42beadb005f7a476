"""Real sizes on one GPU: one full Flow-SDE PPO iteration of a random-init pi0 policy (no weights can be
downloaded) on rgb observations at 320 ManiSkill GPU envs. Prints peak GPU memory, rollout env steps/s and the
update time. The frozen VLM runs in bfloat16 (flow_sde_ppo's default on a GPU); the update is micro-batched and
gradient-checkpointed in the expert. By default the policy is handed to the script in memory and the script's
checkpoint writes are skipped (about 10 GB at pi0 size, minutes of a short device lease; the tests cover
checkpoint IO); --checkpoint-io saves it as an SFT checkpoint for the script to load, and lets the script write its
final checkpoint, as a user's run does.

Run (GPU):  .venv/bin/python benchmarks/bench_scale.py
Run (CPU, the same code path at the tiny size):
            .venv/bin/python benchmarks/bench_scale.py --preset tiny --num-envs 4 --num-steps 2 --max-episode-steps 10
"""

import argparse
import contextlib
import json
import resource
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import flow_sde_ppo
import vla

STATE_DIM, ACTION_DIM = 9, 7  # Panda qpos (the rgb mode's proprio) and pd_ee_delta_pose


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="pi0", choices=sorted(vla.PRESETS))
    p.add_argument("--num-envs", type=int, default=320)
    p.add_argument("--num-steps", type=int, default=10, help="decision points per env in the iteration")
    p.add_argument("--max-episode-steps", type=int, default=80)
    p.add_argument("--action-chunk", type=int, default=5)
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--num-minibatches", type=int, default=4, help="4 x 800 decisions at 320 envs, as measured")
    p.add_argument("--no-grad-checkpointing", action="store_true")
    p.add_argument("--sim-backend", default="auto", help="flow_sde_ppo's --sim-backend: physx_cpu steps CPU envs in "
                   "worker processes (SAPIEN's PhysX GPU library is a download that an offline GPU machine lacks)")
    p.add_argument("--checkpoint-io", action="store_true", help="go through an SFT checkpoint on disk and let the "
                   "script write its own at the end (default: in memory, no checkpoint writes)")
    p.add_argument("--out", default="runs/bench_scale")
    cli = p.parse_args(argv)
    out = Path(cli.out)

    torch.manual_seed(0)
    gpu = torch.cuda.is_available()
    t0 = time.time()
    with torch.device("cuda" if gpu else "cpu"):  # a 3B random init takes about a minute on CPU, a second on a GPU
        policy = vla.build(cli.preset, ACTION_DIM, STATE_DIM)
    rng = np.random.default_rng(0)
    norm = vla.Normalizer.from_data(rng.normal(size=(256, STATE_DIM)), rng.uniform(-1, 1, (256, ACTION_DIM)),
                                    policy.config.norm_mode)
    meta = {"obs_mode": "rgb", "control_mode": "pd_ee_delta_pose", "action_chunk": cli.action_chunk}
    if cli.checkpoint_io:  # a random-init policy saved as an SFT checkpoint: the script runs as a user runs it
        vla.save_checkpoint(out / "sft", policy.to("cpu", torch.bfloat16), norm, meta=meta)
        del policy
    else:
        policy.freeze_vlm(dtype=torch.bfloat16 if gpu else None)  # before the peak-memory reset, as the script would
        (out / "sft").mkdir(parents=True, exist_ok=True)
    print(f"model built{' and saved' if cli.checkpoint_io else ''} in {time.time() - t0:.0f} s", flush=True)

    args = replace(flow_sde_ppo.Args(), checkpoint=str(out / "sft"), output_dir=str(out / "run"),
                   num_envs=cli.num_envs, num_steps=cli.num_steps, action_chunk=cli.action_chunk,
                   max_episode_steps=cli.max_episode_steps, total_iterations=1, critic_warmup_iters=0, obs_mode="rgb",
                   eval_episodes=0, save_every=10**9,
                   num_minibatches=cli.num_minibatches, micro_batch_size=cli.micro_batch_size,
                   grad_checkpointing=not cli.no_grad_checkpointing, sim_backend=cli.sim_backend)
    (out / "run" / "metrics.jsonl").unlink(missing_ok=True)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    with contextlib.ExitStack() as in_memory:
        if not cli.checkpoint_io:  # the script's load_checkpoint returns this policy, its save_checkpoint does nothing
            handed_over = (policy, norm, {}, meta)
            in_memory.enter_context(mock.patch.object(vla, "load_checkpoint", lambda *a, **k: handed_over))
            in_memory.enter_context(mock.patch.object(vla, "save_checkpoint", lambda *a, **k: None))
        flow_sde_ppo.main(args)
    wall = time.time() - t0
    row = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    device = torch.cuda.get_device_name() if gpu else "CPU"
    peak = (f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB GPU (allocated), "
            f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved" if gpu else
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB CPU (max RSS)")
    print(f"\n{cli.preset} preset, PickCube rgb ({cli.sim_backend} simulator), {cli.num_envs} envs x "
          f"{cli.num_steps} decisions x {cli.action_chunk} actions, micro-batch {cli.micro_batch_size}, "
          f"grad checkpointing {not cli.no_grad_checkpointing}, on {device}")
    print(f"peak memory    {peak}")
    print(f"rollout        {row['rollout_sps']:.0f} env steps/s ({row['rollout_time']:.1f} s)")
    print(f"update         {row['update_time']:.1f} s (4 epochs x {cli.num_minibatches} minibatches)")
    print(f"iteration wall {wall:.0f} s including env creation" +
          (", model loading and the final checkpoint" if cli.checkpoint_io else " (no checkpoint IO)"))


if __name__ == "__main__":
    main()

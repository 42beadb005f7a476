"""SFT benchmark on CPU: PickCube (state obs, tiny preset) eval success against the number of demonstrations,
with wall time; then the LIBERO pipeline end to end on a tiny self-made demo file, and LIBERO env steps/s.

Run: .venv/bin/python benchmarks/bench_sft.py [--demos 10 25 100 200] [--planner-joint-acc 0.9] [--skip-libero]
"""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import environments  # noqa: E402
import sft_baseline as sft  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--demos", type=int, nargs="+", default=[10, 25, 100, 200])
    p.add_argument("--train-steps", type=int, default=sft.Args.train_steps)
    p.add_argument("--planner-joint-acc", type=float, default=sft.Args.planner_joint_acc,
                   help="the demos' planner acceleration limit (ManiSkill's own: 0.9)")
    p.add_argument("--skip-libero", action="store_true")
    cli = p.parse_args()
    rows = []
    for n in cli.demos:
        t0 = time.time()
        m, _ = sft.main(replace(sft.Args(), num_demos=n, train_steps=cli.train_steps,
                                planner_joint_acc=cli.planner_joint_acc,
                                output_dir=f"runs/bench_sft/PickCube-v1_{n}demos_acc{cli.planner_joint_acc:g}"))
        rows.append((n, m["success_once"], m["success_at_end"], time.time() - t0))
    print(f"\nPickCube-v1, state obs, pd_ee_delta_pose, tiny preset, {cli.train_steps} steps, planner joint acc "
          f"{cli.planner_joint_acc:g}, 100 eval episodes")
    print(f"{'demos':>6} {'success_once':>13} {'success_at_end':>15} {'wall s':>8}")
    for n, so, se, w in rows:
        print(f"{n:>6} {so:>13.2f} {se:>15.2f} {w:>8.0f}")

    if cli.skip_libero:
        return
    from libero_demo import write_libero_demo_file
    path = Path("runs/bench_sft/libero_tiny_demo.hdf5")
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    write_libero_demo_file(path, "libero_spatial", 0, num_demos=2, steps=20, image_size=128)
    t_demo = time.time() - t0
    t0 = time.time()
    m, _ = sft.main(replace(sft.Args(), env_id="libero_spatial", task_ids=(0,), demo_path=str(path), num_demos=2,
                            train_steps=50, batch_size=8, eval_episodes=1, num_eval_envs=1,
                            output_dir="runs/bench_sft/libero_spatial_tiny"))
    t_pipe = time.time() - t0
    envs = environments.LiberoEnvs("libero_spatial", (0,), 1, 1000, True, torch.device("cpu"))
    envs.reset(seed=0)
    t0 = time.time()
    for _ in range(50):
        envs.step(torch.zeros(1, 7))
    sps = 50 / (time.time() - t0)
    envs.close()
    print(f"\nLIBERO libero_spatial task 0: demo file (2 x 20 steps) written in {t_demo:.0f} s; SFT (50 steps) + "
          f"1 eval episode (220 steps) end to end in {t_pipe:.0f} s, success_once {m['success_once']:.2f}; "
          f"1 env with 2 cameras at 128 px: {sps:.1f} steps/s")


if __name__ == "__main__":
    main()

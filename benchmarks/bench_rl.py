"""RL benchmark on CPU: learning curves of the RL scripts from one SFT checkpoint (plotted on shared axes),
rollout throughput against a zero-cost policy (random actions, and zero actions), and the Flow-Noise / Flow-SDE
update-cost ratio.

Run: .venv/bin/python benchmarks/bench_rl.py [--algos sde noise grpo] [--minutes 30] [--eval-every 16] [--plot-only]
[--plot-file docs/learning_curves.png]
The entries are the runs of docs/results.md: "sde", "noise", "grpo" the three scripts' defaults (sections 1 and 2),
"<name>_seed<N>" the same with --seed N, and the settings compared with the defaults (section 3): sde_k2 (Flow-SDE PPO
at K = 2 with the noise level that keeps the default's action spread), noise_k2, noise_lr5e5, noise_sum (the chain's
exact log-likelihood in the ratio), noise_k2_sum, noise_sum_const and noise_k2_sum_const (the exact sum with a
constant lr 1e-5 and no KL stop). Each run is the script with --time-budget-min 30 --eval-every 16 and the entry's
changes; --plot-only redraws a plot from the runs' metrics.jsonl under runs/bench_rl/<name>/.
Needs the SFT checkpoint first: .venv/bin/python sft_baseline.py
"""

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import flow_grpo
import flow_noise_ppo
import flow_sde_ppo

K2 = dict(denoise_steps=2)
SUM = dict(logprob_reduction="sum")  # the chain's exact log-likelihood in Flow-Noise PPO's ratio
CONST = dict(lr=1e-5, anneal_lr=False, target_kl=None)  # a constant actor lr, no KL stop
SCHEDULE = {"seed"}  # changes that leave the method as it is: drawn with solid lines


def seeded(name: str, mod, changes: dict, label: str, seeds) -> dict:
    """A setting's entry (seed 1) and its _seed<N> for each of seeds (directories and labels of their own)."""
    runs = {name: (mod, changes, label)}
    runs.update({f"{name}_seed{s}": (mod, changes | dict(seed=s), f"{label}, seed {s}") for s in seeds})
    return runs


RUNS = {  # name: (script, changes to its defaults, plot label)
    **seeded("sde", flow_sde_ppo, {}, "Flow-SDE PPO, 30 minutes", seeds=(2, 3, 4, 5, 6)),
    **seeded("noise", flow_noise_ppo, {}, "Flow-Noise PPO, log-likelihood / (K+1)", seeds=(2, 3, 4, 5, 6, 7)),
    **seeded("grpo", flow_grpo, {}, "GRPO, 30 minutes", seeds=(2, 3)),
    # a = 0.45 at K = 2 spreads the executed actions as a = 1.2 does at K = 4 (bench_exploration.py)
    **seeded("sde_k2", flow_sde_ppo, K2 | dict(noise_level=0.45), "Flow-SDE PPO, K = 2, a = 0.45", seeds=(2,)),
    **seeded("noise_k2", flow_noise_ppo, K2, "Flow-Noise PPO, K = 2", seeds=(2, 3, 4)),
    **seeded("noise_lr5e5", flow_noise_ppo, dict(lr=5e-5), "Flow-Noise PPO, lr 5e-5", seeds=(2, 3, 4)),
    **seeded("noise_sum", flow_noise_ppo, SUM, "Flow-Noise PPO, exact sum", seeds=(2, 3, 4)),
    **seeded("noise_k2_sum", flow_noise_ppo, K2 | SUM, "Flow-Noise PPO, K = 2, exact sum", seeds=(2, 3, 4)),
    **seeded("noise_sum_const", flow_noise_ppo, SUM | CONST, "Flow-Noise PPO, exact sum, lr 1e-5", seeds=(2,)),
    **seeded("noise_k2_sum_const", flow_noise_ppo, K2 | SUM | CONST, "Flow-Noise PPO, K = 2, exact sum, lr 1e-5",
             seeds=(2, 3, 4)),
}
OUT = Path("runs/bench_rl")


def raw_env_sps(num_envs: int, steps: int = 200, env_workers: int | None = None, zero: bool = False) -> float:
    """Env steps/s of the same training envs driven by a zero-cost policy: uniform random actions, or zero actions
    (the arm held still), which step faster, so a stricter reference for the rollouts."""
    args = replace(flow_sde_ppo.Args(), obs_mode="state", control_mode="pd_ee_delta_pose", env_workers=env_workers)
    envs = flow_sde_ppo.make_envs(args, num_envs, ignore_terminations=False, device=torch.device("cpu"))
    envs.reset(seed=0)
    actions = torch.rand(steps, num_envs, envs.action_dim) * 2 - 1  # [steps, envs, action dim]
    if zero:
        actions.zero_()
    t0 = time.time()
    for a in actions:
        envs.step(a)
    sps = num_envs * steps / (time.time() - t0)
    envs.close()  # outside the timing: the workers' teardown took 20 s here, more than half the 200 steps' time
    return sps


def read(algo):
    rows = [json.loads(line) for line in (OUT / algo / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "rollout_time" in r], [r for r in rows if "eval/success_once" in r]


def plot(algos, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    # colour: the script (blues Flow-SDE PPO, oranges Flow-Noise PPO, greens GRPO), a darker shade for each of its
    # runs in the order listed; solid: the script's default, dashed: a setting that changes it
    maps = {flow_sde_ppo: plt.cm.Blues, flow_noise_ppo: plt.cm.Oranges, flow_grpo: plt.cm.Greens}
    count = {mod: sum(RUNS[a][0] is mod for a in algos) for mod in maps}
    seen = dict.fromkeys(maps, 0)
    for algo in algos:
        _, ev = read(algo)
        x_steps = [r["global_step"] / 1e3 for r in ev]
        x_min = [r["train_time"] / 60 for r in ev]
        y = [100 * r["eval/success_once"] for r in ev]
        mod, changes, label = RUNS[algo]
        method = {k for k, v in changes.items() if k not in SCHEDULE and getattr(mod.Args(), k) != v}
        shade = 0.7 if count[mod] == 1 else 0.45 + 0.5 * seen[mod] / (count[mod] - 1)  # 0.45 light to 0.95 dark
        color = maps[mod](shade)
        seen[mod] += 1
        style = dict(marker="o", label=label, linestyle="--" if method else "-", color=color)
        axes[0].plot(x_steps, y, **style)
        axes[1].plot(x_min, y, **style)
    axes[0].set_xlabel("env steps (thousands)")
    axes[1].set_xlabel("training wall time, minutes (2-core CPU, evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("eval success_once, % (100 fixed-seed episodes)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=9)  # below, off the curves
    fig.suptitle("PickCube-v1 (state obs, tiny preset) from one few-shot SFT checkpoint")
    fig.tight_layout(rect=(0, 0.19, 1, 1))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--algos", nargs="+", default=["sde", "noise", "grpo"], choices=list(RUNS))
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--eval-every", type=int, default=16, help="iterations between evaluations (100 episodes each)")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--plot-file", default="docs/learning_curves.png", help="where the learning-curve plot goes")
    cli = p.parse_args()
    if not cli.plot_only:
        for algo in cli.algos:
            mod, changes, _ = RUNS[algo]
            run = dict(time_budget_min=cli.minutes, total_iterations=10_000, eval_every=cli.eval_every,
                       output_dir=str(OUT / algo))
            args = replace(mod.Args(), **(run | changes))
            shutil.rmtree(OUT / algo, ignore_errors=True)  # metrics.jsonl appends: start clean
            t0 = time.time()
            mod.main(args)
            print(f"{algo}: {time.time() - t0:.0f} s wall in all")
    n = flow_sde_ppo.Args().num_envs
    raw = raw_env_sps(n)  # the scripts' default: one env worker process per core
    one = raw_env_sps(n, env_workers=1)
    still = raw_env_sps(n, zero=True)
    print(f"\nraw env steps/s, {n} CPU envs, zero-cost policy: {raw:.0f} with random actions (all in one process: "
          f"{one:.0f}), {still:.0f} with zero actions")
    print(f"{'algo':>12} {'eval before':>12} {'eval after':>11} {'best':>6} {'env steps':>10} {'train min':>10} "
          f"{'rollout sps':>12} {'ratio':>6} {'vs zero':>8} {'update s':>9}")
    upd = {}
    for algo in cli.algos:
        tr, ev = read(algo)
        sps = float(np.mean([r["rollout_sps"] for r in tr]))
        # updates that ran every epoch: a KL stop's shorter ones would make the update look cheaper than at equal batch
        full = max(r.get("epochs", 0) for r in tr)
        upd[algo] = float(np.median([r["update_time"] for r in tr if r.get("epochs", 0) == full]))
        print(f"{algo:>12} {ev[0]['eval/success_once']:>12.2f} {ev[-1]['eval/success_once']:>11.2f} "
              f"{max(r['eval/success_once'] for r in ev):>6.2f} {tr[-1]['global_step']:>10} "
              f"{tr[-1]['train_time'] / 60:>10.1f} {sps:>12.0f} {sps / raw:>6.2f} {sps / still:>8.2f} "
              f"{upd[algo]:>9.2f}")
    if "sde" in upd and "noise" in upd:
        print(f"update cost, Flow-Noise / Flow-SDE at equal batch: {upd['noise'] / upd['sde']:.2f}x")
    plot(cli.algos, cli.plot_file)


if __name__ == "__main__":
    main()

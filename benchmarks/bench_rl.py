"""RL benchmark on CPU: learning curves of the RL scripts from one SFT checkpoint (plotted on shared axes),
rollout throughput against a zero-cost policy (random actions, and zero actions), and the Flow-Noise / Flow-SDE
update-cost ratio.

Run: .venv/bin/python benchmarks/bench_rl.py [--algos sde noise grpo] [--minutes 30] [--eval-every 16] [--plot-only]
[--plot-file docs/learning_curves.png]
"sde", "noise", "grpo" are the scripts' defaults (64 envs, 4 actions per decision, Flow-SDE noise level 1.2,
Flow-Noise std 0.16-0.32, since the forty-ninth session Flow-SDE PPO's actor step and since the fifty-first the chain
log-likelihood divided by K+1; every other Flow-Noise entry keeps the constant lr 1e-5 and the exact sum it ran
with); *_a08 / *_a12 / sde_a16 set the Flow-SDE noise level (0.8 until the twenty-second session), noise_s08 /
noise_s2x Flow-Noise's std bounds (0.08-0.16 until then), *_seed2 / *_seed3 other seeds of these, noise_kl05 /
noise_kl05_lr3e5 Flow-Noise PPO with Flow-SDE PPO's KL stop (0.05; and its annealed 3e-5 actor step), noise_e2
Flow-Noise PPO with 2 epochs at lr 2e-5, noise_k2 and noise_k2_seed2 to noise_k2_seed13 Flow-Noise PPO with K = 2
denoising steps (--denoise-steps 2), noise_k2_kl05 / noise_k2_kl05_seed2 the same with the KL stop (--target-kl
0.05), noise_k2_sdeopt / noise_k2_sdeopt_seed2 with Flow-SDE PPO's whole actor step (--lr 3e-5 --anneal-lr
--target-kl 0.05), noise_k2_s4x / noise_k2_s4x_seed4 / noise_k2_s4x_seed2 at K = 2 with twice the std bounds
(0.32-0.64), noise_k2_s4x_lr2e5 / noise_k2_s4x_lr2e5_seed4 / noise_k2_s4x_lr2e5_seed2 the same at actor lr 2e-5,
noise_k2_nh1e4 at K = 2 with the noise head's lr 1e-4 (noise_k2_nh1e3 / noise_k2_nh1e3_seed4: 1e-3), noise_k2_ep8 at
K = 2 with 8 update epochs (noise_k2_ep8_anneal: and the lr annealed to 0), noise_k2_clip3 at K = 2 with the clip at
0.3 (noise_k2_clip3_seed10 / noise_k2_clip3_seed11: seeds 10 and 11), sde_it110 / noise_k2_it110 (and their _seed2 /
_seed3) the fresh-flag runs of the forty-first to forty-fourth sessions over a fixed 110 iterations (563k env steps,
a usual machine's 30 minutes) instead of --minutes, sde_k2_a045_it110 (and its _seed2) the same for Flow-SDE PPO at K
= 2 with noise level 0.45 (forty-fifth session; _seed3 forty-sixth), sde_k2_a045 / sde_k2_a045_seed2 the same over
--minutes and sde_fresh30 the default beside them on the same usual-speed machine (forty-sixth session),
sde_fresh30_seed2 / sde_fresh30_seed3 its seeds 2 and 3 and noise_k2_fresh30 / noise_k2_fresh30_seed2 Flow-Noise PPO
at K = 2 over --minutes on the same machine (forty-seventh session), noise_fresh30 / noise_fresh30_seed2 Flow-Noise
PPO's default and noise_k2_fresh30_seed3 / noise_k2_fresh30_seed4 two more seeds at K = 2 there (forty-eighth
session), noise_sdeopt_fresh30 (and its _seed2 to _seed4) Flow-Noise PPO's K = 4 with Flow-SDE PPO's actor step there
(forty-ninth session), noise_k2_sdeopt_fresh30 (and its _seed2 to _seed4) the same at K = 2 (fiftieth session),
noise_mean_fresh30 (and its _seed2 to _seed4) the same at K = 4 with --logprob-reduction mean (fifty-first session),
noise_k2_mean_fresh30 (and its _seed2 to _seed4) that at K = 2 (fifty-second session), noise_mean_lr5e5_fresh30
(and its _seed2 to _seed4) the K = 4 one with --lr 5e-5 (fifty-third session), noise_mean_fresh30_seed5 to _seed7
three more seeds of the default (fifty-fourth session), sde_fresh30_seed4 to _seed6 three more of Flow-SDE PPO's
default (fifty-fifth session), grpo_fresh30 (and its _seed2 and _seed3) GRPO's default over --minutes (fifty-sixth);
the other entries of RUNS rerun earlier tables' settings (at a = 0.8 and std 0.08-0.16), all with 8 actions per
decision (the default before the nineteenth session; *_c8 are those defaults): 16 envs and 4 minibatches (the PPO
scripts' default before the sixth session, GRPO's before the fifth), all envs in one process (--env-workers 1), the
paper's noise level 0.5.
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

SIXTEEN = dict(num_envs=16, num_minibatches=4)
SDE_CONST = dict(lr=1e-5, anneal_lr=False, target_kl=None)  # Flow-SDE PPO's actor step before the ninth session
SDE_2E5 = dict(lr=2e-5, target_kl=None)  # Flow-SDE PPO's default of the ninth to eleventh sessions
NOISE_CONST = dict(lr=1e-5, anneal_lr=False, target_kl=None)  # Flow-Noise PPO's actor step before the 49th session
ONE_PROC = dict(env_workers=1)  # every env in the script's own process: one core
# The RL scripts' defaults before the nineteenth session: 8 actions per decision (the SFT checkpoint's), 10 decisions
# per 80-step episode and gamma / lambda 0.9 / 0.95 per decision (the defaults' squares: the same per env step).
# GRPO rolls whole episodes (no num_steps) and has no critic (no gamma / lambda): only the chunk changes.
C8 = dict(action_chunk=8, num_steps=10, gamma=0.9, gae_lambda=0.95)
C8_GRPO = dict(action_chunk=8)
A08 = dict(noise_level=0.8)  # the Flow-SDE noise level of every run before the twenty-second session
S08 = dict(sigma_min=0.08, sigma_max=0.16)  # Flow-Noise's std bounds, likewise
S2X = dict(sigma_min=0.16, sigma_max=0.32)  # Flow-Noise's std bounds since the twenty-second session
S4X = dict(sigma_min=0.32, sigma_max=0.64)  # twice those
K2 = dict(denoise_steps=2)
SUM = dict(logprob_reduction="sum")  # Flow-Noise PPO's log-likelihood before the fifty-first session
MEAN = dict(logprob_reduction="mean")  # since
SDE_STEP = dict(lr=3e-5, anneal_lr=True, target_kl=0.05)  # Flow-SDE PPO's actor step since the twelfth session
# A fixed schedule in place of the wall clock, which slow machines shorten: 110 iterations are the 563k env steps a
# usual machine's 30 minutes hold, and Flow-SDE PPO anneals its lr over them whatever the machine's speed
IT110 = dict(total_iterations=110, time_budget_min=None)
SCHEDULE = {"seed", *IT110}  # changes that leave the method as it is: drawn with solid lines
# Flow-SDE at K = 2 with the noise level that keeps the default's action spread (bench_exploration.py: a = 0.45 at
# K = 2 spreads the executed actions as a = 1.2 does at K = 4)
SDE_K2 = K2 | dict(noise_level=0.45)


def seeded(name: str, mod, changes: dict, label: str, seeds=(2, 3, 4)) -> dict:
    """A setting's entry (seed 1) and its _seed<N> for each of seeds (directories and labels of their own)."""
    runs = {name: (mod, changes, label)}
    runs.update({f"{name}_seed{s}": (mod, changes | dict(seed=s), f"{label}, seed {s}") for s in seeds})
    return runs


RUNS = {  # name: (script, changes to its defaults, plot label)
    "sde": (flow_sde_ppo, {}, "Flow-SDE PPO"),
    "noise": (flow_noise_ppo, {}, "Flow-Noise PPO"),
    "grpo": (flow_grpo, {}, "GRPO (Flow-SDE)"),
    "sde_c8": (flow_sde_ppo, A08 | C8, "Flow-SDE PPO, 8 actions per decision"),
    "noise_c8": (flow_noise_ppo, S08 | C8, "Flow-Noise PPO, 8 actions per decision"),
    "grpo_c8": (flow_grpo, A08 | C8_GRPO, "GRPO, 8 actions per decision"),
    "grpo_seed2": (flow_grpo, A08 | C8_GRPO | dict(seed=2), "GRPO, seed 2"),
    "sde_seed2": (flow_sde_ppo, A08 | C8 | dict(seed=2), "Flow-SDE PPO, seed 2"),
    "sde_2e5": (flow_sde_ppo, A08 | C8 | SDE_2E5, "Flow-SDE PPO, lr 2e-5 annealed, no target KL"),
    "sde_2e5_seed2": (flow_sde_ppo, A08 | C8 | SDE_2E5 | dict(seed=2),
                      "Flow-SDE PPO, lr 2e-5 annealed, no target KL, seed 2"),
    "sde_const": (flow_sde_ppo, A08 | C8 | SDE_CONST, "Flow-SDE PPO, constant lr 1e-5"),
    "sde_const_seed2": (flow_sde_ppo, A08 | C8 | SDE_CONST | dict(seed=2),
                        "Flow-SDE PPO, constant lr 1e-5, seed 2"),
    "noise_seed2": (flow_noise_ppo, S08 | C8 | dict(seed=2), "Flow-Noise PPO, seed 2"),
    "grpo_g4": (flow_grpo, A08 | C8_GRPO | dict(group_size=4), "GRPO, groups of 4"),
    "grpo_anneal": (flow_grpo, A08 | C8_GRPO | dict(anneal_lr=True, lr=2e-5), "GRPO, lr 2e-5 annealed to 0"),
    "noise_anneal": (flow_noise_ppo, S08 | C8 | dict(anneal_lr=True, lr=2e-5),
                     "Flow-Noise PPO, lr 2e-5 annealed to 0"),
    "sde_tkl": (flow_sde_ppo, A08 | C8 | dict(lr=3e-5, target_kl=0.05),
                "Flow-SDE PPO, lr 3e-5 annealed, target KL 0.05"),
    "sde_tkl_seed2": (flow_sde_ppo, A08 | C8 | dict(lr=3e-5, target_kl=0.05, seed=2),
                      "Flow-SDE PPO, lr 3e-5 annealed, target KL 0.05, seed 2"),
    "sde16": (flow_sde_ppo, A08 | C8 | SIXTEEN | SDE_CONST, "Flow-SDE PPO, 16 envs"),
    "grpo16": (flow_grpo, A08 | C8_GRPO | SIXTEEN, "GRPO, 16 envs"),
    "sde16_1proc": (flow_sde_ppo, A08 | C8 | SIXTEEN | ONE_PROC | SDE_CONST,
                    "Flow-SDE PPO, 16 envs in one process"),
    "noise16_1proc": (flow_noise_ppo, S08 | C8 | SIXTEEN | ONE_PROC, "Flow-Noise PPO, 16 envs in one process"),
    "grpo16_1proc": (flow_grpo, A08 | C8_GRPO | SIXTEEN | ONE_PROC, "GRPO, 16 envs in one process"),
    # the twenty-second session's runs: the Flow-SDE noise level and Flow-Noise std bounds of the scripts until then
    # (0.8, 0.08-0.16) and their new defaults
    "sde_a08": (flow_sde_ppo, dict(noise_level=0.8), "Flow-SDE PPO, a = 0.8"),
    "grpo_a08": (flow_grpo, dict(noise_level=0.8), "GRPO, a = 0.8"),
    "sde_a12": (flow_sde_ppo, dict(noise_level=1.2), "Flow-SDE PPO, a = 1.2"),
    "grpo_a12": (flow_grpo, dict(noise_level=1.2), "GRPO, a = 1.2"),
    "noise_s08": (flow_noise_ppo, S08, "Flow-Noise PPO, sigma 0.08-0.16"),
    "noise_s2x": (flow_noise_ppo, S2X, "Flow-Noise PPO, sigma 0.16-0.32"),
    # the twenty-third session's: other seeds of the new defaults (noise_s2x_seed2 first run in the twenty-fifth),
    # and a = 1.6
    "sde_a12_seed2": (flow_sde_ppo, dict(noise_level=1.2, seed=2), "Flow-SDE PPO, a = 1.2, seed 2"),
    "sde_a12_seed3": (flow_sde_ppo, dict(noise_level=1.2, seed=3), "Flow-SDE PPO, a = 1.2, seed 3"),
    "grpo_a12_seed2": (flow_grpo, dict(noise_level=1.2, seed=2), "GRPO, a = 1.2, seed 2"),
    "noise_s2x_seed2": (flow_noise_ppo, S2X | dict(seed=2), "Flow-Noise PPO, sigma 0.16-0.32, seed 2"),
    "sde_a16": (flow_sde_ppo, dict(noise_level=1.6), "Flow-SDE PPO, a = 1.6"),
    # the twenty-fourth session's: Flow-Noise PPO with Flow-SDE PPO's KL stop (and its annealed 3e-5 actor step)
    "noise_kl05": (flow_noise_ppo, S2X | dict(target_kl=0.05), "Flow-Noise PPO, target KL 0.05"),
    "noise_kl05_lr3e5": (flow_noise_ppo, S2X | dict(target_kl=0.05, lr=3e-5, anneal_lr=True),
                         "Flow-Noise PPO, lr 3e-5 annealed, target KL 0.05"),
    "noise_kl05_seed2": (flow_noise_ppo, S2X | dict(target_kl=0.05, seed=2), "Flow-Noise PPO, target KL 0.05, seed 2"),
    # the twenty-fifth session's: half the epochs at twice the step (the same step x epochs per iteration), so the
    # 6-7 s update halves and 30 minutes hold more iterations
    "noise_e2": (flow_noise_ppo, S2X | dict(update_epochs=2, lr=2e-5), "Flow-Noise PPO, 2 epochs, lr 2e-5"),
    # the twenty-sixth session's: K = 2 denoising steps (the SFT checkpoint scores 30% at K = 2, 29% at K = 4), which
    # halves the K transitions Flow-Noise PPO's update recomputes; rerun in the fortieth session, as was "sde", with
    # fresh reset observations from an SFT checkpoint trained on demos with fresh first observations
    "noise_k2": (flow_noise_ppo, S2X | dict(denoise_steps=2), "Flow-Noise PPO, K = 2"),
    "noise_k2_seed2": (flow_noise_ppo, S2X | dict(denoise_steps=2, seed=2), "Flow-Noise PPO, K = 2, seed 2"),
    "noise_k2_seed3": (flow_noise_ppo, S2X | dict(denoise_steps=2, seed=3), "Flow-Noise PPO, K = 2, seed 3"),
    # the twenty-seventh session's: K = 2 with Flow-SDE PPO's KL stop (each lifted Flow-Noise PPO's 30 minutes alone)
    "noise_k2_kl05": (flow_noise_ppo, S2X | dict(denoise_steps=2, target_kl=0.05),
                      "Flow-Noise PPO, K = 2, target KL 0.05"),
    "noise_k2_kl05_seed2": (flow_noise_ppo, S2X | dict(denoise_steps=2, target_kl=0.05, seed=2),
                            "Flow-Noise PPO, K = 2, target KL 0.05, seed 2"),
    # the twenty-eighth session's: two more seeds of K = 2, to learn how often it reaches 95%
    "noise_k2_seed4": (flow_noise_ppo, S2X | dict(denoise_steps=2, seed=4), "Flow-Noise PPO, K = 2, seed 4"),
    "noise_k2_seed5": (flow_noise_ppo, S2X | dict(denoise_steps=2, seed=5), "Flow-Noise PPO, K = 2, seed 5"),
    # the thirty-fourth and thirty-fifth sessions': new seeds of K = 2 with the update on every core (--update-threads'
    # default)
    "noise_k2_seed6": (flow_noise_ppo, S2X | dict(denoise_steps=2, seed=6), "Flow-Noise PPO, K = 2, seed 6"),
    "noise_k2_seed7": (flow_noise_ppo, S2X | dict(denoise_steps=2, seed=7), "Flow-Noise PPO, K = 2, seed 7"),
    "noise_k2_seed8": (flow_noise_ppo, S2X | dict(denoise_steps=2, seed=8), "Flow-Noise PPO, K = 2, seed 8"),
    "noise_k2_seed9": (flow_noise_ppo, S2X | dict(denoise_steps=2, seed=9), "Flow-Noise PPO, K = 2, seed 9"),
    "noise_k2_seed10": (flow_noise_ppo, S2X | K2 | dict(seed=10), "Flow-Noise PPO, K = 2, seed 10"),
    "noise_k2_seed11": (flow_noise_ppo, S2X | K2 | dict(seed=11), "Flow-Noise PPO, K = 2, seed 11"),
    "noise_k2_seed12": (flow_noise_ppo, S2X | K2 | dict(seed=12), "Flow-Noise PPO, K = 2, seed 12"),
    # the thirty-ninth session's: a thirteenth seed; its checkpoint is the one whose evaluation the stale is_grasped
    # cost 6 points (README, "Where the policies fail")
    "noise_k2_seed13": (flow_noise_ppo, S2X | K2 | dict(seed=13), "Flow-Noise PPO, K = 2, seed 13"),
    # the thirty-sixth session's: K = 2 with a wider clip. At 0.2 its updates clip 35-40% of the ratios to the end of
    # every run: over a third of the decisions stop contributing to the gradient before the update ends
    "noise_k2_clip3": (flow_noise_ppo, S2X | K2 | dict(clip_coef=0.3), "Flow-Noise PPO, K = 2, clip 0.3"),
    "noise_k2_clip3_seed10": (
        flow_noise_ppo, S2X | K2 | dict(clip_coef=0.3, seed=10), "Flow-Noise PPO, K = 2, clip 0.3, seed 10"
    ),
    "noise_k2_clip3_seed11": (
        flow_noise_ppo, S2X | K2 | dict(clip_coef=0.3, seed=11), "Flow-Noise PPO, K = 2, clip 0.3, seed 11"
    ),
    # the thirty-fifth session's: K = 2 with twice the epochs per update. With the update on every core it takes
    # about a fifth of an iteration, so more passes over each batch cost fewer env steps than before
    "noise_k2_ep8": (flow_noise_ppo, S2X | K2 | dict(update_epochs=8), "Flow-Noise PPO, K = 2, 8 epochs"),
    # and with the lr annealed to 0 over the 30 minutes: at a constant 1e-5, 8 epochs reached 78% at 164k env steps
    # (the second-fastest K = 2 run there), then stayed at 78-83%
    "noise_k2_ep8_anneal": (flow_noise_ppo, S2X | K2 | dict(update_epochs=8, anneal_lr=True),
                            "Flow-Noise PPO, K = 2, 8 epochs, lr annealed"),
    # the twenty-ninth session's: K = 2 with Flow-SDE PPO's whole actor step (lr 3e-5 annealed to 0, KL stop 0.05);
    # K = 2 alone kept its approximate KL near 0.04 and clipped 37% of the ratios to the end of the run
    "noise_k2_sdeopt": (flow_noise_ppo, S2X | K2 | SDE_STEP, "Flow-Noise PPO, K = 2, lr 3e-5 annealed, target KL 0.05"),
    "noise_k2_sdeopt_seed2": (flow_noise_ppo, S2X | K2 | SDE_STEP | dict(seed=2),
                              "Flow-Noise PPO, K = 2, lr 3e-5 annealed, target KL 0.05, seed 2"),
    # the thirtieth session's: K = 2 with twice the std bounds (0.08-0.16 -> 0.16-0.32 had lifted K = 4 from 72 to 86%)
    "noise_k2_s4x": (flow_noise_ppo, S4X | K2, "Flow-Noise PPO, K = 2, sigma 0.32-0.64"),
    "noise_k2_s4x_seed4": (flow_noise_ppo, S4X | K2 | dict(seed=4), "Flow-Noise PPO, K = 2, sigma 0.32-0.64, seed 4"),
    "noise_k2_s4x_seed2": (flow_noise_ppo, S4X | K2 | dict(seed=2), "Flow-Noise PPO, K = 2, sigma 0.32-0.64, seed 2"),
    # the thirty-first session's: the same at twice the actor lr (the larger std had halved the approximate KL per
    # update, 0.017 against 0.038 at 0.16-0.32, so lr 2e-5 brings the step back to about the earlier KL)
    "noise_k2_s4x_lr2e5": (flow_noise_ppo, S4X | K2 | dict(lr=2e-5), "Flow-Noise PPO, K = 2, sigma 0.32-0.64, lr 2e-5"),
    "noise_k2_s4x_lr2e5_seed4": (flow_noise_ppo, S4X | K2 | dict(lr=2e-5, seed=4),
                                 "Flow-Noise PPO, K = 2, sigma 0.32-0.64, lr 2e-5, seed 4"),
    "noise_k2_s4x_lr2e5_seed2": (flow_noise_ppo, S4X | K2 | dict(lr=2e-5, seed=2),
                                 "Flow-Noise PPO, K = 2, sigma 0.32-0.64, lr 2e-5, seed 2"),
    # the thirty-second session's: K = 2 at the default bounds with the noise head at 10x the actor's lr, so its std
    # can leave the middle of its bounds within 30 minutes (about 3,600 Adam steps)
    "noise_k2_nh1e4": (flow_noise_ppo, S2X | K2 | dict(noise_head_lr=1e-4),
                       "Flow-Noise PPO, K = 2, noise head lr 1e-4"),
    # and at 100x the actor's: at 1e-4 the std had not left the middle of its bounds after 30 iterations
    "noise_k2_nh1e3": (flow_noise_ppo, S2X | K2 | dict(noise_head_lr=1e-3),
                       "Flow-Noise PPO, K = 2, noise head lr 1e-3"),
    "noise_k2_nh1e3_seed4": (flow_noise_ppo, S2X | K2 | dict(noise_head_lr=1e-3, seed=4),
                             "Flow-Noise PPO, K = 2, noise head lr 1e-3, seed 4"),
    # the forty-first to forty-fourth sessions': fresh reset observations, from the SFT checkpoint of demos with fresh
    # first observations (41%), over IT110
    "sde_it110": (flow_sde_ppo, IT110, "Flow-SDE PPO, 110 iterations"),
    "sde_it110_seed2": (flow_sde_ppo, IT110 | dict(seed=2), "Flow-SDE PPO, 110 iterations, seed 2"),
    "sde_it110_seed3": (flow_sde_ppo, IT110 | dict(seed=3), "Flow-SDE PPO, 110 iterations, seed 3"),
    "noise_k2_it110": (flow_noise_ppo, S2X | K2 | IT110, "Flow-Noise PPO, K = 2, 110 iterations"),
    "noise_k2_it110_seed2": (flow_noise_ppo, S2X | K2 | IT110 | dict(seed=2),
                             "Flow-Noise PPO, K = 2, 110 iterations, seed 2"),
    "noise_k2_it110_seed3": (flow_noise_ppo, S2X | K2 | IT110 | dict(seed=3),
                             "Flow-Noise PPO, K = 2, 110 iterations, seed 3"),
    # the forty-fifth session's: SDE_K2 over IT110
    "sde_k2_a045_it110": (flow_sde_ppo, SDE_K2 | IT110,
                          "Flow-SDE PPO, K = 2, a = 0.45, 110 iterations"),
    "sde_k2_a045_it110_seed2": (flow_sde_ppo, SDE_K2 | IT110 | dict(seed=2),
                                "Flow-SDE PPO, K = 2, a = 0.45, 110 iterations, seed 2"),
    "sde_k2_a045_it110_seed3": (flow_sde_ppo, SDE_K2 | IT110 | dict(seed=3),
                                "Flow-SDE PPO, K = 2, a = 0.45, 110 iterations, seed 3"),
    # the forty-sixth session's, on a machine at the usual speed: SDE_K2 over --minutes (30 minutes hold 855-865k env
    # steps at K = 2 there, the lr annealed over them), and the default beside them on the same machine (the settings
    # of "sde", a directory of its own)
    "sde_k2_a045": (flow_sde_ppo, SDE_K2, "Flow-SDE PPO, K = 2, a = 0.45, 30 minutes"),
    "sde_k2_a045_seed2": (flow_sde_ppo, SDE_K2 | dict(seed=2), "Flow-SDE PPO, K = 2, a = 0.45, 30 minutes, seed 2"),
    # seeds 2 and 3 the forty-seventh session's on the same machine, 4 to 6 the fifty-fifth session's
    **seeded("sde_fresh30", flow_sde_ppo, {}, "Flow-SDE PPO, 30 minutes", seeds=(2, 3, 4, 5, 6)),
    # the forty-seventh session's, on a machine at the usual speed from the same SFT checkpoint: Flow-Noise PPO at
    # K = 2 over --minutes (noise_k2's settings, directories of their own)
    "noise_k2_fresh30": (flow_noise_ppo, S2X | K2, "Flow-Noise PPO, K = 2, 30 minutes"),
    "noise_k2_fresh30_seed2": (flow_noise_ppo, S2X | K2 | dict(seed=2), "Flow-Noise PPO, K = 2, 30 minutes, seed 2"),
    # the forty-eighth session's, on the same machine: Flow-Noise PPO's default (K = 4) over --minutes in two seeds,
    # and seeds 3 and 4 of noise_k2_fresh30
    "noise_fresh30": (flow_noise_ppo, {}, "Flow-Noise PPO, lr 1e-5, 30 minutes"),
    "noise_fresh30_seed2": (flow_noise_ppo, dict(seed=2), "Flow-Noise PPO, lr 1e-5, 30 minutes, seed 2"),
    "noise_k2_fresh30_seed3": (flow_noise_ppo, S2X | K2 | dict(seed=3), "Flow-Noise PPO, K = 2, 30 minutes, seed 3"),
    "noise_k2_fresh30_seed4": (flow_noise_ppo, S2X | K2 | dict(seed=4), "Flow-Noise PPO, K = 2, 30 minutes, seed 4"),
    # the forty-ninth session's, on the same machine: Flow-Noise PPO's K = 4 with Flow-SDE PPO's actor step over
    # --minutes (noise_kl05_lr3e5's settings, directories of their own)
    **seeded("noise_sdeopt_fresh30", flow_noise_ppo, S2X | SDE_STEP, "Flow-Noise PPO, lr 3e-5 annealed, KL stop"),
    # the fiftieth session's, on the same machine: Flow-Noise PPO at K = 2 with its default actor step (since the
    # forty-ninth session) over --minutes
    **seeded("noise_k2_sdeopt_fresh30", flow_noise_ppo, S2X | K2 | SDE_STEP, "Flow-Noise PPO, K = 2"),
    # the fifty-first session's: Flow-Noise PPO's default (K = 4, the forty-ninth session's actor step) with the
    # chain log-likelihood divided by K+1 (--logprob-reduction mean, the default since), over --minutes; seeds 5 to 7
    # the fifty-fourth session's
    **seeded("noise_mean_fresh30", flow_noise_ppo, S2X | SDE_STEP | MEAN, "Flow-Noise PPO, log-likelihood / (K+1)",
             seeds=(2, 3, 4, 5, 6, 7)),
    # the fifty-second session's: the same at K = 2 (Flow-Noise PPO's default but --denoise-steps 2), over --minutes
    **seeded("noise_k2_mean_fresh30", flow_noise_ppo, S2X | K2 | SDE_STEP | MEAN, "Flow-Noise PPO, K = 2, mean"),
    # the fifty-third session's: Flow-Noise PPO's default (K = 4, the mean) with the actor lr at 5e-5, over --minutes
    **seeded("noise_mean_lr5e5_fresh30", flow_noise_ppo, S2X | SDE_STEP | MEAN | dict(lr=5e-5),
             "Flow-Noise PPO, lr 5e-5"),
    # the fifty-sixth session's: GRPO's default over --minutes (its only earlier runs at a = 1.2, grpo_a12 and
    # grpo_a12_seed2, had stale reset observations and the 29% SFT checkpoint)
    **seeded("grpo_fresh30", flow_grpo, {}, "GRPO, 30 minutes", seeds=(2, 3)),
    "sde16_a05_1proc": (flow_sde_ppo, A08 | C8 | SIXTEEN | ONE_PROC | SDE_CONST | dict(noise_level=0.5),
                        "Flow-SDE PPO, a = 0.5 (the paper's), 16 envs in one process"),
}
# Every Flow-Noise PPO entry but "noise" (the default) ran with NOISE_CONST and SUM unless it says otherwise: they go
# under each entry's own changes, so the entries keep their settings
for _name, (_mod, _changes, _label) in RUNS.items():
    if _mod is flow_noise_ppo and _name != "noise":
        RUNS[_name] = (_mod, NOISE_CONST | SUM | _changes, _label)
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
            args = replace(mod.Args(), **(run | changes))  # a run's own schedule (IT110) wins over --minutes
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

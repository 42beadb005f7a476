"""PPO with Flow-Noise: online RL fine-tuning of a flow-matching VLA policy (pi_RL, Flow-Noise variant).

A flow policy samples an action chunk by integrating a velocity field from noise (t=1) to action (t=0), so the
action's likelihood is intractable. Flow-Noise adds a small learnable noise head on the action expert's outputs and
makes EVERY denoising step a Gaussian transition: the whole chain x_0..x_K then has an exact log-likelihood (section
"Flow-Noise" below). The rollout stores the chain; the PPO update recomputes all K transitions over one cached
prefix. Evaluation uses the deterministic ODE; the noise head only explores and gives the likelihood.

    python flow_noise_ppo.py                                        # PickCube, state obs, tiny policy, CPU
    python flow_noise_ppo.py --env-id PickCube --num-envs 320       # on a GPU (physx_cuda)
    torchrun --nproc-per-node 8 flow_noise_ppo.py --num-envs 320    # 8 GPUs, 40 envs each
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

import vla
from environments import UsageError, check_env_args, make_envs, resolve_env_id


@dataclass
class Args:
    env_id: str = "PickCube"  # ManiSkill task (PickCube, PickCube-v1, ...) or LIBERO suite (libero_spatial, ...)
    task_ids: tuple[int, ...] = (0,)  # LIBERO: the suite's task indices
    checkpoint: str | None = None  # SFT checkpoint (default runs/sft/<env id>/checkpoint), or an openpi / LeRobot dir
    tokenizer: str | None = None  # the policy's tokenizer, if moved: a SentencePiece .model or a transformers dir
    asset_id: str | None = None  # openpi / LeRobot checkpoint: which of its norm stats (assets/<asset_id>/) to use
    obs_mode: str | None = None  # "state" or "rgb" (default: the SFT checkpoint's)
    control_mode: str | None = None  # ManiSkill controller (default: the SFT checkpoint's)
    # ManiSkill reward: normalized_dense, dense or sparse (LIBERO: 1 on success); dense-reward episodes run to the
    # time limit, since ending them at success would make early success cost the rest of the reward
    reward_mode: str = "normalized_dense"
    max_episode_steps: int = 80  # ManiSkill episode length in env steps, as in the paper (LIBERO uses its suite's)
    num_envs: int = 64  # training envs in all, split over torchrun ranks (the paper's 320 on a GPU; CPU: 64)
    num_steps: int = 20  # decisions (action chunks) per env per iteration: 20 x 4 actions = one 80-step episode
    total_iterations: int = 200  # iterations (rollout + update)
    time_budget_min: float | None = None  # stop after this many minutes of training (evaluation excluded)
    action_chunk: int = 4  # C: actions run per decision, the chunk's first C (the paper's 5; shorter re-plans sooner)
    denoise_steps: int = 4  # K: denoising steps in rollouts and evaluation (the paper's); the update redoes all K
    sigma_min: float = 0.16  # noise head's lowest std per step (normalised units): 2x the paper's 0.08, to explore more
    sigma_max: float = 0.32  # noise head's highest std per step: 2x the paper's 0.16, like --sigma-min
    entropy_coef: float = 0.005  # weight of the entropy bonus of the step noises (the paper's)
    # "mean": the chain log-likelihood / its K+1 terms, as the reference code does, so the clip and --target-kl act
    # as on a one-step ratio; "sum": the exact log-likelihood (its ratio clips far more samples)
    logprob_reduction: str = "mean"
    ratio_level: str = "chunk"  # "chunk": one ratio per decision (sum over C x A); "token": per (action, dim), slower
    # "expert": mean of the action expert's output tokens (the paper's pi0 critic); "vlm": mean of the VLM prefix
    # output (pi0.5's); "expert_state": the expert's plus the state (pi0 only: it explains far more variance)
    critic_input: str = "expert_state"
    critic_detach: bool = True  # stop the value loss's gradient at the critic's input features
    gamma: float = 0.9487  # discount per decision: 0.9 per 8 env steps, one episode (the paper's 0.99: slow value fit)
    gae_lambda: float = 0.9747  # GAE lambda per decision: 0.95 per 8 env steps
    update_epochs: int = 4  # PPO epochs per iteration
    num_minibatches: int = 8  # minibatches per epoch (each rank splits its own batch; gradients are averaged)
    micro_batch_size: int | None = None  # accumulate gradients over micro-batches this big (memory for time; None: off)
    prefix_store_gb: float = 1.0  # GB of the rollout's frozen-VLM prefixes kept for the update; more: recompute them
    grad_checkpointing: bool = False  # recompute the expert's activations in the backward pass (memory for time)
    vlm_dtype: str = "auto"  # frozen VLM's dtype: bfloat16, float32, auto (GPU: bfloat16; CPU: float32, bf16 is slow)
    clip_coef: float = 0.2  # PPO ratio clip
    value_clip: float | None = None  # value clip around the rollout's V; off: the paper's 0.2 suits returns in [0, 1]
    huber_delta: float = 10.0  # Huber loss threshold of the value loss
    vf_coef: float = 1.0  # value loss weight
    lr: float = 3e-5  # actor (expert; the VLM is frozen) learning rate, annealed to 0 and held back by --target-kl
    noise_head_lr: float | None = None  # noise head's learning rate (default: --lr; scaled as --lr is)
    value_lr: float = 1e-3  # critic learning rate
    critic_warmup_iters: int = 5  # critic-only iterations first (actor lr 0), so early advantages are not value error
    anneal_lr: bool = True  # decay the actor's lr linearly to 0 by --total-iterations or --time-budget-min
    max_grad_norm: float = 1.0  # gradient-norm clip
    target_kl: float | None = 0.05  # stop an iteration's epochs when the approximate KL exceeds this; None: never
    eval_every: int = 10  # evaluate every N iterations (also before the first and after the last); 0: only those
    eval_episodes: int = 100  # evaluation episodes (fixed seeds, deterministic ODE); 0 disables evaluation
    num_eval_envs: int = 10  # parallel evaluation environments (per rank)
    sim_backend: str = "auto"  # physx_cuda (one GPU simulation), physx_cpu (CPU envs in --env-workers processes), auto
    env_workers: int | None = None  # CPU simulator processes (default: one per core per rank; 1: in this process)
    update_threads: int | None = None  # torch's CPU threads in the update (default: cores per rank; env workers wait)
    eval_seed: int = 10_000  # first seed of the evaluation episodes
    save_every: int = 10  # write the checkpoint every N iterations
    capture_video: bool = False  # save a video of the first evaluation environment at each evaluation
    seed: int = 1  # random seed
    output_dir: str | None = None  # run directory (default runs/flow_noise_ppo/<env id>_<seed>)
    resume: bool = False  # continue from <output_dir>/checkpoint
    track: bool = False  # log to Weights & Biases
    wandb_project: str = "pi_rl"  # W&B project


# ================================================================================================ distributed
# `torchrun --nproc-per-node N <script>` starts N copies of the script. Each rank owns one GPU (or a gloo CPU process),
# num_envs / N envs and its own seeds; after every backward the ranks average their gradients, so their parameters
# stay identical. Metrics are reduced over ranks; only rank 0 logs and saves.
def init_distributed() -> tuple[int, int, torch.device]:
    """-> rank, world size, device. A plain `python` run is rank 0 of 1."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """x summed over ranks (a new tensor on x's device)."""
    if not distributed():
        return x
    y = x.to(f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(y)
    return y.to(x.device)


def broadcast_parameters(params: list[torch.Tensor]):
    """Rank 0's values on every rank (random initialisations differ between ranks)."""
    for p in params if distributed() else []:
        buf = p.data.to("cpu") if dist.get_backend() == "gloo" else p.data
        dist.broadcast(buf, 0)
        p.data.copy_(buf)


def average_gradients(params: list[torch.Tensor]):
    """DDP's gradient averaging, written out: the policy runs through encode_prefix / velocity, not DDP's forward()."""
    if not distributed():
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    flat = all_reduce(flat) / dist.get_world_size()  # [trainable parameters]
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


EPISODE_KEYS = ("success_once", "success_at_end", "return", "episode_len")


def episode_means(episodes: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Mean of each episode metric over every rank's finished episodes (sums and counts all-reduced)."""
    sums = all_reduce(torch.tensor([[torch.cat(episodes[k]).double().sum().item(), sum(map(len, episodes[k]))]
                                    if episodes.get(k) else [0.0, 0.0] for k in EPISODE_KEYS], dtype=torch.float64))
    return {k: (s / n).item() for k, (s, n) in zip(EPISODE_KEYS, sums) if n > 0}


def mean_over_ranks(row: dict[str, float]) -> dict[str, float]:
    """Every value averaged over ranks (all ranks hold the same keys)."""
    if not distributed():
        return row
    keys = sorted(row)
    values = all_reduce(torch.tensor([float(row[k]) for k in keys], dtype=torch.float64)) / dist.get_world_size()
    return dict(zip(keys, values.tolist()))


# ================================================================================================ Flow-Noise
# Every one of the K denoising steps (t_k = 1 - k/K) is a Gaussian transition with a learned std:
#     x_k+1 = mu_k + sigma_k xi,  mu_k = x_k - v(x_k, t_k) / K,  sigma_k = noise_head(expert tokens) in [s_min, s_max]
# so the chain x_0 (noise) .. x_K (action chunk) has the exact log-likelihood (executed entries [:C, :A] only)
#     log p = log N(x_0; 0, I) + sum_k log N(x_k+1; mu_k, sigma_k^2),
# used as the sum or divided by its K+1 terms (--logprob-reduction) in the PPO ratio r = exp(log p - log p_old).
#     loss = -mean(min(r A, clip(r, 1 - eps, 1 + eps) A)) - entropy_coef H + vf_coef Huber(V, R),
#     H = mean over steps and entries of 0.5 log(2 pi e sigma_k^2)
class NoiseHead(nn.Module):
    """Per-token, per-dim std of every denoising step from the expert's action-token outputs (which already depend
    on the observation, x_t and t): W -> 128 -> 64 -> D with tanh, squashed log-linearly into [sigma_min, sigma_max]."""

    def __init__(self, width: int, action_dims: int, sigma_min: float, sigma_max: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(),
                                 nn.Linear(64, action_dims))
        self.log_min, self.log_max = math.log(sigma_min), math.log(sigma_max)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u = (torch.tanh(self.net(h.float())) + 1) / 2  # [N, H, D] in (0, 1)
        return torch.exp(self.log_min + u * (self.log_max - self.log_min))


def checkpoint_noise_head(policy, extra: dict, meta: dict) -> NoiseHead | None:
    """A Flow-Noise PPO checkpoint's learned noise head, in its run's bounds; None for a checkpoint without one."""
    if not (state := {k[len("noise_head."):]: v for k, v in extra.items() if k.startswith("noise_head.")}):
        return None
    run = meta["args"]
    head = NoiseHead(policy.spec["expert_hidden"], policy.spec["max_action_dim"], run["sigma_min"], run["sigma_max"])
    head.load_state_dict(state)
    return head


def gaussian_logp(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, C: int, A: int) -> torch.Tensor:
    """log N(x; mean, std^2) of every executed entry: the first C actions, the env's A real dims -> [N, C, A]."""
    z = (x - mean)[:, :C, :A] / std[:, :C, :A]
    return -0.5 * z**2 - torch.log(std[:, :C, :A]) - 0.5 * math.log(2 * math.pi)


def denoise_transition(policy, noise_head, prefix, x, k, K):
    """Step k of the chain (t = 1 - k/K): mean = the Euler step x - v/K, std from the noise head -> [N, H, D] each."""
    t = torch.full((x.shape[0],), 1.0 - k / K, device=x.device)
    v, h = policy.velocity(prefix, x, t)
    return x - v / K, noise_head(h)


def chain_logp(policy, noise_head, prefix, chain, args, action_dim, sample=False, generator=None):
    """Log-likelihood terms [M, K+1, C, A] (prior, then each step) of chains [M, K+1, H, D] and the entropy H of the
    step noises: K expert passes over one prefix. sample: draw each x_k+1 in `chain` first (the rollout's use)."""
    K, C, x0 = args.denoise_steps, args.action_chunk, chain[:, 0]
    terms, entropy = [gaussian_logp(x0, torch.zeros_like(x0), torch.ones_like(x0), C, action_dim)], 0.0
    for k in range(K):
        mean, std = denoise_transition(policy, noise_head, prefix, chain[:, k], k, K)
        if sample:
            chain[:, k + 1] = mean + std * torch.randn(mean.shape, device=mean.device, generator=generator)
        terms.append(gaussian_logp(chain[:, k + 1], mean, std, C, action_dim))
        entropy = entropy + (0.5 * torch.log(2 * math.pi * math.e * std[:, :C, :action_dim] ** 2)).mean()
    return torch.stack(terms, 1), entropy / K


@torch.no_grad()
def sample_chain(policy, noise_head, prefix, args, action_dim: int, generator=None):
    """Roll out the stochastic chain -> chain [N, K+1, H, D] (x_0 the noise, x_K the normalised action chunk) and
    its log-likelihood terms [N, K+1, C, A]."""
    N, H, D, dev = prefix.mask.shape[0], policy.spec["chunk_size"], policy.spec["max_action_dim"], prefix.mask.device
    chain = torch.empty(N, args.denoise_steps + 1, H, D, device=dev)  # [N, K+1, H, D]
    chain[:, 0] = torch.randn(N, H, D, device=dev, generator=generator)
    return chain, chain_logp(policy, noise_head, prefix, chain, args, action_dim, True, generator)[0]


def reduce_terms(terms: torch.Tensor, how: str) -> torch.Tensor:
    """[N, K+1, C, A] -> [N, C, A]: the exact log-likelihood sums the K+1 terms; "mean" divides it by K+1."""
    return terms.sum(1) if how == "sum" else terms.mean(1)


def ppo_loss(policy, noise_head, critic, normalizer, args, action_dim, state, images, prompts, chain, old_logp,
             adv, ret, old_value, prefix=None):
    """Clipped surrogate on the recomputed chain likelihood, entropy bonus of the step noises, (clipped) Huber value
    loss, for one minibatch of M decisions (prefix: the rollout's, else encoded here). -> loss, stats."""
    if prefix is None:  # VLM frozen: no grad
        prefix = policy.encode_prefix(normalizer.normalize("state", state), prompts, images)
    terms, entropy = chain_logp(policy, noise_head, prefix, chain, args, action_dim)
    log_ratio = reduce_terms(terms, args.logprob_reduction) - old_logp  # [M, C, A]
    if args.ratio_level == "chunk":
        log_ratio = log_ratio.sum((1, 2))  # [M]
    else:
        adv = adv[:, None, None].expand_as(log_ratio)  # the chunk's advantage on every (action, dim)
    ratio = log_ratio.exp()
    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
    value = critic(critic_features(policy, prefix, args))
    v_loss = F.huber_loss(value, ret, reduction="none", delta=args.huber_delta)
    if args.value_clip is not None:
        v_clipped = old_value + (value - old_value).clamp(-args.value_clip, args.value_clip)
        v_loss = torch.max(v_loss, F.huber_loss(v_clipped, ret, reduction="none", delta=args.huber_delta))
    v_loss = v_loss.mean()
    with torch.no_grad():
        stats = {"pg_loss": pg_loss.item(), "v_loss": v_loss.item(), "entropy": entropy.item(),
                 "ratio_mean": ratio.mean().item(), "approx_kl": ((ratio - 1) - log_ratio).mean().item(),
                 "clipfrac": ((ratio - 1).abs() > args.clip_coef).float().mean().item()}
    return pg_loss - args.entropy_coef * entropy + args.vf_coef * v_loss, stats


# ================================================================================================ critic, GAE, eval
class Critic(nn.Module):
    """Chunk-level value: MLP 512-256-128-1 (ReLU); Kaiming hidden layers, N(0, 0.02) output, zero biases."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                                 nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 1))
        for layer in self.net[::2]:  # the Linear layers
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.net[-1].weight, std=0.02)

    def forward(self, features):
        return self.net(features).squeeze(-1)


def critic_features(policy, prefix, args) -> torch.Tensor:
    """The critic's input -> [N, W]. "expert" (pi0): mean of the expert's action-token outputs at (x = 0, t = 1), so
    it sees the observation only; "vlm" (pi0.5): mean of the VLM prefix output; "expert_state": pi0's plus the state."""
    if args.critic_input == "vlm":
        return prefix.features.float()
    if args.critic_input == "expert_state" and prefix.state is None:
        raise UsageError("--critic-input expert_state needs pi0's state token; pi0.5 writes the state into the "
                         "prompt: use expert or vlm")
    N, H, D = prefix.mask.shape[0], policy.spec["chunk_size"], policy.spec["max_action_dim"]
    with torch.set_grad_enabled(torch.is_grad_enabled() and not args.critic_detach):
        _, h = policy.velocity(prefix, torch.zeros(N, H, D, device=prefix.mask.device),
                               torch.ones(N, device=prefix.mask.device))
    h = h.mean(1).float()
    return torch.cat([h, prefix.state.float()], -1) if args.critic_input == "expert_state" else h


def critic_feature_dim(policy, args) -> int:
    s = policy.spec
    return {"vlm": s["text_hidden"], "expert": s["expert_hidden"],
            "expert_state": s["expert_hidden"] + s["max_state_dim"]}[args.critic_input]


def compute_gae(rewards, values, dones, final_values, next_value, gamma, lam):
    """GAE over decisions. [T, N] each: dones[t] = 1 if the episode ended in chunk t, final_values[t] = V(its last obs)
    if the time limit cut it, else 0; next_value [N]: V(obs after the last chunk). -> advantages, returns [T, N]."""
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(next_value)
    for t in reversed(range(len(rewards))):
        not_done = 1.0 - dones[t]
        nxt = next_value if t == len(rewards) - 1 else values[t + 1]
        last = rewards[t] + gamma * (not_done * nxt + final_values[t]) - values[t] + gamma * lam * not_done * last
        advantages[t] = last
    return advantages, advantages + values


@torch.no_grad()
def sample_actions(policy, normalizer, obs, prompts, denoise_steps, action_dim, generator=None):
    """Deterministic ODE from noise (t=1) to action (t=0) in K Euler steps -> env actions [N, H, A]."""
    state = normalizer.normalize("state", obs["state"])
    prefix = policy.encode_prefix(state, prompts, obs["images"])
    N, H, D = state.shape[0], policy.spec["chunk_size"], policy.spec["max_action_dim"]
    x = torch.randn(N, H, D, device=state.device, generator=generator)  # [N, H, max_action_dim] at t=1
    for k in range(denoise_steps):
        v, _ = policy.velocity(prefix, x, 1.0 - k / denoise_steps)
        x = x - v / denoise_steps  # dt = -1/K
    return normalizer.unnormalize("actions", x[..., :action_dim])


def evaluate(policy, normalizer, envs, args, num_episodes, video_path=None, rank=0, world=1) -> dict:
    """Fixed-seed episodes to the time limit, C actions per chunk. Round r (env seeds eval_seed + r * num_envs + i,
    noise seed eval_seed + r) runs on rank r % world: the same episodes at any world size. -> means over all ranks."""
    policy.eval()
    prompts = getattr(envs, "prompts", [envs.prompt] * envs.num_envs)
    results, frames = {}, []
    for r in range(rank, math.ceil(num_episodes / envs.num_envs), world):
        gen = torch.Generator(device=next(policy.parameters()).device).manual_seed(args.eval_seed + r)
        # scenes rebuilt at each evaluation's start: one policy scores the same at every evaluation, as on new envs
        obs = envs.reset(seed=args.eval_seed + r * envs.num_envs, rebuild=r == rank)
        keep = min(envs.num_envs, num_episodes - r * envs.num_envs)  # the last round may be partly surplus
        info = {"episode": {}}
        while not info["episode"]:  # all envs reach the time limit together
            chunk = sample_actions(policy, normalizer, obs, prompts, args.denoise_steps, envs.action_dim, gen)
            for c in range(args.action_chunk):
                obs, _, _, _, info = envs.step(chunk[:, c])
                if video_path is not None and r == 0:
                    frames.append(envs.render())
                if info["episode"]:
                    break
        for k, v in info["episode"].items():
            results.setdefault(k, []).append(v[:keep].float().cpu())
    if frames:
        import imageio
        Path(video_path).parent.mkdir(parents=True, exist_ok=True)
        imageio.mimsave(video_path, frames, fps=20)
    return episode_means(results)


# ================================================================================================ checks
# --resume may change how long the run goes on, how often it evaluates and saves, and how it executes; a change to
# any other option is reported. A different task, episode or chain is another run: those options must stay.
RESUME_FREE = set("total_iterations time_budget_min eval_every eval_episodes num_eval_envs save_every capture_video "
                  "track wandb_project env_workers sim_backend micro_batch_size grad_checkpointing prefix_store_gb "
                  "update_threads vlm_dtype checkpoint output_dir resume tokenizer".split())
RESUME_FIXED = ("env_id task_ids obs_mode control_mode reward_mode max_episode_steps action_chunk denoise_steps "
                "critic_input").split()


def check_args(args: Args) -> tuple[dict, Path, Path]:
    """Refuse bad options before any env or model loads, reading the checkpoint's JSON files and safetensors headers
    only. -> the checkpoint's meta (its run's, to resume), the run directory, the checkpoint to load."""
    def need(ok: bool, k: str, what: str):
        if not ok:
            raise UsageError(f"--{k.replace('_', '-')} {getattr(args, k)}: {what}")
    check_env_args(args)  # --env-id, --sim-backend, --num-eval-envs, --max-episode-steps, --env-workers
    at_least_0 = ("eval_every", "eval_episodes", "critic_warmup_iters")  # 0: only at both ends, none, no warm-up
    for k in ("num_envs", "num_steps", "total_iterations", "update_epochs", "num_minibatches", "denoise_steps",
              "action_chunk", "save_every", "update_threads", "micro_batch_size", *at_least_0):  # None: the default
        v, least = getattr(args, k), 0 if k in at_least_0 else 1
        need(v is None or v >= least, k, f"must be at least {least} (the default is {getattr(Args, k)})")
    for k in ("sigma_min", "sigma_max", "clip_coef", "time_budget_min"):
        v = getattr(args, k)
        need(v is None or v > 0, k, f"must be positive (the default is {getattr(Args, k)})")
    need(args.sigma_min < args.sigma_max, "sigma_min", f"must be below --sigma-max {args.sigma_max} (the defaults "
         f"are {Args.sigma_min} and {Args.sigma_max})")
    for k, choices in (("logprob_reduction", ("mean", "sum")), ("ratio_level", ("chunk", "token")),
                       ("critic_input", ("expert", "vlm", "expert_state")), ("vlm_dtype", ("auto", "bfloat16",
                        "float32")), ("reward_mode", ("normalized_dense", "dense", "sparse"))):
        need(getattr(args, k) in choices, k, "choose one of " + ", ".join(choices))
    env_id, world = resolve_env_id(args.env_id)[1], int(os.environ.get("WORLD_SIZE", 1))
    need(args.num_envs % world == 0, "num_envs", f"does not split over {world} ranks: use a multiple of {world}")
    n = args.num_envs // world * args.num_steps
    batch = f"the batch of {n} decisions per iteration (num_envs {args.num_envs // world} x num_steps {args.num_steps})"
    need(args.num_minibatches <= n, "num_minibatches", f"more minibatches than {batch}; use at most {n}")
    need(n % args.num_minibatches == 0, "num_minibatches", f"{batch} does not split into {args.num_minibatches} "
         f"equal minibatches; use a divisor of {n}")
    run_dir = Path(args.output_dir or f"runs/flow_noise_ppo/{env_id}_{args.seed}")
    source = run_dir / "checkpoint" if args.resume else Path(args.checkpoint or f"runs/sft/{env_id}/checkpoint")
    ckpt = source if source.is_dir() else Path(f"{source}.old")  # where a save killed between its renames left it
    if not ckpt.is_dir():
        raise UsageError(f"--resume: no checkpoint at {source} (is --output-dir the run's directory?)" if args.resume
                         else f"no SFT checkpoint at {source}: run `python sft_baseline.py --env-id {args.env_id}` "
                         "first, or pass --checkpoint")
    vla.checkpoint.read_safetensors(sorted(ckpt.glob("*.safetensors")), tensors=False)  # damaged weights: refused now
    config = vla.checkpoint.read_json(ckpt / "config.json") if (ckpt / "config.json").is_file() else {}
    if "preset" in config:  # ours (an openpi / LeRobot directory is checked as it loads)
        H, variant = (vla.VLAConfig(**config).spec()[k] for k in ("chunk_size", "variant"))
        need(args.action_chunk <= H, "action_chunk", f"exceeds the policy's chunk size {H} ({ckpt}); use at most {H}")
        need(variant == "pi0" or args.critic_input != "expert_state", "critic_input", f"needs pi0's state "
             f"token; {ckpt} is pi0.5 (its state is in the prompt): use vlm (the paper's pi0.5 critic) or expert")
    meta = vla.checkpoint.read_json(ckpt / "meta.json") if (ckpt / "meta.json").is_file() else {}
    args.obs_mode = args.obs_mode or meta.get("obs_mode", "state")
    args.control_mode = args.control_mode or meta.get("control_mode", "pd_ee_delta_pose")
    if not args.resume and meta.get("env_id", env_id) != env_id:
        raise UsageError(f"{ckpt} was trained for {meta['env_id']}, not --env-id {args.env_id}: train one with `python "
                         f"sft_baseline.py --env-id {args.env_id}`, or pass --checkpoint of one")
    if args.resume:  # the run's own options, saved in its checkpoint (tuples as JSON lists)
        saved, now = meta.get("args", {}), json.loads(json.dumps(asdict(args)))
        changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v and k not in RESUME_FREE}
        flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
        if fixed := [k for k in RESUME_FIXED if k in changed]:
            raise UsageError("--resume: " + "; ".join(f"the run has {flag(k)} {changed[k][0]}, not {changed[k][1]}"
                                                      for k in fixed) + ": pass the run's values again (to change "
                             "them, start a new run)")
        if changed:
            print("--resume with changed options: " + ", ".join(f"{flag(k)} {a} -> {b}" for k, (a, b) in
                                                                changed.items()))
    return meta, run_dir, source


# ================================================================================================ main
def main(args: Args):
    """Train; -> the last evaluation's metrics, the policy, the noise head and the critic (Nones: the run had ended)."""
    meta, run_dir, source = check_args(args)
    kind, env_id = resolve_env_id(args.env_id)
    ckpt_dir, metrics_path = run_dir / "checkpoint", run_dir / "metrics.jsonl"
    budget = 60 * args.time_budget_min if args.time_budget_min else math.inf  # seconds of training time
    start_iter, global_step, train_time = 0, 0, 0.0
    if args.resume:
        start_iter, global_step, train_time = meta["iteration"], meta["global_step"], meta["train_time"]
    if start_iter >= args.total_iterations or train_time >= budget:
        if os.environ.get("RANK", "0") == "0":
            print(f"{run_dir} already finished at iteration {start_iter} of {args.total_iterations}: raise "
                  "--total-iterations (or --time-budget-min) to continue")
        return {}, None, None, None
    rank, world, device = init_distributed()
    is_main, N = rank == 0, args.num_envs // world  # N: this rank's envs
    T, C, K = args.num_steps, args.action_chunk, args.denoise_steps
    minibatch_size = N * T // args.num_minibatches
    micro_size = min(args.micro_batch_size or minibatch_size, minibatch_size)
    random.seed(args.seed + rank), np.random.seed(args.seed + rank), torch.manual_seed(args.seed + rank)

    # ---- envs, policy (frozen VLM), critic, noise head, optimiser: from the SFT checkpoint or this run's own
    bf16 = args.vlm_dtype == "bfloat16" or (args.vlm_dtype == "auto" and device.type == "cuda")
    vlm_dtype = torch.bfloat16 if bf16 else None  # None: as saved (float32)
    envs = make_envs(args, N, ignore_terminations=kind == "maniskill" and args.reward_mode != "sparse", device=device)
    eval_envs = make_envs(args, args.num_eval_envs, ignore_terminations=True, device=device)
    # Training seeds never overlap the eval seeds (from 10_000) nor another rank's.
    obs = envs.reset(seed=args.seed * 1_000_003 + rank * 100_003 + start_iter)
    A, S = envs.action_dim, obs["state"].shape[1]
    # openpi / LeRobot weights are built for the env's dims; ours are checked against them below
    policy, normalizer, extra, _ = vla.load_checkpoint(source, vlm_dtype=vlm_dtype, tokenizer=args.tokenizer,
                                                       asset_id=args.asset_id, action_dim=A, state_dim=S)
    if normalizer is None:
        raise UsageError(f"{source} has no norm stats: the policy's state/action normalisation is unknown")
    if (policy.config.action_dim, policy.config.state_dim) != (A, S):
        raise UsageError(f"{source} reads {policy.config.state_dim}-D states and outputs {policy.config.action_dim}-D "
                         f"actions, but {env_id} with {args.obs_mode} obs and {args.control_mode} gives {S}-D states "
                         f"and takes {A}-D actions: train one with `python sft_baseline.py --env-id {args.env_id}`, "
                         "or pass --checkpoint of one")
    policy.to(device).freeze_vlm(dtype=vlm_dtype).expert_checkpointing(args.grad_checkpointing)
    H, D = policy.spec["chunk_size"], policy.spec["max_action_dim"]
    critic = Critic(critic_feature_dim(policy, args)).to(device)
    noise_head = NoiseHead(policy.spec["expert_hidden"], D, args.sigma_min, args.sigma_max).to(device)
    head_lr = args.lr if args.noise_head_lr is None else args.noise_head_lr
    # param groups: 0 the expert (actor), 1 the critic, 2 the noise head (its own --noise-head-lr)
    opt = torch.optim.AdamW([{"params": policy.trainable_parameters(), "lr": args.lr},
                             {"params": critic.parameters(), "lr": args.value_lr},
                             {"params": noise_head.parameters(), "lr": head_lr}], betas=(0.9, 0.95), weight_decay=0.0)
    if args.resume:
        if len(meta["optimizer"]) != len(opt.param_groups):
            raise UsageError(f"--resume: the checkpoint's optimizer has {len(meta['optimizer'])} parameter groups, "
                             f"this script's has {len(opt.param_groups)}: start a new run from its policy with "
                             "--checkpoint <its directory> (a new critic, noise head and optimizer)")
        for name, module in (("critic", critic), ("noise_head", noise_head)):
            module.load_state_dict({k[len(name) + 1:]: v for k, v in extra.items() if k.startswith(name + ".")})
        adam = {}  # AdamW's state, saved as flat tensors optim.<param>.<key>
        for key in (k for k in extra if k.startswith("optim.")):
            _, i, name = key.split(".", 2)
            adam.setdefault(int(i), {})[name] = extra[key]
        opt.load_state_dict({"state": adam, "param_groups": meta["optimizer"]})
    params = policy.trainable_parameters() + list(noise_head.parameters()) + list(critic.parameters())
    broadcast_parameters(params)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if args.resume:  # a run killed after logging an iteration but before saving it runs that iteration again
            rows = metrics_path.read_text().splitlines() if metrics_path.exists() else []
            keep = [r for r in rows if r.endswith("}") and json.loads(r)["iteration"] <= start_iter]  # a cut row: no }
            metrics_path.with_suffix(".tmp").write_text("".join(r + "\n" for r in keep))
            os.replace(metrics_path.with_suffix(".tmp"), metrics_path)
            print(f"resuming {run_dir} from iteration {start_iter}")
        if start_iter < (w := args.critic_warmup_iters):
            never = f": with --total-iterations {args.total_iterations} the actor never trains"
            print(f"iterations {start_iter + 1}-{min(w, args.total_iterations)} train only the critic (actor frozen, "
                  f"--critic-warmup-iters {w})" + (never if args.total_iterations <= w else ""))
        if args.track:
            import wandb
            wandb.init(project=args.wandb_project, config=asdict(args), name=run_dir.name)
    metrics_file = open(metrics_path if is_main else os.devnull, "a")  # one file, written by rank 0

    def log(iteration: int, row: dict):
        row = {"iteration": iteration, "global_step": global_step, "train_time": train_time, **row}
        print(json.dumps(row), file=metrics_file, flush=True)
        if args.track and is_main:
            wandb.log(row, step=global_step)

    def run_eval(iteration):
        video = run_dir / "videos" / f"eval_{iteration}.mp4" if args.capture_video and is_main else None
        m = evaluate(policy, normalizer, eval_envs, args, args.eval_episodes, video, rank, world)
        log(iteration, {f"eval/{k}": v for k, v in m.items()})
        if is_main:
            tqdm.write(f"iter {iteration} step {global_step}: eval success_once {m['success_once']:.3f} "
                       f"success_at_end {m['success_at_end']:.3f}")
        return m

    # ---- rollout storage: one row per (decision point, env)
    prompts = getattr(envs, "prompts", [envs.prompt] * N)
    obs_state = torch.zeros(T, N, S, device=device)  # [T, N, state_dim]
    obs_images = None if obs["images"] is None else torch.zeros(T, N, *obs["images"].shape[1:], dtype=torch.uint8,
                                                                device=device)  # [T, N, cams, H, W, 3]
    chains = torch.zeros(T, N, K + 1, H, D, device=device)  # [T, N, K+1, H, D]: x_0 (noise) .. x_K (action chunk)
    logprobs = torch.zeros(T, N, C, A, device=device)  # [T, N, C, A]
    values, rewards, dones, final_values = torch.zeros(4, T, N, device=device)  # [T, N] each

    def value_of(o, rows):  # V of observations o of the envs in `rows` [N] bool
        prefix = policy.encode_prefix(normalizer.normalize("state", o["state"]),
                                      [p for p, r in zip(prompts, rows.tolist()) if r], o["images"])
        return critic(critic_features(policy, prefix, args))

    eval_metrics = run_eval(0) if args.eval_episodes > 0 and start_iter == 0 else {}  # the SFT policy
    bar = tqdm(initial=start_iter, total=args.total_iterations, desc="ppo", disable=not is_main)
    for iteration in range(start_iter, args.total_iterations):
        # ---- rollout
        policy.eval()
        t0, episodes, prefixes = time.time(), {}, []
        for step in range(T):
            obs_state[step] = obs["state"]
            if obs_images is not None:
                obs_images[step] = obs["images"]
            with torch.no_grad():
                prefix = policy.encode_prefix(normalizer.normalize("state", obs["state"]), prompts, obs["images"])
                if T * prefix.nbytes() <= args.prefix_store_gb * 2**30:
                    prefixes.append(prefix)
                values[step] = critic(critic_features(policy, prefix, args))
                chains[step], terms = sample_chain(policy, noise_head, prefix, args, A)
                logprobs[step] = reduce_terms(terms, args.logprob_reduction)
            actions = normalizer.unnormalize("actions", chains[step, :, K, :C, :A])  # [N, C, A]
            alive = torch.ones(N, dtype=torch.bool, device=device)  # [N]: still in the episode the chunk started in
            truncated = torch.zeros_like(alive)  # [N]: ended by the time limit, so bootstrapped
            reward = torch.zeros(N, device=device)  # [N]
            final = {k: None if v is None else v.clone() for k, v in obs.items()}  # each env's last obs of its episode
            for c in range(C):
                # An episode that ends inside the chunk is credited with its rewards up to its end; the rest of
                # the chunk's actions run in the freshly reset episode and are credited to nobody.
                obs, r, term, trunc, info = envs.step(actions[:, c])
                reward += r * alive
                ended = (term | trunc) & alive
                for k, v in final.items():
                    if v is not None:
                        v[ended] = info["final_obs"][k][ended]
                truncated |= trunc & ~term & alive
                for k, v in info["episode"].items():
                    episodes.setdefault(k, []).append(v[term | trunc].float().cpu())
                alive &= ~ended
            global_step += N * C * world
            rewards[step], dones[step] = reward, (~alive).float()
            final_values[step] = 0.0
            if truncated.any():  # bootstrap episodes cut by the time limit from their last observation
                with torch.no_grad():
                    final_values[step][truncated] = value_of({k: None if v is None else v[truncated]
                                                             for k, v in final.items()}, truncated)
        rollout_time = time.time() - t0

        # ---- advantages
        with torch.no_grad():
            next_value = value_of(obs, torch.ones(N, dtype=torch.bool))
        advantages, returns = compute_gae(rewards, values, dones, final_values, next_value, args.gamma, args.gae_lambda)

        # ---- PPO update: recompute all K transitions of each stored chain
        t1 = time.time()
        rollout_threads = torch.get_num_threads()
        # the env workers wait during the update: their cores are free
        torch.set_num_threads(args.update_threads or max(1, (os.cpu_count() or 1) // world))
        policy.train()
        progress = max(iteration / args.total_iterations, train_time / budget)  # share of the run done
        scale = 0.0 if iteration < args.critic_warmup_iters else max(1.0 - progress, 0.0) if args.anneal_lr else 1.0
        opt.param_groups[0]["lr"], opt.param_groups[2]["lr"] = args.lr * scale, head_lr * scale
        # the batch: [T, N, ...] -> [T * N, ...], row i is step i // N, env i % N
        batch = {k: None if x is None else x.reshape(T * N, *x.shape[2:]) for k, x in dict(
            state=obs_state, images=obs_images, chain=chains, old_logp=logprobs, adv=advantages, ret=returns,
            old_value=values).items()}
        b_adv, b_ret, b_val = batch["adv"], batch["ret"], batch["old_value"]
        b_prefix = vla.Prefix.cat(prefixes) if len(prefixes) == T else None
        prefixes.clear()
        # advantages normalised over all ranks' decisions: sum, sum of squares, count
        s, sq, n = all_reduce(torch.stack([b_adv.sum(), b_adv.square().sum(), b_adv.new_tensor(float(b_adv.numel()))])
                              .double()).tolist()
        batch["adv"] = (b_adv - s / n) / (math.sqrt(max(sq - s * s / n, 0.0) / max(n - 1, 1)) + 1e-8)
        stats = {}
        for epochs_run in range(1, args.update_epochs + 1):  # fewer when --target-kl stops the update
            perm = torch.randperm(T * N, device=device)
            for start in range(0, T * N, minibatch_size):
                mb = perm[start:start + minibatch_size]
                opt.zero_grad(set_to_none=True)
                for micro in mb.split(micro_size):  # gradient accumulation over micro-batches
                    loss, mb_stats = ppo_loss(policy, noise_head, critic, normalizer, args, A,
                                              **{k: None if x is None else x[micro] for k, x in batch.items()},
                                              prompts=[prompts[i % N] for i in micro.tolist()],
                                              prefix=None if b_prefix is None else b_prefix.select(micro))
                    (loss * len(micro) / len(mb)).backward()
                    for k, v in mb_stats.items():
                        stats.setdefault(k, []).append(v)
                average_gradients(params)
                grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                if not torch.isfinite(grad_norm):  # the same on every rank: gradients were averaged
                    raise FloatingPointError(f"non-finite loss or gradient at iteration {iteration}; " + (
                        f"the last good checkpoint is in {ckpt_dir}" if ckpt_dir.is_dir()
                        else "no checkpoint was written yet"))
                opt.step()
                stats.setdefault("grad_norm", []).append(grad_norm.item())
            n_recent = args.num_minibatches * math.ceil(minibatch_size / micro_size)
            kl = all_reduce(torch.tensor(float(np.mean(stats["approx_kl"][-n_recent:])))).item() / world
            if args.target_kl is not None and kl > args.target_kl:  # every rank takes the same decision
                break
        torch.set_num_threads(rollout_threads)
        update_time = time.time() - t1
        train_time += all_reduce(torch.tensor(rollout_time + update_time)).item() / world  # same on every rank

        var_y = b_ret.var()
        row = mean_over_ranks({
            "rollout_sps": N * C * T / rollout_time * world,  # averaged over ranks: the total
            "rollout_time": rollout_time, "update_time": update_time, "lr": opt.param_groups[0]["lr"],
            "noise_head_lr": opt.param_groups[2]["lr"], "epochs": epochs_run,
            "prefix_stored": float(b_prefix is not None),  # 1: the update reused the rollout's prefixes
            "explained_variance": (1 - (b_ret - b_val).var() / var_y).item() if var_y > 0 else float("nan"),
            **{k: float(np.mean(v)) for k, v in stats.items()}})
        row.update({f"train/{k}": v for k, v in episode_means(episodes).items()})  # over all ranks' episodes
        log(iteration + 1, row)
        bar.set_postfix(success=f"{row.get('train/success_once', float('nan')):.2f}", kl=f"{row['approx_kl']:.4f}")
        bar.update()
        done = iteration + 1 == args.total_iterations or train_time >= budget
        if args.eval_episodes > 0 and (done or (args.eval_every and (iteration + 1) % args.eval_every == 0)):
            eval_metrics = run_eval(iteration + 1)
        if is_main and (done or (iteration + 1) % args.save_every == 0):
            sd = opt.state_dict()  # AdamW's state as flat tensors (for safetensors), its param groups in the meta
            tensors = {**{f"critic.{k}": v for k, v in critic.state_dict().items()},
                       **{f"noise_head.{k}": v for k, v in noise_head.state_dict().items()},
                       **{f"optim.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}}
            vla.save_checkpoint(ckpt_dir, policy, normalizer, tensors, {
                "iteration": iteration + 1, "global_step": global_step, "train_time": train_time, "env_id": env_id,
                "optimizer": sd["param_groups"], "args": asdict(args), "obs_mode": args.obs_mode, "control_mode":
                args.control_mode, "action_chunk": args.action_chunk, "denoise_steps": args.denoise_steps,
                "sft_checkpoint": meta.get("sft_checkpoint", str(source))})
        if done:
            break
    bar.close(), envs.close(), eval_envs.close(), metrics_file.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return eval_metrics, policy, noise_head, critic


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (UsageError, vla.CheckpointError) as e:  # the user's mistake: one line, argparse's exit status
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

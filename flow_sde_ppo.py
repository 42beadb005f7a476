"""PPO with Flow-SDE: online RL fine-tuning of a flow-matching VLA policy (pi_RL, Flow-SDE variant).

A flow policy samples an action chunk by integrating a velocity field from noise (t=1) to action (t=0), so the
action's likelihood is intractable. Flow-SDE makes one randomly chosen denoising step k* of each sample an SDE step
with the ODE's marginals, a Gaussian whose density is the log-prob PPO needs; every other step stays the ODE step.
The PPO update recomputes only that step under the current parameters. The method: section "Flow-SDE" below.

    python flow_sde_ppo.py                                       # PickCube, state obs, tiny policy, CPU
    python flow_sde_ppo.py --env-id PickCube --num-envs 320      # on a GPU (physx_cuda)
    torchrun --nproc-per-node 8 flow_sde_ppo.py --num-envs 320   # 8 GPUs, 40 envs each
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
    env_id: str = "PickCube"  # ManiSkill task (PickCube or PickCube-v1, ...) or LIBERO suite (libero_spatial, ...)
    task_ids: tuple[int, ...] = (0,)  # LIBERO: the suite's task indices
    checkpoint: str | None = None  # SFT checkpoint (default runs/sft/<env id>/checkpoint), or an openpi / LeRobot dir
    tokenizer: str | None = None  # the policy's tokenizer, if moved: a SentencePiece .model or a transformers dir
    asset_id: str | None = None  # openpi / LeRobot checkpoint: which of its norm stats (assets/<asset_id>/) to use
    obs_mode: str | None = None  # "state" or "rgb" (default: the SFT checkpoint's)
    control_mode: str | None = None  # ManiSkill controller (default: the SFT checkpoint's)
    reward_mode: str = "normalized_dense"  # normalized_dense, dense, sparse (LIBERO: 1 on success); dense: more signal
    max_episode_steps: int = 80  # ManiSkill episode length in env steps, as in the paper (LIBERO uses its suite's)
    num_envs: int = 64  # training envs in all, split over torchrun ranks (the paper's 320 on a GPU; CPU envs are slow)
    num_steps: int = 20  # decisions (action chunks) per env per iteration: 20 x 4 actions = one 80-step episode
    total_iterations: int = 200  # iterations (rollout + update)
    time_budget_min: float | None = None  # stop after this many training minutes (not eval), even with iterations left
    action_chunk: int = 4  # C: actions executed per decision (the paper's 5; shorter chunks re-plan more often)
    denoise_steps: int = 4  # K: denoising steps in rollouts and evaluation (the paper's 4)
    noise_level: float = 1.2  # SDE noise a: s_t = a sqrt(t/(1-t)) (the paper's 0.5; one noisy step in 4 needs more)
    ratio_level: str = "chunk"  # "chunk": one ratio per decision (C x A log-probs summed); "token": one per entry
    # critic features: "expert" (the paper's pi0 critic), "vlm" (pi0.5's), "expert_state" (pi0: + state, fits best)
    critic_input: str = "expert_state"
    critic_detach: bool = True  # stop the value loss's gradient at the critic's input features
    gamma: float = 0.9487  # discount per decision, 0.9 per 8 env steps: a one-episode horizon keeps values small
    gae_lambda: float = 0.9747  # GAE lambda per decision: 0.95 per 8 env steps (sqrt 0.95 per 4-step decision)
    update_epochs: int = 4  # PPO epochs per iteration
    num_minibatches: int = 8  # minibatches per epoch (each rank splits its own batch; the ranks' gradients averaged)
    micro_batch_size: int | None = None  # accumulate gradients in micro-batches this big (memory for time); None: off
    prefix_store_gb: float = 1.0  # reuse rollout VLM prefixes in the update if they fit in this many GB; 0: recompute
    grad_checkpointing: bool = False  # recompute the expert's activations in backward, not store them (memory for time)
    vlm_dtype: str = "auto"  # frozen VLM's dtype: bfloat16 halves its memory (expert: float32); auto: bfloat16 on a GPU
    clip_coef: float = 0.2  # PPO ratio clip
    value_clip: float | None = None  # clip of V around the rollout's; off: the paper's 0.2 suits values in [0, 1]
    huber_delta: float = 10.0  # Huber threshold of the value loss
    vf_coef: float = 1.0  # value loss weight
    lr: float = 3e-5  # actor lr (expert, projections; VLM frozen): the paper's 5e-6 is for pi0's far larger expert
    value_lr: float = 1e-3  # critic learning rate
    critic_warmup_iters: int = 5  # critic-only iterations first (actor lr 0), so early advantages are not value error
    anneal_lr: bool = True  # decay the actor's lr linearly to 0 by the run's end (iterations or --time-budget-min)
    max_grad_norm: float = 1.0  # gradient-norm clip
    target_kl: float | None = 0.05  # end the epochs once approximate KL passes this (None: never); it keeps the lr safe
    eval_every: int = 10  # evaluate every N iterations and before the first and after the last (0: only those two)
    eval_episodes: int = 100  # evaluation episodes (fixed seeds, deterministic ODE); 0 disables evaluation
    num_eval_envs: int = 10  # parallel evaluation environments (per rank)
    sim_backend: str = "auto"  # auto: physx_cuda (one GPU simulation) with CUDA, else physx_cpu (envs in env_workers)
    env_workers: int | None = None  # processes stepping the CPU envs (default: cores per torchrun rank; 1: in-process)
    update_threads: int | None = None  # torch threads in the update, as env workers idle (default: the cores per rank)
    eval_seed: int = 10_000  # first seed of the evaluation episodes
    save_every: int = 10  # write the checkpoint every N iterations
    capture_video: bool = False  # save a video of the first evaluation environment at each evaluation
    seed: int = 1  # random seed
    output_dir: str | None = None  # run directory (default runs/flow_sde_ppo/<env id>_<seed>)
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


# ================================================================================================ Flow-SDE
# The SDE step (sample_chunk): x_1 ~ N(0, I) [N, H, D]; K steps on t = 1 - k/K. Step k* (uniform per sample) is the
# SDE step with the ODE's marginals (sde_mean_std), every other step the ODE step x - v/K:
#     x' = mean + std xi,  mean = x - [v + s_t^2 / (2t) (x + (1 - t) v)] / K,  std = s_t / sqrt(K),
#     s_t = a sqrt(t / (1 - t))  (at t = 1 the next grid point's 1 - t = 1/K: s_1 = a sqrt(K)).
# Its log-prob (gaussian_logp, step_logp): log N(x'; mean, std^2) of the executed C x A entries of that one step.
# The PPO loss (ppo_loss): r = exp(logp_new - logp_old), L = mean max(-A r, -A clip(r, 1 - eps, 1 + eps))
#     + vf_coef mean Huber(V - R) (with --value-clip: the max of it and the clipped V's).
# GAE (compute_gae) over decisions: delta_t = r_t + gamma [(1 - d_t) V_t+1 + V(final obs)_t] - V_t,
#     A_t = delta_t + gamma lambda (1 - d_t) A_t+1, R_t = A_t + V_t.
def sde_mean_std(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, K: int, a: float):
    """The SDE transition t -> t - 1/K. x, v [N, H, D], t [N] -> mean [N, H, D], std [N, 1, 1]."""
    t = t[:, None, None]
    s = a * torch.sqrt(t / torch.where(t < 1, 1 - t, torch.full_like(t, 1.0 / K)))
    mean = x - (v + s**2 / (2 * t) * (x + (1 - t) * v)) / K  # x + (1 - t) v is the predicted noise
    return mean, s * math.sqrt(1.0 / K)


def gaussian_logp(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, C: int, A: int) -> torch.Tensor:
    """log N(x; mean, std^2) of every executed entry: the first C actions, the env's A real dims -> [N, C, A]."""
    z = (x - mean)[:, :C, :A] / std
    return -0.5 * z**2 - torch.log(std) - 0.5 * math.log(2 * math.pi)


@torch.no_grad()
def sample_chunk(policy, prefix, args, action_dim: int, generator=None):
    """Hybrid sampling -> chunk x_0 [N, H, D] (normalised), x_k* and x_k*+1 [N, H, D], k* [N], log-prob [N, C, A]."""
    K, N = args.denoise_steps, prefix.mask.shape[0]
    H, D, dev = policy.spec["chunk_size"], policy.spec["max_action_dim"], prefix.mask.device
    x = torch.randn(N, H, D, device=dev, generator=generator)  # [N, H, D] at t=1
    k_star = torch.randint(0, K, (N,), device=dev, generator=generator)  # [N]
    x_before, x_after = torch.empty_like(x), torch.empty_like(x)  # [N, H, D]
    logp = torch.empty(N, args.action_chunk, action_dim, device=dev)  # [N, C, A]
    xi = torch.randn(x.shape, device=dev, generator=generator)  # [N, H, D]: each sample's one SDE step draws once
    for k in range(K):
        t = torch.full((N,), 1.0 - k / K, device=dev)
        v, _ = policy.velocity(prefix, x, t)
        sde = k_star == k
        mean, std = sde_mean_std(x, v, t, K, args.noise_level)
        x_next = torch.where(sde[:, None, None], mean + std * xi, x - v / K)
        x_before[sde], x_after[sde] = x[sde], x_next[sde]
        logp[sde] = gaussian_logp(x_next, mean, std, args.action_chunk, action_dim)[sde]
        x = x_next
    return x, x_before, x_after, k_star, logp


def step_logp(policy, prefix, x_before, x_after, k_star, args, action_dim):
    """Log-prob [M, C, A] of the stored SDE transitions under the current parameters: one expert pass each."""
    t = 1.0 - k_star.float() / args.denoise_steps
    v, _ = policy.velocity(prefix, x_before, t)
    mean, std = sde_mean_std(x_before, v, t, args.denoise_steps, args.noise_level)
    return gaussian_logp(x_after, mean, std, args.action_chunk, action_dim)


def ppo_loss(policy, critic, normalizer, args, action_dim, state, images, prompts, x_before, x_after, k_star,
             old_logp, adv, ret, old_value, prefix=None):
    """Clipped surrogate on the recomputed SDE step + Huber value loss of a minibatch of M decisions -> loss, stats."""
    if prefix is None:  # not stored in the rollout: encoded here (VLM frozen: no grad)
        prefix = policy.encode_prefix(normalizer.normalize("state", state), prompts, images)
    log_ratio = step_logp(policy, prefix, x_before, x_after, k_star, args, action_dim) - old_logp  # [M, C, A]
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
        stats = {"pg_loss": pg_loss.item(), "v_loss": v_loss.item(), "ratio_mean": ratio.mean().item(),
                 "approx_kl": ((ratio - 1) - log_ratio).mean().item(),
                 "clipfrac": ((ratio - 1).abs() > args.clip_coef).float().mean().item()}
    return pg_loss + args.vf_coef * v_loss, stats


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
    """"expert": mean of the expert's action-token outputs at (x = 0, t = 1), so the value depends on the observation
    only; "vlm": mean of the VLM prefix output; "expert_state": the expert's plus pi0's normalised, padded state."""
    if args.critic_input == "vlm":
        return prefix.features.float()  # [N, W]
    if args.critic_input == "expert_state" and prefix.state is None:
        raise UsageError("--critic-input expert_state needs pi0's state token; pi0.5 writes the state into the "
                         "prompt: use expert or vlm")
    N, H, D = prefix.mask.shape[0], policy.spec["chunk_size"], policy.spec["max_action_dim"]
    with torch.set_grad_enabled(torch.is_grad_enabled() and not args.critic_detach):
        _, h = policy.velocity(prefix, torch.zeros(N, H, D, device=prefix.mask.device),
                               torch.ones(N, device=prefix.mask.device))
    h = h.mean(1).float()  # [N, expert width]
    return torch.cat([h, prefix.state.float()], -1) if args.critic_input == "expert_state" else h


def critic_feature_dim(policy, args) -> int:
    s = policy.spec
    return {"vlm": s["text_hidden"], "expert": s["expert_hidden"],
            "expert_state": s["expert_hidden"] + s["max_state_dim"]}[args.critic_input]


def compute_gae(rewards, values, dones, final_values, next_value, gamma, lam):
    """rewards, values, dones, final_values [T, N] (dones[t]: the episode ended in chunk t; final_values[t]: V(its
    last obs) if the time limit cut it, else 0), next_value [N]: V(obs after the last chunk) -> advantages, returns."""
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        nxt = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * (not_done * nxt + final_values[t]) - values[t]
        last = advantages[t] = delta + gamma * lam * not_done * last
    return advantages, advantages + values


@torch.no_grad()
def sample_actions(policy, normalizer, obs, prompts, denoise_steps, action_dim, generator=None):
    """Deterministic ODE from noise (t=1) to action (t=0) in K Euler steps -> env actions [N, H, A]."""
    state = normalizer.normalize("state", obs["state"])
    prefix = policy.encode_prefix(state, prompts, obs["images"])
    N, H, D = state.shape[0], policy.spec["chunk_size"], policy.spec["max_action_dim"]
    x = torch.randn(N, H, D, device=state.device, generator=generator)  # [N, H, max_action_dim] at t=1
    for k in range(denoise_steps):
        x = x - policy.velocity(prefix, x, 1.0 - k / denoise_steps)[0] / denoise_steps  # dt = -1/K
    return normalizer.unnormalize("actions", x[..., :action_dim])


def evaluate(policy, normalizer, envs, args, num_episodes, video_path=None, rank=0, world=1) -> dict:
    """Fixed-seed episodes to the time limit, executing the first C actions of each ODE chunk. Round r (seeds
    eval_seed + r * num_envs + i, noise seeded with r) runs on rank r % world: the episodes do not depend on the
    number of ranks. -> mean success_once, success_at_end, return, episode_len over all ranks' episodes."""
    policy.eval()
    prompts = getattr(envs, "prompts", [envs.prompt] * envs.num_envs)
    results, frames = {}, []
    for r in range(rank, math.ceil(num_episodes / envs.num_envs), world):
        gen = torch.Generator(device=next(policy.parameters()).device).manual_seed(args.eval_seed + r)
        # scenes rebuilt at each evaluation's start: one policy scores the same at every evaluation, as on new envs
        obs = envs.reset(seed=args.eval_seed + r * envs.num_envs, rebuild=r == rank)
        keep = min(envs.num_envs, num_episodes - r * envs.num_envs)  # the last round may be partly surplus
        info = {"episode": None}
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


# ================================================================================================ main
def check_args(args: Args) -> tuple[dict, Path, Path]:
    """Fail on a user error before any env or model loads. -> meta of the checkpoint to start from, run dir, path."""
    check_env_args(args)
    env_id = resolve_env_id(args.env_id)[1]

    def need(ok: bool, name: str, problem: str):
        if not ok:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: {problem}")
    for names, ok, problem in (  # None: a default computed at run time, or off
            ("num_envs num_steps total_iterations update_epochs num_minibatches denoise_steps action_chunk save_every "
             "micro_batch_size update_threads", lambda v: v >= 1, "must be at least 1"),
            ("noise_level clip_coef huber_delta max_grad_norm time_budget_min value_clip", lambda v: v > 0,
             "must be positive"),
            ("eval_every eval_episodes critic_warmup_iters prefix_store_gb lr value_lr", lambda v: v >= 0,
             "must not be negative")):
        for k in names.split():
            need(getattr(args, k) is None or ok(getattr(args, k)), k, problem)
    for k, choices in (("ratio_level", "chunk token"), ("critic_input", "expert vlm expert_state"),
                       ("vlm_dtype", "auto bfloat16 float32"), ("reward_mode", "normalized_dense dense sparse")):
        need(getattr(args, k) in choices.split(), k, f"choose {', '.join(choices.split())}")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's ranks
    need(args.num_envs % world == 0, "num_envs", f"does not split over {world} ranks: use a multiple of {world}")
    N, ranks = args.num_envs // world, " per rank" if world > 1 else ""
    batch, mb = N * args.num_steps, args.num_minibatches
    decisions = f"{batch} decisions per iteration{ranks} (num_envs {N} x num_steps {args.num_steps})"
    need(mb <= batch, "num_minibatches", f"more minibatches than the {decisions}; use at most {batch}")
    need(batch % mb == 0, "num_minibatches", f"the batch of {decisions} does not split into {mb} equal minibatches")

    run_dir = Path(args.output_dir or f"runs/flow_sde_ppo/{env_id}_{args.seed}")
    source = run_dir / "checkpoint" if args.resume else Path(args.checkpoint or f"runs/sft/{env_id}/checkpoint")
    path = source if source.is_dir() else Path(f"{source}.old")  # a save killed between its two renames left it here
    if not path.is_dir():
        raise UsageError(f"--resume: no checkpoint at {source} (is --output-dir the run's directory?)" if args.resume
                         else f"no SFT checkpoint at {source}: run `python sft_baseline.py --env-id {args.env_id}` "
                              "first, or pass --checkpoint")
    vla.checkpoint.read_safetensors(sorted(path.glob("*.safetensors")), tensors=False)  # damaged weights: refused now
    config = vla.checkpoint.read_json(path / "config.json") if (path / "config.json").is_file() else {}
    if "preset" in config:  # ours (an openpi / LeRobot directory is checked as it loads)
        H, variant = (vla.VLAConfig(**config).spec()[k] for k in ("chunk_size", "variant"))
        need(args.action_chunk <= H, "action_chunk", f"exceeds the policy's chunk size {H} ({path}): use at most {H}")
        need(variant == "pi0" or args.critic_input != "expert_state", "critic_input", f"needs pi0's state "
             f"token; {path} is pi0.5 (its state is in the prompt): use vlm (the paper's pi0.5 critic) or expert")
    meta = vla.checkpoint.read_json(path / "meta.json") if (path / "meta.json").is_file() else {}
    args.obs_mode = args.obs_mode or meta.get("obs_mode", "state")
    args.control_mode = args.control_mode or meta.get("control_mode", "pd_ee_delta_pose")
    if not args.resume and meta.get("env_id", env_id) != env_id:  # a resumed run's task: refused below
        raise UsageError(f"--env-id {args.env_id}: the checkpoint {path} was trained for {meta['env_id']}; train one "
                         f"with `python sft_baseline.py --env-id {args.env_id}`, or pass --checkpoint of one")
    if args.resume:  # a changed task, episode, chain or critic is another run (refused); other changes printed
        free = set("total_iterations time_budget_min eval_every eval_episodes num_eval_envs save_every capture_video "
                   "track wandb_project env_workers sim_backend micro_batch_size grad_checkpointing prefix_store_gb "
                   "update_threads vlm_dtype checkpoint output_dir resume tokenizer".split())
        fixed = ("env_id task_ids obs_mode control_mode reward_mode max_episode_steps action_chunk denoise_steps "
                 "critic_input").split()
        saved, now = meta.get("args", {}), json.loads(json.dumps(asdict(args)))  # tuples as lists, as in the JSON
        changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v and k not in free}
        flag = {k: "--" + k.replace("_", "-") for k in changed}
        refused = [f"the run has {flag[k]} {changed[k][0]}, not {changed[k][1]}" for k in fixed if k in changed]
        if refused:
            raise UsageError(f"--resume: {'; '.join(refused)}: pass the run's values again (to change them, start a "
                             "new run)")
        if changed:
            print("--resume with changed options:", ", ".join(f"{flag[k]} {a} -> {b}" for k, (a, b) in changed.items()))
    return meta, run_dir, source


def main(args: Args):
    """Train; -> the last evaluation's metrics, the policy and the critic (None for a run already finished)."""
    meta, run_dir, source = check_args(args)
    kind, env_id = resolve_env_id(args.env_id)
    ckpt_dir, metrics_path = run_dir / "checkpoint", run_dir / "metrics.jsonl"
    budget = 60 * args.time_budget_min if args.time_budget_min else math.inf  # seconds of training time
    resumed = meta if args.resume else {"iteration": 0, "global_step": 0, "train_time": 0.0}
    start_iter, global_step, train_time = resumed["iteration"], resumed["global_step"], resumed["train_time"]
    if start_iter >= args.total_iterations or train_time >= budget:
        print(f"{run_dir} already finished at iteration {start_iter} of {args.total_iterations}: raise "
              "--total-iterations (or --time-budget-min) to continue")
        return None
    rank, world, device = init_distributed()
    is_main, update_threads = rank == 0, args.update_threads or max(1, (os.cpu_count() or 1) // world)
    N, T, C = args.num_envs // world, args.num_steps, args.action_chunk  # N: this rank's envs
    minibatch_size = N * T // args.num_minibatches
    micro_size = min(args.micro_batch_size or minibatch_size, minibatch_size)
    random.seed(args.seed + rank), np.random.seed(args.seed + rank), torch.manual_seed(args.seed + rank)

    # ---- envs, policy (frozen VLM), critic, optimiser: from the SFT checkpoint or resumed from this run's
    # dense-reward episodes run to the time limit: an early success does not forfeit the rest of the episode's reward
    envs = make_envs(args, N, ignore_terminations=kind == "maniskill" and args.reward_mode != "sparse", device=device)
    eval_envs = make_envs(args, args.num_eval_envs, ignore_terminations=True, device=device)
    obs = envs.reset(seed=args.seed * 1_000_003 + rank * 100_003 + start_iter)  # apart from eval's and other ranks'
    A, S = envs.action_dim, obs["state"].shape[1]
    bf16 = args.vlm_dtype == "bfloat16" or (args.vlm_dtype == "auto" and device.type == "cuda")
    vlm_dtype = torch.bfloat16 if bf16 else None  # None: as saved (float32)
    policy, normalizer, extra, _ = vla.load_checkpoint(source, vlm_dtype=vlm_dtype, tokenizer=args.tokenizer,
                                                       asset_id=args.asset_id, action_dim=A, state_dim=S)
    if normalizer is None:
        raise UsageError(f"{source} has no norm stats: the policy's state/action normalisation is unknown")
    if (policy.config.action_dim, policy.config.state_dim) != (A, S):  # openpi / LeRobot weights: built for these
        raise UsageError(f"{source} reads {policy.config.state_dim}-D states and outputs {policy.config.action_dim}-D "
                         f"actions, but {env_id} with {args.obs_mode} obs and {args.control_mode} gives {S}-D states "
                         f"and takes {A}-D actions: train one with `python sft_baseline.py --env-id {args.env_id}`, "
                         "or pass --checkpoint of one")
    policy.to(device).freeze_vlm(dtype=vlm_dtype).expert_checkpointing(args.grad_checkpointing)
    critic = Critic(critic_feature_dim(policy, args)).to(device)
    opt = torch.optim.AdamW([{"params": policy.trainable_parameters(), "lr": args.lr}, {"params": critic.parameters(),
                             "lr": args.value_lr}], betas=(0.9, 0.95), weight_decay=0.0)  # groups: actor, critic
    if args.resume:
        critic.load_state_dict({k[len("critic."):]: v for k, v in extra.items() if k.startswith("critic.")})
        state = {}  # AdamW's state, saved as flat tensors "optim.<param>.<key>"
        for key in (k for k in extra if k.startswith("optim.")):
            state.setdefault(int(key.split(".")[1]), {})[key.split(".", 2)[2]] = extra[key]
        opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]})
    params = policy.trainable_parameters() + list(critic.parameters())
    broadcast_parameters(params)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if args.resume:  # a run killed after logging an iteration but before saving it runs that iteration again
            lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
            keep = [line for line in lines if line.endswith("}") and json.loads(line)["iteration"] <= start_iter]
            metrics_path.with_suffix(".tmp").write_text("".join(f"{line}\n" for line in keep))  # (a cut line: no "}")
            os.replace(metrics_path.with_suffix(".tmp"), metrics_path)
            print(f"resuming {run_dir} from iteration {start_iter}")
        if start_iter < (w := args.critic_warmup_iters):
            never = f"; with --total-iterations {args.total_iterations} the actor never trains"
            print(f"iterations {start_iter + 1}-{w} train only the critic (actor frozen, --critic-warmup-iters {w})"
                  + (never if args.total_iterations <= w else ""))
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
    H, D = policy.spec["chunk_size"], policy.spec["max_action_dim"]
    prompts = getattr(envs, "prompts", [envs.prompt] * N)
    obs_state = torch.zeros(T, N, S, device=device)  # [T, N, state_dim]
    obs_images = None if obs["images"] is None else torch.zeros(T, N, *obs["images"].shape[1:], dtype=torch.uint8,
                                                                device=device)  # [T, N, cams, H, W, 3]
    x_before, x_after = torch.zeros(2, T, N, H, D, device=device)  # [T, N, H, D] each: x_k* and x_k*+1 of the SDE step
    k_stars, logp = torch.zeros(T, N, dtype=torch.long, device=device), torch.zeros(T, N, C, A, device=device)
    values, rewards, dones, final_values = torch.zeros(4, T, N, device=device)  # [T, N] each

    @torch.no_grad()
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
                chunk, x_before[step], x_after[step], k_stars[step], logp[step] = sample_chunk(policy, prefix, args, A)
            actions = normalizer.unnormalize("actions", chunk[:, :C, :A])  # [N, C, A]: the chunk's first C actions
            alive = torch.ones(N, dtype=torch.bool, device=device)  # [N]: still in the episode the chunk started in
            truncated, reward = torch.zeros_like(alive), torch.zeros(N, device=device)  # [N] each
            final = {k: None if v is None else v.clone() for k, v in obs.items()}  # each env's last obs of its episode
            for c in range(C):  # an episode ending in the chunk gets its rewards to its end; the reset one's: nobody
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
            rewards[step], dones[step], final_values[step] = reward, (~alive).float(), 0.0
            if truncated.any():  # bootstrap episodes cut by the time limit from their last observation
                final_values[step][truncated] = value_of({k: None if v is None else v[truncated]
                                                         for k, v in final.items()}, truncated)
        rollout_time = time.time() - t0

        # ---- advantages
        next_value = value_of(obs, torch.ones(N, dtype=torch.bool))
        advantages, returns = compute_gae(rewards, values, dones, final_values, next_value, args.gamma, args.gae_lambda)

        # ---- PPO update: recompute only the stored SDE step of each decision
        t1, rollout_threads = time.time(), torch.get_num_threads()
        torch.set_num_threads(update_threads)  # the env workers wait during the update: their cores are free
        policy.train()
        progress = max(iteration / args.total_iterations, train_time / budget)  # share of the run done
        lr_now = args.lr * (max(1.0 - progress, 0.0) if args.anneal_lr else 1.0)
        opt.param_groups[0]["lr"] = 0.0 if iteration < args.critic_warmup_iters else lr_now
        # the batch: [T, N, ...] -> [T * N, ...], row i is step i // N, env i % N
        batch = {k: None if x is None else x.reshape(T * N, *x.shape[2:]) for k, x in dict(
            state=obs_state, images=obs_images, x_before=x_before, x_after=x_after, k_star=k_stars, old_logp=logp,
            adv=advantages, ret=returns, old_value=values).items()}
        b_prefix = vla.Prefix.cat(prefixes) if len(prefixes) == T else None
        prefixes.clear()
        # advantages normalised over all ranks' decisions: sum, sum of squares, count
        s, sq, n = all_reduce(torch.stack([advantages.sum(), advantages.square().sum(),
                                           advantages.new_tensor(float(advantages.numel()))]).double()).tolist()
        batch["adv"] = (batch["adv"] - s / n) / (math.sqrt(max(sq - s * s / n, 0.0) / max(n - 1, 1)) + 1e-8)
        stats = {}
        for epochs_run in range(1, args.update_epochs + 1):  # fewer when --target-kl stops the update
            perm = torch.randperm(T * N, device=device)
            for start in range(0, T * N, minibatch_size):
                mb = perm[start:start + minibatch_size]
                opt.zero_grad(set_to_none=True)
                for micro in mb.split(micro_size):  # gradient accumulation over micro-batches
                    loss, mb_stats = ppo_loss(policy, critic, normalizer, args, A,
                                              **{k: None if x is None else x[micro] for k, x in batch.items()},
                                              prompts=[prompts[i % N] for i in micro.tolist()],
                                              prefix=None if b_prefix is None else b_prefix.select(micro))
                    (loss * len(micro) / len(mb)).backward()
                    for k, v in mb_stats.items():
                        stats.setdefault(k, []).append(v)
                average_gradients(params)
                grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                if not torch.isfinite(grad_norm):  # the same on every rank: gradients were averaged
                    raise FloatingPointError(f"non-finite loss or gradient at iteration {iteration + 1}; " + (
                        f"the last good checkpoint is in {ckpt_dir}" if ckpt_dir.is_dir() else
                        "no checkpoint was written yet"))
                opt.step()
                stats.setdefault("grad_norm", []).append(grad_norm.item())
            n_recent = args.num_minibatches * math.ceil(minibatch_size / micro_size)  # this epoch's loss calls
            kl = all_reduce(torch.tensor(float(np.mean(stats["approx_kl"][-n_recent:])))).item() / world
            if args.target_kl is not None and kl > args.target_kl:  # every rank takes the same decision
                break
        torch.set_num_threads(rollout_threads)
        update_time = time.time() - t1
        train_time += all_reduce(torch.tensor(rollout_time + update_time)).item() / world  # same on every rank

        var_y = returns.var()
        row = mean_over_ranks({
            "rollout_sps": N * C * T / rollout_time * world,  # averaged over ranks: the total
            "rollout_time": rollout_time, "update_time": update_time, "lr": opt.param_groups[0]["lr"],
            "epochs": epochs_run, "prefix_stored": float(b_prefix is not None),  # 1: the update reused the prefixes
            "explained_variance": (1 - (returns - values).var() / var_y).item() if var_y > 0 else float("nan"),
            **{k: float(np.mean(v)) for k, v in stats.items()}})
        row.update({f"train/{k}": v for k, v in episode_means(episodes).items()})  # over all ranks' episodes
        log(iteration + 1, row)
        bar.set_postfix(success=f"{row.get('train/success_once', float('nan')):.2f}", kl=f"{row['approx_kl']:.4f}")
        bar.update()
        done = iteration + 1 == args.total_iterations or train_time >= budget
        if args.eval_episodes > 0 and (done or (args.eval_every and (iteration + 1) % args.eval_every == 0)):
            eval_metrics = run_eval(iteration + 1)
        if (done or (iteration + 1) % args.save_every == 0) and is_main:
            sd = opt.state_dict()  # AdamW's state as flat tensors (safetensors), its param groups in the JSON
            tensors = {f"critic.{k}": v for k, v in critic.state_dict().items()}
            tensors.update({f"optim.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()})
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
    return eval_metrics, policy, critic


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (UsageError, vla.CheckpointError) as e:  # the user's mistake: one line, argparse's exit status
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

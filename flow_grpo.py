"""GRPO with Flow-SDE sampling: critic-free online RL fine-tuning of a flow-matching VLA policy (pi_RL).

Groups of G envs start from one initial state; each member's undiscounted return, normalised within its group, is the
advantage of its episode's decisions in PPO's clipped surrogate on one random denoising step's Flow-SDE log-prob.

    python flow_grpo.py                                        # PickCube, state obs, tiny policy, CPU
    python flow_grpo.py --env-id PickCube --num-envs 320       # on a GPU (physx_cuda)
    torchrun --nproc-per-node 8 flow_grpo.py --num-envs 320    # 8 GPUs, 40 envs (5 groups) each
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import tyro
from tqdm import tqdm

import vla
from environments import LIBERO_MAX_STEPS, UsageError, check_env_args, make_envs, resolve_env_id

@dataclass
class Args:
    env_id: str = "PickCube"  # ManiSkill task (alias or full id) or LIBERO suite: libero_{spatial,object,goal,10}
    task_ids: tuple[int, ...] = (0,)  # LIBERO: the suite's task indices
    checkpoint: str | None = None  # SFT checkpoint (default runs/sft/<env id>/checkpoint), or an openpi / LeRobot dir
    tokenizer: str | None = None  # the policy's tokenizer, if moved: a SentencePiece .model or a transformers dir
    asset_id: str | None = None  # openpi / LeRobot checkpoint: which of its norm stats (assets/<asset_id>/) to use
    obs_mode: str | None = None  # "state" or "rgb" (default: the SFT checkpoint's)
    control_mode: str | None = None  # ManiSkill controller (default: the SFT checkpoint's)
    # normalized_dense, dense or sparse (LIBERO: 1 on success); a dense reward's episodes run to the time limit
    reward_mode: str = "normalized_dense"
    max_episode_steps: int = 80  # ManiSkill episode length in env steps, as in the paper (LIBERO uses its suite's)
    num_envs: int = 64  # total training envs, in whole groups per torchrun rank (64: 8 groups, for steadier updates)
    group_size: int = 8  # G: environments per group, all starting from the same initial state
    filter_groups: bool = False  # drop groups whose mean success lies outside [0.1, 0.9] (nothing to compare)
    total_iterations: int = 200  # iterations (rollout + update)
    time_budget_min: float | None = None  # stop after this many training minutes (not eval), even with iterations left
    action_chunk: int = 4  # C: actions executed per decision (the chunk's first C; paper: 5; fewer re-plan more often)
    denoise_steps: int = 4  # K: denoising steps, in rollouts and evaluation
    noise_level: float = 1.2  # SDE noise a: s_t = a sqrt(t/(1-t)) (paper: 0.5; larger explores more per SDE step)
    ratio_level: str = "chunk"  # "chunk": one ratio per decision (its C x A log-probs summed); "token": one per entry
    update_epochs: int = 2  # policy epochs per iteration (2-4)
    num_minibatches: int = 8  # minibatches per epoch (each rank splits its own batch; the ranks' gradients averaged)
    micro_batch_size: int | None = None  # accumulate gradients in micro-batches this big (memory for time); None: off
    prefix_store_gb: float = 1.0  # reuse rollout VLM prefixes in the update if they fit in this many GB; 0: recompute
    grad_checkpointing: bool = False  # recompute the expert's activations in backward, not store them (memory for time)
    vlm_dtype: str = "auto"  # frozen VLM's dtype: bfloat16 halves its memory (expert: float32); auto: bfloat16 on a GPU
    clip_coef: float = 0.2  # PPO ratio clip
    kl_coef: float = 0.0  # weight of a KL penalty to the SFT policy on the SDE step; 0 disables it and keeps no copy
    lr: float = 1e-5  # lr of the expert and projections (VLM frozen; paper: 5e-6); larger constant steps collapse
    anneal_lr: bool = False  # decay the lr linearly to 0 by the end (iterations or budget); off: the lr is already low
    max_grad_norm: float = 1.0  # gradient-norm clip
    target_kl: float | None = None  # stop an iteration's epochs once the approximate KL exceeds this (logged: "epochs")
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
    output_dir: str | None = None  # run directory (default runs/flow_grpo/<env id>_<seed>)
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


# ================================================================================================ Flow-SDE and GRPO
# Hybrid sampling: K denoising steps from noise (t = 1) to action (t = 0), D = 1/K. One step k* ~ U{0..K-1} per
# sample is the SDE step with the ODE's marginals, all others the ODE step x - D v:
#     mean = x - D [v + s_t^2 / (2t) (x + (1 - t) v)],   std = s_t sqrt(D),   s_t = a sqrt(t / (1 - t))
# The action's log-prob is that one transition's, log N(x_k*+1; mean, std^2), over the C executed actions' real dims.
# Group advantage of an episode's return R among the G members that started from its initial state:
#     A = (R - mean_group R) / (std_group R + 1e-6)
# GRPO loss on the recomputed SDE step, ratio r = exp(logp - logp_old), optional KL to the SFT policy's step:
#     L = mean max(-A r, -A clip(r, 1 - eps, 1 + eps)) + kl_coef |mean - mean_ref|^2 / (2 std^2)
def sde_mean_std(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, K: int, a: float):
    """x, v [N, H, D], t [N] -> mean [N, H, D], std [N, 1, 1]; s_1 takes 1 - t = 1/K, the next grid point's (finite)."""
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
    """Hybrid ODE/SDE sampling -> x_0 (normalised), x_k*, x_k*+1 [N, H, D], k* [N], that step's log-prob [N, C, A]."""
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


def group_advantages(returns: torch.Tensor, success: torch.Tensor, group_size: int, filter_groups: bool):
    """returns, success [N] (groups of G adjacent episodes) -> advantage [N] (population std), keep [N] (filter)."""
    R = returns.view(-1, group_size)  # [groups, G]
    adv = (R - R.mean(1, keepdim=True)) / (R.std(1, unbiased=False, keepdim=True) + 1e-6)
    rate = success.float().view(-1, group_size).mean(1, keepdim=True)  # [groups, 1]
    keep = ((rate >= 0.1) & (rate <= 0.9) | (not filter_groups)).expand_as(R)
    return adv.flatten(), keep.flatten()


def grpo_loss(policy, ref_policy, normalizer, args, action_dim, state, images, prompts, x_before, x_after, k_star,
              old_logp, adv, prefix=None):
    """Clipped surrogate on the recomputed SDE step for one minibatch of M decisions (prefix: the rollout's, else
    encoded here), plus the optional KL to the reference policy's step (same std). -> loss, stats."""
    if prefix is None:  # VLM frozen: no grad
        prefix = policy.encode_prefix(normalizer.normalize("state", state), prompts, images)
    t = 1.0 - k_star.float() / args.denoise_steps
    v, _ = policy.velocity(prefix, x_before, t)
    mean, std = sde_mean_std(x_before, v, t, args.denoise_steps, args.noise_level)
    log_ratio = gaussian_logp(x_after, mean, std, args.action_chunk, action_dim) - old_logp  # [M, C, A]
    if args.ratio_level == "chunk":
        log_ratio = log_ratio.sum((1, 2))  # [M]
    else:
        adv = adv[:, None, None].expand_as(log_ratio)  # the episode's advantage on every (action, dim)
    ratio = log_ratio.exp()
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
    kl = torch.zeros(())
    if ref_policy is not None:
        with torch.no_grad():
            ref_prefix = ref_policy.encode_prefix(normalizer.normalize("state", state), prompts, images)
            ref_mean, _ = sde_mean_std(x_before, ref_policy.velocity(ref_prefix, x_before, t)[0], t,
                                       args.denoise_steps, args.noise_level)
        kl = ((mean - ref_mean)[:, :args.action_chunk, :action_dim] ** 2 / (2 * std**2)).sum((1, 2)).mean()
        loss = loss + args.kl_coef * kl
    with torch.no_grad():
        stats = {"pg_loss": loss.item(), "kl_ref": kl.item(), "ratio_mean": ratio.mean().item(),
                 "approx_kl": ((ratio - 1) - log_ratio).mean().item(),
                 "clipfrac": ((ratio - 1).abs() > args.clip_coef).float().mean().item()}
    return loss, stats


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
    """Fixed-seed episodes to the time limit, running each ODE chunk's first C actions -> mean episode metrics over all
    ranks. Round r (seeds eval_seed + r * num_envs + i, noise seeded r) runs on rank r % world: rank-independent."""
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
def check_args(args: Args) -> tuple[str, str, dict, Path, Path]:
    """User errors, found before any env or model loads; fills in obs/control mode. -> kind, env id, meta, dirs."""
    check_env_args(args)
    kind, env_id = resolve_env_id(args.env_id)
    def need(ok: bool, name: str, problem: str):
        if not ok:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: {problem}")
    hint = {"num_envs": " (the paper uses 320 on a GPU, 64 on CPU)", "denoise_steps": " (the paper uses 4)",
            "noise_level": " (the noise level a: 1.2)", "update_threads": " (omit it for the cores per rank)"}
    for names, ok, problem in (  # None: a default computed at run time
            ("num_envs total_iterations update_epochs num_minibatches denoise_steps action_chunk save_every "
             "micro_batch_size update_threads", lambda v: v >= 1, "must be at least 1"),
            ("noise_level clip_coef max_grad_norm time_budget_min", lambda v: v > 0, "must be positive"),
            ("eval_every eval_episodes kl_coef prefix_store_gb lr", lambda v: v >= 0, "must not be negative")):
        for k in names.split():
            need(getattr(args, k) is None or ok(getattr(args, k)), k, problem + hint.get(k, ""))
    for k, choices in (("ratio_level", ("chunk", "token")), ("vlm_dtype", ("auto", "bfloat16", "float32")),
                       ("reward_mode", ("normalized_dense", "dense", "sparse"))):
        need(getattr(args, k) in choices, k, f"choose {', '.join(choices)}")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's ranks
    N, G, ranks = args.num_envs // world, args.group_size, f" x {world} ranks" if world > 1 else ""
    need(G >= 2 and args.num_envs % (G * world) == 0, "num_envs", f"must be a multiple of --group-size {G} (>= 2)"
         f"{ranks}: every group needs G members starting from the same state, on one rank")
    need(kind != "libero" or N % (G * len(args.task_ids)) == 0, "num_envs", f"must be a multiple of --group-size x "
         f"the number of --task-ids ({G} x {len(args.task_ids)}){ranks}, so that every group shares one task")
    T = math.ceil((LIBERO_MAX_STEPS[env_id] if kind == "libero" else args.max_episode_steps) / args.action_chunk)
    need(args.num_minibatches <= N * T, "num_minibatches", f"more minibatches than the {N * T} decisions of an "
         f"iteration at most ({N} envs{' per rank' if world > 1 else ''} x {T} per episode); use at most {N * T}")
    run_dir = Path(args.output_dir or f"runs/flow_grpo/{env_id}_{args.seed}")
    source = run_dir / "checkpoint" if args.resume else Path(args.checkpoint or f"runs/sft/{env_id}/checkpoint")
    path = source if source.is_dir() else Path(f"{source}.old")  # a save killed between its two renames left it here
    if not path.is_dir():
        raise UsageError(f"--resume: no checkpoint at {source} (is --output-dir the run's directory?)" if args.resume
                         else f"no SFT checkpoint at {source}: run `python sft_baseline.py --env-id {args.env_id}` "
                              "first, or pass --checkpoint")
    vla.checkpoint.read_safetensors(sorted(path.glob("*.safetensors")), tensors=False)  # damaged weights: refused now
    config = vla.checkpoint.read_json(path / "config.json") if (path / "config.json").is_file() else {}
    H = vla.VLAConfig(**config).spec()["chunk_size"] if "preset" in config else math.inf  # others: 8 or 50
    need(args.action_chunk <= H, "action_chunk", f"exceeds the policy's chunk size {H} ({path}): use at most {H}")
    meta = vla.checkpoint.read_json(path / "meta.json") if (path / "meta.json").is_file() else {}
    if not args.resume and meta.get("env_id", env_id) != env_id:  # a resumed run's task: refused below
        raise UsageError(f"--env-id {args.env_id}: the checkpoint {path} was trained for {meta['env_id']}; train one "
                         f"with `python sft_baseline.py --env-id {args.env_id}`, or pass --checkpoint of one")
    args.obs_mode = args.obs_mode or meta.get("obs_mode", "state")
    args.control_mode = args.control_mode or meta.get("control_mode", "pd_ee_delta_pose")
    if args.resume:  # free options may change; a changed fixed one is another run (refused); other changes: printed
        free = set("total_iterations time_budget_min eval_every eval_episodes num_eval_envs save_every capture_video "
                   "track wandb_project env_workers sim_backend micro_batch_size grad_checkpointing prefix_store_gb "
                   "update_threads vlm_dtype checkpoint output_dir resume tokenizer".split())
        fixed = "env_id task_ids obs_mode control_mode reward_mode max_episode_steps action_chunk denoise_steps".split()
        saved, now = meta.get("args", {}), json.loads(json.dumps(asdict(args)))  # tuples as lists, as in the JSON
        changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v and k not in free}
        flag = {k: "--" + k.replace("_", "-") for k in changed}
        refused = [f"the run has {flag[k]} {a}, not {b}" for k, (a, b) in changed.items() if k in fixed]
        if refused:
            raise UsageError(f"--resume: {'; '.join(refused)}: pass the run's values again, or start a new run")
        if changed:
            print("--resume with changed options:", ", ".join(f"{flag[k]} {a} -> {b}" for k, (a, b) in changed.items()))
    return kind, env_id, meta, run_dir, source


def main(args: Args):
    """Train; -> the last evaluation's metrics and the policy (None for a run already finished)."""
    kind, env_id, meta, run_dir, source = check_args(args)
    ckpt_dir, metrics_path = run_dir / "checkpoint", run_dir / "metrics.jsonl"
    budget = 60 * args.time_budget_min if args.time_budget_min else math.inf  # seconds of training time
    if args.resume and (meta["iteration"] >= args.total_iterations or meta["train_time"] >= budget):
        print(f"{run_dir} already finished at iteration {meta['iteration']} of {args.total_iterations}: raise "
              "--total-iterations (or --time-budget-min) to continue")
        return None
    rank, world, device = init_distributed()
    is_main, update_threads = rank == 0, args.update_threads or max(1, (os.cpu_count() or 1) // world)
    N, C, G = args.num_envs // world, args.action_chunk, args.group_size  # N: this rank's envs, whole groups
    random.seed(args.seed + rank), np.random.seed(args.seed + rank), torch.manual_seed(args.seed + rank)

    # ---- policy (frozen VLM), optional frozen copy of the starting policy, envs, optimiser
    bf16 = args.vlm_dtype == "bfloat16" or (args.vlm_dtype == "auto" and device.type == "cuda")
    vlm_dtype = torch.bfloat16 if bf16 else None
    envs = make_envs(args, N, ignore_terminations=kind == "maniskill" and args.reward_mode != "sparse", device=device)
    eval_envs = make_envs(args, args.num_eval_envs, ignore_terminations=True, device=device)
    obs = envs.reset(seed=args.seed)  # shows the env's dims; each rollout resets every group to its own seed
    A, S = envs.action_dim, obs["state"].shape[1]
    load = partial(vla.load_checkpoint, vlm_dtype=vlm_dtype, tokenizer=args.tokenizer, asset_id=args.asset_id,
                   action_dim=A, state_dim=S)  # (openpi / LeRobot weights are built for the env's dims)
    policy, normalizer, extra, _ = load(source)
    if normalizer is None:
        raise UsageError(f"{source} has no norm stats: the policy's state/action normalisation is unknown")
    if (policy.config.action_dim, policy.config.state_dim) != (A, S):
        raise UsageError(f"{source} reads {policy.config.state_dim}-D states and outputs {policy.config.action_dim}-D "
                         f"actions, but {env_id} with {args.obs_mode} obs and {args.control_mode} gives {S}-D states "
                         f"and takes {A}-D actions: train one with `python sft_baseline.py --env-id {args.env_id}`, "
                         "or pass --checkpoint of one")
    policy.to(device).freeze_vlm(dtype=vlm_dtype).expert_checkpointing(args.grad_checkpointing)
    ref_policy = None
    if args.kl_coef > 0:  # the starting policy, frozen
        ref_policy = load(meta.get("sft_checkpoint", source) if args.resume else source)[0]
        ref_policy.to(device).freeze_vlm(dtype=vlm_dtype).eval().requires_grad_(False)
    params = policy.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    start_iter, global_step, train_time = 0, 0, 0.0
    if args.resume:
        state = {}  # AdamW's state, saved as flat tensors "optim.<param>.<key>"
        for key in (k for k in extra if k.startswith("optim.")):
            state.setdefault(int(key.split(".")[1]), {})[key.split(".", 2)[2]] = extra[key]
        opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]})
        start_iter, global_step, train_time = meta["iteration"], meta["global_step"], meta["train_time"]
    broadcast_parameters(params)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if args.resume:  # a run killed after logging an iteration but before saving it runs that iteration again
            lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
            keep = [line for line in lines if line.endswith("}") and json.loads(line)["iteration"] <= start_iter]
            metrics_path.with_suffix(".tmp").write_text("".join(f"{line}\n" for line in keep))  # (a cut line: no "}")
            os.replace(metrics_path.with_suffix(".tmp"), metrics_path)
            print(f"resuming {run_dir} from iteration {start_iter}")
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

    # ---- rollout storage: one row per (decision point, env); an episode lasts at most T decisions
    T = math.ceil((LIBERO_MAX_STEPS[env_id] if kind == "libero" else args.max_episode_steps) / C)
    H, D = policy.spec["chunk_size"], policy.spec["max_action_dim"]
    prompts = getattr(envs, "prompts", [envs.prompt] * N)
    obs_state = torch.zeros(T, N, S, device=device)  # [T, N, state_dim]
    obs_images = None if obs["images"] is None else torch.zeros(T, N, *obs["images"].shape[1:], dtype=torch.uint8,
                                                                device=device)  # [T, N, cams, H, W, 3]
    x_before, x_after = torch.zeros(2, T, N, H, D, device=device)  # [T, N, H, D] each: x_k* and x_k*+1 of the SDE step
    k_stars, logp = torch.zeros(T, N, dtype=torch.long, device=device), torch.zeros(T, N, C, A, device=device)
    eval_metrics = run_eval(0) if args.eval_episodes > 0 and start_iter == 0 else {}  # the SFT policy
    bar = tqdm(initial=start_iter, total=args.total_iterations, desc="grpo", disable=not is_main)
    for iteration in range(start_iter, args.total_iterations):
        # ---- rollout: every group member from the same seed, each episode to its end, no auto-reset credit
        policy.eval()
        t0, prefixes = time.time(), []
        # one seed per group; training seeds never overlap the eval seeds (from 10_000) nor another rank's
        base = args.seed * 1_000_003 + (iteration * world + rank) * (N // G)
        obs = envs.reset(seed=[base + i // G for i in range(N)])
        alive, success = torch.ones(N, dtype=torch.bool, device=device), torch.zeros(N, dtype=torch.bool, device=device)
        returns, episode_len = torch.zeros(2, N, device=device)  # [N] each
        valid = torch.zeros(T, N, dtype=torch.bool, device=device)  # the decision belongs to the group episode
        for step in range(T):
            if not alive.any():
                break
            valid[step], obs_state[step] = alive, obs["state"]
            if obs_images is not None:
                obs_images[step] = obs["images"]
            with torch.no_grad():
                prefix = policy.encode_prefix(normalizer.normalize("state", obs["state"]), prompts, obs["images"])
                if T * prefix.nbytes() <= args.prefix_store_gb * 2**30:
                    prefixes.append(prefix)
                chunk, x_before[step], x_after[step], k_stars[step], logp[step] = sample_chunk(policy, prefix, args, A)
            actions = normalizer.unnormalize("actions", chunk[:, :C, :A])  # [N, C, A]
            for c in range(C):
                obs, r, term, trunc, info = envs.step(actions[:, c])
                returns += r * alive
                success |= info["success"] & alive
                episode_len += alive.float()
                alive &= ~(term | trunc)
            global_step += N * C * world
        rollout_time = time.time() - t0

        # ---- group advantages, broadcast to every decision of the episode; GRPO update on the kept decisions
        adv, keep = group_advantages(returns, success, G, args.filter_groups)
        rows = valid & keep[None, :]  # [T, N]
        t1, rollout_threads = time.time(), torch.get_num_threads()
        torch.set_num_threads(update_threads)  # the env workers wait during the update: their cores are free
        progress = max(iteration / args.total_iterations, train_time / budget)  # share of the run done
        opt.param_groups[0]["lr"] = args.lr * (max(1.0 - progress, 0.0) if args.anneal_lr else 1.0)
        stats, epochs_run, b_prefix, kept = {}, 0, None, all_reduce(rows.sum()).item()
        if kept < args.num_minibatches and is_main:  # e.g. every group filtered out, or episodes ended early
            tqdm.write(f"iter {iteration + 1}: no update, {kept} kept decisions for {args.num_minibatches} minibatches")
        if kept >= args.num_minibatches:
            policy.train()
            b_state, b_xb, b_xa, b_k, b_logp = (x[rows] for x in (obs_state, x_before, x_after, k_stars, logp))
            b_images = obs_images[rows] if obs_images is not None else None
            b_env = torch.arange(N, device=device)[None, :].expand(T, N)[rows]  # each kept decision's env
            if len(prefixes) == int(valid.any(1).sum()):  # every step run was stored: keep the kept rows'
                b_prefix = vla.Prefix.cat(prefixes).select(rows[:len(prefixes)].flatten().nonzero()[:, 0])
            prefixes.clear()
            M, micro_size = len(b_env), args.micro_batch_size or max(len(b_env), 1)
            for epochs_run in range(1, args.update_epochs + 1):  # fewer when --target-kl stops the update
                perm = torch.randperm(M, device=device)
                for j in range(args.num_minibatches):
                    mb = perm[j * M // args.num_minibatches:(j + 1) * M // args.num_minibatches]
                    if all_reduce(torch.tensor(len(mb))).item() == 0:  # every rank takes the same optimiser steps: a
                        continue  # minibatch empty on every rank is skipped, one empty here adds zero gradients
                    opt.zero_grad(set_to_none=True)
                    for i in mb.split(micro_size):  # gradient accumulation over micro-batches
                        loss, mb_stats = grpo_loss(
                            policy, ref_policy, normalizer, args, A, b_state[i], None if b_images is None else
                            b_images[i], [prompts[e] for e in b_env[i].tolist()], b_xb[i], b_xa[i], b_k[i], b_logp[i],
                            adv[b_env[i]], prefix=None if b_prefix is None else b_prefix.select(i))
                        (loss * len(i) / len(mb)).backward()
                        for k, v in mb_stats.items():
                            stats.setdefault(k, []).append(v)
                    average_gradients(params)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                    if not torch.isfinite(grad_norm):  # the same on every rank: gradients were averaged
                        raise FloatingPointError(f"non-finite loss or gradient at iteration {iteration + 1}; " + (
                            f"the last good checkpoint is in {ckpt_dir}" if ckpt_dir.is_dir() else
                            "no checkpoint was written yet"))
                    opt.step()
                    stats.setdefault("grad_norm", []).append(grad_norm.item())
                recent = stats.get("approx_kl", [])[-args.num_minibatches * math.ceil(max(M, 1) / micro_size):]
                kl = all_reduce(torch.tensor([float(np.sum(recent)), float(len(recent))], dtype=torch.float64))
                if args.target_kl is not None and kl[0] / max(kl[1], 1) > args.target_kl:  # same on every rank
                    break
        torch.set_num_threads(rollout_threads)
        update_time = time.time() - t1
        train_time += all_reduce(torch.tensor(rollout_time + update_time)).item() / world  # same on every rank

        row = mean_over_ranks({  # every env runs one episode per iteration: means over ranks are over all episodes
            "rollout_sps": N * C * int(valid.any(1).sum()) / rollout_time * world,  # averaged: the total
            "rollout_time": rollout_time, "update_time": update_time, "lr": opt.param_groups[0]["lr"],
            "epochs": epochs_run, "prefix_stored": float(b_prefix is not None),  # 1: the update reused the prefixes
            "decisions": int(rows.sum()) * world, "groups_kept": int(keep.sum()) // G * world,  # averaged: totals
            "train/success_once": success.float().mean().item(), "train/return": returns.mean().item(),
            "train/episode_len": episode_len.mean().item()})
        for k in ("pg_loss", "kl_ref", "ratio_mean", "approx_kl", "clipfrac", "grad_norm"):  # over all minibatches
            s = all_reduce(torch.tensor([float(np.sum(stats.get(k, []))), float(len(stats.get(k, [])))],
                                        dtype=torch.float64))
            if s[1] > 0:  # not when no rank updated
                row[k] = (s[0] / s[1]).item()
        log(iteration + 1, row)
        bar.set_postfix(success=f"{row['train/success_once']:.2f}")
        bar.update()
        done = iteration + 1 == args.total_iterations or train_time >= budget
        if args.eval_episodes > 0 and (done or (args.eval_every and (iteration + 1) % args.eval_every == 0)):
            eval_metrics = run_eval(iteration + 1)
        if (done or (iteration + 1) % args.save_every == 0) and is_main:
            sd = opt.state_dict()  # AdamW's state as flat tensors (safetensors), its param groups in the JSON
            optim = {f"optim.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
            vla.save_checkpoint(ckpt_dir, policy, normalizer, optim, {
                "iteration": iteration + 1, "global_step": global_step, "train_time": train_time, "env_id": env_id,
                "optimizer": sd["param_groups"], "args": asdict(args), "obs_mode": args.obs_mode, "control_mode":
                args.control_mode, "action_chunk": args.action_chunk, "denoise_steps": args.denoise_steps,
                "sft_checkpoint": meta.get("sft_checkpoint", str(source))})
        if done:
            break
    bar.close(), envs.close(), eval_envs.close(), metrics_file.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return eval_metrics, policy


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (UsageError, vla.CheckpointError) as e:  # the user's mistake: one line, argparse's exit status
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

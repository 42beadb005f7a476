"""Few-shot supervised flow matching (pi0's recipe) on ManiSkill or LIBERO demonstrations.

Produces the policies the RL scripts start from. ManiSkill demonstrations come from ManiSkill's motion planners,
converted to the chosen control / observation mode by its replay tool; LIBERO's are read from a local hdf5 file.

    python sft_baseline.py                                  # PickCube, state obs, tiny policy, CPU
    python sft_baseline.py --env-id PickCube --num-demos 100 --obs-mode rgb --preset pi0   # on a GPU
    torchrun --nproc-per-node 8 sft_baseline.py --preset pi0 --obs-mode rgb                # on 8 GPUs
    python sft_baseline.py --env-id libero_spatial --task-ids 0 --demo-path demos/libero_spatial.hdf5
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import torch
import torch.distributed as dist
import tyro
from tqdm import tqdm

import vla
from environments import FreshGraspFlag, MANISKILL_TASKS, UsageError, check_env_args, make_envs, resolve_env_id


@dataclass
class Args:
    env_id: str = "PickCube"  # ManiSkill task (alias or full id) or LIBERO suite: libero_{spatial,object,goal,10}
    task_ids: tuple[int, ...] = (0,)  # LIBERO: the suite's task indices to train and evaluate on
    obs_mode: str = "state"  # "state": the full state vector (CPU default); "rgb": camera images + robot proprio
    control_mode: str = "pd_ee_delta_pose"  # ManiSkill controller (RL rises faster per env step on it than on joints)
    max_episode_steps: int = 80  # ManiSkill episode length in env steps, as in the paper (LIBERO uses its suite's)
    num_demos: int = 200  # few-shot subset: the first N demos (200: a PickCube start of 20-60% success, room for RL)
    # demo planner's joint acceleration limit: ManiSkill's own (policies from faster demos end at the goal less often)
    planner_joint_acc: float = 0.9
    demo_path: str | None = None  # ManiSkill .h5 (+ its .json) or LIBERO hdf5; default: make ManiSkill demos in demos/
    preset: str = "tiny"  # a fresh policy's size: tiny or tiny_pi05 (CPU), pi0 or pi05 (3B, random init)
    pretrained: str | None = None  # fine-tune these weights instead: openpi or LeRobot pi0 / pi0.5 dir (size detected)
    tokenizer: str | None = None  # SentencePiece .model or transformers dir (real weights need it); None: bytes
    chunk_size: int = 16  # action horizon H predicted per call (the paper: 8 on ManiSkill, 50 / 10 on LIBERO)
    action_chunk: int = 8  # C: actions run per prediction (the paper: 5, which stalls after the grasp with few demos)
    denoise_steps: int = 4  # K Euler steps of the ODE at evaluation
    train_steps: int = 20000  # gradient steps (about 90 passes over 200 demos; fewer leave success lower)
    batch_size: int = 64  # (observation, action chunk) samples per step and rank (torchrun averages their gradients)
    lr: float = 3e-4  # peak learning rate (AdamW, linear warmup then cosine decay to 10%)
    warmup_steps: int = 100  # linear warmup steps
    weight_decay: float = 1e-4  # AdamW weight decay
    grad_clip: float = 1.0  # gradient-norm clip
    eval_episodes: int = 100  # evaluation episodes on fixed seeds after training (0 to skip)
    eval_every: int = 0  # also evaluate every N gradient steps (0: only at the end)
    num_eval_envs: int = 10  # parallel evaluation environments (per rank)
    sim_backend: str = "auto"  # auto: physx_cuda (one GPU simulation) with CUDA, else physx_cpu (envs in --env-workers)
    env_workers: int | None = None  # CPU env processes (default: one per core, shared by torchrun ranks; 1: in-process)
    eval_seed: int = 10_000  # first seed of the evaluation episodes (demonstrations use seeds 0..N-1)
    capture_video: bool = False  # save a video of the first evaluation environment
    seed: int = 1  # random seed of the training run
    output_dir: str | None = None  # run directory (default runs/sft/<env id>), its checkpoint <output_dir>/checkpoint
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


# ================================================================================================ demonstrations
def generate_maniskill_demos(env_id, num_demos, obs_mode, control_mode, root="demos", joint_acc=0.9) -> Path:
    """ManiSkill's motion-planner demos (seeds from 0, joint accelerations up to `joint_acc`), converted to the modes by
    its replay tool. Reuses a file of this planner setting holding >= num_demos: a converted one, else the planner's."""
    record_dir = Path(root) / f"planner_acc{joint_acc:g}"
    folder, suffix = record_dir / env_id / "motionplanning", f".{obs_mode}.{control_mode}.physx_cpu.h5"
    def files(ending):  # {N: mpN<ending>} of the files holding at least num_demos
        found = {f.name[2:].removesuffix(ending): f for f in folder.glob(f"mp*{ending}")}
        return {int(n): f for n, f in found.items() if n.isdigit() and int(n) >= num_demos}
    if converted := files(suffix):
        return converted[min(converted)]
    raw = {n: f for n, f in files(".h5").items() if f.with_suffix(".json").exists()}  # the planner's own
    name = f"mp{min(raw) if raw else num_demos}"
    def run(what, *cmd):
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    # ManiSkill's runner has no acceleration option: set its solver's default joint_acc_limits (scales mplib's 1/joint)
    planner = ("import runpy; from mani_skill.examples.motionplanning.panda.motionplanner import "
               "PandaArmMotionPlanningSolver as S; init = S.__init__; "
               "assert init.__code__.co_varnames[init.__code__.co_argcount - 1] == 'joint_acc_limits'; "
               f"init.__defaults__ = init.__defaults__[:-1] + ({joint_acc!r},); "
               "runpy.run_module('mani_skill.examples.motionplanning.panda.run', run_name='__main__')")
    if not raw:
        print(f"generating {num_demos} motion-planner demos for {env_id} into {folder}")
        run("ManiSkill's motion planner", "-c", planner, "-e", env_id, "-n", str(num_demos), "-b", "cpu",
            "--only-count-success", "--record-dir", str(record_dir), "--traj-name", name)
    print(f"converting {folder / name}.h5 to {obs_mode} observations and {control_mode}")
    run("ManiSkill's replay tool", "-m", "mani_skill.trajectory.replay_trajectory",
        "--traj-path", str(folder / f"{name}.h5"), "-b", "physx_cpu", "-o", obs_mode, "-c", control_mode, "--save-traj")
    return folder / f"{name}{suffix[:-3]}.h5"


def load_maniskill_demos(path: Path, num_demos: int, control_mode: str) -> list[dict]:
    """ManiSkill trajectory file (.h5 + .json) -> episodes dict(state [T, D], actions [T, A], images
    [T, cams, H, W, 3] or None). Observations hold T+1 entries; the last (after the final action) is dropped."""
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"demo file {path} or its {meta_path.name} is missing")
    meta = json.loads(meta_path.read_text())
    env_id, env_kwargs = meta.get("env_info", {}).get("env_id"), meta.get("env_info", {}).get("env_kwargs", {})
    if (recorded := env_kwargs.get("control_mode")) != control_mode:
        raise UsageError(f"{path} was recorded with control mode {recorded!r}, not {control_mode!r}: convert it with "
                         f"python -m mani_skill.trajectory.replay_trajectory -c {control_mode} -o state --save-traj")
    # The replay tool resets its scene between episodes without stepping it, so a first observation's is_grasped is
    # the previous episode's last: cleared, as the envs' FreshGraspFlag clears it (its column found in a CPU env).
    grasp_col = None
    if env_kwargs.get("obs_mode") == "state":
        import mani_skill.envs  # noqa: F401  (registers the tasks)
        env = FreshGraspFlag(gym.make(env_id, **{**env_kwargs, "num_envs": 1, "sim_backend": "physx_cpu",
                                                 "render_mode": None, "render_backend": "cpu"}))
        grasp_col = env.col
        env.close()
    episodes = []
    with h5py.File(path, "r") as f:
        for ep in meta["episodes"][:num_demos]:
            g = f.get(f"traj_{ep['episode_id']}")
            obs = None if g is None else g.get("obs")
            if obs is None or "actions" not in g or (isinstance(obs, h5py.Group) and "sensor_data" not in obs):
                raise UsageError(f"{path}: traj_{ep['episode_id']} lacks 'actions' or 'obs' (convert it with "
                                 "replay_trajectory -o state|rgb --save-traj to add observations)")
            actions = g["actions"][:].astype(np.float32)  # [T, A]
            T = len(actions)
            if isinstance(obs, h5py.Dataset):
                state, images = obs[:T], None  # [T, D]
                if grasp_col is not None:
                    state[0, grasp_col] = 0
            else:
                state = obs["agent/qpos"][:T]
                images = np.stack([c["rgb"][:T] for c in obs["sensor_data"].values()], 1)  # [T, cams, H, W, 3]
            episodes.append(dict(state=state.astype(np.float32), actions=actions, images=images))
    return episodes


def load_libero_demos(path: Path, num_demos: int) -> list[dict]:
    """LIBERO / robomimic hdf5 (data/demo_N/{actions, obs/{agentview_rgb, eye_in_hand_rgb, ee_states,
    gripper_states}}) -> episodes dict(state [T, 8], actions [T, 7], images [T, 2, H, W, 3] upright, prompt)."""
    if not path.is_file():
        raise FileNotFoundError(f"LIBERO demo file {path} does not exist")
    episodes = []
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise UsageError(f"{path} has no 'data' group: not a LIBERO/robomimic demo file")
        prompt = json.loads(f["data"].attrs.get("problem_info", "{}")).get("language_instruction", "")
        for name in sorted(f["data"], key=lambda n: int(n.split("_")[-1]))[:num_demos]:
            g = f["data"][name]
            for key in ("actions", "obs/agentview_rgb", "obs/eye_in_hand_rgb", "obs/ee_states", "obs/gripper_states"):
                if key not in g:
                    raise UsageError(f"{path}: data/{name} has no '{key}'")
            actions = g["actions"][:].astype(np.float32)
            if actions.ndim != 2 or actions.shape[1] != 7:
                raise UsageError(f"{path}: data/{name}/actions has shape {actions.shape}, LIBERO actions are [T, 7]")
            images = np.stack([g["obs/agentview_rgb"][:], g["obs/eye_in_hand_rgb"][:]], 1)[:, :, ::-1, ::-1]
            state = np.concatenate([g["obs/ee_states"][:], g["obs/gripper_states"][:]], -1).astype(np.float32)
            episodes.append(dict(state=state, actions=actions, images=np.ascontiguousarray(images), prompt=prompt))
    return episodes


def make_chunks(episodes: list[dict], horizon: int):
    """Every (observation t, actions t..t+H-1) pair -> chunks [N, H, A] and mask [N, H] of steps inside the episode
    (an episode's tail is padded with its last action and masked out of the loss)."""
    steps = [np.arange(len(ep["actions"]))[:, None] + np.arange(horizon) for ep in episodes]  # [T, H]: step t + h
    chunks = [ep["actions"][np.minimum(t, len(t) - 1)] for ep, t in zip(episodes, steps)]  # [T, H, A]
    return np.concatenate(chunks), np.concatenate([t < len(t) for t in steps])


# ================================================================================================ flow matching
# pi0's conditional flow matching. A demo's action chunk a [H, A] and Gaussian noise eps lie on the straight path
# x_t = t eps + (1 - t) a, t ~ 0.001 + 0.999 Beta(1.5, 1) (weighted to the noise end t = 1), of velocity u = eps - a:
#     L = E_{a, eps, t} || v_theta(x_t, t | o) - (eps - a) ||^2     (over the chunk's steps inside the episode)
# Acting integrates dx/dt = v_theta from noise at t = 1 to an action chunk at t = 0 in K Euler steps.
def flow_matching_loss(policy, state, prompts, images, actions, mask):
    """actions [B, H, A] normalised, mask [B, H] -> the loss above (a scalar)."""
    B, H, A = actions.shape
    a = torch.nn.functional.pad(actions, (0, policy.spec["max_action_dim"] - A))  # [B, H, max_action_dim]
    eps = torch.randn_like(a)
    t = torch.distributions.Beta(1.5, 1.0).sample((B,)).to(a.device) * 0.999 + 0.001  # [B]
    x_t = t[:, None, None] * eps + (1 - t[:, None, None]) * a
    v, _ = policy.velocity(policy.encode_prefix(state, prompts, images), x_t, t)
    err = (v - (eps - a))[..., :A].square().mean(-1)  # [B, H]; padded action dims are not trained
    return (err * mask).sum() / mask.sum()


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


# ================================================================================================ main
def check_args(args: Args) -> tuple[str, str, dict]:
    """User errors, found before any demo, env or model is made -> env kind, full env id, --resume's checkpoint meta."""
    check_env_args(args)  # --env-id, --sim-backend, --num-eval-envs, --max-episode-steps, --env-workers
    kind, env_id = resolve_env_id(args.env_id)
    def need(ok: bool, name: str, problem: str):
        if not ok:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: {problem}")
    for k in "num_demos chunk_size action_chunk denoise_steps train_steps batch_size".split():
        need(getattr(args, k) >= 1, k, f"must be at least 1 (the default is {getattr(Args, k)})")
    for k in "lr grad_clip planner_joint_acc".split():
        need(getattr(args, k) > 0, k, f"must be positive (the default is {getattr(Args, k)})")
    for k in "warmup_steps eval_episodes eval_every".split():
        need(getattr(args, k) >= 0, k, f"must not be negative (the default is {getattr(Args, k)})")
    need(args.action_chunk <= args.chunk_size, "action_chunk", f"exceeds --chunk-size {args.chunk_size}; execute at "
         f"most the {args.chunk_size} actions the policy predicts")
    for k, choices in (("obs_mode", ("state", "rgb")), ("preset", tuple(vla.PRESETS))):
        need(getattr(args, k) in choices, k, f"choose one of {', '.join(choices)}")
    need(kind != "libero" or args.demo_path is not None, "env_id", "LIBERO demonstrations cannot be downloaded "
         "here; pass --demo-path to a local LIBERO hdf5 file")
    for k, exists in (("demo_path", Path.is_file), ("pretrained", Path.is_dir), ("tokenizer", Path.exists)):
        need(getattr(args, k) is None or exists(Path(getattr(args, k))), k, "no such file or directory")
    if not args.resume:
        return kind, env_id, {}
    ckpt_dir = Path(args.output_dir or f"runs/sft/{env_id}") / "checkpoint"
    if not (ckpt_dir / "meta.json").is_file():
        raise UsageError(f"--resume: no checkpoint in {ckpt_dir} (drop --resume to start there)")
    meta, config = (vla.checkpoint.read_json(ckpt_dir / f) for f in ("meta.json", "config.json"))
    horizon = vla.VLAConfig(**config).spec()["chunk_size"]
    need(meta.get("env_id", env_id) == env_id, "env_id", f"{ckpt_dir} was trained on {meta.get('env_id')}; resume "
         f"it with --env-id {meta.get('env_id')}, or pass another --output-dir")
    need(horizon == args.chunk_size, "chunk_size", f"{ckpt_dir} predicts {horizon}-step chunks; resume it with "
         f"--chunk-size {horizon}")
    return kind, env_id, meta


def main(args: Args):
    """Train; -> the last evaluation's metrics and the policy."""
    kind, env_id, resumed = check_args(args)
    run_dir, start = Path(args.output_dir or f"runs/sft/{env_id}"), resumed.get("step", 0)
    ckpt_dir, metrics_path = run_dir / "checkpoint", run_dir / "metrics.jsonl"
    if start >= args.train_steps:
        if os.environ.get("RANK", "0") == "0":
            print(f"{run_dir} already finished at step {start} of {args.train_steps}: raise --train-steps to continue")
        return resumed.get("eval", {}), vla.load_checkpoint(ckpt_dir)[0]
    rank, world, device = init_distributed()
    is_main = rank == 0
    random.seed(args.seed + rank), np.random.seed(args.seed + rank), torch.manual_seed(args.seed + rank)

    # ---- demonstrations -> N samples: state, action chunk, its mask, images; one prompt (LIBERO's: the file's)
    if args.demo_path is None and distributed() and not is_main:
        dist.barrier()  # rank 0 generates the ManiSkill demos while the others wait, then they find them
    demo_path = Path(args.demo_path) if args.demo_path else generate_maniskill_demos(
        env_id, args.num_demos, args.obs_mode, args.control_mode, joint_acc=args.planner_joint_acc)
    if args.demo_path is None and distributed() and is_main:
        dist.barrier()
    episodes = (load_libero_demos(demo_path, args.num_demos) if kind == "libero"
                else load_maniskill_demos(demo_path, args.num_demos, args.control_mode))
    if not episodes:
        raise UsageError(f"{demo_path} holds no demonstrations")
    if len(episodes) < args.num_demos:
        print(f"warning: {demo_path} holds only {len(episodes)} demonstrations (asked for {args.num_demos})")
    prompt = episodes[0].get("prompt", MANISKILL_TASKS.get(env_id.removesuffix("-v1")))
    action_dim, state_dim = episodes[0]["actions"].shape[1], episodes[0]["state"].shape[1]
    states = torch.as_tensor(np.concatenate([ep["state"] for ep in episodes]))  # [N, state_dim]
    chunks, masks = (torch.as_tensor(x) for x in make_chunks(episodes, args.chunk_size))  # [N, H, A], [N, H]
    images = (torch.as_tensor(np.concatenate([ep["images"] for ep in episodes]))
              if episodes[0].get("images") is not None else None)  # [N, cams, H, W, 3] uint8
    if is_main:
        print(f"{len(episodes)} demos, {len(states)} samples from {demo_path}")

    # ---- policy (fresh, or resumed with its optimiser), evaluation envs, logging
    if args.resume:
        policy, normalizer, extra, _ = vla.load_checkpoint(ckpt_dir, tokenizer=args.tokenizer)
    else:  # fresh, or openpi / LeRobot weights; the norm stats come from the demos either way, as openpi fine-tunes
        kw = dict(chunk_size=args.chunk_size, **({"tokenizer": args.tokenizer} if args.tokenizer else {}))
        policy = (vla.load_pretrained(args.pretrained, None, action_dim, state_dim, with_norm=False, **kw)[0]
                  if args.pretrained else vla.build(args.preset, action_dim, state_dim, **kw))
        normalizer = vla.Normalizer.from_data(states.numpy(), chunks[:, 0].numpy(), policy.config.norm_mode)
    policy.to(device)
    broadcast_parameters(list(policy.parameters()))  # one initialisation for all ranks
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    if args.resume:
        state = {}  # AdamW's state, saved as flat tensors "optim.<param>.<key>"
        for key in (k for k in extra if k.startswith("optim.")):
            state.setdefault(int(key.split(".")[1]), {})[key.split(".", 2)[2]] = extra[key]
        opt.load_state_dict({"state": state, "param_groups": resumed["optimizer"]})
    envs = make_envs(args, args.num_eval_envs, ignore_terminations=True, device=device) if args.eval_episodes else None
    if envs is not None and envs.action_dim != action_dim:
        raise UsageError(f"{demo_path} has {action_dim}-D actions but {env_id} with {args.control_mode} takes "
                         f"{envs.action_dim}-D: regenerate or convert the demos for this control mode")
    if args.track and is_main:
        import wandb
        wandb.init(project=args.wandb_project, config=asdict(args), name=f"sft_{env_id}_{args.seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main and args.resume:  # rows logged after the checkpoint are logged again: dropped, as is a row cut short
        print(f"resuming {run_dir} from step {start}")
        rows = metrics_path.read_text().splitlines(keepends=True) if metrics_path.is_file() else []
        kept = "".join(r for r in rows if r.endswith("\n") and json.loads(r)["step"] <= start)
        metrics_path.with_suffix(".tmp").write_text(kept)
        os.replace(metrics_path.with_suffix(".tmp"), metrics_path)  # at once: a kill leaves one whole file
    metrics_file = open(metrics_path if is_main else os.devnull, "a")  # one file, written by rank 0

    def log(row: dict):
        print(json.dumps(row), file=metrics_file, flush=True)
        if args.track and is_main:
            wandb.log(row, step=row["step"])

    # ---- training
    x_state, x_actions = (normalizer.normalize(k, x).to(device) for k, x in (("state", states), ("actions", chunks)))
    masks = masks.float().to(device)
    eval_metrics, t0 = {}, time.time()
    bar = tqdm(range(start, args.train_steps), initial=start, total=args.train_steps, desc="sft", disable=not is_main)
    for step in bar:
        policy.train()
        progress = min(1.0, (step - args.warmup_steps) / max(1, args.train_steps - args.warmup_steps))
        lr = (args.lr * (step + 1) / args.warmup_steps if step < args.warmup_steps  # linear warmup, then cosine
              else args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))))  # decay to 10% of the peak
        opt.param_groups[0]["lr"] = lr
        idx = torch.randint(len(x_state), (args.batch_size,))
        imgs = images[idx].to(device) if images is not None else None
        loss = flow_matching_loss(policy, x_state[idx.to(device)], [prompt] * len(idx), imgs,
                                  x_actions[idx.to(device)], masks[idx.to(device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(list(policy.parameters()))
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        if not torch.isfinite(grad_norm):  # the same on every rank: gradients were averaged
            raise FloatingPointError(f"non-finite loss or gradient at step {step}; " + (
                f"the last good checkpoint is in {ckpt_dir}" if ckpt_dir.is_dir() else "no checkpoint was written yet"))
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1 == args.train_steps
        if step % 50 == 0 or done:
            log({"step": step + 1, "loss": all_reduce(loss.detach()).item() / world, "grad_norm": grad_norm.item(),
                 "lr": lr, "time": time.time() - t0})
        if envs is not None and (done or (args.eval_every and (step + 1) % args.eval_every == 0)):
            video = run_dir / "videos" / f"eval_{step + 1}.mp4" if args.capture_video and is_main else None
            eval_metrics = evaluate(policy, normalizer, envs, args, args.eval_episodes, video, rank, world)
            log({"step": step + 1, **{f"eval/{k}": v for k, v in eval_metrics.items()}})
            if is_main:
                print(f"step {step + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in eval_metrics.items()))
        if (done or (step + 1) % 1000 == 0) and is_main:  # the RL scripts read the env and its modes from meta
            sd = opt.state_dict()  # AdamW's state as flat tensors (safetensors), its param groups in the JSON
            optim = {f"optim.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
            vla.save_checkpoint(ckpt_dir, policy, normalizer, optim, {"step": step + 1,
                "optimizer": sd["param_groups"], "args": asdict(args), "eval": eval_metrics, "env_id": env_id,
                "prompt": prompt, "action_chunk": args.action_chunk, "denoise_steps": args.denoise_steps,
                "obs_mode": args.obs_mode, "control_mode": args.control_mode, "demo_path": str(demo_path)})
    if is_main:
        print(f"checkpoint: {ckpt_dir} ({time.time() - t0:.0f} s)")
    metrics_file.close()
    if envs is not None:
        envs.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return eval_metrics, policy


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (UsageError, vla.CheckpointError) as e:  # the user's mistake: one line, argparse's exit status
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

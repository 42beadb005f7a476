"""PPO with Flow-SDE: online RL fine-tuning of a flow-matching VLA policy (pi_RL, Flow-SDE variant).

A flow policy samples an action chunk by integrating a velocity field from noise (t=1) to action (t=0); the
action's likelihood is intractable. Flow-SDE turns one randomly chosen denoising step k* of each sample into an
SDE step with the same marginals as the ODE,
    mean = x - D [v + s_t^2 / (2t) (x + (1 - t) v)],  std = s_t sqrt(D),  s_t = a sqrt(t / (1 - t)),  D = 1/K,
so that step is Gaussian and its density is the log-prob PPO needs; every other step stays the deterministic
ODE step x - D v. The PPO update recomputes only that one step under the current parameters.

    python flow_sde_ppo.py                                   # PickCube, state obs, tiny policy, CPU
    python flow_sde_ppo.py --env-id PickCube --num-envs 320  # on a GPU (physx_cuda)
    torchrun --nproc-per-node 8 flow_sde_ppo.py --num-envs 320   # 8 GPUs, 40 envs each
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

import vla


@dataclass
class Args:
    env_id: str = "PickCube"
    """ManiSkill task (short alias or full id) or a LIBERO suite (libero_spatial, libero_object, libero_goal, libero_10)"""
    task_ids: tuple[int, ...] = (0,)
    """LIBERO: the suite's task indices"""
    checkpoint: str | None = None
    """SFT checkpoint to start from (default: runs/sft/<env id>/checkpoint, written by sft_baseline.py)"""
    obs_mode: str | None = None
    """"state" or "rgb" (default: the SFT checkpoint's)"""
    control_mode: str | None = None
    """ManiSkill controller (default: the SFT checkpoint's)"""
    reward_mode: str = "normalized_dense"
    """ManiSkill reward: normalized_dense, dense or sparse (LIBERO is always sparse: 1 on success). With a dense
    reward, training episodes run to the time limit even after success: the dense reward peaks at success, and
    ending the episode there would make early success cost the rest of the episode's reward. On CPU PickCube sparse
    learned more slowly per env step than dense, with the paper's discount too (docs/rl_runs.md, fourteenth and
    fifteenth sessions)"""
    max_episode_steps: int = 80
    """ManiSkill episode length in env steps, as in the paper (LIBERO uses its suite's)"""
    num_envs: int = 64
    """parallel training environments in all (the paper uses 320 on a GPU); under torchrun each rank runs
    num_envs / world size of them. On CPU PickCube 64 envs with 8 minibatches beat 16 with 4 after 30 minutes
    (docs/rl_runs.md)"""
    num_steps: int = 20
    """decision points (action chunks) per environment per iteration (20 x 4 actions = one 80-step episode)"""
    total_iterations: int = 200
    """iterations (rollout + update)"""
    time_budget_min: float | None = None
    """stop after this many minutes of training time (evaluation excluded), whatever total_iterations says"""
    action_chunk: int = 4
    """C: actions executed per decision point, the first C of the predicted chunk (the SFT checkpoint executes 8,
    the paper 5). On CPU PickCube two seeds with 4 stood at 82% / 68% after 410k env steps, the runs with 8 at
    71-74% (docs/rl_runs.md). The runs with 8, at the same discount per env step (the default before the nineteenth
    session): --action-chunk 8 --num-steps 10 --gamma 0.9 --gae-lambda 0.95"""
    denoise_steps: int = 4
    """K: denoising steps, in rollouts and evaluation. At K = 2 the same exploration takes a smaller noise level
    (--noise-level 0.45 spreads the executed actions as 1.2 does at K = 4; benchmarks/bench_exploration.py). On CPU
    PickCube (30 minutes) K = 2 with a = 0.45 ended at 96 / 94% (two seeds), the default at 95 / 98 / 98 / 91 / 96 /
    95% (six; the README's RL section), so it stays the paper's 4"""
    noise_level: float = 1.2
    """a in s_t = a sqrt(t / (1 - t)): the SDE step's noise (the paper's default is 0.5, its ablation's best 0.8).
    With K = 4 a larger a also spreads the executed actions more: 2.5 / 4 times the ODE's own spread at a = 0.8 /
    1.2 on PickCube (benchmarks/bench_exploration.py). On CPU PickCube (64 envs, 30 minutes) Flow-SDE PPO ended at
    57% / 69% with a = 0.5 / 0.8 (envs in one process, one run each), and with the env workers at 90% with a = 0.8
    (one run), 93 / 94 / 96 / 97 / 89% with a = 1.2 (five seeds), 92% with a = 1.6 (one run); GRPO at 89% with
    a = 0.8, 92 / 97% with a = 1.2 (runs before the fortieth session, with stale reset observations; see the
    README's Choices). At the default since: the README's RL section"""
    ratio_level: str = "chunk"
    """"chunk": one ratio per decision (log-probs summed over C x action dims); "token": one per (action, dim)"""
    critic_input: str = "expert_state"
    """"expert": mean of the action expert's output tokens (the paper's pi0 critic); "vlm": mean of the VLM prefix
    output (pi0.5's); "expert_state": the expert's plus the normalised state itself (pi0 only: pi0.5 has the state in
    its prompt). On PickCube state obs the critic's explained variance went from 0.3-0.45 ("expert") to 0.65-0.89"""
    critic_detach: bool = True
    """stop the value loss's gradient at the critic's input features"""
    gamma: float = 0.9487
    """discount per decision point: 0.9 per 8 env steps (0.9487 = sqrt 0.9 per 4-step decision).
    The paper's 0.99 goes with its success reward; with the dense reward, bootstrapped at the time limit, 0.99 per
    8-step chunk makes values of ~250 that the critic chases for hundreds of iterations (Flow-SDE's success fell from
    28% to 14% in 10 minutes); 0.9 per 8 steps (a horizon of about one episode) fixed that. With the sparse reward
    0.99 collapsed as well (32% to 15% in 82k env steps) unless the paper's --value-clip 0.2 --critic-input expert
    came with it"""
    gae_lambda: float = 0.9747
    """GAE lambda per decision point: 0.95 per 8 env steps (0.9747 = sqrt 0.95 per 4-step decision)"""
    update_epochs: int = 4
    """PPO epochs per iteration"""
    num_minibatches: int = 8
    """minibatches per epoch (each rank splits its own batch; the ranks' gradients are averaged): 8 x 160
    decisions at 64 envs"""
    micro_batch_size: int | None = None
    """split each minibatch into micro-batches of this many decisions and accumulate their gradients: memory
    for time, e.g. 32 for pi0 at 320 envs on one 80 GB GPU (default: the whole minibatch at once)"""
    prefix_store_gb: float = 1.0
    """keep each rollout decision's frozen-VLM prefix (keys/values) for the update when one iteration's fit in this
    many GB, so the update runs no VLM pass; otherwise (e.g. pi0 with images at 320 envs) the update recomputes each
    minibatch's. The same numbers either way: the VLM is frozen. 0 always recomputes"""
    grad_checkpointing: bool = False
    """recompute the expert's layer activations in the backward pass instead of storing them (memory for time)"""
    vlm_dtype: str = "auto"
    """dtype of the frozen VLM: "bfloat16" halves its weights and prefix cache, the expert and the log-probs stay
    float32; "auto": bfloat16 on a GPU, float32 on CPU (where bfloat16 matmuls are slow)"""
    clip_coef: float = 0.2
    """PPO ratio clip"""
    value_clip: float | None = None
    """value clip around the rollout's value, off by default: the paper's 0.2 suits success rewards (values in [0, 1]);
    with the dense reward's returns of ~25 it lets the critic move 0.2 per iteration"""
    huber_delta: float = 10.0
    """Huber loss threshold of the value loss"""
    vf_coef: float = 1.0
    """value loss weight"""
    lr: float = 3e-5
    """actor learning rate at the start (the expert, projections; the VLM is frozen), annealed to 0 (--anneal-lr)
    and held back by --target-kl. Constant, 1e-4 drove the approximate KL above 1 per update on the tiny policy and
    2e-5 to 0.14; annealed and held back, a larger start pays (see target_kl). The paper uses 5e-6 to 8e-6 on pi0's
    300M expert"""
    value_lr: float = 1e-3
    """critic learning rate"""
    critic_warmup_iters: int = 5
    """first iterations train only the critic (actor lr 0), so early advantages are not mostly value error"""
    anneal_lr: bool = True
    """decay the actor's learning rate linearly to 0 by the end of the run: over total_iterations, or over
    time_budget_min of training time when that ends the run first. On CPU PickCube (64 envs, 30 minutes) 2e-5
    annealed ended at 85% / 86% over two seeds, a constant 1e-5 at 82% / 78%"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    target_kl: float | None = 0.05
    """stop an iteration's epochs early when the approximate KL exceeds this (logged: "epochs"; None: never); at
    the defaults it ends a quarter to a third of the updates early. On CPU PickCube from the 29% SFT start, lr 3e-5
    with 0.05 ended 30 minutes at 90 / 83 / 83 / 93% in four runs, lr 2e-5 without it at 85 / 86 / 79% in three.
    It caps the policy's change per iteration, so with 5 times the envs it may allow 5 times less per env step: at
    320 envs (40 minibatches) 0.25 reached 68% after 230k env steps where 0.05 reached 49% (one short GPU run each)"""
    eval_every: int = 10
    """evaluate every N iterations (also before the first and after the last); 0: only before and after"""
    eval_episodes: int = 100
    """evaluation episodes (fixed seeds, deterministic ODE); 0 disables evaluation"""
    num_eval_envs: int = 10
    """parallel evaluation environments (per rank)"""
    sim_backend: str = "auto"
    """ManiSkill simulator: "physx_cuda" (all envs in one GPU simulation), "physx_cpu" (CPU envs in env_workers
    processes; the policy still runs on the GPU if there is one), "auto": physx_cuda when CUDA is available"""
    env_workers: int | None = None
    """CPU simulator only: processes that step the envs (default: one per core, divided among torchrun ranks; 1 keeps
    them in this process)"""
    update_threads: int | None = None
    """torch's CPU threads during the update (default: the cores per torchrun rank). The env workers wait while it
    runs, so their cores are free; the rollout keeps this process's setting (OMP_NUM_THREADS or torch's default)"""
    eval_seed: int = 10_000
    """first seed of the evaluation episodes"""
    save_every: int = 10
    """write the checkpoint every N iterations"""
    capture_video: bool = False
    """save a video of the first evaluation environment at each evaluation"""
    seed: int = 1
    """random seed"""
    output_dir: str | None = None
    """run directory (default runs/flow_sde_ppo/<env id>_<seed>)"""
    resume: bool = False
    """continue from <output_dir>/checkpoint"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "pi_rl"
    """W&B project"""


# ================================================================================================ environments
# ManiSkill tasks whose assets ship with ManiSkill (they run offline) and their instructions for the prompt.
MANISKILL_TASKS = {
    "PickCube": "pick up the cube and move it to the goal position",
    "PushCube": "push the cube to the goal region",
    "PullCube": "pull the cube to the goal region",
    "StackCube": "stack the red cube on the green cube",
    "PlaceSphere": "place the sphere into the bin",
    "LiftPegUpright": "lift the peg upright",
    "PegInsertionSide": "insert the peg into the hole",
    "PokeCube": "use the peg to push the cube to the goal",
    "RollBall": "roll the ball to the goal region",
    "PlugCharger": "plug the charger into the receptacle",
    "StackPyramid": "stack the cubes into a pyramid",
}
LIBERO_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520}


def resolve_env_id(env_id: str) -> tuple[str, str]:
    """-> ("maniskill" | "libero", full id). Unknown ids fail at once, listing the valid ones."""
    if env_id in LIBERO_MAX_STEPS:
        return "libero", env_id
    short = env_id.removesuffix("-v1")
    if short in MANISKILL_TASKS:
        return "maniskill", f"{short}-v1"
    raise ValueError(f"unknown --env-id {env_id!r}; valid: ManiSkill {sorted(MANISKILL_TASKS)} "
                     f"(or with -v1) and LIBERO {sorted(LIBERO_MAX_STEPS)}")


def to_torch_obs(obs, device) -> dict:
    """ManiSkill observation (state vector, or rgb dict) -> {"state": [N, D] float, "images": [N, cams, H, W, 3] uint8}."""
    if not isinstance(obs, dict):
        return {"state": torch.as_tensor(obs, dtype=torch.float32, device=device), "images": None}
    cams = [torch.as_tensor(c["rgb"], device=device) for c in obs["sensor_data"].values()]
    state = torch.as_tensor(obs["agent"]["qpos"], dtype=torch.float32, device=device)
    return {"state": state, "images": torch.stack(cams, 1)}


def add_batch_dim(x):
    return {k: add_batch_dim(v) for k, v in x.items()} if isinstance(x, dict) else np.asarray(x)[None]


class FreshGraspFlag(gym.Wrapper):
    """A CPU scene reports its last physics step's contacts until its next step, so after a plain reset the
    observation's is_grasped still reads 1 where the previous episode ended holding the object (on PickCube: at 90 of
    the 90 plain resets of one evaluation of an RL policy, and in 199 of the 200 demonstrations' first observations).
    Every episode starts with the gripper open and away from the object, so reset observations get the 0 that a
    rebuilt scene reports; the physics is untouched. Tasks without is_grasped pass through."""

    def __init__(self, env):
        super().__init__(env)
        from mani_skill.utils.common import flatten_state_dict
        self.col = None  # is_grasped's column in a flat "state" observation [1, D] (image modes pass qpos alone)
        state = env.unwrapped.get_obs(unflattened=True) if env.unwrapped.obs_mode == "state" else {}  # what it joins
        if "is_grasped" in state.get("extra", {}):
            def mark(d):  # 1 at is_grasped, 0 elsewhere, in the observation's layout
                return {k: mark(v) if isinstance(v, dict) else torch.full_like(v, k == "is_grasped", dtype=torch.float)
                        for k, v in d.items()}
            self.col = int(flatten_state_dict(mark(state), use_torch=True)[0].argmax())

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        if self.col is not None:
            obs = obs.clone()
            obs[:, self.col] = 0
        return obs, info


def cpu_vector_env(env_id: str, num_envs: int, kw: dict, ignore_terminations: bool):
    """A SyncVectorEnv of num_envs single CPU envs (physx_cpu), auto-resetting in the same step."""
    import mani_skill.envs  # noqa: F401  (registers the tasks)
    from gymnasium.vector import AutoresetMode, SyncVectorEnv
    from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

    def thunk():  # enhanced_determinism: an auto-reset draws the new episode from the env's own seeded RNG, not the
        # process's global torch RNG, so the episodes are the same in this process and in worker processes
        env = gym.make(env_id, num_envs=1, sim_backend="physx_cpu", enhanced_determinism=True, **kw)
        return CPUGymWrapper(FreshGraspFlag(env), ignore_terminations=ignore_terminations, record_metrics=True)
    return SyncVectorEnv([thunk] * num_envs, autoreset_mode=AutoresetMode.SAME_STEP)


def cpu_env_worker(pipe, env_id, num_envs, kw, ignore_terminations):
    """Subprocess loop: owns a SyncVectorEnv and answers ("reset", (seeds, options)), ("step", actions), ("call", name).
    All of it in inference mode, see ManiSkillEnvs.cpu_sim."""
    torch.set_num_threads(1)
    with torch.inference_mode():
        env = cpu_vector_env(env_id, num_envs, kw, ignore_terminations)
        try:
            for cmd, arg in iter(pipe.recv, None):
                pipe.send(env.reset(seed=arg[0], options=arg[1]) if cmd == "reset" else env.step(arg) if cmd == "step"
                          else env.call(arg))
        except EOFError:  # the parent dropped its envs without close() (an error, or exit): nobody is left to answer
            pass
        env.close()


def concat_envs(parts: list, sizes: list[int]):
    """Join the workers' outputs (arrays, or nested dicts of them) along the env axis. A worker's info lacks the keys
    none of its envs set (final_obs when none finished); fill them as SyncVectorEnv does: zeros, False, None."""
    if isinstance(parts[0], tuple):
        return tuple(concat_envs(list(p), sizes) for p in zip(*parts))
    ref = next(p for p in parts if p is not None)
    if isinstance(ref, dict):
        keys = list(dict.fromkeys(k for p in parts if p is not None for k in p))
        return {k: concat_envs([(p or {}).get(k) for p in parts], sizes) for k in keys}
    ref = np.asarray(ref)
    fill = lambda n: np.full(n, None, object) if ref.dtype == object else np.zeros((n, *ref.shape[1:]), ref.dtype)
    return np.concatenate([fill(n) if p is None else np.asarray(p) for p, n in zip(parts, sizes)])


class ProcessVectorEnv:
    """num_envs CPU envs split over `workers` subprocesses, each a SyncVectorEnv. ManiSkill's CPU step is mostly
    Python (controller, reward, observation), so one process keeps one core busy and a second process on a second core
    nearly doubles the env steps per second. Same interface and the same numbers as one SyncVectorEnv."""

    def __init__(self, env_id, num_envs, kw, ignore_terminations, workers):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")  # forked env processes hung here (gymnasium's AsyncVectorEnv, fork)
        self.sizes = [len(a) for a in np.array_split(np.arange(num_envs), workers)]
        self.bounds = np.cumsum([0] + self.sizes).tolist()
        self.num_envs, self.pipes, self.procs = num_envs, [], []
        for n in self.sizes:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=cpu_env_worker, args=(child, env_id, n, kw, ignore_terminations), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent), self.procs.append(proc)
        self.single_action_space = self.call("action_space")[0]

    def _ask(self, cmd, args) -> list:
        """Send each worker its message -> their answers, in env order."""
        for pipe, arg in zip(self.pipes, args):
            pipe.send((cmd, arg))
        try:
            return [pipe.recv() for pipe in self.pipes]
        except EOFError:
            raise RuntimeError("a CPU env worker process died (its traceback is above); --env-workers 1 runs the envs "
                               "in this process") from None

    def _split(self, x):
        return [x[b:e] for b, e in zip(self.bounds[:-1], self.bounds[1:])]

    def reset(self, seed, options=None):  # an int seeds env i with seed + i, as SyncVectorEnv does
        seeds = seed if isinstance(seed, list) else [seed + i for i in range(self.num_envs)]
        return concat_envs(self._ask("reset", [(s, options) for s in self._split(seeds)]), self.sizes)

    def step(self, actions):
        return concat_envs(self._ask("step", self._split(actions)), self.sizes)

    def call(self, name):  # -> one result per env: a method's return value or an attribute
        return tuple(r for part in self._ask("call", [name] * len(self.pipes)) for r in part)

    def close(self):
        for pipe, proc in zip(self.pipes, self.procs):
            pipe.send(None)
            proc.join(timeout=30)


class ManiSkillEnvs:
    """N ManiSkill envs as one batch of torch tensors: the GPU simulator (physx_cuda) when `gpu_sim`,
    otherwise SyncVectorEnvs of CPU envs in `workers` processes. Both auto-reset in the same step and return the
    finished episode's last observation and metrics in `info`, so the rest of the script sees one interface."""

    def __init__(self, env_id, num_envs, obs_mode, control_mode, max_steps, ignore_terminations, device,
                 reward_mode="normalized_dense", workers=1, gpu_sim=False):
        import mani_skill.envs  # noqa: F401  (registers the tasks)
        kw = dict(obs_mode=obs_mode, control_mode=control_mode, max_episode_steps=max_steps,
                  reward_mode=reward_mode, render_mode="rgb_array")
        self.device, self.num_envs, self.gpu = device, num_envs, gpu_sim
        if self.gpu:
            import sapien
            from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv
            try:  # SAPIEN downloads its PhysX GPU library from GitHub on first use: fails offline
                sapien.physx.enable_gpu()
            except Exception as e:
                raise RuntimeError(
                    f"ManiSkill's GPU simulator could not start ({type(e).__name__}: {e}). SAPIEN fetches "
                    f"libPhysXGpu_64.so into ~/.sapien/physx/{sapien.physx.version()}/ on first use; offline, copy it "
                    "there from a machine that has it, or pass --sim-backend physx_cpu (CPU envs in worker "
                    "processes, the policy stays on the GPU)") from e
            if device.index is not None:  # this rank's GPU under torchrun
                kw.update(sim_backend=f"physx_cuda:{device.index}", render_backend=f"sapien_cuda:{device.index}")
            env = gym.make(env_id, num_envs=num_envs, **{"sim_backend": "physx_cuda", **kw})
            self.env = ManiSkillVectorEnv(env, num_envs, auto_reset=True, ignore_terminations=ignore_terminations,
                                          record_metrics=True)
        elif min(workers, num_envs) > 1:
            self.env = ProcessVectorEnv(env_id, num_envs, kw, ignore_terminations, min(workers, num_envs))
        else:
            with self.cpu_sim():
                self.env = cpu_vector_env(env_id, num_envs, kw, ignore_terminations)
        self.action_dim = self.env.single_action_space.shape[0]
        self.prompt = MANISKILL_TASKS[env_id.removesuffix("-v1")]

    def cpu_sim(self):
        """ManiSkill's CPU step is mostly small torch ops: in inference mode, without autograd's bookkeeping, it steps
        about 1.2x as fast with the same numbers. Only numpy leaves the CPU envs; the GPU simulator's tensors reach
        the policy, so it runs outside."""
        return torch.inference_mode(not self.gpu)

    def reset(self, seed: int | list[int], rebuild: bool = False):
        """rebuild: rebuild the CPU scenes first, as in new envs (each evaluation does, for about 0.3 s an env). Plain
        resets replay the same seeds exactly as well (tested): what made them differ until the thirty-ninth session
        was the stale is_grasped that FreshGraspFlag clears. (The GPU scene is not rebuilt: slow for hundreds of
        sub-scenes, and its partial resets' is_grasped is not measured here.)"""
        options = {"reconfigure": True} if rebuild and not self.gpu else {}
        with self.cpu_sim():
            obs, _ = self.env.reset(seed=seed, options=options)  # an int seeds env i with seed + i; a list: its own
        return to_torch_obs(obs, self.device)

    def step(self, action: torch.Tensor):
        """action [N, A] -> obs, reward [N], terminated [N], truncated [N], info with "success" [N],
        "final_obs" (obs, with finished envs' rows replaced by their last observation) and "episode"
        (metrics [N] of the episodes that just finished: success_once, success_at_end, return, episode_len)."""
        with self.cpu_sim():
            obs, rew, term, trunc, info = self.env.step(action if self.gpu else action.cpu().numpy())
        t = lambda x, dt=torch.float32: torch.as_tensor(x, dtype=dt, device=self.device)
        obs, rew, term, trunc = to_torch_obs(obs, self.device), t(rew), t(term, torch.bool), t(trunc, torch.bool)
        done = term | trunc
        out = {"success": t(info["success"], torch.bool), "final_obs": obs, "episode": {}}
        if done.any():
            fin = {k: None if v is None else v.clone() for k, v in obs.items()}
            if self.gpu:
                last = to_torch_obs(info["final_observation"], self.device)
                for k, v in fin.items():
                    if v is not None:
                        v[done] = last[k][done]
            else:  # the CPU vector env keeps each finished episode's last observation unbatched
                for i in done.nonzero()[:, 0].tolist():
                    last = to_torch_obs(add_batch_dim(info["final_obs"][i]), self.device)
                    for k, v in fin.items():
                        if v is not None:
                            v[i] = last[k][0]
            out["final_obs"] = fin
            ep = info["final_info"]["episode"]
            out["episode"] = {k: t(v) for k, v in ep.items() if not k.startswith("_")}
        return obs, rew, term, trunc, out

    def render(self):
        """First env's frame [H, W, 3] uint8 (for videos)."""
        with self.cpu_sim():
            frame = self.env.render()[0] if self.gpu else self.env.call("render")[0]
        return np.asarray(frame.cpu() if torch.is_tensor(frame) else frame)

    def close(self):
        with self.cpu_sim():
            self.env.close()


def quat_xyzw_to_axis_angle(q: np.ndarray) -> np.ndarray:
    """Unit quaternion (x, y, z, w) -> axis * angle, robosuite's convention (no sign flip of w), which the
    LIBERO datasets' ee_states use. atan2 stays accurate near zero rotation, where angle/|v| -> 2/w."""
    v, w = q[:3], float(np.clip(q[3], -1.0, 1.0))
    n = float(np.linalg.norm(v))
    if n < 1e-8:
        return v * (2.0 / w) if abs(w) > 1e-8 else np.zeros(3)
    return v * (2.0 * np.arctan2(n, w) / n)


class LiberoEnvs:
    """N LIBERO envs of one suite, stepped in this process, with the ManiSkillEnvs interface. Each env cycles
    through its tasks' fixed init states; after reset it settles for 10 no-op steps (openpi's protocol).
    Reward 1 on success; with ignore_terminations an episode runs to the suite's step limit (as ManiSkill eval)."""

    def __init__(self, suite, task_ids, num_envs, max_steps, ignore_terminations, device, image_size=128):
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
        bench = benchmark.get_benchmark_dict()[suite]()
        bad = [i for i in task_ids if not 0 <= i < bench.n_tasks]
        if bad:
            raise ValueError(f"--task-ids {bad} out of range: {suite} has tasks 0..{bench.n_tasks - 1}")
        self.device, self.num_envs, self.max_steps, self.ignore_terminations = device, num_envs, max_steps, ignore_terminations
        ids = [task_ids[i * len(task_ids) // num_envs] for i in range(num_envs)]  # contiguous blocks per task
        self.tasks = [bench.get_task(i) for i in ids]
        self.init_states = [bench.get_task_init_states(i) for i in ids]
        self.envs = []
        for task in self.tasks:
            # hard_reset=False: set_init_state overwrites the whole simulator state anyway, and a soft reset
            # takes 0.3 s instead of 6 s here.
            env = OffScreenRenderEnv(bddl_file_name=os.path.join(get_libero_path("bddl_files"), task.problem_folder,
                                                                 task.bddl_file),
                                     camera_heights=image_size, camera_widths=image_size, hard_reset=False)
            env.seed(7)
            self.envs.append(env)
        self.prompts = [t.language for t in self.tasks]
        self.prompt = self.prompts[0]
        self.action_dim = 7
        self.episode_idx = np.zeros(num_envs, dtype=int)
        self.steps = np.zeros(num_envs, dtype=int)
        self.ret = np.zeros(num_envs)
        self.succ_once = np.zeros(num_envs, dtype=bool)

    @staticmethod
    def obs_of(raw: dict) -> tuple[np.ndarray, np.ndarray]:
        """-> images [2, H, W, 3] uint8 (agentview, wrist; rotated upright) and state [8] (eef pos, axis-angle, gripper)."""
        images = np.stack([raw["agentview_image"][::-1, ::-1], raw["robot0_eye_in_hand_image"][::-1, ::-1]])
        state = np.concatenate([raw["robot0_eef_pos"], quat_xyzw_to_axis_angle(raw["robot0_eef_quat"]),
                                raw["robot0_gripper_qpos"]])
        return images, state.astype(np.float32)

    def _reset_one(self, i: int, seed: int | None):
        if seed is not None:
            self.episode_idx[i] = seed
        env, states = self.envs[i], self.init_states[i]
        env.reset()
        raw = env.set_init_state(states[self.episode_idx[i] % len(states)])
        for _ in range(10):  # let objects settle
            raw, *_ = env.step([0.0] * 6 + [-1.0])
        self.episode_idx[i] += self.num_envs
        self.steps[i], self.ret[i], self.succ_once[i] = 0, 0.0, False
        return self.obs_of(raw)

    def _batch(self, items):
        images, state = zip(*items)
        return {"state": torch.as_tensor(np.stack(state), device=self.device),
                "images": torch.as_tensor(np.stack(images), device=self.device)}

    def reset(self, seed: int | list[int], rebuild: bool = False):  # rebuild: ManiSkill's; set_init_state sets the state
        seeds = seed if isinstance(seed, list) else [seed + i for i in range(self.num_envs)]
        return self._batch([self._reset_one(i, s) for i, s in enumerate(seeds)])  # seed = init-state index

    def step(self, action: torch.Tensor):
        items, final, rew, term, trunc, succ = [], [], [], [], [], []
        episode = {k: np.zeros(self.num_envs) for k in ("success_once", "success_at_end", "return", "episode_len")}
        for i, (env, a) in enumerate(zip(self.envs, action.cpu().numpy())):
            raw, r, done, _ = env.step(a.tolist())
            success = bool(done)  # LIBERO's done is check_success()
            self.steps[i] += 1
            self.ret[i] += r
            self.succ_once[i] |= success
            te = success and not self.ignore_terminations
            tr = self.steps[i] >= self.max_steps and not te
            items.append(self.obs_of(raw))
            final.append(items[-1])
            if te or tr:
                episode["success_once"][i], episode["success_at_end"][i] = self.succ_once[i], success
                episode["return"][i], episode["episode_len"][i] = self.ret[i], self.steps[i]
                items[-1] = self._reset_one(i, None)
            rew.append(r), term.append(te), trunc.append(tr), succ.append(success)
        t = lambda x, dt=torch.float32: torch.as_tensor(np.asarray(x), dtype=dt, device=self.device)
        term, trunc = t(term, torch.bool), t(trunc, torch.bool)
        self.last_frame = final[0][0][0]  # env 0's agentview before any reset, for videos
        info = {"success": t(succ, torch.bool), "final_obs": self._batch(final),
                "episode": {k: t(v) for k, v in episode.items()} if (term | trunc).any() else {}}
        return self._batch(items), t(rew), term, trunc, info

    def render(self):
        return self.last_frame

    def close(self):
        for env in self.envs:
            env.close()


def make_envs(args, num_envs: int, ignore_terminations: bool, device):
    kind, env_id = resolve_env_id(args.env_id)
    if kind == "libero":
        return LiberoEnvs(env_id, args.task_ids, num_envs, LIBERO_MAX_STEPS[env_id], ignore_terminations, device)
    world = dist.get_world_size() if dist.is_initialized() else 1  # torchrun ranks share the cores
    workers = args.env_workers or max(1, (os.cpu_count() or 1) // world)
    if args.sim_backend not in ("auto", "physx_cuda", "physx_cpu"):
        raise ValueError(f"--sim-backend {args.sim_backend!r}: choose auto, physx_cuda or physx_cpu")
    if args.sim_backend == "physx_cuda" and device.type != "cuda":
        raise ValueError("--sim-backend physx_cuda needs a CUDA GPU; none is visible (use physx_cpu or auto)")
    gpu_sim = args.sim_backend == "physx_cuda" or (args.sim_backend == "auto" and device.type == "cuda")
    return ManiSkillEnvs(env_id, num_envs, args.obs_mode, args.control_mode, args.max_episode_steps,
                         ignore_terminations, device, args.reward_mode, workers, gpu_sim)


# ================================================================================================ Flow-SDE
def sde_mean_std(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, K: int, a: float):
    """The SDE transition t -> t - 1/K with the ODE's marginals. x, v [N, H, D], t [N] -> mean [N, H, D], std [N, 1, 1].
    s_t = a sqrt(t / (1 - t)); at t = 1 the next grid point's 1 - t (= 1/K) keeps it finite: s_1 = a sqrt(K)."""
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
    """Hybrid ODE/SDE sampling from noise (t=1) to action (t=0) in K steps: step k* (uniform per sample) is the
    SDE step, all others the ODE step x - v/K. -> chunk x_0 [N, H, D] (normalised), x_k* and x_k*+1 [N, H, D],
    k* [N], log-prob of that transition [N, C, A]."""
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
        noisy = mean + std * xi
        x_next = torch.where(sde[:, None, None], noisy, x - v / K)
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
    """Clipped surrogate on the recomputed SDE step + clipped Huber value loss for one minibatch of M decisions
    (prefix: the rollout's, else encoded here). -> loss, stats (pg_loss, v_loss, approx_kl, clipfrac, ratio_mean)."""
    if prefix is None:  # VLM frozen: no grad
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
    """Chunk-level value: MLP 512-256-128-1 (ReLU) on the critic features; Kaiming hidden layers, N(0, 0.02)
    output, zero biases."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                                 nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 1))
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        nn.init.normal_(self.net[-1].weight, std=0.02)

    def forward(self, features):
        return self.net(features).squeeze(-1)


def critic_features(policy, prefix, args) -> torch.Tensor:
    """pi0 style: mean of the expert's action-token outputs, queried at (x = 0, t = 1) so the value depends on the
    observation only; pi0.5 style ("vlm"): mean of the VLM prefix output; "expert_state" appends pi0's normalised,
    padded state. -> [N, W]"""
    if args.critic_input == "vlm":
        return prefix.features.float()
    if args.critic_input == "expert_state" and prefix.state is None:
        raise ValueError("--critic-input expert_state needs pi0's state token; pi0.5 writes the state into the "
                         "prompt: use expert or vlm")
    N, H, D = prefix.mask.shape[0], policy.spec["chunk_size"], policy.spec["max_action_dim"]
    with torch.set_grad_enabled(torch.is_grad_enabled() and not args.critic_detach):
        _, h = policy.velocity(prefix, torch.zeros(N, H, D, device=prefix.mask.device),
                               torch.ones(N, device=prefix.mask.device))
    h = h.mean(1).float()
    return torch.cat([h, prefix.state.float()], -1) if args.critic_input == "expert_state" else h


def critic_feature_dim(policy, args) -> int:
    """Width W of critic_features' output."""
    spec = policy.spec
    return {"vlm": spec["text_hidden"], "expert": spec["expert_hidden"],
            "expert_state": spec["expert_hidden"] + spec["max_state_dim"]}[args.critic_input]


def compute_gae(rewards, values, dones, final_values, next_value, gamma, lam):
    """GAE over decision points. rewards, values, dones, final_values: [T, N]; dones[t] = 1 when the episode ended
    inside chunk t; final_values[t] = V(last observation) when it ended by the time limit (bootstrap), 0 when it
    terminated; next_value [N] = V(observation after the last chunk). -> advantages, returns [T, N]."""
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        nxt = next_value if t == T - 1 else values[t + 1]
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * (not_done * nxt + final_values[t]) - values[t]
        last = delta + gamma * lam * not_done * last
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
    """Fixed-seed episodes run to the time limit (terminations ignored), executing the first C actions of each
    chunk. Round r (envs.num_envs episodes: seeds eval_seed + r * num_envs + i, sampling noise seeded with r) runs
    on rank r % world, so the episodes do not depend on the number of ranks.
    -> mean success_once, success_at_end, return, episode_len over all ranks' episodes."""
    policy.eval()
    prompts = getattr(envs, "prompts", [envs.prompt] * envs.num_envs)
    results, frames = {}, []
    for r in range(rank, math.ceil(num_episodes / envs.num_envs), world):
        gen = torch.Generator(device=next(policy.parameters()).device).manual_seed(args.eval_seed + r)
        # scenes rebuilt at each evaluation's start: one policy scores the same at every evaluation, as on new envs
        obs = envs.reset(seed=args.eval_seed + r * envs.num_envs, rebuild=r == rank)
        keep = min(envs.num_envs, num_episodes - r * envs.num_envs)  # the last round may be partly surplus
        finished = False
        while not finished:
            chunk = sample_actions(policy, normalizer, obs, prompts, args.denoise_steps, envs.action_dim, gen)
            for c in range(args.action_chunk):
                obs, _, _, _, info = envs.step(chunk[:, c])
                if video_path is not None and r == 0:
                    frames.append(envs.render())
                if info["episode"]:  # all envs reach the time limit together
                    for k, v in info["episode"].items():
                        results.setdefault(k, []).append(v[:keep].float().cpu())
                    finished = True
                    break
    if frames:
        import imageio
        Path(video_path).parent.mkdir(parents=True, exist_ok=True)
        imageio.mimsave(video_path, frames, fps=20)
    return episode_means(results)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, list]:
    """AdamW state as flat tensors (for safetensors) + its param groups (for JSON)."""
    sd = opt.state_dict()
    return {f"optim.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict, groups: list):
    state = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


# ================================================================================================ distributed
# `torchrun --nproc-per-node N flow_sde_ppo.py` starts N copies of this script. Each rank owns one GPU (or one CPU
# process with the gloo backend), num_envs / N envs and its own seeds; after every backward the ranks average their
# gradients, so their parameters stay identical. Metrics are reduced over ranks; only rank 0 logs and saves.
def init_distributed() -> tuple[int, int, torch.device]:
    """-> rank, world size, device. A plain `python` run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """x combined over ranks (a new tensor on x's device); x itself with one rank."""
    if not distributed():
        return x
    y = x.to(f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(y, op=op)
    return y.to(x.device)


def broadcast_parameters(params: list[torch.Tensor]):
    """Rank 0's values on every rank (random initialisations differ between ranks)."""
    if distributed():
        for p in params:
            buf = p.data.to("cpu") if dist.get_backend() == "gloo" else p.data
            dist.broadcast(buf, 0)
            p.data.copy_(buf)


def average_gradients(params: list[torch.Tensor]):
    """What DDP does after backward, written out because the policy is called through encode_prefix / velocity,
    not through the forward() that DDP wraps: all gradients in one flat buffer, summed over ranks, / world size."""
    if not distributed():
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    flat = all_reduce(flat) / dist.get_world_size()  # [trainable parameters]
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


EPISODE_KEYS = ("success_once", "success_at_end", "return", "episode_len")


def episode_means(episodes: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Mean of each episode metric over every rank's finished episodes (sums and counts are all-reduced)."""
    sums = torch.zeros(len(EPISODE_KEYS), 2, dtype=torch.float64)  # [metric, (sum, count)]
    for i, k in enumerate(EPISODE_KEYS):
        if episodes.get(k):
            v = torch.cat(episodes[k]).double()
            sums[i] = torch.stack([v.sum(), v.new_tensor(float(v.numel()))])
    sums = all_reduce(sums)
    return {k: (s / n).item() for k, (s, n) in zip(EPISODE_KEYS, sums) if n > 0}


def mean_over_ranks(row: dict[str, float]) -> dict[str, float]:
    """Every value averaged over ranks (all ranks hold the same keys)."""
    if not distributed():
        return row
    keys = sorted(row)
    values = all_reduce(torch.tensor([float(row[k]) for k in keys], dtype=torch.float64)) / dist.get_world_size()
    return dict(zip(keys, values.tolist()))


# ================================================================================================ main
def load_policy(args, env_id, resume_dir: Path, vlm_dtype: torch.dtype | None):
    """The SFT checkpoint (or this run's own, to resume) -> policy (its VLM in vlm_dtype), normaliser, extra
    tensors, meta, path."""
    path = resume_dir if args.resume else Path(args.checkpoint or f"runs/sft/{env_id}/checkpoint")
    if not path.is_dir() and not Path(f"{path}.old").is_dir():
        if args.resume:
            raise FileNotFoundError(f"--resume: no checkpoint at {path} (is --output-dir the run's directory?)")
        raise FileNotFoundError(f"no SFT checkpoint at {path}: run `python sft_baseline.py --env-id {args.env_id}` "
                                "first, or pass --checkpoint")
    policy, normalizer, extra, meta = vla.load_checkpoint(path, vlm_dtype=vlm_dtype)
    if normalizer is None:
        raise ValueError(f"{path} has no norm_stats.json: the policy's state/action normalisation is unknown")
    args.obs_mode = args.obs_mode or meta.get("obs_mode", "state")
    args.control_mode = args.control_mode or meta.get("control_mode", "pd_ee_delta_pose")
    if args.resume:
        check_resumed_options(args, meta.get("args", {}))
    return policy, normalizer, extra, meta, path


# --resume may change how long the run goes on, how often it evaluates and saves, and how it executes; a change to
# any other option is reported. A different task, episode or chain is another run: those options must stay.
RESUME_FREE = {"total_iterations", "time_budget_min", "eval_every", "eval_episodes", "num_eval_envs", "save_every",
               "capture_video", "track", "wandb_project", "env_workers", "sim_backend", "micro_batch_size",
               "grad_checkpointing", "prefix_store_gb", "update_threads", "vlm_dtype", "checkpoint", "output_dir",
               "resume"}
RESUME_FIXED = ("env_id", "task_ids", "obs_mode", "control_mode", "reward_mode", "max_episode_steps",
                "action_chunk", "denoise_steps", "critic_input")


def check_resumed_options(args, saved: dict):
    """Compare the options given to --resume with the run's own (the checkpoint's meta): refuse a changed task,
    episode or chain, print the other changes."""
    now = json.loads(json.dumps(asdict(args)))  # tuples become lists, as in the checkpoint's JSON
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v and k not in RESUME_FREE}
    flag = lambda k: "--" + k.replace("_", "-")
    fixed = [k for k in RESUME_FIXED if k in changed]
    if fixed:
        raise ValueError("--resume: " + "; ".join(f"the run has {flag(k)} {changed[k][0]}, not {changed[k][1]}"
                                                  for k in fixed)
                         + ": pass the run's values again (to change them, start a new run)")
    if changed:
        print("--resume with changed options: " + ", ".join(f"{flag(k)} {a} -> {b}" for k, (a, b) in changed.items()))


def main(args: Args):
    """Train; -> the last evaluation's metrics, the policy and the critic."""
    kind, env_id = resolve_env_id(args.env_id)
    if args.ratio_level not in ("chunk", "token") or args.critic_input not in ("expert", "vlm", "expert_state"):
        raise ValueError("--ratio-level must be chunk|token and --critic-input expert|vlm|expert_state")
    if args.vlm_dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"--vlm-dtype {args.vlm_dtype!r}: choose auto, bfloat16 or float32")
    rank, world, device = init_distributed()
    if args.update_threads is not None and args.update_threads < 1:
        raise ValueError(f"--update-threads {args.update_threads} must be at least 1 (omit it for the cores per rank)")
    update_threads = args.update_threads or max(1, (os.cpu_count() or 1) // world)
    is_main = rank == 0
    if args.num_envs % world:
        raise ValueError(f"--num-envs {args.num_envs} does not split over {world} ranks: use a multiple of {world}")
    N = args.num_envs // world  # this rank's envs
    batch_size = N * args.num_steps
    if args.num_minibatches < 1 or batch_size % args.num_minibatches:
        raise ValueError(f"the batch of {batch_size} decisions (per rank: num_envs {N} x num_steps "
                         f"{args.num_steps}) does not split into {args.num_minibatches} equal minibatches")
    minibatch_size = batch_size // args.num_minibatches
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size {args.micro_batch_size} must be at least 1")
    micro_size = min(args.micro_batch_size or minibatch_size, minibatch_size)
    random.seed(args.seed + rank), np.random.seed(args.seed + rank), torch.manual_seed(args.seed + rank)
    run_dir = Path(args.output_dir or f"runs/flow_sde_ppo/{env_id}_{args.seed}")
    ckpt_dir = run_dir / "checkpoint"

    # ---- policy (frozen VLM), critic, optimiser: from the SFT checkpoint or resumed from this run's
    bf16 = args.vlm_dtype == "bfloat16" or (args.vlm_dtype == "auto" and device.type == "cuda")
    vlm_dtype = torch.bfloat16 if bf16 else None
    policy, normalizer, extra, meta, source = load_policy(args, env_id, ckpt_dir, vlm_dtype)
    if args.action_chunk > policy.spec["chunk_size"]:
        raise ValueError(f"--action-chunk {args.action_chunk} exceeds the policy's chunk size {policy.spec['chunk_size']}")
    dense = kind == "maniskill" and args.reward_mode != "sparse"
    envs = make_envs(args, N, ignore_terminations=dense, device=device)
    eval_envs = make_envs(args, args.num_eval_envs, ignore_terminations=True, device=device)
    A = envs.action_dim
    if policy.config.action_dim != A:
        raise ValueError(f"{source} outputs {policy.config.action_dim}-D actions but {env_id} with "
                         f"{args.control_mode} takes {A}-D: use a checkpoint trained for this env and control mode")
    policy.to(device).freeze_vlm(dtype=vlm_dtype).expert_checkpointing(args.grad_checkpointing)
    critic = Critic(critic_feature_dim(policy, args)).to(device)
    opt = torch.optim.AdamW([{"params": policy.trainable_parameters(), "lr": args.lr},
                             {"params": critic.parameters(), "lr": args.value_lr}], betas=(0.9, 0.95),
                            weight_decay=0.0)
    start_iter, global_step, train_time = 0, 0, 0.0
    if args.resume:
        critic.load_state_dict({k[len("critic."):]: v for k, v in extra.items() if k.startswith("critic.")})
        load_optimizer(opt, extra, meta["optimizer"])
        start_iter, global_step, train_time = meta["iteration"], meta["global_step"], meta["train_time"]
    params = policy.trainable_parameters() + list(critic.parameters())
    broadcast_parameters(params)

    if args.track and is_main:
        import wandb
        wandb.init(project=args.wandb_project, config=asdict(args), name=run_dir.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = open(run_dir / "metrics.jsonl", "a") if is_main else None

    def log(row: dict):
        if not is_main:
            return
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        if args.track:
            wandb.log(row, step=row["global_step"])

    def save(iteration):
        if not is_main:
            return
        opt_tensors, groups = optimizer_tensors(opt)
        extra = {**{f"critic.{k}": v for k, v in critic.state_dict().items()}, **opt_tensors}
        vla.save_checkpoint(ckpt_dir, policy, normalizer, extra, {
            "iteration": iteration, "global_step": global_step, "train_time": train_time, "optimizer": groups,
            "args": asdict(args), "env_id": env_id, "obs_mode": args.obs_mode, "control_mode": args.control_mode,
            "action_chunk": args.action_chunk, "denoise_steps": args.denoise_steps,
            "sft_checkpoint": meta.get("sft_checkpoint", str(source))})

    def run_eval(iteration):
        video = run_dir / "videos" / f"eval_{iteration}.mp4" if args.capture_video else None
        m = evaluate(policy, normalizer, eval_envs, args, args.eval_episodes, video if is_main else None, rank, world)
        log({"iteration": iteration, "global_step": global_step, "train_time": train_time,
             **{f"eval/{k}": v for k, v in m.items()}})
        if is_main:
            tqdm.write(f"iter {iteration} step {global_step}: eval success_once {m['success_once']:.3f} "
                   f"success_at_end {m['success_at_end']:.3f}")
        return m

    # ---- rollout storage: one row per decision point (action chunk)
    T, C = args.num_steps, args.action_chunk
    H, D = policy.spec["chunk_size"], policy.spec["max_action_dim"]
    prompts = getattr(envs, "prompts", [envs.prompt] * N)
    # Training seeds never overlap the eval seeds (from 10_000) nor another rank's.
    obs = envs.reset(seed=args.seed * 1_000_003 + rank * 100_003 + start_iter)
    images_on = obs["images"] is not None
    obs_state = torch.zeros(T, N, obs["state"].shape[1], device=device)  # [T, N, state_dim]
    obs_images = torch.zeros(T, N, *obs["images"].shape[1:], dtype=torch.uint8, device=device) if images_on else None
    x_before = torch.zeros(T, N, H, D, device=device)  # x_k* of the SDE step
    x_after = torch.zeros(T, N, H, D, device=device)  # x_k*+1
    k_stars = torch.zeros(T, N, dtype=torch.long, device=device)
    logprobs = torch.zeros(T, N, C, A, device=device)
    values, rewards, dones, final_values = (torch.zeros(T, N, device=device) for _ in range(4))

    def value_of(o, rows):  # V of observations o of the envs in `rows` [N] bool
        prefix = policy.encode_prefix(normalizer.normalize("state", o["state"]),
                                      [p for p, r in zip(prompts, rows.tolist()) if r], o["images"])
        return critic(critic_features(policy, prefix, args))

    eval_metrics = run_eval(0) if args.eval_episodes > 0 and start_iter == 0 else {}  # the SFT policy
    bar = tqdm(range(start_iter, args.total_iterations), initial=start_iter, total=args.total_iterations, desc="ppo",
               disable=not is_main)
    for iteration in bar:
        # ---- rollout
        policy.eval()
        t0, episodes, prefixes = time.time(), {}, []
        for step in range(T):
            obs_state[step] = obs["state"]
            if images_on:
                obs_images[step] = obs["images"]
            with torch.no_grad():
                prefix = policy.encode_prefix(normalizer.normalize("state", obs["state"]), prompts, obs["images"])
                if T * prefix.nbytes() <= args.prefix_store_gb * 2**30:
                    prefixes.append(prefix)
                values[step] = critic(critic_features(policy, prefix, args))
                chunk, x_before[step], x_after[step], k_stars[step], logprobs[step] = sample_chunk(
                    policy, prefix, args, A)
            actions = normalizer.unnormalize("actions", chunk[:, :C, :A])  # [N, C, A]
            alive = torch.ones(N, dtype=torch.bool, device=device)
            truncated = torch.zeros(N, dtype=torch.bool, device=device)
            final = {k: None if v is None else v.clone() for k, v in obs.items()}
            reward = torch.zeros(N, device=device)
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
        advantages, returns = compute_gae(rewards, values, dones, final_values, next_value, args.gamma,
                                          args.gae_lambda)

        # ---- PPO update: recompute only the stored SDE step of each decision
        t1 = time.time()
        rollout_threads = torch.get_num_threads()
        torch.set_num_threads(update_threads)  # the env workers wait during the update: their cores are free
        policy.train()
        progress = iteration / args.total_iterations  # share of the run done, in iterations or in time
        if args.time_budget_min is not None:
            progress = max(progress, train_time / (60 * args.time_budget_min))
        lr_now = args.lr * (max(1.0 - progress, 0.0) if args.anneal_lr else 1.0)
        opt.param_groups[0]["lr"] = 0.0 if iteration < args.critic_warmup_iters else lr_now
        b = lambda x: x.reshape(T * N, *x.shape[2:])
        b_state, b_xb, b_xa, b_k = b(obs_state), b(x_before), b(x_after), b(k_stars)
        b_images = b(obs_images) if images_on else None
        b_logp, b_adv, b_ret, b_val = b(logprobs), b(advantages), b(returns), b(values)
        b_prefix = vla.Prefix.cat(prefixes) if len(prefixes) == T else None  # row i: step i // N, env i % N
        prefixes.clear()
        # advantages normalised over all ranks' decisions: sum, sum of squares, count
        s, sq, n = all_reduce(torch.stack([b_adv.sum(), b_adv.square().sum(), b_adv.new_tensor(float(b_adv.numel()))])
                              .double()).tolist()
        b_adv = (b_adv - s / n) / (math.sqrt(max(sq - s * s / n, 0.0) / max(n - 1, 1)) + 1e-8)
        stats, epochs_run = {}, 0
        for epoch in range(args.update_epochs):
            epochs_run = epoch + 1  # fewer than update_epochs when --target-kl stops the update
            perm = torch.randperm(T * N, device=device)
            for start in range(0, T * N, minibatch_size):
                mb = perm[start:start + minibatch_size]
                opt.zero_grad(set_to_none=True)
                for micro in mb.split(micro_size):  # gradient accumulation over micro-batches
                    loss, mb_stats = ppo_loss(policy, critic, normalizer, args, A, state=b_state[micro],
                                              images=b_images[micro] if images_on else None,
                                              prompts=[prompts[i % N] for i in micro.tolist()],  # row i: env i % N
                                              x_before=b_xb[micro], x_after=b_xa[micro], k_star=b_k[micro],
                                              old_logp=b_logp[micro], adv=b_adv[micro], ret=b_ret[micro],
                                              old_value=b_val[micro],
                                              prefix=None if b_prefix is None else b_prefix.select(micro))
                    (loss * len(micro) / len(mb)).backward()
                    for k, v in mb_stats.items():
                        stats.setdefault(k, []).append(v)
                average_gradients(params)
                grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                if not torch.isfinite(grad_norm):  # the same on every rank: gradients were averaged
                    raise FloatingPointError(f"non-finite loss or gradient at iteration {iteration}; the last good "
                                             f"checkpoint is in {ckpt_dir}")
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
            "rollout_time": rollout_time, "update_time": update_time, "lr": opt.param_groups[0]["lr"], "epochs": epochs_run,
            "prefix_stored": float(b_prefix is not None),  # 1: the update reused the rollout's prefixes
            "explained_variance": (1 - (b_ret - b_val).var() / var_y).item() if var_y > 0 else float("nan"),
            **{k: float(np.mean(v)) for k, v in stats.items()}})
        row = {"iteration": iteration + 1, "global_step": global_step, "train_time": train_time, **row,
               **{f"train/{k}": v for k, v in episode_means(episodes).items()}}
        log(row)
        bar.set_postfix(success=f"{row.get('train/success_once', float('nan')):.2f}", kl=f"{row['approx_kl']:.4f}")
        done = iteration + 1 == args.total_iterations or (args.time_budget_min is not None
                                                           and train_time >= 60 * args.time_budget_min)
        if args.eval_episodes > 0 and (done or (args.eval_every and (iteration + 1) % args.eval_every == 0)):
            eval_metrics = run_eval(iteration + 1)
        if done or (iteration + 1) % args.save_every == 0:
            save(iteration + 1)
        if done:
            break
    envs.close(), eval_envs.close()
    if is_main:
        metrics_file.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return eval_metrics, policy, critic


if __name__ == "__main__":
    main(tyro.cli(Args))

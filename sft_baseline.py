"""Few-shot supervised flow matching (pi0 recipe) on ManiSkill or LIBERO demonstrations.

Produces the policies the RL scripts start from. ManiSkill demonstrations come from ManiSkill's own motion
planners, converted to the chosen control / observation mode with its replay tool; LIBERO demonstrations are
read from a local file in the standard LIBERO hdf5 layout.

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


@dataclass
class Args:
    env_id: str = "PickCube"
    """ManiSkill task (short alias or full id) or a LIBERO suite (libero_spatial, libero_object, libero_goal, libero_10)"""
    task_ids: tuple[int, ...] = (0,)
    """LIBERO: the suite's task indices to train and evaluate on"""
    obs_mode: str = "state"
    """"state": the full state vector in the state slot (CPU default); "rgb": camera images + robot proprio"""
    control_mode: str = "pd_ee_delta_pose"
    """ManiSkill controller; the demonstrations are converted to it. pd_joint_delta_pos steps the CPU envs 1.6-2x as
    fast and SFT scored 34% on PickCube, but Flow-SDE PPO from it learned about half as fast per env step (README)"""
    max_episode_steps: int = 80
    """ManiSkill episode length (the paper uses 80). LIBERO uses its suite's"""
    num_demos: int = 200
    """few-shot subset size: the first N demonstrations are used (200 gave a 29% start on PickCube, inside the
    20-60% few-shot band; see README)"""
    planner_joint_acc: float = 0.9
    """joint acceleration limit (rad/s^2) of the motion planner that generates ManiSkill demos; 0.9 is ManiSkill's
    own, far below the Panda's. At 0.9 the 200 PickCube demos (pd_ee_delta_pose) last 78 steps on average and 41% run
    past the 80-step episode; at 2.0, 56 (at most 74), and SFT on them scored 36% success_once (29% at 0.9) but 14%
    success_at_end (29%): the policy finishes sooner, then drifts off the goal. See README"""
    demo_path: str | None = None
    """existing ManiSkill .h5 (with its .json) or LIBERO hdf5 file; default: generate ManiSkill demos into demos/"""
    preset: str = "tiny"
    """policy size: tiny (CPU), pi0, pi05"""
    chunk_size: int = 16
    """action horizon H predicted per call (the paper: 8 on ManiSkill, 50 / 10 on LIBERO)"""
    action_chunk: int = 8
    """C: actions executed per prediction (the first C of the chunk; the paper: 5). With few motion-planner demos
    the policy stalls after grasping when it replans every 5 steps; committing to 8 of 16 triples its success"""
    denoise_steps: int = 4
    """K Euler steps of the ODE at evaluation"""
    train_steps: int = 20000
    """gradient steps (about 90 passes over 200 demos; 6000 gave 21% success on PickCube, 20000 gave 29%)"""
    batch_size: int = 64
    """samples (observation, action chunk) per gradient step and rank (torchrun: the ranks' gradients are averaged)"""
    lr: float = 3e-4
    """peak learning rate (AdamW, linear warmup then cosine decay to 10%)"""
    warmup_steps: int = 100
    """linear warmup steps"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """gradient-norm clip"""
    eval_episodes: int = 100
    """evaluation episodes on fixed seeds after training (0 to skip)"""
    eval_every: int = 0
    """also evaluate every N gradient steps (0: only at the end)"""
    num_eval_envs: int = 10
    """parallel evaluation environments (per rank)"""
    sim_backend: str = "auto"
    """ManiSkill simulator: "physx_cuda" (all envs in one GPU simulation), "physx_cpu" (CPU envs in env_workers
    processes; the policy still runs on the GPU if there is one), "auto": physx_cuda when CUDA is available"""
    env_workers: int | None = None
    """CPU simulator only: processes that step the envs (default: one per core, divided among torchrun ranks; 1 keeps
    them in this process)"""
    eval_seed: int = 10_000
    """first seed of the evaluation episodes (demonstrations use seeds 0..N-1)"""
    capture_video: bool = False
    """save a video of the first evaluation environment"""
    seed: int = 1
    """random seed of the training run"""
    output_dir: str | None = None
    """run directory (default runs/sft/<env id>); the checkpoint goes to <output_dir>/checkpoint"""
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
                         ignore_terminations, device, workers=workers, gpu_sim=gpu_sim)


# ================================================================================================ demonstrations
def generate_maniskill_demos(env_id: str, num_demos: int, obs_mode: str, control_mode: str, root="demos",
                             joint_acc: float = 0.9) -> Path:
    """Motion-planner demonstrations (ManiSkill's own solvers, seeds from 0, joint accelerations planned up to
    `joint_acc`), converted to the control and observation mode with ManiSkill's replay tool. Reuses an earlier file
    of the same planner setting holding at least `num_demos`: a converted one, else the planner's own."""
    record_dir = Path(root) / f"planner_acc{joint_acc:g}"
    folder = record_dir / env_id / "motionplanning"
    suffix = f".{obs_mode}.{control_mode}.physx_cpu.h5"
    def size(f):  # mpN.h5 (the planner's) or mpN<suffix> (converted) -> N
        n = f.name[2:].split(".")[0]
        return int(n) if n.isdigit() else -1
    converted = [f for f in folder.glob(f"mp*{suffix}") if size(f) >= num_demos]
    if converted:
        return min(converted, key=size)
    # The planner's own files (joint positions) do not depend on the control mode: convert one large enough if
    # there is one, so that another control mode costs only the conversion.
    raw = [f for f in folder.glob("mp*.h5") if f.name == f"mp{size(f)}.h5" and size(f) >= num_demos
           and f.with_suffix(".json").exists()]
    name = min(raw, key=size).stem if raw else f"mp{num_demos}"
    def run(what, *cmd):
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    # ManiSkill's runner has no option for the planner's limits: set the solver's default before running it.
    # The solver scales mplib's default limits (1 per joint) by its joint_acc_limits argument, the last one.
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
    mode = meta.get("env_info", {}).get("env_kwargs", {}).get("control_mode")
    if mode != control_mode:
        raise ValueError(f"{path} was recorded with control mode {mode!r}, not {control_mode!r}: convert it with "
                         f"python -m mani_skill.trajectory.replay_trajectory -c {control_mode} -o state --save-traj")
    # ManiSkill's replay tool resets its scene between episodes without stepping it, so each first observation's
    # is_grasped is the previous episode's last (199 of 200 PickCube demos read 1): cleared as FreshGraspFlag clears
    # the envs', found by name in one env built with the file's settings (on the CPU, not rendering: the layout is
    # the same), so the demos start as the envs do.
    grasp_col, env_info = None, meta.get("env_info", {})
    if env_info.get("env_kwargs", {}).get("obs_mode") == "state":
        import mani_skill.envs  # noqa: F401  (registers the tasks)
        kw = {**env_info["env_kwargs"], "num_envs": 1, "sim_backend": "physx_cpu", "render_mode": None}
        env = FreshGraspFlag(gym.make(env_info["env_id"], **kw))
        grasp_col = env.col
        env.close()
    episodes = []
    with h5py.File(path, "r") as f:
        for ep in meta["episodes"][:num_demos]:
            g = f.get(f"traj_{ep['episode_id']}")
            obs = None if g is None else g.get("obs")
            if obs is None or "actions" not in g or (isinstance(obs, h5py.Group) and "sensor_data" not in obs):
                raise ValueError(f"{path}: traj_{ep['episode_id']} lacks 'actions' or 'obs' (convert it with "
                                 "replay_trajectory -o state|rgb --save-traj to add observations)")
            T = g["actions"].shape[0]
            if isinstance(g["obs"], h5py.Dataset):
                state, images = g["obs"][:T], None  # [T, D]
                if grasp_col is not None:
                    state[0, grasp_col] = 0
            else:
                state = g["obs/agent/qpos"][:T]
                images = np.stack([c["rgb"][:T] for c in g["obs/sensor_data"].values()], 1)
            episodes.append(dict(state=state.astype(np.float32), actions=g["actions"][:].astype(np.float32),
                                 images=images))
    return episodes


def load_libero_demos(path: Path, num_demos: int) -> list[dict]:
    """LIBERO / robomimic hdf5 (data/demo_N/{actions, obs/{agentview_rgb, eye_in_hand_rgb, ee_states,
    gripper_states}}) -> episodes dict(state [T, 8], actions [T, 7], images [T, 2, H, W, 3] upright, prompt)."""
    if not path.is_file():
        raise FileNotFoundError(f"LIBERO demo file {path} does not exist")
    episodes = []
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise ValueError(f"{path} has no 'data' group: not a LIBERO/robomimic demo file")
        info = json.loads(f["data"].attrs.get("problem_info", "{}"))
        prompt = info.get("language_instruction", "")
        names = sorted(f["data"], key=lambda n: int(n.split("_")[-1]))[:num_demos]
        for name in names:
            g = f["data"][name]
            for key in ("actions", "obs/agentview_rgb", "obs/eye_in_hand_rgb", "obs/ee_states", "obs/gripper_states"):
                if key not in g:
                    raise ValueError(f"{path}: data/{name} has no '{key}'")
            actions = g["actions"][:].astype(np.float32)
            if actions.ndim != 2 or actions.shape[1] != 7:
                raise ValueError(f"{path}: data/{name}/actions has shape {actions.shape}, LIBERO actions are [T, 7]")
            images = np.stack([g["obs/agentview_rgb"][:], g["obs/eye_in_hand_rgb"][:]], 1)[:, :, ::-1, ::-1]
            state = np.concatenate([g["obs/ee_states"][:], g["obs/gripper_states"][:]], -1).astype(np.float32)
            episodes.append(dict(state=state, actions=actions, images=np.ascontiguousarray(images), prompt=prompt))
    return episodes


def make_chunks(episodes: list[dict], horizon: int):
    """Every (observation t, actions t..t+H-1) pair: chunks [N, H, A] and mask [N, H] of steps inside the episode
    (the tail of an episode is padded with its last action and masked out of the loss)."""
    chunks, masks = [], []
    for ep in episodes:
        a = ep["actions"]
        T = len(a)
        idx = np.minimum(np.arange(T)[:, None] + np.arange(horizon)[None], T - 1)  # [T, H]
        chunks.append(a[idx])
        masks.append(np.arange(T)[:, None] + np.arange(horizon)[None] < T)
    return np.concatenate(chunks), np.concatenate(masks)


# ================================================================================================ policy
def flow_matching_loss(policy, state, prompts, images, actions, mask):
    """pi0's loss. actions [B, H, A] normalised, mask [B, H]. x_t = t*eps + (1-t)*a, target u = eps - a,
    t ~ Beta(1.5, 1) * 0.999 + 0.001 (more weight near the noisy end, as in pi0)."""
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
# `torchrun --nproc-per-node N sft_baseline.py` starts N copies of this script. Each rank owns one GPU (or one CPU
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


# ================================================================================================ main
def main(args: Args):
    """Train; -> the last evaluation's metrics and the policy."""
    kind, env_id = resolve_env_id(args.env_id)
    if args.action_chunk > args.chunk_size:
        raise ValueError(f"--action-chunk {args.action_chunk} exceeds --chunk-size {args.chunk_size}")
    if not args.planner_joint_acc > 0:
        raise ValueError(f"--planner-joint-acc {args.planner_joint_acc} must be positive (rad/s^2; ManiSkill's is 0.9)")
    if kind == "libero" and args.demo_path is None:
        raise ValueError("LIBERO demonstrations cannot be downloaded here: pass --demo-path to a local LIBERO hdf5 file")
    rank, world, device = init_distributed()
    is_main = rank == 0
    random.seed(args.seed + rank), np.random.seed(args.seed + rank), torch.manual_seed(args.seed + rank)
    run_dir = Path(args.output_dir or f"runs/sft/{env_id}")
    ckpt_dir = run_dir / "checkpoint"

    # ---- demonstrations
    if kind == "libero":
        demo_path = Path(args.demo_path)
        episodes = load_libero_demos(demo_path, args.num_demos)
        prompt_of = lambda ep: ep["prompt"]
    else:
        if args.demo_path:
            demo_path = Path(args.demo_path)
        else:  # rank 0 writes the demos while the others wait, then finds them
            if not is_main and distributed():
                dist.barrier()
            demo_path = generate_maniskill_demos(env_id, args.num_demos, args.obs_mode, args.control_mode,
                                                  joint_acc=args.planner_joint_acc)
            if is_main and distributed():
                dist.barrier()
        episodes = load_maniskill_demos(demo_path, args.num_demos, args.control_mode)
        prompt_of = lambda ep: MANISKILL_TASKS[env_id.removesuffix("-v1")]
    if not episodes:
        raise ValueError(f"{demo_path} holds no demonstrations")
    if len(episodes) < args.num_demos:
        print(f"warning: {demo_path} holds only {len(episodes)} demonstrations (asked for {args.num_demos})")
    action_dim, state_dim = episodes[0]["actions"].shape[1], episodes[0]["state"].shape[1]
    states = torch.as_tensor(np.concatenate([ep["state"] for ep in episodes]))  # [N, state_dim]
    chunks, masks = (torch.as_tensor(x) for x in make_chunks(episodes, args.chunk_size))  # [N, H, A], [N, H]
    images = (torch.as_tensor(np.concatenate([ep["images"] for ep in episodes]))
              if episodes[0].get("images") is not None else None)  # [N, cams, H, W, 3] uint8
    prompts = [prompt_of(ep) for ep in episodes for _ in range(len(ep["actions"]))]
    if is_main:
        print(f"{len(episodes)} demos, {len(states)} samples from {demo_path}")

    # ---- policy (fresh, or resumed with its optimiser)
    if args.resume:
        policy, normalizer, extra, meta = vla.load_checkpoint(ckpt_dir)
        start = meta["step"]
    else:
        policy = vla.build(args.preset, action_dim, state_dim, chunk_size=args.chunk_size)
        normalizer = vla.Normalizer.from_data(states.numpy(), chunks[:, 0].numpy(), policy.config.norm_mode)
        extra, meta, start = {}, {}, 0
    policy.to(device)
    broadcast_parameters(list(policy.parameters()))  # one initialisation for all ranks
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    if args.resume:
        load_optimizer(opt, extra, meta["optimizer"])

    def lr_at(step):  # linear warmup, cosine decay to 10% of the peak
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.train_steps - args.warmup_steps)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    envs = None
    if args.eval_episodes > 0:
        envs = make_envs(args, args.num_eval_envs, ignore_terminations=True, device=device)
        if envs.action_dim != action_dim:
            raise ValueError(f"{demo_path} has {action_dim}-D actions but {env_id} with {args.control_mode} takes "
                             f"{envs.action_dim}-D: regenerate or convert the demos for this control mode")
    if args.track and is_main:
        import wandb
        wandb.init(project=args.wandb_project, config=asdict(args), name=f"sft_{env_id}_{args.seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = open(run_dir / "metrics.jsonl", "a") if is_main else None

    def log(row: dict):
        if not is_main:
            return
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        if args.track:
            wandb.log(row, step=row["step"])

    def save(step, eval_metrics):
        if not is_main:
            return
        opt_tensors, groups = optimizer_tensors(opt)
        vla.save_checkpoint(ckpt_dir, policy, normalizer, opt_tensors,
                            {"step": step, "optimizer": groups, "args": asdict(args), "eval": eval_metrics,
                             "env_id": env_id, "prompt": prompt_of(episodes[0]), "action_chunk": args.action_chunk,
                             "denoise_steps": args.denoise_steps, "obs_mode": args.obs_mode,
                             "control_mode": args.control_mode, "demo_path": str(demo_path)})

    # ---- training
    x_state = normalizer.normalize("state", states).to(device)
    x_actions = normalizer.normalize("actions", chunks).to(device)
    masks = masks.float().to(device)
    eval_metrics, t0 = {}, time.time()
    bar = tqdm(range(start, args.train_steps), initial=start, total=args.train_steps, desc="sft", disable=not is_main)
    for step in bar:
        policy.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = torch.randint(len(x_state), (args.batch_size,))
        imgs = images[idx].to(device) if images is not None else None
        loss = flow_matching_loss(policy, x_state[idx.to(device)], [prompts[i] for i in idx.tolist()], imgs,
                                  x_actions[idx.to(device)], masks[idx.to(device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(list(policy.parameters()))
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        if not torch.isfinite(grad_norm):  # the same on every rank: gradients were averaged
            raise FloatingPointError(f"non-finite loss or gradient at step {step}; the last good checkpoint is in "
                                     f"{ckpt_dir}")
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1 == args.train_steps
        if step % 50 == 0 or done:
            mean_loss = all_reduce(loss.detach()).item() / world
            log({"step": step + 1, "loss": mean_loss, "grad_norm": grad_norm.item(), "lr": lr_at(step),
                 "time": time.time() - t0})
        if envs is not None and (done or (args.eval_every and (step + 1) % args.eval_every == 0)):
            video = run_dir / "videos" / f"eval_{step + 1}.mp4" if args.capture_video else None
            eval_metrics = evaluate(policy, normalizer, envs, args, args.eval_episodes, video if is_main else None,
                                    rank, world)
            log({"step": step + 1, **{f"eval/{k}": v for k, v in eval_metrics.items()}})
            if is_main:
                print(f"step {step + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in eval_metrics.items()))
        if done or (step + 1) % 1000 == 0:
            save(step + 1, eval_metrics)
    if start >= args.train_steps and is_main:
        print(f"{ckpt_dir} is already at step {start}; raise --train-steps to continue")
    if is_main:
        print(f"checkpoint: {ckpt_dir} ({time.time() - t0:.0f} s)")
        metrics_file.close()
    if envs is not None:
        envs.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return eval_metrics, policy


if __name__ == "__main__":
    main(tyro.cli(Args))

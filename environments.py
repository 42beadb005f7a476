"""The environments every script trains and evaluates in, as batches of torch tensors: ManiSkill3 tasks (one GPU
simulation, or CPU envs split over worker processes) and LIBERO suites. It lives here, once, so that each script shows
its method rather than this plumbing; copy it along with the script (and vla/).

    envs = make_envs(args, num_envs, ignore_terminations, device)  # args: env_id, obs_mode, control_mode, ...
    obs = envs.reset(seed)  # {"state": [N, S] float32, "images": [N, cams, H, W, 3] uint8 or None}
    obs, reward, terminated, truncated, info = envs.step(action)  # action [N, A]; info: success, final_obs, episode

Every env auto-resets in the step that ends its episode: `info["final_obs"]` holds that episode's last observation and
`info["episode"]` its metrics (success_once, success_at_end, return, episode_len).
"""

from __future__ import annotations

import os
from functools import partial

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist


class UsageError(ValueError):
    """A mistake in the options or input files: shown as one `error:` line with exit status 2, no traceback."""


# ManiSkill tasks whose assets ship with ManiSkill (they run offline), with their prompts; LIBERO suites' step limits.
MANISKILL_TASKS = {
    "PickCube": "pick up the cube and move it to the goal position", "PushCube": "push the cube to the goal region",
    "PullCube": "pull the cube to the goal region", "StackCube": "stack the red cube on the green cube",
    "PlaceSphere": "place the sphere into the bin", "LiftPegUpright": "lift the peg upright",
    "PegInsertionSide": "insert the peg into the hole", "PokeCube": "use the peg to push the cube to the goal",
    "RollBall": "roll the ball to the goal region", "PlugCharger": "plug the charger into the receptacle",
    "StackPyramid": "stack the cubes into a pyramid"}
LIBERO_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520}


def resolve_env_id(env_id: str) -> tuple[str, str]:
    """-> ("maniskill" | "libero", full id)."""
    if env_id in LIBERO_MAX_STEPS:
        return "libero", env_id
    if env_id.removesuffix("-v1") in MANISKILL_TASKS:
        return "maniskill", env_id.removesuffix("-v1") + "-v1"
    raise UsageError(f"unknown --env-id {env_id!r}; valid: ManiSkill {sorted(MANISKILL_TASKS)} (or with -v1) and "
                     f"LIBERO {sorted(LIBERO_MAX_STEPS)}")


def check_env_args(args, device: torch.device | None = None):
    """The env options' user errors, found before anything is built (device None: this machine's default)."""
    resolve_env_id(args.env_id)
    if args.sim_backend not in ("auto", "physx_cuda", "physx_cpu"):
        raise UsageError(f"--sim-backend {args.sim_backend!r}: choose auto, physx_cuda or physx_cpu")
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    if args.sim_backend == "physx_cuda" and not cuda:
        raise UsageError("--sim-backend physx_cuda needs a CUDA GPU; none is visible (use physx_cpu or auto)")
    for name in ("num_eval_envs", "max_episode_steps", "env_workers"):  # getattr: not every script has each
        if (value := getattr(args, name, None)) is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least 1")


def to_torch_obs(obs, device) -> dict:
    """An env's obs (state array, ManiSkill's rgb dict or LiberoEnv's dict) -> {"state": [N, D] float, "images":
    [N, cams, H, W, 3] uint8 or None}; an unbatched obs without N."""
    if not isinstance(obs, dict):
        return {"state": torch.as_tensor(obs, dtype=torch.float32, device=device), "images": None}
    if "images" in obs:
        state, images = obs["state"], torch.as_tensor(obs["images"], device=device)
    else:
        state = obs["agent"]["qpos"]
        images = torch.stack([torch.as_tensor(c["rgb"], device=device) for c in obs["sensor_data"].values()], -4)
    return {"state": torch.as_tensor(state, dtype=torch.float32, device=device), "images": images}


class FreshGraspFlag(gym.Wrapper):
    """Reset observations read is_grasped = 0 (every episode starts with the gripper open): a CPU scene reports its
    last step's contacts until it steps again, so the same seed replayed differently after a held object."""

    def __init__(self, env):
        super().__init__(env)
        from mani_skill.utils.common import flatten_state_dict
        self.col = None  # is_grasped's column in the flat state observation [1, D] (image modes pass qpos alone)
        state = env.unwrapped.get_obs(unflattened=True) if env.unwrapped.obs_mode == "state" else {}
        if "is_grasped" in state.get("extra", {}):  # the one column that changes when is_grasped flips
            flat = flatten_state_dict(state, use_torch=True)
            state["extra"]["is_grasped"] = state["extra"]["is_grasped"].logical_not()
            self.col = int((flatten_state_dict(state, use_torch=True) != flat)[0].nonzero()[0, 0])

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        if self.col is not None:  # the rows reset: all, or the env_idx of ManiSkillVectorEnv's auto-reset
            obs = obs.clone()
            obs[(kwargs.get("options") or {}).get("env_idx", slice(None)), self.col] = 0
        return obs, info


def maniskill_env(env_id: str, kw: dict, ignore_terminations: bool):
    """One CPU ManiSkill env with numpy in and out. enhanced_determinism: auto-resets draw from the env's own seeded
    RNG, so the episodes are the same in any process."""
    import mani_skill.envs  # noqa: F401  (registers the tasks)
    from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper
    env = gym.make(env_id, num_envs=1, sim_backend="physx_cpu", enhanced_determinism=True, **kw)
    return CPUGymWrapper(FreshGraspFlag(env), ignore_terminations=ignore_terminations, record_metrics=True)


def quat_xyzw_to_axis_angle(q: np.ndarray) -> np.ndarray:
    """Unit quaternion (x, y, z, w) -> axis * angle as robosuite computes it (LIBERO's ee_states); atan2 stays
    accurate near zero rotation, where angle / |v| -> 2 / w."""
    v, w = q[:3], float(np.clip(q[3], -1.0, 1.0))
    n = float(np.linalg.norm(v))
    if n < 1e-8:
        return v * (2.0 / w) if abs(w) > 1e-8 else np.zeros(3)
    return v * (2.0 * np.arctan2(n, w) / n)


class LiberoEnv(gym.Env):
    """One LIBERO task, stepped like a ManiSkill CPU env. reset(seed) starts at init state `seed`; each later reset
    takes the init state num_envs further, then settles 10 no-op steps (openpi's protocol). Reward 1 on success,
    which ends the episode unless ignore_terminations; else it runs to max_steps."""

    def __init__(self, suite, task_id, num_envs, max_steps, ignore_terminations, image_size=128):
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
        bench = benchmark.get_benchmark_dict()[suite]()
        task, self.init_states = bench.get_task(task_id), bench.get_task_init_states(task_id)
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        # hard_reset=False: set_init_state overwrites the whole state, and a soft reset takes 0.3 s, not 6 s
        self.env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=image_size, camera_widths=image_size,
                                      hard_reset=False)
        self.env.seed(7)
        self.prompt, self.num_envs, self.max_steps = task.language, num_envs, max_steps
        self.ignore, self.index, self.success = ignore_terminations, 0, False
        self.name = f"LIBERO {suite} task {task_id} ({task.language!r})"
        box = gym.spaces.Box
        self.observation_space = gym.spaces.Dict({"state": box(-np.inf, np.inf, (8,), np.float32),
                                                  "images": box(0, 255, (2, image_size, image_size, 3), np.uint8)})
        self.action_space = box(-1.0, 1.0, (7,), np.float32)

    def obs_of(self, raw: dict) -> dict:
        """-> images [2, H, W, 3] uint8 (agentview, wrist; turned upright), state [8] (eef pos, axis-angle, gripper)."""
        images = np.stack([raw["agentview_image"][::-1, ::-1], raw["robot0_eye_in_hand_image"][::-1, ::-1]])
        state = np.concatenate([raw["robot0_eef_pos"], quat_xyzw_to_axis_angle(raw["robot0_eef_quat"]),
                                raw["robot0_gripper_qpos"]])
        return {"state": state.astype(np.float32), "images": images}

    def reset(self, seed=None, options=None):
        self.index = self.index if seed is None else seed
        self.where = f"{self.name} at init state {self.index % len(self.init_states)}"  # what an error names
        self.sim("reset")
        raw = self.sim("set_init_state", self.init_states[self.index % len(self.init_states)])
        for _ in range(10):  # let objects settle
            raw, *_ = self.sim("step", [0.0] * 6 + [-1.0])
        self.index += self.num_envs
        self.episode = {"success_once": False, "success_at_end": False, "return": 0.0, "episode_len": 0}
        return self.obs_of(raw), {"success": self.success}  # SAME_STEP auto-reset: this info replaces the step's

    def step(self, action):
        raw, r, done, _ = self.sim("step", action.tolist())
        obs, self.success, ep = self.obs_of(raw), bool(done), self.episode  # LIBERO's done is its success check
        ep["success_once"], ep["success_at_end"] = ep["success_once"] or self.success, self.success
        ep["return"], ep["episode_len"], self.frame = ep["return"] + r, ep["episode_len"] + 1, obs["images"][0]
        term = self.success and not self.ignore
        trunc = ep["episode_len"] >= self.max_steps and not term
        return obs, r, term, trunc, {"success": self.success, **({"episode": dict(ep)} if term or trunc else {})}

    def sim(self, method: str, *args):  # self.env.<method>(*args), a failure named by the task and init state
        try:
            return getattr(self.env, method)(*args)
        except Exception as e:
            raise RuntimeError(f"{self.where}: LIBERO's {method} failed: {type(e).__name__}: {e}") from e

    def render(self):
        return self.frame  # the last step's agentview, before any reset

    def close(self):
        self.env.close()


def cpu_env_worker(pipe, thunks):
    """A worker process's SyncVectorEnv: runs each (method, kwargs) it receives and sends the result back."""
    import warnings
    warnings.filterwarnings("ignore", message="Failed to find system libvulkan")  # the main process shows it once
    torch.set_num_threads(1)
    with torch.inference_mode():  # see ManiSkillEnvs.cpu_sim
        env = gym.vector.SyncVectorEnv(thunks, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        try:
            for method, kwargs in iter(pipe.recv, None):  # each answer comes with what the envs run (LiberoEnv.where)
                pipe.send((getattr(env, method)(**kwargs), [getattr(e, "where", "") for e in env.envs]))
        except EOFError:  # the parent left without close(): nobody is left to answer
            pass
        env.close()


def concat_envs(parts: list, sizes: list[int]):
    """The workers' outputs (arrays or nested tuples / dicts of them) joined along the env axis; keys a worker lacks
    (none of its envs set them, e.g. final_obs) filled as SyncVectorEnv fills them: None, zeros, False."""
    if isinstance(parts[0], tuple):
        return tuple(concat_envs(list(p), sizes) for p in zip(*parts))
    ref = next(p for p in parts if p is not None)
    if isinstance(ref, dict):
        keys = dict.fromkeys(k for p in parts if p is not None for k in p)
        return {k: concat_envs([(p or {}).get(k) for p in parts], sizes) for k in keys}
    ref = np.asarray(ref)
    empty = [np.full(n, None, object) if ref.dtype == object else np.zeros((n, *ref.shape[1:]), ref.dtype)
             for n in sizes]
    return np.concatenate([e if p is None else np.asarray(p) for p, e in zip(parts, empty)])


class ProcessVectorEnv:
    """CPU envs (one thunk each) split over `workers` processes, each a SyncVectorEnv, with SyncVectorEnv's interface
    and numbers. A ManiSkill CPU step is mostly Python: a process keeps one core busy; a second nearly doubles speed."""

    def __init__(self, thunks: list, workers: int):
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")  # forked env processes hang
        groups = [g.tolist() for g in np.array_split(np.array(thunks, dtype=object), workers)]
        self.num_envs, self.sizes = len(thunks), [len(g) for g in groups]
        self.replies = [(None, [""] * n) for n in self.sizes]  # per worker: its last answer, what its envs ran
        self.pipes, ends = zip(*[ctx.Pipe() for _ in groups])  # this process's ends, the workers' ends
        self.procs = [ctx.Process(target=cpu_env_worker, args=(end, g), daemon=True) for end, g in zip(ends, groups)]
        for proc, end in zip(self.procs, ends):
            proc.start()
            end.close()
        self.single_action_space = self.call("action_space")[0]

    def ask(self, method: str, kwargs: list[dict]) -> list:
        """Worker w's SyncVectorEnv.method(**kwargs[w]) for every w -> their results, in env order."""
        for pipe, kw in zip(self.pipes, kwargs):
            pipe.send((method, kw))
        try:
            for k, pipe in enumerate(self.pipes):
                self.replies[k] = pipe.recv()
        except EOFError:
            raise RuntimeError(f"CPU env worker {k + 1} of {len(self.pipes)} died (its traceback is above) running "
                               f"{'; '.join(w for w in self.replies[k][1] if w) or 'its envs'}; --env-workers 1 runs "
                               "the envs in this process") from None
        return [answer for answer, _ in self.replies]

    def reset(self, seed, options=None):  # an int seeds env i with seed + i, as SyncVectorEnv does
        seeds = np.array_split(seed if isinstance(seed, list) else np.arange(self.num_envs) + seed, len(self.pipes))
        return concat_envs(self.ask("reset", [dict(seed=list(map(int, s)), options=options) for s in seeds]),
                           self.sizes)

    def step(self, actions):
        return concat_envs(self.ask("step", [dict(actions=a) for a in np.array_split(actions, len(self.pipes))]),
                           self.sizes)

    def call(self, name):  # -> one result per env: a method's return value or an attribute
        return tuple(r for part in self.ask("call", [dict(name=name)] * len(self.pipes)) for r in part)

    def close(self):
        for pipe, proc in zip(self.pipes, self.procs):
            pipe.send(None)
            proc.join(timeout=30)


class ManiSkillEnvs:
    """N ManiSkill envs as one batch of torch tensors: one simulation on `batched` (physx_cuda; physx_cpu: one env),
    else CPU envs in `workers` processes. Both auto-reset in the same step, returning the last obs and metrics."""

    def __init__(self, env_id, num_envs, obs_mode, control_mode, max_steps, ignore_terminations, device,
                 reward_mode="normalized_dense", workers=1, batched=None):
        kw = dict(obs_mode=obs_mode, control_mode=control_mode, max_episode_steps=max_steps,
                  reward_mode=reward_mode, render_mode="rgb_array")
        if not torch.cuda.is_available():  # else each env warns that sapien_cuda falls back to the CPU renderer
            kw["render_backend"] = "cpu"
        self.prompt, self.batched = MANISKILL_TASKS[env_id.removesuffix("-v1")], batched is not None
        if batched is None:
            self.start_cpu([partial(maniskill_env, env_id, kw, ignore_terminations)] * num_envs, workers, device)
            return
        import mani_skill.envs  # noqa: F401  (registers the tasks)
        import sapien
        from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv
        try:  # SAPIEN downloads its PhysX GPU library from GitHub on first use: fails offline
            if batched == "physx_cuda":
                sapien.physx.enable_gpu()
        except Exception as e:
            raise RuntimeError(f"ManiSkill's GPU simulator could not start ({type(e).__name__}: {e}); offline, put "
                               "libPhysXGpu_64.so in ~/.sapien/physx/<version>/ or pass --sim-backend physx_cpu") from e
        if batched == "physx_cuda" and device.index is not None:  # this rank's GPU under torchrun
            kw.update(sim_backend=f"physx_cuda:{device.index}", render_backend=f"sapien_cuda:{device.index}")
        env = FreshGraspFlag(gym.make(env_id, num_envs=num_envs, **{"sim_backend": batched, **kw}))
        self.env = ManiSkillVectorEnv(env, ignore_terminations=ignore_terminations, record_metrics=True)  # auto-resets
        self.device, self.num_envs, self.action_dim = device, num_envs, self.env.single_action_space.shape[0]

    def start_cpu(self, thunks: list, workers: int, device):
        self.device, self.num_envs, workers = device, len(thunks), min(workers, len(thunks))
        with self.cpu_sim():
            self.env = ProcessVectorEnv(thunks, workers) if workers > 1 else \
                gym.vector.SyncVectorEnv(thunks, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        self.action_dim = self.env.single_action_space.shape[0]

    def cpu_sim(self):
        """CPU envs step in inference mode: about 1.2x as fast, the same numbers (only numpy leaves them)."""
        return torch.inference_mode(not self.batched)

    def reset(self, seed: int | list[int], rebuild: bool = False):
        """An int seeds env i with seed + i, a list each env. rebuild: new CPU scenes, as new envs have (0.3 s an env;
        a batched simulation's hundreds of sub-scenes are kept)."""
        with self.cpu_sim():
            obs, _ = self.env.reset(seed=seed, options={"reconfigure": True} if rebuild and not self.batched else {})
        return to_torch_obs(obs, self.device)

    def step(self, action: torch.Tensor):
        """action [N, A] -> obs, reward [N], terminated [N], truncated [N], info: "success" [N], "final_obs" (obs with
        ended envs' rows replaced by their episode's last obs), "episode" (metrics [N] of the episodes that ended:
        success_once, success_at_end, return, episode_len; {} when none did)."""
        with self.cpu_sim():
            obs, rew, term, trunc, info = self.env.step(action if self.batched else action.cpu().numpy())
        t = lambda x, dt=torch.float32: torch.as_tensor(x, dtype=dt, device=self.device)
        obs, rew, term, trunc = to_torch_obs(obs, self.device), t(rew), t(term, torch.bool), t(trunc, torch.bool)
        out = {"success": t(info["success"], torch.bool), "final_obs": obs, "episode": {}}
        if (term | trunc).any():  # a batched env returns the last obs as one batch, CPU envs each ended env's apart
            fin = out["final_obs"] = {k: None if v is None else v.clone() for k, v in obs.items()}
            last = to_torch_obs(info["final_observation"], self.device) if self.batched else None
            for i in (term | trunc).nonzero()[:, 0].tolist():
                row = {k: v if v is None else v[i] for k, v in last.items()} if self.batched else \
                    to_torch_obs(info["final_obs"][i], self.device)
                for k, v in fin.items():
                    if v is not None:
                        v[i] = row[k]
            out["episode"] = {k: t(v) for k, v in info["final_info"]["episode"].items() if not k.startswith("_")}
        return obs, rew, term, trunc, out

    def render(self):
        """First env's frame [H, W, 3] uint8 (for videos)."""
        with self.cpu_sim():
            frame = self.env.render()[0] if self.batched else self.env.call("render")[0]
        return np.asarray(frame.cpu() if torch.is_tensor(frame) else frame)

    def close(self):
        with self.cpu_sim():
            self.env.close()


class LiberoEnvs(ManiSkillEnvs):
    """N LIBERO envs of one suite (LiberoEnv), task_ids in contiguous blocks, in `workers` processes."""

    def __init__(self, suite, task_ids, num_envs, max_steps, ignore_terminations, device, workers=1):
        from libero.libero import benchmark
        n = benchmark.get_benchmark_dict()[suite]().n_tasks
        if bad := [i for i in task_ids if not 0 <= i < n]:
            raise UsageError(f"--task-ids {bad} out of range: {suite} has tasks 0..{n - 1}")
        ids = [task_ids[i * len(task_ids) // num_envs] for i in range(num_envs)]
        self.batched = False
        self.start_cpu([partial(LiberoEnv, suite, i, num_envs, max_steps, ignore_terminations) for i in ids], workers,
                       device)
        self.prompts = list(self.env.call("prompt"))
        self.prompt = self.prompts[0]


def make_envs(args, num_envs: int, ignore_terminations: bool, device):
    """The envs of args.env_id: LiberoEnvs, or ManiSkillEnvs on the simulator --sim-backend picks."""
    check_env_args(args, device)
    kind, env_id = resolve_env_id(args.env_id)
    world = dist.get_world_size() if dist.is_initialized() else 1  # torchrun ranks share the cores
    workers = args.env_workers or max(1, (os.cpu_count() or 1) // world)
    if kind == "libero":
        return LiberoEnvs(env_id, args.task_ids, num_envs, LIBERO_MAX_STEPS[env_id], ignore_terminations, device,
                          workers)
    gpu_sim = args.sim_backend == "physx_cuda" or (args.sim_backend == "auto" and device.type == "cuda")
    reward = getattr(args, "reward_mode", "normalized_dense")  # sft_baseline has no reward option
    return ManiSkillEnvs(env_id, num_envs, args.obs_mode, args.control_mode, args.max_episode_steps,
                         ignore_terminations, device, reward, workers, "physx_cuda" if gpu_sim else None)

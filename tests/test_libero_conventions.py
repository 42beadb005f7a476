"""The LIBERO conventions of openpi's LIBERO example (examples/libero/main.py), which public pi0 / pi0.5 LIBERO
checkpoints were trained on, recomputed from the raw robosuite observation independently of the scripts' helpers and
compared with what the scripts' LiberoEnvs return; and the errors that name a failed env's task and init state."""

import math
import os
from dataclasses import replace
from functools import partial

import gymnasium as gym
import numpy as np
import pytest
import torch

import environments
import flow_sde_ppo as script

SUITE = "libero_spatial"
OPENPI_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520}
SETTLE = [0.0] * 6 + [-1.0]  # openpi's no-op: no motion, gripper open


def openpi_axis_angle(q):
    """openpi's _quat2axisangle (robosuite's formula): (x, y, z, w) -> 2 acos(w) / sqrt(1 - w^2) * (x, y, z)."""
    w = min(max(float(q[3]), -1.0), 1.0)
    den = math.sqrt(1.0 - w * w)
    return np.zeros(3) if math.isclose(den, 0.0) else np.asarray(q[:3], np.float64) * 2.0 * math.acos(w) / den


class Recorder:
    """Wraps the robosuite env inside a LiberoEnv: keeps every raw observation and action it was given."""

    def __init__(self, env):
        self.env, self.calls = env, []

    def __getattr__(self, name):
        attr = getattr(self.env, name)
        if name not in ("step", "set_init_state", "reset"):
            return attr

        def record(*args):
            out = attr(*args)
            self.calls.append((name, args, out[0] if name == "step" else out))
            return out
        return record


@pytest.fixture(scope="module")
def envs():
    """One libero_spatial task-0 env built as the scripts build it (make_envs), in this process, its robosuite env
    recorded (building a LIBERO env takes seconds: one for the whole module)."""
    args = replace(script.Args(), env_id=SUITE, env_workers=1)
    envs = script.make_envs(args, 1, ignore_terminations=False, device=torch.device("cpu"))
    lib = envs.env.envs[0]  # the LiberoEnv inside the in-process SyncVectorEnv
    lib.env = Recorder(lib.env)
    yield envs, lib
    envs.close()


def raw_after(lib, start):
    """The last raw robosuite observation recorded since call number `start`."""
    return [out for _, _, out in lib.env.calls[start:]][-1]


def test_reset_loads_the_init_state_then_settles_ten_noop_steps(envs):
    envs, lib = envs
    from libero.libero import benchmark
    init_states = benchmark.get_benchmark_dict()[SUITE]().get_task_init_states(0)
    start = len(lib.env.calls)
    envs.reset(seed=3)
    calls = lib.env.calls[start:]
    assert [c[0] for c in calls] == ["reset", "set_init_state"] + ["step"] * 10
    assert np.array_equal(calls[1][1][0], init_states[3])
    assert all(list(c[1][0]) == SETTLE for c in calls[2:])


def test_observation_is_openpis(envs):
    """Both cameras turned 180 degrees (openpi: img[::-1, ::-1]; here np.rot90 twice), 8-D state = eef position,
    the eef quaternion's axis-angle, the two finger joints; after a reset and after a step."""
    envs, lib = envs
    for i in range(2):
        start = len(lib.env.calls)
        obs = envs.reset(seed=0) if i == 0 else envs.step(torch.tensor([[0.3, -0.2, 0.1, 0.0, 0.0, 0.1, 1.0]]))[0]
        raw = raw_after(lib, start)
        assert obs["images"].shape == (1, 2, 128, 128, 3) and obs["images"].dtype == torch.uint8
        assert np.array_equal(obs["images"][0, 0].numpy(), np.rot90(raw["agentview_image"], 2))
        assert np.array_equal(obs["images"][0, 1].numpy(), np.rot90(raw["robot0_eye_in_hand_image"], 2))
        assert not np.array_equal(raw["agentview_image"], np.rot90(raw["agentview_image"], 2))  # a real turn
        expected = np.concatenate([raw["robot0_eef_pos"], openpi_axis_angle(raw["robot0_eef_quat"]),
                                   raw["robot0_gripper_qpos"]])
        assert obs["state"].shape == (1, 8) and obs["state"].dtype == torch.float32
        np.testing.assert_allclose(obs["state"][0].numpy(), expected, rtol=0, atol=2e-6)
        assert abs(raw["robot0_eef_quat"][3]) < 0.99  # the gripper points down: far from the zero rotation


def test_axis_angle_near_zero_rotation():
    """openpi returns zeros at w = 1; the scripts' atan2 form agrees there and stays accurate close to it."""
    assert np.array_equal(environments.quat_xyzw_to_axis_angle(np.array([0.0, 0.0, 0.0, 1.0])), np.zeros(3))
    for angle in (1e-3, 0.5, 2.0, 3.1):
        axis = np.array([0.6, -0.8, 0.0])
        q = np.concatenate([axis * math.sin(angle / 2), [math.cos(angle / 2)]])
        np.testing.assert_allclose(environments.quat_xyzw_to_axis_angle(q), axis * angle, atol=1e-9)
        np.testing.assert_allclose(openpi_axis_angle(q), axis * angle, atol=1e-6)


def test_action_space_and_gripper_sign(envs):
    """7-D actions (OSC pose delta + gripper), passed to robosuite as given; gripper -1 opens, +1 closes."""
    envs, lib = envs
    assert envs.action_dim == 7 and lib.action_space.shape == (7,) and lib.env.env.env.action_dim == 7
    envs.reset(seed=0)
    width = lambda: float(np.sum(np.abs(raw_after(lib, 0)["robot0_gripper_qpos"])))
    opened = width()
    action = torch.tensor([[0.1, 0.0, -0.1, 0.0, 0.0, 0.0, 1.0]])
    start = len(lib.env.calls)
    for _ in range(8):
        envs.step(action)
    assert np.allclose(lib.env.calls[start][1][0], action[0].tolist())  # unchanged on its way to robosuite
    closed = width()
    for _ in range(8):
        envs.step(torch.tensor([SETTLE]))
    assert closed < opened - 0.01 and width() > closed + 0.01


def test_prompt_is_the_task_language(envs):
    """openpi prompts with the benchmark task's `language` (not the BDDL file's instruction, which here differs:
    "pick the akita black bowl ...")."""
    envs, lib = envs
    from libero.libero import benchmark
    task = benchmark.get_benchmark_dict()[SUITE]().get_task(0)
    assert envs.prompt == task.language == envs.prompts[0]
    assert task.language.startswith("pick up the black bowl")


def test_step_limits_are_openpis(envs):
    """openpi's max_steps per suite; the env truncates at its suite's limit, built so by make_envs."""
    envs, lib = envs
    assert environments.LIBERO_MAX_STEPS == OPENPI_MAX_STEPS
    assert lib.max_steps == OPENPI_MAX_STEPS[SUITE]
    envs.reset(seed=0)
    lib.episode["episode_len"] = OPENPI_MAX_STEPS[SUITE] - 2  # skip ahead: 218 steps taken
    _, _, term, trunc, _ = envs.step(torch.zeros(1, 7))
    assert not trunc.any()
    _, _, term, trunc, info = envs.step(torch.zeros(1, 7))
    assert trunc.tolist() == [True] and not term.any() and info["episode"]["episode_len"].tolist() == [220]


def test_success_is_the_envs_own_check(envs, monkeypatch):
    """success, reward 1 and termination come from LIBERO's own _check_success, read after each step."""
    envs, lib = envs
    envs.reset(seed=0)
    _, r, term, _, info = envs.step(torch.zeros(1, 7))
    assert info["success"].tolist() == [lib.env.env.check_success()] == [False] and r.tolist() == [0.0]
    monkeypatch.setattr(lib.env.env.env, "_check_success", lambda: True)  # the robosuite task's own check
    _, r, term, _, info = envs.step(torch.zeros(1, 7))
    assert r.tolist() == [1.0] and term.tolist() == [True]  # ends the episode: ignore_terminations is off
    assert info["final_obs"] is not None and info["episode"]["success_once"].tolist() == [1.0]


def test_a_failed_env_names_its_task_and_init_state(envs, monkeypatch):
    envs, lib = envs
    envs.reset(seed=7)

    def broken(action):
        raise ValueError("mjWARN_BADQACC")

    monkeypatch.setattr(lib.env.env, "step", broken)
    with pytest.raises(RuntimeError, match=r"LIBERO libero_spatial task 0 \('pick up the black bowl.*'\) at init "
                                           r"state 7: LIBERO's step failed: ValueError: mjWARN_BADQACC"):
        envs.step(torch.zeros(1, 7))


class Dying(gym.Env):
    """A stand-in env that names what it runs (as LiberoEnv does); task 1's kill their process at their third step."""

    def __init__(self, name):
        self.name, self.steps, self.where = name, 0, ""
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, seed=None, options=None):
        self.where = f"{self.name} at init state {seed}"
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.steps += 1
        if self.steps == 3 and self.name == "task 1":
            os._exit(1)
        return np.zeros(1, np.float32), 0.0, False, False, {}



def test_a_dead_worker_names_what_its_envs_ran():
    env = environments.ProcessVectorEnv([partial(Dying, f"task {i // 2}") for i in range(4)], workers=2)
    env.reset(seed=10)
    env.step(np.zeros((4, 2), np.float32))
    env.step(np.zeros((4, 2), np.float32))
    with pytest.raises(RuntimeError, match=r"CPU env worker 2 of 2 died \(its traceback is above\) running task 1 at "
                                           r"init state 12; task 1 at init state 13; --env-workers 1"):
        env.step(np.zeros((4, 2), np.float32))
    for proc in env.procs:  # worker 1 still waits for a command
        proc.kill()

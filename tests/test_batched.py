"""ManiSkill's batched env path (one simulation wrapped in ManiSkillVectorEnv: what `--sim-backend physx_cuda` builds)
run on physx_cpu, which holds one env per simulation: every script's rollouts and evaluation consume its torch outputs,
auto-resets and final observations; and it returns what the CPU worker path returns."""

import importlib
import inspect
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import environments
import vla
from conftest import assert_same, small_rl_args, tiny_policy, write_sft_checkpoint

CTRL = "pd_ee_delta_pose"
CPU = torch.device("cpu")


class Joined:
    """n one-env ManiSkillEnvs as one batch (physx_cpu holds one env per simulation; GRPO's groups need >= 2): each
    member steps through the batched branch; an int seed gives member i seed + i, as the CPU path does."""

    def __init__(self, members):
        self.members, self.num_envs, self.action_dim = members, len(members), members[0].action_dim
        self.prompt, self.device = members[0].prompt, members[0].device

    def reset(self, seed, rebuild=False):
        seeds = seed if isinstance(seed, list) else [seed + i for i in range(self.num_envs)]
        return cat([m.reset(s, rebuild) for m, s in zip(self.members, seeds)])

    def step(self, action):
        return tuple(cat(list(p)) for p in zip(*[m.step(a[None]) for m, a in zip(self.members, action)]))

    def render(self):
        return self.members[0].render()

    def close(self):
        for m in self.members:
            m.close()


def cat(parts):
    """Members' outputs joined along the env axis; an episode dict a member lacks (its episode did not end) as zeros."""
    if isinstance(parts[0], dict):
        keys = list(dict.fromkeys(k for p in parts for k in p))
        ref = {k: next(p[k] for p in parts if k in p) for k in keys}
        return {k: cat([p.get(k, torch.zeros_like(ref[k]) if torch.is_tensor(ref[k]) else {}) for p in parts])
                for k in keys}
    return None if parts[0] is None else torch.cat(parts)


def force_batched(monkeypatch) -> list:
    """make_envs builds ManiSkill's batched branch on physx_cpu (n envs: n one-env simulations joined).
    -> the list of batched ManiSkillEnvs built, to check that they were used."""
    cls, built = environments.ManiSkillEnvs, []
    params = list(inspect.signature(cls).parameters)

    def make(*args, **kw):
        kw = {**dict(zip(params, args)), **kw, "batched": "physx_cpu"}
        members = [cls(**{**kw, "num_envs": 1}) for _ in range(kw["num_envs"])]
        built.extend(members)
        return members[0] if len(members) == 1 else Joined(members)

    monkeypatch.setattr(environments, "ManiSkillEnvs", make)
    return built


def assert_batched_ran(built):
    from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv
    assert built and all(e.batched and isinstance(e.env, ManiSkillVectorEnv) for e in built)
    assert all(e.env.base_env.backend.sim_backend == "physx_cpu" for e in built)


def train_rows(tmp_path):
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return rows, [r for r in rows if "loss" in r or "pg_loss" in r]


@pytest.mark.parametrize("name", ["flow_sde_ppo", "flow_noise_ppo"])
def test_batched_ppo(name, tmp_path, monkeypatch):
    """Two PPO iterations on one batched env: episodes of 6 steps end inside the second 4-action chunk, so the
    auto-reset, the final observation and the truncation bootstrap from it all run."""
    m = importlib.import_module(name)
    built = force_batched(monkeypatch)
    write_sft_checkpoint(tmp_path)
    args = small_rl_args(m, tmp_path, num_envs=1, num_eval_envs=1, num_steps=4, max_episode_steps=6,
                         eval_episodes=1)
    m.main(args)
    assert_batched_ran(built)
    rows, train = train_rows(tmp_path)
    assert [r["iteration"] for r in train] == [1, 2] and train[-1]["global_step"] == 2 * 4 * args.action_chunk
    assert all(math.isfinite(r["pg_loss"]) and math.isfinite(r["v_loss"]) for r in train)
    assert all(r["train/episode_len"] == 6 for r in train)  # 6-step episodes, ending inside chunks
    assert sum("eval/success_once" in r for r in rows) == 2
    assert vla.load_checkpoint(tmp_path / "run" / "checkpoint")[3]["iteration"] == 2


def test_batched_grpo(tmp_path, monkeypatch):
    """Two GRPO iterations: a group of 2 (GRPO refuses groups of 1, whose advantages are all 0), each member one
    batched physx_cpu simulation, reset to the group's seed; the evaluation runs on one batched env."""
    m = importlib.import_module("flow_grpo")
    built = force_batched(monkeypatch)
    write_sft_checkpoint(tmp_path)
    args = small_rl_args(m, tmp_path, num_envs=2, group_size=2, num_eval_envs=1, max_episode_steps=6,
                         eval_episodes=1)
    m.main(args)
    assert_batched_ran(built)
    rows, train = train_rows(tmp_path)
    assert [r["iteration"] for r in train] == [1, 2]
    assert sum("eval/success_once" in r for r in rows) == 2
    assert vla.load_checkpoint(tmp_path / "run" / "checkpoint")[3]["iteration"] == 2


def test_batched_sft_evaluation(tmp_path, monkeypatch):
    """sft_baseline's evaluation on one batched env: two rounds (the second reset without a rebuild), a video."""
    m = importlib.import_module("sft_baseline")
    built = force_batched(monkeypatch)
    policy, norm = tiny_policy()
    args = replace(m.Args(), eval_episodes=2, num_eval_envs=1, max_episode_steps=6, output_dir=str(tmp_path / "run"))
    envs = m.make_envs(args, 1, ignore_terminations=True, device=CPU)
    metrics = m.evaluate(policy, norm, envs, args, 2, video_path=tmp_path / "v.mp4")
    envs.close()
    assert_batched_ran(built)
    assert metrics["episode_len"] == 6 and 0.0 <= metrics["success_once"] <= 1.0
    assert (tmp_path / "v.mp4").stat().st_size > 1000


def scripted_actions(obs, t):
    """A scripted PickCube grasp (to the cube, close, lift) for 30 steps, then random actions -> action [1, 7]."""
    a = torch.zeros(1, 7)
    if t < 15:
        a[:, :3], a[:, 6] = (obs["state"][:, 36:39] / 0.05).clamp(-1, 1), 1.0
    elif t < 30:
        a[:, 2], a[:, 6] = (0.5 if t >= 20 else 0.0), -1.0
    else:
        a = torch.rand(1, 7, generator=torch.Generator().manual_seed(t)) * 2 - 1
    return a


def rollout(m, batched, obs_mode, max_steps, steps):
    """Reset (seed 5, scenes rebuilt), `steps` actions (state: the cube held at step 30; rgb: random actions), a plain
    reset of the same seed -> the envs' outputs."""
    envs = environments.ManiSkillEnvs("PickCube-v1", 1, obs_mode, CTRL, max_steps, True, CPU, batched=batched)
    out = [envs.reset(seed=5, rebuild=True)]
    obs = out[0]
    for t in range(steps):
        obs, *rest = envs.step(scripted_actions(obs, t) if obs_mode == "state" else
                               torch.rand(1, 7, generator=torch.Generator().manual_seed(t)) * 2 - 1)
        out.append((obs, *rest))
    out.append(envs.reset(seed=5))
    envs.close()
    return out


@pytest.mark.parametrize("obs_mode", ["state", "rgb"])
def test_batched_branch_returns_what_the_cpu_workers_return(obs_mode, monkeypatch):
    """For the same seeds and actions the batched branch and the CPU worker path return identical observations,
    rewards, terminated / truncated flags, success, final observations and episode metrics (dtypes included), across
    an auto-reset inside an action chunk. Two things make them agree: the reset observation's is_grasped is 0 on both
    (FreshGraspFlag: a CPU scene reports its last contacts until it steps; here the cube is held at the time limit),
    and the auto-reset's episode comes from the env's own seeded RNG: the CPU path builds its envs with
    enhanced_determinism, the batched branch without it (on a GPU ManiSkill would then seed every partial reset's
    draws with env 0's episode seed), so there its auto-resets draw from torch's global RNG and this test builds it
    with enhanced_determinism."""
    m = importlib.import_module("flow_sde_ppo")
    make = environments.gym.make
    max_steps, steps = (30, 44) if obs_mode == "state" else (6, 9)  # camera frames cost: a short rgb episode
    cpu = rollout(m, None, obs_mode, max_steps, steps)
    monkeypatch.setattr(environments.gym, "make", lambda *a, **kw: make(*a, **{"enhanced_determinism": True, **kw}))
    batched = rollout(m, "physx_cpu", obs_mode, max_steps, steps)
    # The one difference: an episode's return, the same rewards summed in another order. The CPU path's is numpy's
    # np.sum of the reward list (pairwise: eight partial sums from 8 steps on), the batched branch's a running float32
    # sum; from 8 steps on they can differ in the last bits (here, the 30-step episode's).
    out, rewards = cpu[1:-1], [r for _, r, *_ in cpu[1:max_steps + 1]]
    running = torch.zeros(1)
    for r in rewards:
        running += r
    (cpu_return, cpu_mean), (batched_return, batched_mean) = (
        [x[max_steps][4]["episode"].pop(k) for k in ("return", "reward")] for x in (cpu, batched))
    assert torch.equal(cpu_return, torch.as_tensor(np.sum([r.numpy() for r in rewards], 0)))
    assert torch.equal(batched_return, running)
    torch.testing.assert_close(cpu_return, batched_return, rtol=1e-6, atol=0)
    torch.testing.assert_close(cpu_mean, batched_mean, rtol=1e-6, atol=0)  # return / episode_len
    assert_same(cpu, batched)
    ends = [t for t, (_, _, te, tr, _) in enumerate(out) if (te | tr).any()]
    assert ends == [max_steps - 1] and out[max_steps - 1][4]["episode"]["episode_len"].tolist() == [max_steps]
    assert max_steps % 4 != 0  # the auto-reset falls inside a chunk of 4 actions
    fin, new = out[max_steps - 1][4]["final_obs"], out[max_steps - 1][0]
    assert not torch.equal(fin["state"], new["state"])  # the ended episode's last obs, the new one's first
    if obs_mode == "state":
        assert fin["state"][0, 18] == 1 and new["state"][0, 18] == 0  # held at the end; reset reads not grasped
        assert torch.equal(cpu[-1]["state"], cpu[0]["state"])  # a plain reset replays the seed
    else:
        assert new["images"].dtype == torch.uint8 and not torch.equal(fin["images"], new["images"])

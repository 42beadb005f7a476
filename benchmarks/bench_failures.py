"""Where a PickCube policy fails: the RL scripts' evaluation (flow_sde_ppo.evaluate itself: fixed seeds, deterministic
ODE, episodes run to the time limit) on one checkpoint, each failed episode sorted by what its observations show:
  never grasped        the cube was never held
  dropped              held at some step, not at the end
  held off the goal    held at the end, the cube farther than PickCube's goal threshold (2.5 cm) from the goal
  placed, not static   the cube within the threshold at the end, the robot still moving (success needs both)
For "held off the goal" it prints the cube-goal distance at the end and over the last 20 env steps (a policy that
has stopped short of the goal keeps it constant). PickCube state observations only.
--scripted runs a hand-written proportional controller instead of a policy on the same episodes (seeds, controller,
time limit): what the env and its end-effector controller allow without any learning.
--sampler train samples the actions as the checkpoint's RL run rolled out (Flow-Noise PPO: its chain with its learned
noise head; Flow-SDE PPO and GRPO: one SDE step per chunk at the run's noise level) instead of the deterministic ODE:
how often the policy that RL trained succeeds, against the ODE policy the evaluation scores.

Run: .venv/bin/python benchmarks/bench_failures.py --checkpoint runs/flow_sde_ppo/PickCube-v1_1/checkpoint
     [--action-chunk 4] [--denoise-steps K] [--episodes 100] [--sampler ode|train]
     .venv/bin/python benchmarks/bench_failures.py --scripted
"""

import argparse
import math
from dataclasses import replace

import numpy as np
import torch

import flow_noise_ppo
import flow_sde_ppo
import vla

# ManiSkill PickCube-v1 "state" observation: qpos 9, qvel 9, is_grasped 1, tcp_pose 7, goal_pos 3, obj_pose 7,
# tcp_to_obj_pos 3, obj_to_goal_pos 3
STATE_DIM, IS_GRASPED, GOAL_Z, TCP_TO_OBJ, OBJ_TO_GOAL, GOAL_THRESH = 42, 18, 28, slice(36, 39), slice(39, 42), 0.025
KINDS = ("never grasped", "dropped", "held off the goal", "placed, not static")


def classify(grasped: np.ndarray, dist: np.ndarray, success: np.ndarray) -> list[str]:
    """grasped, dist (cube-goal distance) [T, N] after each env step of N episodes, success [N] (success_once) ->
    one label each: "success" or one of KINDS."""
    labels = []
    for n in range(grasped.shape[1]):
        if success[n]:
            labels.append("success")
        elif not grasped[:, n].any():
            labels.append("never grasped")
        elif not grasped[-1, n]:
            labels.append("dropped")
        else:
            labels.append("held off the goal" if dist[-1, n] > GOAL_THRESH else "placed, not static")
    return labels


class Recorder:
    """The evaluation envs, recording what every env step shows; flow_sde_ppo.evaluate drives it as it drives the
    envs, so the episodes are exactly the scripts' evaluation's."""

    def __init__(self, envs):
        self.envs, self.num_envs, self.prompt, self.action_dim = envs, envs.num_envs, envs.prompt, envs.action_dim
        self.rounds = []  # per round: [(grasped, dist, height, goal_z, each [N]) per env step], success_once [N]

    def reset(self, seed, rebuild=False):
        self.rounds.append([[], None])
        return self.envs.reset(seed, rebuild=rebuild)

    def step(self, action):
        obs, rew, term, trunc, info = self.envs.step(action)
        s = info["final_obs"]["state"]  # the episode's own last observation at the time limit
        # height: the cube's height above the goal (obj_to_goal is goal - cube)
        self.rounds[-1][0].append((s[:, IS_GRASPED] > 0.5, s[:, OBJ_TO_GOAL].norm(dim=1), -s[:, OBJ_TO_GOAL][:, 2],
                                   s[:, GOAL_Z]))
        if info["episode"]:  # all envs reach the time limit together
            self.rounds[-1][1] = info["episode"]["success_once"].bool()
        return obs, rew, term, trunc, info

    def results(self, episodes: int):
        """-> grasped, dist (cube-goal distance), height (the cube's above the goal), goal_z [T, episodes],
        success_once [episodes] (the last round may be partly surplus)."""
        per_step = [torch.cat([torch.stack([x[i] for x in steps]) for steps, _ in self.rounds], 1)[:, :episodes].numpy()
                    for i in range(4)]
        success = torch.cat([succ for _, succ in self.rounds])[:episodes]
        return (*per_step, success.numpy())


def scripted_evaluate(envs: Recorder, args, num_episodes: int, gain: float = 0.05):
    """A proportional pick-and-place controller on the evaluation's episodes (round r: seeds eval_seed + r * N + i,
    scenes rebuilt at the first round, as flow_sde_ppo.evaluate runs them), recorded by envs. Per env: move the
    TCP at the cube with the gripper open, close it for 3 env steps once within 1 cm, then move the cube at the goal
    (pd_ee_delta_pose: action 1 = the controller's largest xyz step; gain: the distance that gets a full step)."""
    for r in range(math.ceil(num_episodes / envs.num_envs)):
        obs = envs.reset(seed=args.eval_seed + r * envs.num_envs, rebuild=r == 0)
        phase = torch.zeros(envs.num_envs, dtype=torch.long)  # [N]: 0 reach, 1..3 closing, 4 carry
        while True:
            s = obs["state"]
            reach, carry = phase == 0, phase >= 4
            a = torch.zeros(envs.num_envs, 7)  # [N, 7]: xyz and rotation deltas, gripper (1 open, -1 closed)
            a[:, :3] = torch.where(reach[:, None], s[:, TCP_TO_OBJ], torch.where(carry[:, None], s[:, OBJ_TO_GOAL], 0))
            a[:, :3] = (a[:, :3] / gain).clamp(-1, 1)
            a[:, 6] = torch.where(reach, 1.0, -1.0)
            phase = torch.where(reach, (s[:, TCP_TO_OBJ].norm(dim=1) < 0.01).long(), (phase + 1).clamp(max=4))
            obs, _, _, _, info = envs.step(a)
            if info["episode"]:  # all envs reach the time limit together
                break


def training_sampler(head, noise_level: float, action_chunk: int):
    """A stand-in for flow_sde_ppo.sample_actions that samples as an RL run rolls out: Flow-Noise PPO's chain with
    the learned noise head (head given), else Flow-SDE's hybrid chunk (one SDE step at noise_level) -> env actions."""

    def sample(policy, normalizer, obs, prompts, denoise_steps, action_dim, generator=None):
        prefix = policy.encode_prefix(normalizer.normalize("state", obs["state"]), prompts, obs["images"])
        args = replace(flow_sde_ppo.Args(), denoise_steps=denoise_steps, noise_level=noise_level,
                       action_chunk=action_chunk)
        if head is not None:
            x = flow_noise_ppo.sample_chain(policy, head, prefix, args, action_dim, generator)[0][:, -1]  # [N, H, D]
        else:
            x = flow_sde_ppo.sample_chunk(policy, prefix, args, action_dim, generator)[0]  # [N, H, D]
        return normalizer.unnormalize("actions", x[..., :action_dim])

    return sample


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--checkpoint", help="an SFT or RL checkpoint directory")
    who.add_argument("--scripted", action="store_true", help="the proportional controller instead of a policy")
    p.add_argument("--action-chunk", type=int, default=4, help="actions executed per decision")
    p.add_argument("--denoise-steps", type=int, default=None, help="default: the checkpoint's (an RL run's), else 4")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--num-envs", type=int, default=10, help="parallel envs (the scripts' --num-eval-envs)")
    p.add_argument("--max-episode-steps", type=int, default=80)
    p.add_argument("--eval-seed", type=int, default=10_000)
    p.add_argument("--sampler", choices=("ode", "train"), default="ode",
                   help="ode: the evaluation's; train: the checkpoint's RL rollout sampler")
    cli = p.parse_args(argv)
    torch.set_num_threads(1)
    if cli.scripted:
        args = replace(flow_sde_ppo.Args(), eval_seed=cli.eval_seed, max_episode_steps=cli.max_episode_steps,
                       obs_mode="state", control_mode="pd_ee_delta_pose", env_workers=1)
        cpu = torch.device("cpu")
        envs = Recorder(flow_sde_ppo.make_envs(args, cli.num_envs, ignore_terminations=True, device=cpu))
        scripted_evaluate(envs, args, cli.episodes)
        report(envs, cli.episodes, "scripted controller")
        return
    policy, normalizer, extra, meta = vla.load_checkpoint(cli.checkpoint)
    if normalizer is None:
        raise ValueError(f"{cli.checkpoint} has no norm_stats.json: the policy's normalisation is unknown")
    cli.denoise_steps = cli.denoise_steps or meta.get("denoise_steps", 4)
    args = replace(flow_sde_ppo.Args(), action_chunk=cli.action_chunk, denoise_steps=cli.denoise_steps,
                   eval_seed=cli.eval_seed, max_episode_steps=cli.max_episode_steps,
                   obs_mode=meta.get("obs_mode", "state"), control_mode=meta.get("control_mode", "pd_ee_delta_pose"),
                   env_workers=1)
    if args.obs_mode != "state" or policy.config.state_dim != STATE_DIM:
        raise ValueError(f"{cli.checkpoint} is not a PickCube state-observation policy ({args.obs_mode}, "
                         f"{policy.config.state_dim}-D state): this breakdown reads PickCube's state layout")
    who = f"{cli.checkpoint}: C = {cli.action_chunk}, K = {cli.denoise_steps}"
    ode = sampler = flow_sde_ppo.sample_actions
    if cli.sampler == "train":
        run = meta.get("args", {})
        head = flow_noise_ppo.checkpoint_noise_head(policy, extra, meta)  # Flow-Noise PPO's learned head
        if head is None and "noise_level" not in run:
            raise ValueError(f"{cli.checkpoint} is not an RL run's checkpoint (no noise head, no noise level): "
                             "--sampler train samples as the run rolled out; use --sampler ode")
        who += (", its training sampler (Flow-Noise chain, its noise head)" if head is not None else
                f", its training sampler (Flow-SDE, noise level {run['noise_level']:g})")
        sampler = training_sampler(head, run.get("noise_level", 0.0), cli.action_chunk)
    envs = Recorder(flow_sde_ppo.make_envs(args, cli.num_envs, ignore_terminations=True, device=torch.device("cpu")))
    try:  # evaluate looks sample_actions up in its module at each call: the stand-in replaces the ODE there
        flow_sde_ppo.sample_actions = sampler
        flow_sde_ppo.evaluate(policy, normalizer, envs, args, cli.episodes)
    finally:
        flow_sde_ppo.sample_actions = ode
    report(envs, cli.episodes, who)


def held_off(dist: np.ndarray, height: np.ndarray, goal_z: np.ndarray, labels: np.ndarray) -> dict:
    """The "held off the goal" episodes (dist, height [T, N] per env step, goal_z [T, N], labels [N] from classify):
    cube-goal distance at the end (median, min, max), its change over the last 20 env steps (median), how many end
    with the cube more than half the threshold above the goal, and the median goal height of these episodes and of
    the successes."""
    off, ok = labels == "held off the goal", labels == "success"
    end, last20 = dist[-1, off], dist[-20:, off]
    return dict(count=int(off.sum()), end=(np.median(end), end.min(), end.max()),
                moved=np.median(last20.max(0) - last20.min(0)), above=int((height[-1, off] > GOAL_THRESH / 2).sum()),
                goal_z=np.median(goal_z[0, off]), goal_z_success=np.median(goal_z[0, ok]) if ok.any() else float("nan"))


def report(envs: Recorder, episodes: int, who: str):
    """Closes the envs; prints the recorded episodes' success rate and their failures by kind."""
    envs.envs.close()
    grasped, dist, height, goal_z, success = envs.results(episodes)
    labels = np.array(classify(grasped, dist, success))
    print(f"{who}, {episodes} episodes, success_once {success.mean():.0%}")
    for kind in KINDS:
        print(f"  {kind:<20} {np.sum(labels == kind)}")
    if (labels == "held off the goal").any():
        h = held_off(dist, height, goal_z, labels)
        print(f"  held off the goal: cube-goal distance at the end {h['end'][0]:.3f} m median "
              f"({h['end'][1]:.3f}-{h['end'][2]:.3f}); its change over the last 20 env steps {h['moved']:.3f} m median")
        print(f"  held off the goal: the cube more than {GOAL_THRESH / 2 * 100:.3g} cm above the goal in {h['above']} "
              f"of {h['count']}; goal height {h['goal_z']:.3f} m median (successes': {h['goal_z_success']:.3f} m)")


if __name__ == "__main__":
    main()

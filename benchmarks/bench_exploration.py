"""How far the RL scripts' stochastic samplers move the executed actions: the exploration each noise setting buys.

On the states of the policy's own evaluation episodes (the first round of the scripts' fixed-seed evaluation, one
state per decision), every sampler draws `--samples` chunks per state; the spread is the standard deviation over
those draws of each executed env action (the first C of the chunk, in the env's units), averaged over states and
actions, per action dim. Samplers:
  ODE                  the deterministic evaluation sampler: only the initial noise varies
  Flow-SDE a           flow_sde_ppo.sample_chunk (one SDE step per sample) at noise level a (--noise-level)
  Flow-Noise sigma     flow_noise_ppo.sample_chain with a noise head whose std is sigma at every step and entry
                       (the head's bounds --sigma-min / --sigma-max set the range it learns in)
With pd_ee_delta_pose, action 1 in an xyz dim is a 10 cm step of the end-effector target. The ODE's spread is the
policy's own (its action distribution at that state); Flow-SDE keeps the ODE's marginals only for an exact velocity
field and a fine grid, so what it adds at K = 4 is the coarse grid's and the learned field's excess, growing with a;
Flow-Noise adds its std at every step. For a Flow-Noise PPO checkpoint (one with a noise head) it also prints what
its head learned: the std per denoising step and action dim along its own chains (geometric mean over the states and
the first C actions, in normalised units), and the spread of the executed actions with that head.

Run: .venv/bin/python benchmarks/bench_exploration.py [--checkpoint runs/sft/PickCube-v1/checkpoint]
     [--noise-levels 0.5 0.8 1.2 1.6] [--sigmas 0.08 0.16 0.32] [--samples 32] [--denoise-steps K]
"""

import argparse
import math
from dataclasses import replace

import torch

import flow_noise_ppo
import flow_sde_ppo
import vla


@torch.no_grad()
def visited_states(policy, normalizer, envs, args) -> tuple[dict, list[str]]:
    """The first evaluation round's observations at each decision point (deterministic ODE, fixed seeds) ->
    {"state": [S, D], "images": [S, ...] or None}, the S prompts."""
    gen = torch.Generator().manual_seed(args.eval_seed)
    prompts = getattr(envs, "prompts", [envs.prompt] * envs.num_envs)
    obs = envs.reset(seed=args.eval_seed, rebuild=True)
    states, images = [], []
    while True:
        states.append(obs["state"]), images.append(obs["images"])
        chunk = flow_sde_ppo.sample_actions(policy, normalizer, obs, prompts, args.denoise_steps, envs.action_dim, gen)
        for c in range(args.action_chunk):
            obs, _, _, _, info = envs.step(chunk[:, c])
            if info["episode"]:  # all envs reach the time limit together
                obs = {"state": torch.cat(states), "images": None if images[0] is None else torch.cat(images)}
                return obs, prompts * len(states)


@torch.no_grad()
def spreads(policy, normalizer, obs: dict, prompts: list[str], action_dim: int, args, noise_levels, sigmas,
            samples: int, seed: int = 0, head=None) -> dict[str, torch.Tensor]:
    """-> {sampler name: spread [A]}: the std over `samples` draws per state of the executed env actions, averaged
    over the S states of obs and the first C actions. Every sampler starts from the same initial noises; head: a
    learned noise head, measured too."""
    S, R, C = obs["state"].shape[0], samples, args.action_chunk
    rep = lambda x: None if x is None else x.repeat_interleave(R, 0)  # [S * R, ...]: R draws per state
    obs, prompts = {k: rep(v) for k, v in obs.items()}, [p for p in prompts for _ in range(R)]
    prefix = policy.encode_prefix(normalizer.normalize("state", obs["state"]), prompts, obs["images"])
    gen = lambda: torch.Generator(device=obs["state"].device).manual_seed(seed)
    spread = lambda actions: actions.reshape(S, R, -1, action_dim)[:, :, :C].std(1).mean((0, 1))  # [S * R, H, A] -> [A]
    env_units = lambda x: normalizer.unnormalize("actions", x[..., :action_dim])  # normalised chunk [S * R, H, D]
    out = {"ODE": spread(flow_sde_ppo.sample_actions(policy, normalizer, obs, prompts, args.denoise_steps, action_dim,
                                                      gen()))}
    for a in noise_levels:
        x, *_ = flow_sde_ppo.sample_chunk(policy, prefix, replace(args, noise_level=a), action_dim, gen())
        out[f"Flow-SDE a = {a:g}"] = spread(env_units(x))
    for s in sigmas:  # bounds s and s: the head's std is s whatever its weights
        fixed = flow_noise_ppo.NoiseHead(policy.spec["expert_hidden"], policy.spec["max_action_dim"], s, s)
        chain, _ = flow_noise_ppo.sample_chain(policy, fixed.to(obs["state"].device), prefix, args, action_dim, gen())
        out[f"Flow-Noise sigma = {s:g}"] = spread(env_units(chain[:, -1]))
    if head is not None:
        chain, _ = flow_noise_ppo.sample_chain(policy, head, prefix, args, action_dim, gen())
        out["Flow-Noise, its head"] = spread(env_units(chain[:, -1]))
    return out


@torch.no_grad()
def head_stds(policy, head, prefix, args, action_dim: int, seed: int = 0) -> tuple[torch.Tensor, float, float]:
    """A learned noise head's std along its own chains from the states of prefix -> the geometric mean over states
    and the first C actions [K, A] (row k: the step from t = 1 - k/K), the smallest and the largest entry."""
    K, C = args.denoise_steps, args.action_chunk
    gen = torch.Generator(device=prefix.mask.device).manual_seed(seed)
    chain, _ = flow_noise_ppo.sample_chain(policy, head, prefix, args, action_dim, gen)  # [N, K+1, H, D]
    step_std = lambda k: flow_noise_ppo.denoise_transition(policy, head, prefix, chain[:, k], k, K)[1]  # [N, H, D]
    used = torch.stack([step_std(k)[:, :C, :action_dim] for k in range(K)])  # the executed entries' std, [K, N, C, A]
    return used.log().mean((1, 2)).exp().cpu(), used.min().item(), used.max().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/sft/PickCube-v1/checkpoint", help="an SFT or RL checkpoint directory")
    p.add_argument("--env-id", default="PickCube")
    p.add_argument("--noise-levels", type=float, nargs="+", default=[0.5, 0.8, 1.2, 1.6])
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.08, 0.16, 0.32])
    p.add_argument("--samples", type=int, default=32, help="draws per state")
    p.add_argument("--action-chunk", type=int, default=4, help="actions executed per decision")
    p.add_argument("--denoise-steps", type=int, default=None, help="default: the checkpoint's (an RL run's), else 4")
    p.add_argument("--num-envs", type=int, default=10, help="evaluation episodes whose states are used")
    p.add_argument("--max-episode-steps", type=int, default=80)
    cli = p.parse_args(argv)
    if cli.samples < 2:
        raise ValueError(f"--samples {cli.samples}: a spread needs at least 2 draws per state")
    torch.set_num_threads(1)
    policy, normalizer, extra, meta = vla.load_checkpoint(cli.checkpoint)
    if normalizer is None:
        raise ValueError(f"{cli.checkpoint} has no norm_stats.json: the policy's normalisation is unknown")
    policy.eval()
    cli.denoise_steps = cli.denoise_steps or meta.get("denoise_steps", 4)
    head = flow_noise_ppo.checkpoint_noise_head(policy, extra, meta)  # a Flow-Noise PPO checkpoint's, else None
    _, env_id = flow_sde_ppo.resolve_env_id(cli.env_id)
    args = replace(flow_sde_ppo.Args(), env_id=env_id, action_chunk=cli.action_chunk, denoise_steps=cli.denoise_steps,
                   max_episode_steps=cli.max_episode_steps, obs_mode=meta.get("obs_mode", "state"),
                   control_mode=meta.get("control_mode", "pd_ee_delta_pose"), env_workers=1)
    envs = flow_sde_ppo.make_envs(args, cli.num_envs, ignore_terminations=True, device=torch.device("cpu"))
    if envs.action_dim != policy.config.action_dim:
        raise ValueError(f"{cli.checkpoint} acts in {policy.config.action_dim} dims, {env_id} in {envs.action_dim}")
    obs, prompts = visited_states(policy, normalizer, envs, args)
    envs.close()
    print(f"{cli.checkpoint} on {env_id}: {obs['state'].shape[0]} states of its evaluation episodes, "
          f"{cli.samples} draws each, C = {cli.action_chunk}, K = {cli.denoise_steps}")
    print("std of the executed env actions over draws, per action dim (mean over states and actions):")
    for name, s in spreads(policy, normalizer, obs, prompts, envs.action_dim, args, cli.noise_levels, cli.sigmas,
                           cli.samples, head=head).items():
        print(f"  {name:<24} " + " ".join(f"{v:.4f}" for v in s.tolist()))
    if head is not None:
        prefix = policy.encode_prefix(normalizer.normalize("state", obs["state"]), prompts, obs["images"])
        stds, lo, hi = head_stds(policy, head, prefix, args, envs.action_dim)
        print(f"its noise head (bounds {math.exp(head.log_min):.3g}-{math.exp(head.log_max):.3g}): "
              f"std per action dim, geometric mean over states and actions (entries {lo:.3f}-{hi:.3f}):")
        for k, row in enumerate(stds.tolist()):
            print(f"  step {k} (t = {1 - k / cli.denoise_steps:g})".ljust(27) + " ".join(f"{v:.4f}" for v in row))


if __name__ == "__main__":
    main()

"""flow_sde_ppo.py: the SDE step's density and marginals, ratio 1, gradients, the loss against hand formulas, GAE,
smoke run, bad input."""

import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import tyro

import flow_sde_ppo as sde
import vla
from conftest import (backward_grads, load_benchmark, main_checking_threads, small_rl_args, tiny_policy,
                      write_sft_checkpoint)

ROOT = Path(__file__).resolve().parents[1]


def test_sde_logp_equals_torch_normal():
    torch.manual_seed(0)
    N, H, D, C, A, K = 6, 8, 8, 5, 7, 4
    x, v, x_next = torch.randn(N, H, D), torch.randn(N, H, D), torch.randn(N, H, D)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 1.0, 0.5])
    mean, std = sde.sde_mean_std(x, v, t, K, 0.5)
    ours = sde.gaussian_logp(x_next, mean, std, C, A)
    ref = torch.distributions.Normal(mean[:, :C, :A], std.expand(N, C, A)).log_prob(x_next[:, :C, :A])
    torch.testing.assert_close(ours, ref)  # float32: relative 1.3e-6
    # The formulas of METHOD.md, written out: s_t = a sqrt(t/(1-t)), s_1 = a sqrt(K), std = s_t sqrt(1/K).
    s = 0.5 * torch.sqrt(torch.where(t < 1, t / (1 - t), torch.full_like(t, float(K))))
    torch.testing.assert_close(std.flatten(), s / 2)
    i = 2  # t = 0.5
    expected = x[i] - 0.25 * (v[i] + s[i] ** 2 / (2 * 0.5) * (x[i] + 0.5 * v[i]))
    torch.testing.assert_close(mean[i], expected)


# Analytic target: actions a ~ N(M, S^2) per entry. For x_t = t eps + (1 - t) a the exact velocity is
# E[eps - a | x_t = x], linear in x, so the ODE, the all-SDE chain and the hybrid can be compared in closed form.
M, S = 0.7, 0.4


def analytic_velocity(x, t):
    t = t[:, None, None].to(x.dtype)
    var, mu = t**2 + (1 - t) ** 2 * S**2, (1 - t) * M
    return t / var * (x - mu) - (M + (1 - t) * S**2 / var * (x - mu))


class AnalyticPolicy:
    spec = {"chunk_size": 2, "max_action_dim": 2}

    def velocity(self, prefix, x, t):
        return analytic_velocity(x, torch.as_tensor(t).expand(x.shape[0])), None


@pytest.mark.parametrize("a", [0.5, 0.8, 1.2])  # the paper's default and best, ours
def test_sde_keeps_ode_marginals_on_gaussian_target(a):
    torch.manual_seed(0)
    N, K = 40_000, 100
    x_ode = torch.randn(N, 2, 2, dtype=torch.float64)
    x_sde = x_ode.clone()
    for k in range(K):
        t = torch.full((N,), 1 - k / K, dtype=torch.float64)
        x_ode = x_ode - analytic_velocity(x_ode, t) / K
        mean, std = sde.sde_mean_std(x_sde, analytic_velocity(x_sde, t), t, K, a)
        x_sde = mean + std * torch.randn_like(x_sde)
    args = SimpleNamespace(denoise_steps=K, noise_level=a, action_chunk=2)
    x_hyb, *_ = sde.sample_chunk(AnalyticPolicy(), SimpleNamespace(mask=torch.ones(N, 1)), args, 2)
    # With 100 steps Euler's bias is ~3% of the variance; the sampling error of each estimate is < 0.5%.
    # A wrong sign or factor in the SDE drift moves the all-SDE variance by far more than 5%.
    for x in (x_ode, x_sde, x_hyb.double()):
        assert abs(x.mean().item() - M) < 0.01
        assert abs(x.var().item() / S**2 - 1) < 0.05, x.var().item()
    assert abs(x_sde.var().item() / x_ode.var().item() - 1) < 0.04
    assert abs(x_hyb.var().item() / x_ode.var().item() - 1) < 0.02


@pytest.mark.parametrize("ratio_level", ["chunk", "token"])
def test_ratio_one_and_gradients_reach_only_trainable(ratio_level):
    policy, norm = tiny_policy()
    policy.freeze_vlm()
    args = replace(sde.Args(), ratio_level=ratio_level, action_chunk=5)
    critic = sde.Critic(sde.critic_feature_dim(policy, args))
    N = 12
    state = torch.randn(N, 42)
    prompts = ["pick up the cube"] * N
    with torch.no_grad():
        prefix = policy.encode_prefix(norm.normalize("state", state), prompts)
        value = critic(sde.critic_features(policy, prefix, args))
        chunk, xb, xa, k_star, logp = sde.sample_chunk(policy, prefix, args, 7)
    assert set(k_star.tolist()) <= {0, 1, 2, 3} and len(set(k_star.tolist())) > 1
    # Recomputed on a shuffled minibatch of different size: still the rollout's numbers.
    idx = torch.randperm(N)[:8]
    with torch.no_grad():
        pre2 = policy.encode_prefix(norm.normalize("state", state[idx]), prompts[:8])
        new = sde.step_logp(policy, pre2, xb[idx], xa[idx], k_star[idx], args, 7)
    ratio = (new - logp[idx]).sum((1, 2)).exp()
    assert (ratio - 1).abs().max() < 1e-5
    # The PPO loss: finite non-zero gradients on the expert, projections and critic; none on the VLM.
    adv, ret = torch.randn(N), value + torch.randn(N)

    def loss(**kw):
        return sde.ppo_loss(policy, critic, norm, args, 7, state, None, prompts, xb, xa, k_star, logp, adv, ret, value,
                            **kw)
    # the rollout's stored prefix (no VLM pass in the update) gives the loss and gradients of a recomputed one
    stored_loss, _, stored = backward_grads(lambda: loss(prefix=prefix), policy, critic)
    recomputed_loss, stats, grads = backward_grads(loss, policy, critic)
    torch.testing.assert_close(recomputed_loss, stored_loss)
    torch.testing.assert_close(grads, stored)
    assert abs(stats["ratio_mean"] - 1) < 1e-5 and stats["clipfrac"] == 0
    args_es = replace(args, critic_input="expert_state")  # the state-augmented critic sees [expert tokens, state]
    with torch.no_grad():
        feats = sde.critic_features(policy, prefix, args_es)
    assert feats.shape == (N, policy.spec["expert_hidden"] + policy.spec["max_state_dim"])
    torch.testing.assert_close(feats[:, policy.spec["expert_hidden"]:][:, :42], norm.normalize("state", state))
    assert all(p.grad is None for p in policy.vlm.parameters())
    for name, p in list(policy.named_parameters()) + list(critic.named_parameters()):
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert policy.pi0.action_out_proj.weight.grad.abs().sum() > 0
    assert policy.pi0.model.dit.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert critic.net[0].weight.grad.abs().sum() > 0


def test_gae_matches_reference_loop_with_truncation():
    torch.manual_seed(0)
    T, N, gamma, lam = 7, 3, 0.9, 0.8
    rewards, values = torch.rand(T, N), torch.rand(T, N)
    dones = torch.zeros(T, N)
    final_values = torch.zeros(T, N)
    dones[2, 0] = 1  # env 0: terminated in chunk 2
    dones[4, 1], final_values[4, 1] = 1, 0.37  # env 1: cut by the time limit in chunk 4, V(last obs) = 0.37
    dones[1, 2] = dones[5, 2] = 1  # env 2: terminated twice
    next_value = torch.rand(N)
    adv, ret = sde.compute_gae(rewards, values, dones, final_values, next_value, gamma, lam)

    # Reference: per env, per episode, A_t = sum_l (gamma lam)^l delta_{t+l}, with the bootstrap value at the end of
    # each episode segment: V(next obs) inside, V(final obs) on truncation, 0 on termination.
    ref = torch.zeros(T, N)
    for n in range(N):
        for t in range(T):
            total, discount = 0.0, 1.0
            for u in range(t, T):
                if dones[u, n]:
                    bootstrap = final_values[u, n]
                else:
                    bootstrap = next_value[n] if u == T - 1 else values[u + 1, n]
                total += discount * (rewards[u, n] + gamma * bootstrap - values[u, n])
                if dones[u, n]:
                    break
                discount *= gamma * lam
            ref[t, n] = total
    torch.testing.assert_close(adv, ref)
    torch.testing.assert_close(ret, ref + values)


def test_smoke_two_iterations_and_resume(tmp_path, capsys, monkeypatch):
    write_sft_checkpoint(tmp_path)
    args = small_rl_args(sde, tmp_path)
    assert args.anneal_lr  # the default
    main_checking_threads(sde, args, monkeypatch, "sample_chunk", "ppo_loss")  # the update at --update-threads
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "pg_loss" in r]
    assert [r["iteration"] for r in train] == [1, 2] and train[-1]["global_step"] == 2 * 2 * 2 * args.action_chunk
    assert all(math.isfinite(r["pg_loss"]) and math.isfinite(r["v_loss"]) for r in train)
    assert sum("eval/success_once" in r for r in rows) == 2  # before RL and after the last iteration
    policy, norm, extra, meta = vla.load_checkpoint(tmp_path / "run" / "checkpoint")
    assert meta["iteration"] == 2 and any(k.startswith("critic.") for k in extra)
    capsys.readouterr()
    # the resumed iteration stops after one epoch: any approximate KL exceeds a negative --target-kl
    sde.main(replace(args, total_iterations=3, resume=True, target_kl=-1.0, prefix_store_gb=1e-6))
    # a changed hyperparameter is reported; more iterations (the usual reason to resume) and memory knobs are not
    assert f"--resume with changed options: --target-kl {args.target_kl} -> -1.0\n" in capsys.readouterr().out
    meta = vla.load_checkpoint(tmp_path / "run" / "checkpoint")[3]
    assert meta["iteration"] == 3 and meta["global_step"] == 3 * 2 * 2 * args.action_chunk
    # resuming with another chunk length would mix two decision lengths in one run, another critic input would
    # not fit the critic
    with pytest.raises(ValueError, match="the run has --action-chunk 4, not 2; the run has --critic-input "
                                         "expert_state, not expert: pass the run's values again"):
        sde.main(replace(args, total_iterations=4, resume=True, action_chunk=2, critic_input="expert"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "pg_loss" in r] == [1, 2, 3]
    # critic warm-up, then the actor's lr falls linearly towards 0 at the end of the (resumed, longer) run
    assert [r["lr"] for r in rows if "pg_loss" in r] == pytest.approx([0.0, args.lr / 2, args.lr / 3])
    assert [r["epochs"] for r in rows if "pg_loss" in r] == [args.update_epochs] * 2 + [1] and args.update_epochs > 1
    # the updates reused the rollout's prefixes; the resumed one, with no room for them, recomputed them
    assert [r["prefix_stored"] for r in rows if "pg_loss" in r] == [1.0, 1.0, 0.0]


def test_bad_inputs(tmp_path):
    with pytest.raises(sde.UsageError, match="no SFT checkpoint at .*nope.*sft_baseline.py"):
        sde.main(replace(small_rl_args(sde, tmp_path), checkpoint=str(tmp_path / "nope")))
    write_sft_checkpoint(tmp_path, action_dim=8)
    with pytest.raises(ValueError, match="outputs 8-D actions, but PickCube-v1 with state obs and pd_ee_delta_pose "
                                         "gives 42-D states and takes 7-D actions: train one with"):
        sde.main(small_rl_args(sde, tmp_path))
    write_sft_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="the batch of 4 decisions .* does not split into 3"):
        sde.main(replace(small_rl_args(sde, tmp_path), num_minibatches=3))
    with pytest.raises(ValueError, match="more minibatches than the 4 decisions per iteration .*; use at most 4"):
        sde.main(replace(small_rl_args(sde, tmp_path), num_minibatches=8))
    with pytest.raises(ValueError, match="unknown --env-id"):
        sde.main(replace(small_rl_args(sde, tmp_path), env_id="PickSphere"))
    with pytest.raises(ValueError, match="--micro-batch-size 0: must be at least 1"):
        sde.main(replace(small_rl_args(sde, tmp_path), micro_batch_size=0))
    with pytest.raises(ValueError, match="--update-threads 0: must be at least 1"):
        sde.main(replace(small_rl_args(sde, tmp_path), update_threads=0))
    pi05 = vla.build("tiny", action_dim=7, state_dim=42, variant="pi05")
    prefix = pi05.encode_prefix(torch.zeros(2, 42), ["pick"] * 2)
    with pytest.raises(ValueError, match="expert_state needs pi0's state token"):
        sde.critic_features(pi05, prefix, replace(sde.Args(), critic_input="expert_state"))


def write_run(tmp_path, iteration: int, **meta):
    """A run directory tmp_path/run whose checkpoint (the tiny SFT policy) says it stopped at `iteration`."""
    write_sft_checkpoint(tmp_path)
    policy, norm, _, _ = vla.load_checkpoint(tmp_path / "sft")
    vla.save_checkpoint(tmp_path / "run" / "checkpoint", policy, norm, meta={
        "iteration": iteration, "global_step": 0, "train_time": 0.0, "env_id": "PickCube-v1", "obs_mode": "state",
        "control_mode": "pd_ee_delta_pose", **meta})


def break_file(name: str, data: bytes):
    def damage(tmp_path):
        write_sft_checkpoint(tmp_path)
        (tmp_path / "sft" / name).write_bytes(data)
    return damage


def another_task(tmp_path):
    write_sft_checkpoint(tmp_path)
    (tmp_path / "sft" / "meta.json").write_text(json.dumps({"env_id": "StackCube-v1", "obs_mode": "state"}))


# case -> (options, what stderr must name, how to prepare tmp_path)
BAD_INPUTS = {
    "no envs": (["--num-envs", "0"], "--num-envs 0: must be at least 1", write_sft_checkpoint),
    "negative envs": (["--num-envs", "-8"], "--num-envs -8: must be at least 1", write_sft_checkpoint),
    "no denoising steps": (["--denoise-steps", "0"], "--denoise-steps 0: must be at least 1", write_sft_checkpoint),
    "negative denoising steps": (["--denoise-steps", "-2"], "--denoise-steps -2: must be at least 1",
                                 write_sft_checkpoint),
    "no noise": (["--noise-level", "0"], "--noise-level 0.0: must be positive", write_sft_checkpoint),
    "negative noise": (["--noise-level", "-1"], "--noise-level -1.0: must be positive", write_sft_checkpoint),
    "too many minibatches": (["--num-envs", "8", "--num-minibatches", "1000"], "--num-minibatches 1000: more "
                             "minibatches than the 160 decisions per iteration", write_sft_checkpoint),
    "another task's checkpoint": (["--env-id", "PickCube"], "the checkpoint .*sft was trained for StackCube-v1",
                                  another_task),
    "corrupt weights": ([], r"sft/model\.safetensors is not a readable safetensors file",
                        break_file("model.safetensors", b"\x07" * 100)),
    "invalid config": ([], r"sft/config\.json is not valid JSON", break_file("config.json", b"{'preset': ")),
}


def bad_input_options(tmp_path, case: str) -> tuple[list[str], str]:
    """The command line of a BAD_INPUTS case, its checkpoint prepared in tmp_path -> options, what the error names."""
    options, message, prepare = BAD_INPUTS[case]
    prepare(tmp_path)
    return ["--checkpoint", str(tmp_path / "sft"), "--output-dir", str(tmp_path / "run"), *options], message


def no_envs(*args, **kwargs):
    pytest.fail("the envs were built before the error")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_usage_error_naming_it(case, tmp_path, monkeypatch):
    """In this process, the command line parsed as the script parses it: each mistake stops main() with one line
    naming the option or file, before any env is built."""
    options, message = bad_input_options(tmp_path, case)
    monkeypatch.setattr(sde, "make_envs", no_envs)
    with pytest.raises((sde.UsageError, vla.CheckpointError)) as error:
        sde.main(tyro.cli(sde.Args, args=options))
    assert re.search(message, str(error.value)) and "\n" not in str(error.value), error.value
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["no envs", "corrupt weights"])  # an option, and a damaged checkpoint
def test_bad_input_exits_with_status_2_and_one_error_line(case, tmp_path):
    options, message = bad_input_options(tmp_path, case)
    out = run_script(options)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]) and "Traceback" not in out.stderr, out.stderr
    assert out.cpu_s < 20  # about 3.5 s here (importing torch and the script); building the envs alone takes ~40 s


def test_resume_of_a_finished_run_says_so(tmp_path, capsys, monkeypatch):
    write_run(tmp_path, iteration=2)
    monkeypatch.setattr(sde, "make_envs", no_envs)
    options = ["--output-dir", str(tmp_path / "run"), "--resume", "--total-iterations", "2"]
    assert sde.main(tyro.cli(sde.Args, args=options)) is None
    out = capsys.readouterr().out
    assert f"{tmp_path / 'run'} already finished at iteration 2 of 2: raise --total-iterations" in out


def run_script(options: list[str], timeout: float = 300):
    """python flow_sde_ppo.py OPTIONS -> the completed process, with .cpu_s: its CPU seconds (unlike wall time, not
    stretched by a busy machine)."""
    used = lambda: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(resource.RUSAGE_CHILDREN))  # noqa: E731
    before = used()
    out = subprocess.run([sys.executable, str(ROOT / "flow_sde_ppo.py"), *options], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out.cpu_s = used() - before
    return out


# ---- the loss against formulas written out independently, on numbers far from ratio 1
def hand_ppo_loss(new_logp, old_logp, adv, value, ret, old_value, clip, value_clip, delta, vf_coef, ratio_level):
    """The PPO loss of pi_RL in plain Python: -mean min(r A, clip(r) A) + vf_coef mean Huber, with the value clip
    taking the larger of the two Huber losses."""
    terms = []
    for i, a in enumerate(adv):
        logs = [sum(sum(row) for row in new_logp[i]) - sum(sum(row) for row in old_logp[i])] if ratio_level == "chunk" \
            else [n - o for rn, ro in zip(new_logp[i], old_logp[i]) for n, o in zip(rn, ro)]
        for lr in logs:
            r = math.exp(lr)
            terms.append(-min(r * a, min(max(r, 1 - clip), 1 + clip) * a))
    huber = lambda e: 0.5 * e * e if abs(e) <= delta else delta * (abs(e) - 0.5 * delta)  # noqa: E731
    v_terms = []
    for v, R, v_old in zip(value, ret, old_value):
        loss = huber(v - R)
        if value_clip is not None:
            loss = max(loss, huber(v_old + min(max(v - v_old, -value_clip), value_clip) - R))
        v_terms.append(loss)
    return sum(terms) / len(terms) + vf_coef * sum(v_terms) / len(v_terms)


@pytest.mark.parametrize("ratio_level", ["chunk", "token"])
@pytest.mark.parametrize("value_clip", [None, 0.5])
def test_ppo_loss_matches_the_formula_far_from_ratio_one(ratio_level, value_clip, monkeypatch):
    """Ratios from 0.37 to 2.7 with positive and negative advantages reach both clip sides; values far from the
    returns reach Huber's linear part and both sides of the value clip."""
    M, C, A = 6, 2, 1
    old = torch.zeros(M, C, A)
    new = torch.tensor([0.5, -0.5, 0.05, -0.05, 0.3, -0.3]).reshape(M, 1, 1).expand(M, C, A).clone()  # [M, C, A]
    new[4, 1, 0] = -0.2  # one entry apart from its chunk's other (token ratios differ within a chunk)
    adv = torch.tensor([1.0, 1.0, -2.0, 0.5, -1.0, -1.0])
    value = torch.tensor([3.0, -1.0, 0.2, 10.0, 0.0, 25.0])
    ret = torch.tensor([1.0, 1.0, 0.1, -5.0, 0.0, 2.0])
    old_value = torch.tensor([2.0, -0.2, 0.0, 9.0, 1.0, 20.0])
    args = replace(sde.Args(), ratio_level=ratio_level, value_clip=value_clip, huber_delta=4.0, vf_coef=0.7,
                   clip_coef=0.2)
    monkeypatch.setattr(sde, "step_logp", lambda *a: new)  # the recomputed log-prob [M, C, A] is given
    monkeypatch.setattr(sde, "critic_features", lambda policy, prefix, args: value[:, None])
    loss, stats = sde.ppo_loss(None, lambda f: f[:, 0], None, args, A, None, None, None, None, None, None, old, adv,
                               ret, old_value, prefix="given")
    expected = hand_ppo_loss(new.tolist(), old.tolist(), adv.tolist(), value.tolist(), ret.tolist(),
                             old_value.tolist(), 0.2, value_clip, 4.0, 0.7, ratio_level)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    log_r = new.sum((1, 2)) if ratio_level == "chunk" else new.flatten()
    assert stats["clipfrac"] == pytest.approx(((log_r.exp() - 1).abs() > 0.2).float().mean().item())
    assert stats["approx_kl"] == pytest.approx((log_r.exp() - 1 - log_r).mean().item(), rel=1e-6)
    assert 0 < stats["clipfrac"] < 1  # both clipped and unclipped entries


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_step_moves_the_log_prob_with_the_advantage(sign):
    """One optimiser step on a decision with a positive advantage raises its log-prob; a negative one lowers it."""
    policy, norm = tiny_policy()
    policy.freeze_vlm()
    args = replace(sde.Args(), action_chunk=4, critic_input="expert")
    critic = sde.Critic(sde.critic_feature_dim(policy, args))
    state, prompts = torch.randn(3, 42), ["pick up the cube"] * 3
    with torch.no_grad():
        prefix = policy.encode_prefix(norm.normalize("state", state), prompts)
        _, xb, xa, k_star, logp = sde.sample_chunk(policy, prefix, args, 7)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=1e-3)
    adv = torch.full((3,), sign)
    loss, _ = sde.ppo_loss(policy, critic, norm, args, 7, state, None, prompts, xb, xa, k_star, logp, adv,
                           torch.zeros(3), torch.zeros(3), prefix=prefix)
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = sde.step_logp(policy, prefix, xb, xa, k_star, args, 7).sum((1, 2))  # [3]
    change = after - logp.sum((1, 2))
    assert (sign * change > 0).all(), change


def test_hybrid_sampler_variance_gap_closes_as_k_grows():
    """On the analytic Gaussian target the hybrid sampler's terminal variance approaches the exact S^2 as K grows.
    At the defaults (K = 4, a = 1.2) it is 27% too large (the plain ODE's: 58% too small); at K = 10 and 50 within
    4%. The sampling error of each estimate is about 0.5%."""
    gaps = {}
    for K in (4, 10, 50):
        torch.manual_seed(0)
        args = SimpleNamespace(denoise_steps=K, noise_level=sde.Args().noise_level, action_chunk=2)
        x, *_ = sde.sample_chunk(AnalyticPolicy(), SimpleNamespace(mask=torch.ones(100_000, 1)), args, 2)
        assert abs(x.mean().item() - M) < 0.01
        gaps[K] = x.var().item() / S**2 - 1
    assert 0.22 < gaps[4] < 0.32 and abs(gaps[10]) < 0.05 and abs(gaps[50]) < 0.04, gaps
    assert abs(gaps[4]) > abs(gaps[10]) > abs(gaps[50]), gaps


def test_micro_batches_and_checkpointing_give_the_minibatch_gradient():
    """The update's gradient accumulation (loss x len(micro) / len(minibatch) per micro-batch) and the expert's
    gradient checkpointing change memory, not the gradient."""
    policy, norm = tiny_policy()
    policy.freeze_vlm()
    args = replace(sde.Args(), action_chunk=5)
    torch.manual_seed(1)
    critic = sde.Critic(sde.critic_feature_dim(policy, args))
    N = 12
    state, prompts = torch.randn(N, 42), ["pick up the cube"] * N
    with torch.no_grad():
        prefix = policy.encode_prefix(norm.normalize("state", state), prompts)
        value = critic(sde.critic_features(policy, prefix, args))
        _, xb, xa, k_star, logp = sde.sample_chunk(policy, prefix, args, 7)
    logp = logp + 0.05 * torch.randn_like(logp)  # ratios away from 1, some clipped
    adv, ret = torch.randn(N), value + torch.randn(N)
    params = policy.trainable_parameters() + list(critic.parameters())

    def gradient(micro_size, checkpointing):
        policy.expert_checkpointing(checkpointing).train()
        for p in params:
            p.grad = None
        for m in torch.arange(N).split(micro_size):
            loss, _ = sde.ppo_loss(policy, critic, norm, args, 7, state[m], None, [prompts[i] for i in m],
                                   xb[m], xa[m], k_star[m], logp[m], adv[m], ret[m], value[m])
            (loss * len(m) / N).backward()
        return [p.grad.clone() for p in params]

    whole = gradient(N, False)
    assert sum(g.abs().sum() for g in whole) > 0
    for micro_size, checkpointing in ((5, False), (4, True)):
        for g, ref in zip(gradient(micro_size, checkpointing), whole):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("checkpoint_io", [False, True])
def test_real_size_benchmark_runs_at_the_tiny_size(tmp_path, checkpoint_io):
    """benchmarks/bench_scale.py drives the script on rgb observations with micro-batches and checkpointing, with
    the policy handed over in memory or through a checkpoint on disk."""
    bench = load_benchmark("bench_scale")
    bench.main(["--preset", "tiny", "--num-envs", "2", "--num-steps", "2", "--max-episode-steps", "10",
                "--micro-batch-size", "1", "--out", str(tmp_path)] + ["--checkpoint-io"] * checkpoint_io)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["global_step"] == 2 * 2 * 5 and row["update_time"] > 0
    # in memory nothing is written; through the disk the script's final checkpoint is there
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").is_file() == checkpoint_io
    assert vla.load_checkpoint.__module__ == "vla.checkpoint"  # the in-memory patch is undone


def test_failure_breakdown_benchmark(tmp_path, capsys):
    """benchmarks/bench_failures.py sorts failed PickCube episodes by their observations, and runs the scripts'
    evaluation on a checkpoint."""
    import numpy as np
    bench = load_benchmark("bench_failures")
    # 5 episodes of 3 env steps: a success; never held; held then dropped; held 5 cm off; held 1 cm off (not static)
    grasped = np.array([[0, 0, 1, 1, 1], [1, 0, 1, 1, 1], [1, 0, 0, 1, 1]], dtype=bool)  # [T, N]
    dist = np.array([[0.2] * 5, [0.1] * 5, [0.02, 0.2, 0.2, 0.05, 0.01]])  # [T, N]
    success = np.array([True, False, False, False, False])
    assert bench.classify(grasped, dist, success) == ["success", "never grasped", "dropped", "held off the goal",
                                                      "placed, not static"]
    # the held-off episode: 5 cm off, 3 cm above a goal 4 cm high; the success's goal 20 cm high
    height = np.array([[0.1] * 5, [0.05] * 5, [0.0, 0.1, 0.1, 0.03, 0.0]])  # [T, N]
    goal_z = np.array([[0.2, 0.1, 0.1, 0.04, 0.1]] * 3)  # [T, N]
    h = bench.held_off(dist, height, goal_z, np.array(bench.classify(grasped, dist, success)))
    assert h["count"] == 1 and h["end"] == (0.05, 0.05, 0.05) and h["above"] == 1
    assert h["moved"] == pytest.approx(0.15) and h["goal_z"] == 0.04 and h["goal_z_success"] == 0.2
    write_sft_checkpoint(tmp_path)
    bench.main(["--checkpoint", str(tmp_path / "sft"), "--episodes", "3", "--num-envs", "2",
                "--max-episode-steps", "8"])
    out = capsys.readouterr().out
    assert "3 episodes, success_once" in out
    counts = {kind: int(n) for kind, n in re.findall(r"^  (\S.*?) +(\d+)$", out, re.M)}
    successes = round(float(re.search(r"success_once (\d+)%", out)[1]) * 3 / 100)
    assert sorted(counts) == sorted(bench.KINDS) and sum(counts.values()) + successes == 3
    # the scripted controller on the same episodes: it places both cubes in 40 env steps, and none in 8 (too short to
    # reach, grasp and carry), each failure counted under one kind
    for steps, rate in (("40", "100%"), ("8", "0%")):
        bench.main(["--scripted", "--episodes", "2", "--num-envs", "2", "--max-episode-steps", steps])
        out = capsys.readouterr().out
        assert f"scripted controller, 2 episodes, success_once {rate}" in out
        counts = {kind: int(n) for kind, n in re.findall(r"^  (\S.*?) +(\d+)$", out, re.M)}
        assert sum(counts.values()) == (0 if rate == "100%" else 2)


def write_noise_ppo_checkpoint(tmp_path):
    """A Flow-Noise PPO checkpoint's layout without training: the tiny SFT policy (tmp_path/sft) with a noise head in
    its run's bounds 0.1-0.4 and K = 2 -> tmp_path/rl."""
    from flow_noise_ppo import NoiseHead
    write_sft_checkpoint(tmp_path)
    tiny, norm, _, _ = vla.load_checkpoint(tmp_path / "sft")
    head = NoiseHead(tiny.spec["expert_hidden"], tiny.spec["max_action_dim"], 0.1, 0.4)
    vla.save_checkpoint(tmp_path / "rl", tiny, norm, {f"noise_head.{k}": v for k, v in head.state_dict().items()},
                        {"obs_mode": "state", "control_mode": "pd_ee_delta_pose", "denoise_steps": 2,
                         "args": {"sigma_min": 0.1, "sigma_max": 0.4}})


def test_failure_benchmark_training_sampler(tmp_path, capsys):
    """bench_failures.py --sampler train samples as the RL run rolled out: with next to no noise it is the ODE from
    the same initial noise, with noise it is not; flow_sde_ppo.sample_actions is the ODE again afterwards."""
    from flow_noise_ppo import NoiseHead
    bench = load_benchmark("bench_failures")
    policy, norm = tiny_policy(7)
    policy.eval()
    obs, prompts = {"state": torch.randn(5, 42), "images": None}, ["pick up the cube"] * 5  # [S, D]
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    ode = sde.sample_actions(policy, norm, obs, prompts, 2, 7, gen())  # [S, H, A]
    head = lambda s: NoiseHead(policy.spec["expert_hidden"], policy.spec["max_action_dim"], s, s)  # noqa: E731
    # (Flow-Noise head or None for Flow-SDE, noise level, whether it must be the ODE)
    for h, level, is_ode in ((head(1e-7), 0.0, True), (None, 1e-7, True), (head(0.3), 0.0, False), (None, 1.0, False)):
        actions = bench.training_sampler(h, level, 4)(policy, norm, obs, prompts, 2, 7, gen())
        if is_ode:
            torch.testing.assert_close(actions, ode, rtol=1e-4, atol=1e-5)
        else:
            assert (actions - ode).abs().max() > 1e-2
    # end to end on a Flow-Noise PPO checkpoint (a head, its run's bounds and K)
    write_noise_ppo_checkpoint(tmp_path)
    ode_sampler = sde.sample_actions
    bench.main(["--checkpoint", str(tmp_path / "rl"), "--episodes", "2", "--num-envs", "2", "--max-episode-steps", "8",
                "--sampler", "train"])
    assert "K = 2, its training sampler (Flow-Noise chain, its noise head), 2 episodes" in capsys.readouterr().out
    assert sde.sample_actions is ode_sampler
    with pytest.raises(ValueError, match="not an RL run's checkpoint"):
        bench.main(["--checkpoint", str(tmp_path / "sft"), "--sampler", "train"])


class PointMassPolicy:
    """The exact velocity field of actions that are a point mass at each state's first entry (x_t = (1 - t) mu +
    t eps): v = (x - mu) / t. Euler's last step (t = 1/K) lands exactly on mu, whatever the initial noise."""
    spec = {"chunk_size": 8, "max_action_dim": 8, "expert_hidden": 16}

    def encode_prefix(self, state, prompts, images=None):
        return SimpleNamespace(mask=torch.ones(state.shape[0], 1), mu=state[:, :1, None])

    def velocity(self, prefix, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1)
        return (x - prefix.mu) / t, torch.zeros(*x.shape[:2], self.spec["expert_hidden"])


def test_exploration_benchmark(tmp_path, capsys):
    """benchmarks/bench_exploration.py measures what the stochastic samplers add to the ODE's action spread: none
    for a point-mass target (the ODE is exact there), sigma per entry for Flow-Noise, more with a for Flow-SDE; with
    no noise either sampler is the ODE from the same initial noises."""
    bench = load_benchmark("bench_exploration")
    torch.manual_seed(0)
    _, norm = tiny_policy(7)
    args = replace(sde.Args(), action_chunk=4, denoise_steps=4)
    obs, prompts = {"state": torch.randn(5, 42), "images": None}, ["pick up the cube"] * 5  # [S, D]
    out = bench.spreads(PointMassPolicy(), norm, obs, prompts, 7, args, [0.5, 1.0, 2.0], [0.1, 0.3], samples=400)
    scale = norm.unnormalize("actions", torch.ones(7)) - norm.unnormalize("actions", torch.zeros(7))  # [A]
    assert out["ODE"].abs().max() < 1e-5
    for s in (0.1, 0.3):  # the last step's noise alone reaches the action: std s in normalised units
        torch.testing.assert_close(out[f"Flow-Noise sigma = {s:g}"], s * scale.abs(), rtol=0.05, atol=0)
    assert (0 < out["Flow-SDE a = 0.5"]).all() and (out["Flow-SDE a = 0.5"] < out["Flow-SDE a = 1"]).all()
    assert (out["Flow-SDE a = 1"] < out["Flow-SDE a = 2"]).all()
    # a trained-like field: with next to no step noise both stochastic samplers are the ODE
    policy, norm = tiny_policy(7)
    out = bench.spreads(policy.eval(), norm, obs, prompts, 7, args, [1e-6], [1e-6], samples=16)
    torch.testing.assert_close(out["Flow-SDE a = 1e-06"], out["ODE"], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(out["Flow-Noise sigma = 1e-06"], out["ODE"], rtol=1e-3, atol=1e-6)
    # end to end on the evaluation's first episodes
    write_sft_checkpoint(tmp_path)
    bench.main(["--checkpoint", str(tmp_path / "sft"), "--num-envs", "2", "--max-episode-steps", "8", "--samples", "4",
                "--noise-levels", "0.8", "--sigmas", "0.1"])
    out = capsys.readouterr().out
    assert "4 states of its evaluation episodes" in out  # 2 envs x 2 decisions of 4 actions
    rows = re.findall(r"^  (ODE|Flow-SDE a = 0.8|Flow-Noise sigma = 0.1) +((?:[\d.]+ ?){7})$", out, re.M)
    assert [r[0] for r in rows] == ["ODE", "Flow-SDE a = 0.8", "Flow-Noise sigma = 0.1"]
    with pytest.raises(ValueError, match="at least 2 draws"):
        bench.main(["--checkpoint", str(tmp_path / "sft"), "--samples", "1"])


def test_exploration_benchmark_reads_a_learned_noise_head(tmp_path, capsys):
    """For a Flow-Noise PPO checkpoint the benchmark reports its head's std per step and action dim: a head whose
    output is pinned high in dim 0, low in dim 1 and at 0 elsewhere gives the upper bound, the lower bound and their
    geometric mean, at every step."""
    from flow_noise_ppo import NoiseHead
    bench = load_benchmark("bench_exploration")
    policy = PointMassPolicy()
    head = NoiseHead(policy.spec["expert_hidden"], policy.spec["max_action_dim"], 0.1, 0.4)
    with torch.no_grad():
        head.net[-1].weight.zero_()
        head.net[-1].bias.copy_(torch.tensor([20.0, -20.0, 0, 0, 0, 0, 0, 0]))
    args = replace(sde.Args(), action_chunk=4, denoise_steps=2)
    prefix = policy.encode_prefix(torch.randn(5, 42), ["pick up the cube"] * 5)
    stds, lo, hi = bench.head_stds(policy, head, prefix, args, 7)
    assert stds.shape == (2, 7) and (lo, hi) == pytest.approx((0.1, 0.4))
    torch.testing.assert_close(stds[:, :3], torch.tensor([[0.4, 0.1, 0.2]] * 2))
    # the executed actions' spread with that head: the last step's std per dim (the point mass absorbs the others),
    # measured next to a fixed-sigma head that must not take its place
    _, norm = tiny_policy(7)
    obs, prompts = {"state": torch.randn(5, 42), "images": None}, ["pick up the cube"] * 5  # [S, D]
    out = bench.spreads(policy, norm, obs, prompts, 7, args, [], [0.3], samples=400, head=head)
    scale = norm.unnormalize("actions", torch.ones(7)) - norm.unnormalize("actions", torch.zeros(7))  # [A]
    torch.testing.assert_close(out["Flow-Noise, its head"][:3], torch.tensor([0.4, 0.1, 0.2]) * scale[:3].abs(),
                               rtol=0.05, atol=0)
    # end to end: a checkpoint with a noise head and its run's bounds and K
    write_noise_ppo_checkpoint(tmp_path)
    bench.main(["--checkpoint", str(tmp_path / "rl"), "--num-envs", "2", "--max-episode-steps", "8", "--samples", "4",
                "--noise-levels", "0.8", "--sigmas", "0.1"])
    out = capsys.readouterr().out
    assert ", K = 2" in out and re.search(r"^  Flow-Noise, its head +(?:[\d.]+ ?){7}$", out, re.M)
    assert "its noise head (bounds 0.1-0.4)" in out
    rows = re.findall(r"^  step (\d) \(t = ([\d.]+)\) +((?:[\d.]+ ?){7})$", out, re.M)
    assert [r[:2] for r in rows] == [("0", "1"), ("1", "0.5")]
    assert all(0.1 <= float(v) <= 0.4 for r in rows for v in r[2].split())


def test_killed_run_resumes_with_each_iteration_once(tmp_path, capsys):
    """SIGKILL after an iteration's metrics row was written but before its checkpoint; --resume drops that row, runs
    the iteration again and ends with every iteration in metrics.jsonl once and a checkpoint that loads."""
    import signal
    write_sft_checkpoint(tmp_path)
    run = tmp_path / "run"
    options = ["--checkpoint", str(tmp_path / "sft"), "--output-dir", str(run), "--num-envs", "2", "--num-steps", "2",
               "--num-minibatches", "2", "--update-epochs", "1", "--eval-episodes", "0", "--num-eval-envs", "1",
               "--max-episode-steps", "10", "--env-workers", "1", "--critic-warmup-iters", "0", "--save-every", "2",
               "--total-iterations", "4"]

    def iterations():  # the complete rows' iterations
        lines = (run / "metrics.jsonl").read_text().split("\n")[:-1] if (run / "metrics.jsonl").exists() else []
        return [json.loads(line)["iteration"] for line in lines]
    proc = subprocess.Popen([sys.executable, str(ROOT / "flow_sde_ppo.py"), *options], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while 3 not in iterations() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)  # the row of iteration 3 is written about an iteration before the checkpoint of 4
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = vla.load_checkpoint(run / "checkpoint")[3]["iteration"]
    assert killed_at == 2 and iterations() == [1, 2, 3], iterations()  # a row past the checkpoint
    sde.main(tyro.cli(sde.Args, args=options + ["--resume"]))  # in this process: no second start-up
    assert f"resuming {run} from iteration 2" in capsys.readouterr().out
    assert iterations() == [1, 2, 3, 4]
    assert vla.load_checkpoint(run / "checkpoint")[3]["iteration"] == 4

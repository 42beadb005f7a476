"""flow_noise_ppo.py: the exact chain likelihood, the noise bounds, the loss against formulas written out here, ratio
1, gradients, smoke run and resume, errors (in-process and on the command line)."""

import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import tyro

import flow_noise_ppo as fn
import vla
from conftest import backward_grads, main_checking_threads, small_rl_args, tiny_policy, write_sft_checkpoint


def setup(N=6):
    policy, norm = tiny_policy()
    policy.freeze_vlm()
    head = fn.NoiseHead(policy.spec["expert_hidden"], policy.spec["max_action_dim"], 0.08, 0.16)
    state = torch.randn(N, 42)
    prompts = ["pick up the cube"] * N
    return policy, head, norm, state, prompts


def test_chain_loglik_equals_sum_of_normal_logprobs():
    policy, head, norm, state, prompts = setup()
    args = replace(fn.Args(), action_chunk=5)
    K, C, A = args.denoise_steps, args.action_chunk, 7
    with torch.no_grad():
        prefix = policy.encode_prefix(norm.normalize("state", state), prompts)
        chain, terms = fn.sample_chain(policy, head, prefix, args, A)
        # Reference: each transition's Normal written out from the model's own outputs.
        ref = torch.distributions.Normal(0.0, 1.0).log_prob(chain[:, 0, :C, :A]).sum((1, 2))
        for k in range(K):
            v, h = policy.velocity(prefix, chain[:, k], 1.0 - k / K)
            mean, std = chain[:, k] - v / K, head(h)
            step = torch.distributions.Normal(mean[:, :C, :A], std[:, :C, :A])
            ref += step.log_prob(chain[:, k + 1, :C, :A]).sum((1, 2))
    ours = fn.reduce_terms(terms, "sum").sum((1, 2))
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(fn.reduce_terms(terms, "mean").sum((1, 2)), ref / (K + 1))
    # The chain really moved: x_K is not the noise, and each step's residual is on the noise head's scale.
    assert (chain[:, K] - chain[:, 0]).abs().mean() > 0.1


def test_std_stays_in_bounds_for_extreme_head_outputs():
    head = fn.NoiseHead(16, 4, 0.08, 0.16)
    h = torch.randn(3, 5, 16)
    for scale in (1e4, -1e4):
        with torch.no_grad():
            head.net[-1].weight.fill_(0).add_(scale * torch.sign(torch.randn_like(head.net[-1].weight)))
        std = head(h * 1e3)
        assert std.min() >= 0.08 * (1 - 1e-6) and std.max() <= 0.16 * (1 + 1e-6)
    for bias, bound in ((1e4, 0.16), (-1e4, 0.08)):  # saturated either way: exactly at the bound
        with torch.no_grad():
            head.net[-1].weight.zero_()
            head.net[-1].bias.fill_(bias)
        torch.testing.assert_close(head(h), torch.full((3, 5, 4), bound))


@pytest.mark.parametrize("ratio_level,reduction", [("chunk", "sum"), ("chunk", "mean"), ("token", "sum")])
def test_ratio_one_and_gradients(ratio_level, reduction):
    policy, head, norm, state, prompts = setup(N=8)
    args = replace(fn.Args(), ratio_level=ratio_level, action_chunk=5, logprob_reduction=reduction)
    critic = fn.Critic(fn.critic_feature_dim(policy, args))
    with torch.no_grad():
        prefix = policy.encode_prefix(norm.normalize("state", state), prompts)
        chain, terms = fn.sample_chain(policy, head, prefix, args, 7)
        old = fn.reduce_terms(terms, reduction)
        value = critic(fn.critic_features(policy, prefix, args))
        idx = torch.tensor([5, 1, 2])
        pre2 = policy.encode_prefix(norm.normalize("state", state[idx]), prompts[:3])
        new_terms, _ = fn.chain_logp(policy, head, pre2, chain[idx], args, 7)
    ratio = (fn.reduce_terms(new_terms, reduction) - old[idx]).sum((1, 2)).exp()
    assert (ratio - 1).abs().max() < 1e-5
    adv = torch.randn(8)

    def loss(**kw):
        return fn.ppo_loss(policy, head, critic, norm, args, 7, state, None, prompts, chain, old, adv, value + 1,
                           value, **kw)
    # the rollout's stored prefix (no VLM pass in the update) gives the loss and gradients of a recomputed one
    stored_loss, _, stored = backward_grads(lambda: loss(prefix=prefix), policy, head, critic)
    recomputed_loss, stats, grads = backward_grads(loss, policy, head, critic)
    torch.testing.assert_close(recomputed_loss, stored_loss)
    torch.testing.assert_close(grads, stored)
    assert abs(stats["ratio_mean"] - 1) < 1e-5 and math.isfinite(stats["entropy"])
    assert all(p.grad is None for p in policy.vlm.parameters())
    for name, p in list(policy.named_parameters()) + list(head.named_parameters()):
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert head.net[0].weight.grad.abs().sum() > 0 and head.net[-1].weight.grad.abs().sum() > 0
    assert policy.pi0.model.dit.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0


# Hand-made minibatch of 6 decisions: ratios far outside the clip range on both sides (and two inside), with positive
# and negative advantages on each side; values, returns and rollout values on both sides of the Huber threshold 1.
RATIOS, ADVS = [1.5, 0.5, 1.5, 0.5, 1.1, 0.95], [2.0, 1.0, -1.0, -3.0, 0.5, -0.7]
VALUES, RETURNS = [0.0, 2.0, -1.0, 3.0, 0.5, 1.0], [0.5, -1.0, -1.2, 3.1, 2.5, 0.0]
OLD_VALUES = [0.3, 1.0, -1.1, 2.0, 0.5, 1.5]


def surrogate_reference(ratios, advs, eps):
    """PPO's pessimistic clipped objective, per sample min(r A, clip(r, 1 - eps, 1 + eps) A), as a loss."""
    return -sum(min(r * a, min(max(r, 1 - eps), 1 + eps) * a) for r, a in zip(ratios, advs)) / len(ratios)


def value_reference(values, returns, old, delta, clip):
    """Huber(V - R), or with a value clip the larger of it and Huber(old + clip(V - old, -c, c) - R); mean."""
    huber = lambda d: 0.5 * d * d if abs(d) <= delta else delta * (abs(d) - 0.5 * delta)  # noqa: E731
    total = 0.0
    for v, r, o in zip(values, returns, old):
        clipped = huber(o + min(max(v - o, -clip), clip) - r) if clip is not None else -1.0
        total += max(huber(v - r), clipped)
    return total / len(values)


def loss_on_hand_made_numbers(monkeypatch, entropy=0.3, **kw):
    """ppo_loss with its model calls replaced: chain_logp returns log-likelihood terms (prior + one step, one executed
    entry) whose ratios to old_logp are RATIOS, and `entropy`; the critic returns VALUES. -> loss, stats, the terms."""
    args = replace(fn.Args(), denoise_steps=1, action_chunk=1, logprob_reduction="sum", huber_delta=1.0, **kw)
    old = torch.tensor([-1.3, 0.2, 2.0, -0.4, 0.0, 1.1])  # [M]
    new = old + torch.tensor(RATIOS).log()
    terms = torch.stack([torch.full_like(new, -0.9), new + 0.9], 1)[:, :, None, None].requires_grad_()  # [M, 2, 1, 1]
    monkeypatch.setattr(fn, "chain_logp", lambda *a: (terms, torch.tensor(entropy)))
    monkeypatch.setattr(fn, "critic_features", lambda *a: None)
    loss, stats = fn.ppo_loss(None, None, lambda features: torch.tensor(VALUES), None, args, 1, None, None, None, None,
                              old[:, None, None], torch.tensor(ADVS), torch.tensor(RETURNS), torch.tensor(OLD_VALUES),
                              prefix=object())
    return loss, stats, terms


@pytest.mark.parametrize("value_clip", [None, 0.2])
def test_ppo_loss_against_written_out_formulas(monkeypatch, value_clip):
    loss, stats, terms = loss_on_hand_made_numbers(monkeypatch, value_clip=value_clip, entropy_coef=0.1, vf_coef=0.5)
    pg, v = surrogate_reference(RATIOS, ADVS, 0.2), value_reference(VALUES, RETURNS, OLD_VALUES, 1.0, value_clip)
    assert stats["pg_loss"] == pytest.approx(pg, rel=1e-5) and stats["v_loss"] == pytest.approx(v, rel=1e-5)
    assert loss.item() == pytest.approx(pg - 0.1 * 0.3 + 0.5 * v, rel=1e-5)
    assert stats["clipfrac"] == pytest.approx(4 / 6) and stats["ratio_mean"] == pytest.approx(sum(RATIOS) / 6)
    # the numbers can tell the clip from no clip, and the value clip from none
    assert abs(pg + sum(r * a for r, a in zip(RATIOS, ADVS)) / 6) > 0.2
    assert abs(value_reference(VALUES, RETURNS, OLD_VALUES, 1.0, 0.2) - value_reference(VALUES, RETURNS, OLD_VALUES,
                                                                                        1.0, None)) > 0.1
    # gradient per sample's log-likelihood: -A r / M where r A is the smaller objective, 0 where the clip is
    loss.backward()
    grad = [-a * r / 6 if r * a <= min(max(r, 0.8), 1.2) * a else 0.0 for r, a in zip(RATIOS, ADVS)]
    torch.testing.assert_close(terms.grad[:, 1, 0, 0], torch.tensor(grad))
    assert sum(g == 0.0 for g in grad) == 2 and terms.grad[:, 0].eq(terms.grad[:, 1]).all()


def test_entropy_bonus_lowers_the_loss(monkeypatch):
    low, _, _ = loss_on_hand_made_numbers(monkeypatch, entropy=0.3, entropy_coef=0.1)
    high, _, _ = loss_on_hand_made_numbers(monkeypatch, entropy=0.9, entropy_coef=0.1)
    assert high.item() == pytest.approx(low.item() - 0.1 * 0.6, rel=1e-5) and high < low


def test_entropy_is_the_gaussian_entropy_of_the_step_stds():
    policy, _, norm, state, prompts = setup(N=4)
    D, A, lo, hi = policy.spec["max_action_dim"], 5, 0.1, 2.0
    head = fn.NoiseHead(policy.spec["expert_hidden"], D, lo, hi)
    sigmas = torch.linspace(0.15, 1.8, D)  # per action dim, at every step and token; entropies of both signs
    with torch.no_grad():  # std = exp(log lo + u (log hi - log lo)), u = (tanh(bias) + 1) / 2
        head.net[-1].weight.zero_()
        head.net[-1].bias.copy_(torch.atanh(2 * (sigmas.log() - math.log(lo)) / (math.log(hi) - math.log(lo)) - 1))
    args = replace(fn.Args(), action_chunk=3, denoise_steps=2)
    with torch.no_grad():
        prefix = policy.encode_prefix(norm.normalize("state", state), prompts)
        chain, _ = fn.sample_chain(policy, head, prefix, args, A)
        _, entropy = fn.chain_logp(policy, head, prefix, chain, args, A)
    ref = sum(0.5 * math.log(2 * math.pi * math.e * s * s) for s in sigmas[:A].tolist()) / A  # the executed dims
    assert entropy.item() == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert min(0.5 * math.log(2 * math.pi * math.e * s * s) for s in sigmas[:A].tolist()) < 0 < ref


def test_one_step_raises_the_log_prob_of_a_positive_advantage_sample():
    policy, head, norm, state, prompts = setup(N=4)
    args = replace(fn.Args(), entropy_coef=0.0, vf_coef=0.0)  # the surrogate alone
    critic = fn.Critic(fn.critic_feature_dim(policy, args))
    with torch.no_grad():
        prefix = policy.encode_prefix(norm.normalize("state", state), prompts)
        chain, terms = fn.sample_chain(policy, head, prefix, args, 7)

    def logp():  # [N] the chains' log-likelihoods, as the ratio uses them
        return fn.reduce_terms(fn.chain_logp(policy, head, prefix, chain, args, 7)[0], "mean").sum((1, 2)).detach()
    before, adv = logp(), torch.tensor([1.0, 0.0, -1.0, 0.0])
    opt = torch.optim.AdamW(policy.trainable_parameters() + list(head.parameters()), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.0)  # the script's actor step
    loss, _ = fn.ppo_loss(policy, head, critic, norm, args, 7, state, None, prompts, chain,
                          fn.reduce_terms(terms, "mean"), adv, torch.zeros(4), torch.zeros(4), prefix=prefix)
    loss.backward()
    opt.step()
    after = logp()
    assert after[0] > before[0] + 0.01 and after[2] < before[2] - 0.01  # and the negative one's down


def test_smoke_two_iterations_and_resume(tmp_path, capsys, monkeypatch):
    write_sft_checkpoint(tmp_path)
    args = small_rl_args(fn, tmp_path, anneal_lr=True, noise_head_lr=1e-4)
    main_checking_threads(fn, args, monkeypatch, "sample_chain", "ppo_loss")  # the update at --update-threads
    policy, norm, extra, meta = vla.load_checkpoint(tmp_path / "run" / "checkpoint")
    assert meta["iteration"] == 2 and any(k.startswith("noise_head.") for k in extra)
    # the optimizer's third group is the noise head (its 6 tensors) at its own annealed lr
    head_tensors = sum(k.startswith("noise_head.") for k in extra)
    assert head_tensors == 6 and len(meta["optimizer"][2]["params"]) == head_tensors
    assert [g["lr"] for g in meta["optimizer"]] == pytest.approx([args.lr / 2, args.value_lr, 1e-4 / 2])
    assert "iterations 1-1 train only the critic (actor frozen, --critic-warmup-iters 1)\n" in capsys.readouterr().out
    # a run killed after logging iteration 3 but before its checkpoint: the resumed run logs iteration 3 once
    metrics = tmp_path / "run" / "metrics.jsonl"
    killed = json.loads(metrics.read_text().splitlines()[-2])  # the last training row (the evaluation follows it)
    metrics.write_text(metrics.read_text() + json.dumps({**killed, "iteration": 3}) + "\n" + '{"iteration": 4, "glo')
    # the resumed iteration stops after one epoch: any approximate KL exceeds a negative --target-kl
    fn.main(replace(args, total_iterations=3, resume=True, target_kl=-1.0, prefix_store_gb=1e-6))
    # a changed hyperparameter is reported; more iterations (the usual reason to resume) and memory knobs are not
    out = capsys.readouterr().out
    assert f"--resume with changed options: --target-kl {args.target_kl} -> -1.0\n" in out
    assert f"resuming {tmp_path / 'run'} from iteration 2\n" in out and "train only the critic" not in out
    assert fn.main(replace(args, total_iterations=3, resume=True)) == ({}, None, None, None)  # nothing to do
    finished = f"{tmp_path / 'run'} already finished at iteration 3 of 3: raise --total-iterations"
    assert finished in capsys.readouterr().out
    with pytest.raises(ValueError, match="the run has --action-chunk 4, not 2: pass the run's values again"):
        fn.main(replace(args, total_iterations=4, resume=True, action_chunk=2))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "pg_loss" in r] == [1, 2, 3]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 2, 3, 3]  # evaluations before, at the end, at the resumed end
    assert [r["lr"] for r in rows if "pg_loss" in r] == pytest.approx([0.0, args.lr / 2, args.lr / 3])
    assert [r["noise_head_lr"] for r in rows if "pg_loss" in r] == pytest.approx([0.0, 1e-4 / 2, 1e-4 / 3])
    # a checkpoint from before the noise head had its own optimizer group is refused with the way out
    meta_file = tmp_path / "run" / "checkpoint" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "optimizer": meta["optimizer"][:2]}))
    with pytest.raises(ValueError, match="has 2 parameter groups, this script's has 3.*--checkpoint"):
        fn.main(replace(args, total_iterations=4, resume=True, target_kl=-1.0))
    assert [r["epochs"] for r in rows if "pg_loss" in r] == [args.update_epochs] * 2 + [1] and args.update_epochs > 1
    # the updates reused the rollout's prefixes; the resumed one, with no room for them, recomputed them
    assert [r["prefix_stored"] for r in rows if "pg_loss" in r] == [1.0, 1.0, 0.0]
    assert all(math.isfinite(r["entropy"]) for r in rows if "entropy" in r)


def test_bad_inputs(tmp_path):
    with pytest.raises(fn.UsageError, match="no SFT checkpoint"):
        fn.main(small_rl_args(fn, tmp_path))
    write_sft_checkpoint(tmp_path, action_dim=6)
    with pytest.raises(ValueError, match="outputs 6-D actions, but PickCube-v1 .* takes 7-D actions"):
        fn.main(small_rl_args(fn, tmp_path))
    with pytest.raises(ValueError, match="sigma-min"):
        fn.main(replace(small_rl_args(fn, tmp_path), sigma_min=0.5))  # above the default sigma_max 0.32
    with pytest.raises(ValueError, match="does not split into 3"):
        fn.main(replace(small_rl_args(fn, tmp_path), num_minibatches=3))
    with pytest.raises(ValueError, match="--update-threads 0: must be at least 1"):
        fn.main(replace(small_rl_args(fn, tmp_path), update_threads=0))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A PickCube SFT checkpoint that records its task, and damaged copies of it."""
    root = tmp_path_factory.mktemp("ckpt")
    policy, norm = tiny_policy()
    meta = {"obs_mode": "state", "control_mode": "pd_ee_delta_pose", "env_id": "PickCube-v1"}
    for name in ("sft", "bad_weights", "bad_config"):
        vla.save_checkpoint(root / name, policy, norm, meta=meta)
    (root / "bad_weights" / "model.safetensors").write_bytes(b"\x00\x93 not a safetensors file" * 40)
    (root / "bad_config" / "config.json").write_text('{"preset": "tiny", ')
    return root


# (options, checkpoint, what the one error line must name): the bad inputs, each found before any env or model starts
BAD_INPUTS = [
    (["--num-envs", "0"], "sft", "--num-envs 0: must be at least 1"),
    (["--num-envs", "-8"], "sft", "--num-envs -8: must be at least 1"),
    (["--denoise-steps", "0"], "sft", "--denoise-steps 0: must be at least 1"),
    (["--denoise-steps", "-2"], "sft", "--denoise-steps -2: must be at least 1"),
    (["--sigma-min", "0"], "sft", "--sigma-min 0.0: must be positive"),
    (["--sigma-max", "-1"], "sft", "--sigma-max -1.0: must be positive"),
    (["--sigma-min", "0.3", "--sigma-max", "0.2"], "sft", "--sigma-min 0.3: must be below --sigma-max 0.2"),
    (["--num-minibatches", "1000", "--num-envs", "8"], "sft", "--num-minibatches 1000: more minibatches than the "
     "batch of 160 decisions per iteration (num_envs 8 x num_steps 20); use at most 160"),
    (["--action-chunk", "9"], "sft", "--action-chunk 9: exceeds the policy's chunk size 8"),
    (["--env-id", "PickBall"], "sft", "unknown --env-id 'PickBall'"),
    (["--env-id", "StackCube"], "sft", "was trained for PickCube-v1, not --env-id StackCube: train one with `python "
     "sft_baseline.py --env-id StackCube`"),
    ([], "bad_weights", "model.safetensors is not a readable safetensors file"),
    ([], "bad_config", "config.json is not valid JSON"),
]


@pytest.mark.parametrize("options,checkpoint,message", BAD_INPUTS, ids=[" ".join(c[0]) or c[1] for c in BAD_INPUTS])
def test_bad_input_is_refused_before_envs_start(checkpoints, tmp_path, monkeypatch, options, checkpoint, message):
    """The options as the command line parses them; main refuses them with the message before building any env."""
    monkeypatch.setattr(fn, "make_envs", lambda *a, **kw: pytest.fail("envs were built before the check"))
    args = tyro.cli(fn.Args, args=["--checkpoint", str(checkpoints / checkpoint), "--output-dir",
                                   str(tmp_path / "run"), *options])
    with pytest.raises((fn.UsageError, vla.CheckpointError)) as error:
        fn.main(args)
    assert message in str(error.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("options,checkpoint,message", [BAD_INPUTS[0], BAD_INPUTS[-2]], ids=["option", "checkpoint"])
def test_bad_input_on_the_command_line(checkpoints, tmp_path, options, checkpoint, message):
    """One `error:` line naming the option and the fix, exit status 2, no traceback, and fast: nothing slow started
    (importing torch and transformers takes 4-8 s on this machine, more when it is busy)."""
    cmd = [sys.executable, "flow_noise_ppo.py", "--checkpoint", str(checkpoints / checkpoint), "--output-dir",
           str(tmp_path / "run"), *options]
    start = time.time()
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in proc.stderr
    assert time.time() - start < 40 and not (tmp_path / "run").exists()  # building the envs alone takes ~45 s

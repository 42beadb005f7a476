"""flow_noise_ppo.py: the exact chain likelihood, the noise bounds, ratio 1, gradients, smoke run, errors."""

import json
import math
from dataclasses import replace

import pytest
import torch

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
            ref += torch.distributions.Normal(mean[:, :C, :A], std[:, :C, :A]).log_prob(chain[:, k + 1, :C, :A]).sum((1, 2))
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
    capsys.readouterr()
    # the resumed iteration stops after one epoch: any approximate KL exceeds a negative --target-kl
    fn.main(replace(args, total_iterations=3, resume=True, target_kl=-1.0, prefix_store_gb=1e-6))
    # a changed hyperparameter is reported; more iterations (the usual reason to resume) and memory knobs are not
    assert f"--resume with changed options: --target-kl {args.target_kl} -> -1.0\n" in capsys.readouterr().out
    with pytest.raises(ValueError, match="the run has --action-chunk 4, not 2: pass the run's values again"):
        fn.main(replace(args, total_iterations=4, resume=True, action_chunk=2))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "pg_loss" in r] == [1, 2, 3]
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
    with pytest.raises(FileNotFoundError, match="no SFT checkpoint"):
        fn.main(small_rl_args(fn, tmp_path))
    write_sft_checkpoint(tmp_path, action_dim=6)
    with pytest.raises(ValueError, match="outputs 6-D actions but PickCube-v1"):
        fn.main(small_rl_args(fn, tmp_path))
    with pytest.raises(ValueError, match="sigma-min"):
        fn.main(replace(small_rl_args(fn, tmp_path), sigma_min=0.5))  # above the default sigma_max 0.32
    with pytest.raises(ValueError, match="does not split into 3"):
        fn.main(replace(small_rl_args(fn, tmp_path), num_minibatches=3))
    with pytest.raises(ValueError, match="--update-threads 0 must be at least 1"):
        fn.main(replace(small_rl_args(fn, tmp_path), update_threads=0))

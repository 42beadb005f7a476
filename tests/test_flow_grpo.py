"""flow_grpo.py: group advantages, shared initial states, ratio 1, smoke run, errors."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import flow_grpo as grpo
import vla
from conftest import backward_grads, main_checking_threads, small_rl_args, tiny_policy, write_sft_checkpoint


def test_group_advantages_on_hand_made_returns():
    returns = torch.tensor([1.0, 0.0, 0.0, 1.0,   2.0, 2.0, 2.0, 2.0,   0.0, 0.0, 0.0, 3.0])
    success = returns > 0
    adv, keep = grpo.group_advantages(returns, success, 4, filter_groups=False)
    # group 0: mean 0.5, population std 0.5 -> +-1; group 1: zero variance -> 0; group 2: mean 0.75, std 1.299
    torch.testing.assert_close(adv[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(adv[4:8], torch.zeros(4))
    s = np.std([0, 0, 0, 3.0])
    torch.testing.assert_close(adv[8:], torch.tensor([-0.75, -0.75, -0.75, 2.25]) / (s + 1e-6))
    assert keep.all()
    _, keep = grpo.group_advantages(returns, success, 4, filter_groups=True)
    # success rates 0.5 (kept), 1.0 (dropped), 0.25 (kept)
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4


def test_group_members_start_from_the_same_simulator_state():
    envs = grpo.ManiSkillEnvs("PickCube-v1", 4, "state", "pd_ee_delta_pose", 10, False, torch.device("cpu"))
    obs = envs.reset(seed=[7, 7, 8, 8])
    states = [torch.as_tensor(e.unwrapped.get_state()) for e in envs.env.envs]  # full physics state per env
    assert torch.equal(states[0], states[1]) and torch.equal(states[2], states[3])
    assert not torch.equal(states[0], states[2])
    assert torch.equal(obs["state"][0], obs["state"][1]) and not torch.equal(obs["state"][1], obs["state"][2])
    envs.close()


def test_ratio_one_on_first_epoch_and_kl_zero_at_start():
    policy, norm = tiny_policy()
    policy.freeze_vlm()
    ref = tiny_policy()[0].eval()  # identical weights
    args = replace(grpo.Args(), kl_coef=0.1, action_chunk=5)
    state, prompts = torch.randn(8, 42), ["pick"] * 8
    with torch.no_grad():
        prefix = policy.encode_prefix(norm.normalize("state", state), prompts)
        _, xb, xa, k, logp = grpo.sample_chunk(policy, prefix, args, 7)
    adv = torch.randn(8)

    def loss(**kw):
        return grpo.grpo_loss(policy, ref, norm, args, 7, state, None, prompts, xb, xa, k, logp, adv, **kw)
    # the rollout's stored prefix (no VLM pass in the update) gives the loss and gradients of a recomputed one
    stored_loss, _, stored = backward_grads(lambda: loss(prefix=prefix), policy)
    recomputed_loss, stats, grads = backward_grads(loss, policy)
    torch.testing.assert_close(recomputed_loss, stored_loss)
    torch.testing.assert_close(grads, stored)
    assert abs(stats["ratio_mean"] - 1) < 1e-5 and stats["approx_kl"] < 1e-9 and stats["kl_ref"] < 1e-9
    assert all(p.grad is None for p in policy.vlm.parameters())
    assert policy.pi0.action_out_proj.weight.grad.abs().sum() > 0


def test_smoke_two_iterations_and_resume(tmp_path, capsys, monkeypatch):
    write_sft_checkpoint(tmp_path)
    args = small_rl_args(grpo, tmp_path, num_envs=4, anneal_lr=True)
    main_checking_threads(grpo, args, monkeypatch, "sample_chunk", "grpo_loss")  # the update at --update-threads
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "rollout_time" in r]
    assert [r["iteration"] for r in train] == [1, 2] and all(r["decisions"] > 0 for r in train)
    assert train[0]["train/episode_len"] <= 10
    capsys.readouterr()
    # the resumed iteration stops after one epoch: any approximate KL exceeds a negative --target-kl
    grpo.main(replace(args, total_iterations=3, resume=True, target_kl=-1.0, prefix_store_gb=1e-6))
    # a changed hyperparameter is reported; more iterations (the usual reason to resume) and memory knobs are not
    assert f"--resume with changed options: --target-kl {args.target_kl} -> -1.0\n" in capsys.readouterr().out
    with pytest.raises(ValueError, match="the run has --action-chunk 4, not 2: pass the run's values again"):
        grpo.main(replace(args, total_iterations=4, resume=True, action_chunk=2))
    assert vla.load_checkpoint(tmp_path / "run" / "checkpoint")[3]["iteration"] == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # no critic to warm up: the lr falls linearly from the first iteration towards 0 at the end of the resumed run
    assert [r["lr"] for r in rows if "rollout_time" in r] == pytest.approx([args.lr, args.lr / 2, args.lr / 3])
    assert [r["epochs"] for r in rows if "rollout_time" in r] == [args.update_epochs] * 2 + [1] and args.update_epochs > 1
    # the updates reused the rollout's prefixes; the resumed one, with no room for them, recomputed them
    assert [r["prefix_stored"] for r in rows if "rollout_time" in r] == [1.0, 1.0, 0.0]


def test_bad_inputs(tmp_path):
    write_sft_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="--num-envs 6 must be a multiple of --group-size 4"):
        grpo.main(replace(small_rl_args(grpo, tmp_path, num_envs=4), num_envs=6, group_size=4))
    with pytest.raises(ValueError, match="multiple of --group-size 1"):
        grpo.main(replace(small_rl_args(grpo, tmp_path, num_envs=4), group_size=1))
    with pytest.raises(FileNotFoundError, match="no SFT checkpoint"):
        grpo.main(replace(small_rl_args(grpo, tmp_path, num_envs=4), checkpoint=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="--update-threads 0 must be at least 1"):
        grpo.main(replace(small_rl_args(grpo, tmp_path), update_threads=0))

"""flow_grpo.py: group advantages, shared initial states, the loss against its formula, one update step, smoke run
and resume, errors."""

import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro

import environments
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
    envs = environments.ManiSkillEnvs("PickCube-v1", 4, "state", "pd_ee_delta_pose", 10, False, torch.device("cpu"))
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
    assert "| 2/2 [" in capsys.readouterr().err  # the progress bar reaches its total
    # a run killed after logging iteration 3 but before saving it (the last line cut short): resuming redoes it
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**train[-1], "iteration": 3}) + "\n" + '{"iteration": 3, "glo')
    # the resumed iteration stops after one epoch: any approximate KL exceeds a negative --target-kl
    grpo.main(replace(args, total_iterations=3, resume=True, target_kl=-1.0, prefix_store_gb=1e-6))
    out = capsys.readouterr().out
    assert f"resuming {tmp_path / 'run'} from iteration 2\n" in out
    # a changed hyperparameter is reported; more iterations (the usual reason to resume) and memory knobs are not
    assert f"--resume with changed options: --target-kl {args.target_kl} -> -1.0\n" in out
    assert grpo.main(replace(args, total_iterations=3, resume=True)) is None  # nothing left to do
    out = capsys.readouterr().out
    assert f"{tmp_path / 'run'} already finished at iteration 3 of 3: raise --total-iterations" in out
    with pytest.raises(ValueError, match="the run has --action-chunk 4, not 2: pass the run's values again"):
        grpo.main(replace(args, total_iterations=4, resume=True, action_chunk=2))
    assert vla.load_checkpoint(tmp_path / "run" / "checkpoint")[3]["iteration"] == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "rollout_time" in r] == [1, 2, 3]  # each iteration once
    assert [r["iteration"] for r in rows if "eval/return" in r] == [0, 2, 3]
    # no critic to warm up: the lr falls linearly from the first iteration towards 0 at the end of the resumed run
    assert [r["lr"] for r in rows if "rollout_time" in r] == pytest.approx([args.lr, args.lr / 2, args.lr / 3])
    assert [r["epochs"] for r in rows if "rollout_time" in r] == [args.update_epochs] * 2 + [1]
    assert args.update_epochs > 1
    # the updates reused the rollout's prefixes; the resumed one, with no room for them, recomputed them
    assert [r["prefix_stored"] for r in rows if "rollout_time" in r] == [1.0, 1.0, 0.0]


def test_bad_inputs(tmp_path):
    write_sft_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="--num-envs 6: must be a multiple of --group-size 4"):
        grpo.main(replace(small_rl_args(grpo, tmp_path, num_envs=4), num_envs=6, group_size=4))
    with pytest.raises(ValueError, match="multiple of --group-size 1"):
        grpo.main(replace(small_rl_args(grpo, tmp_path, num_envs=4), group_size=1))
    with pytest.raises(grpo.UsageError, match="no SFT checkpoint"):
        grpo.main(replace(small_rl_args(grpo, tmp_path, num_envs=4), checkpoint=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="--update-threads 0: must be at least 1"):
        grpo.main(replace(small_rl_args(grpo, tmp_path), update_threads=0))


# ---- the loss against formulas written here, on hand-made ratios far from 1
def sde_step_logp_and_mean(policy, prefix, xb, xa, k, K, a, C, A):
    """log N(x_k*+1; mean, std^2) [M, C, A] and the SDE mean [M, H, D], written out from the paper's equations."""
    t = 1.0 - k.double() / K
    v = policy.velocity(prefix, xb, t.float())[0].double()
    t = t[:, None, None]
    s = a * torch.sqrt(t / torch.where(t < 1, 1 - t, torch.full_like(t, 1 / K)))  # s_1 uses the next grid point
    mean = xb.double() - (v + s**2 / (2 * t) * (xb.double() + (1 - t) * v)) / K
    std = s * (1 / K) ** 0.5
    z = (xa.double() - mean)[:, :C, :A] / std
    return -z**2 / 2 - torch.log(std) - 0.5 * np.log(2 * np.pi), mean, std


def clipped_objective(ratio, adv, eps):
    """PPO's pessimistic surrogate, -min(r A, clip(r) A), element by element in plain Python."""
    return float(np.mean([-min(r * a, min(max(r, 1 - eps), 1 + eps) * a) for r, a in zip(ratio, adv)]))


@pytest.mark.parametrize("ratio_level", ["chunk", "token"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
def test_grpo_loss_matches_the_clipped_surrogate_written_out(ratio_level, kl_coef):
    policy, norm = tiny_policy()
    policy.freeze_vlm()
    ref = tiny_policy(seed=1)[0].eval() if kl_coef else None  # another policy: a KL well above 0
    args = replace(grpo.Args(), ratio_level=ratio_level, kl_coef=kl_coef, clip_coef=0.2, noise_level=0.8)
    C, A, M = args.action_chunk, 7, 8
    state, prompts = torch.randn(M, 42), ["pick"] * M
    with torch.no_grad():
        prefix = policy.encode_prefix(norm.normalize("state", state), prompts)
        _, xb, xa, k, _ = grpo.sample_chunk(policy, prefix, args, A)
        logp, mean, std = sde_step_logp_and_mean(policy, prefix, xb, xa, k, 4, 0.8, C, A)
    # both clip sides and the inside, with positive and negative advantages
    ratio = torch.tensor([3.0, 0.3, 1.1, 0.5, 2.0, 0.95, 0.1, 1.6], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -2.0, -0.5, -1.5, 0.7])
    if ratio_level == "chunk":  # one ratio per decision: its log spread over the C x A entries
        old = logp - (ratio.log() / (C * A))[:, None, None]
        expected = clipped_objective(ratio.tolist(), adv.tolist(), 0.2)
    else:  # one ratio per entry, the decision's advantage on each
        ratio = torch.exp(torch.linspace(-1.5, 1.5, M * C * A, dtype=torch.float64)[torch.randperm(M * C * A)])
        old = logp - ratio.log().view(M, C, A)
        expected = clipped_objective(ratio.tolist(), adv.repeat_interleave(C * A).tolist(), 0.2)
    kl = 0.0
    if ref is not None:
        with torch.no_grad():
            ref_prefix = ref.encode_prefix(norm.normalize("state", state), prompts)
            ref_mean = sde_step_logp_and_mean(ref, ref_prefix, xb, xa, k, 4, 0.8, C, A)[1]
        kl = float(((mean - ref_mean)[:, :C, :A] ** 2 / (2 * std**2)).sum((1, 2)).mean())
        assert kl > 1e-3
    loss, stats = grpo.grpo_loss(policy, ref, norm, args, A, state, None, prompts, xb, xa, k, old.float(), adv,
                                 prefix=prefix)
    assert loss.item() == pytest.approx(expected + kl_coef * kl, rel=1e-4, abs=1e-5)
    assert stats["kl_ref"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(float(((ratio - 1).abs() > 0.2).double().mean()))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_step_moves_the_sample_log_prob_with_its_advantage(sign):
    """One AdamW step on one decision whose ratio lies below the clip range for A > 0 (above it for A < 0), where the
    surrogate is unclipped: the log-prob rises for a positive advantage, falls for a negative one. Past the clip range
    on the other side the loss gives no gradient at all."""
    policy, norm = tiny_policy()
    policy.freeze_vlm()
    args = replace(grpo.Args(), noise_level=0.8)
    state, prompts = torch.randn(1, 42), ["pick"]
    with torch.no_grad():
        prefix = policy.encode_prefix(norm.normalize("state", state), prompts)
        _, xb, xa, k, logp = grpo.sample_chunk(policy, prefix, args, 7)
    adv = torch.tensor([sign])

    def loss_at(ratio):  # old log-prob set so that the current ratio is `ratio`
        old = logp - math.log(ratio) / logp.numel()
        return grpo.grpo_loss(policy, None, norm, args, 7, state, None, prompts, xb, xa, k, old, adv, prefix=prefix)
    policy.zero_grad(set_to_none=True)
    loss_at(2.0 if sign > 0 else 0.5)[0].backward()  # clipped: the trust region stops the push
    assert all(p.grad is None or not p.grad.any() for p in policy.trainable_parameters())
    with torch.no_grad():
        before = sde_step_logp_and_mean(policy, prefix, xb, xa, k, 4, 0.8, args.action_chunk, 7)[0].sum()
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    opt.zero_grad(set_to_none=True)
    loss_at(0.5 if sign > 0 else 2.0)[0].backward()
    opt.step()
    with torch.no_grad():  # the same transition's log-prob under the updated policy
        after = sde_step_logp_and_mean(policy, prefix, xb, xa, k, 4, 0.8, args.action_chunk, 7)[0].sum()
    assert (after - before) * sign > 1e-4


# ---- bad input: one error line naming the option, exit status 2, before anything slow starts
def corrupt(tmp_path, name, data):
    (tmp_path / "sft" / name).write_bytes(data)


def trained_for_another_task(tmp_path):
    meta = json.loads((tmp_path / "sft" / "meta.json").read_text())
    (tmp_path / "sft" / "meta.json").write_text(json.dumps({**meta, "env_id": "PickCube-v1"}))


BAD_INPUTS = {  # options, what to do to the SFT checkpoint first, what the message must name
    "too many minibatches": (["--num-minibatches", "1000"], None, "--num-minibatches 1000"),
    "no envs": (["--num-envs", "0"], None, "--num-envs 0"),
    "negative envs": (["--num-envs", "-8"], None, "--num-envs -8"),
    "no denoising steps": (["--denoise-steps", "0"], None, "--denoise-steps 0"),
    "negative denoising steps": (["--denoise-steps", "-2"], None, "--denoise-steps -2"),
    "no noise": (["--noise-level", "0"], None, "--noise-level 0"),
    "negative noise": (["--noise-level", "-1"], None, "--noise-level -1"),
    "group size not dividing the envs": (["--group-size", "3"], None, "--group-size 3"),
    "checkpoint of another task": (["--env-id", "StackCube"], trained_for_another_task, "--env-id StackCube"),
    "truncated weights": ([], lambda p: corrupt(p, "model.safetensors", b"\x10\x00"), "model.safetensors"),
    "invalid config json": ([], lambda p: corrupt(p, "config.json", b"{oops"), "config.json"),
}
COMMON = ["--num-envs", "8", "--group-size", "8", "--max-episode-steps", "10", "--num-minibatches", "2"]


def damaged_checkpoint(tmp_path, case):
    options, damage, named = BAD_INPUTS[case]
    write_sft_checkpoint(tmp_path)
    if damage:
        damage(tmp_path)
    return ["--checkpoint", str(tmp_path / "sft"), "--output-dir", str(tmp_path / "run"), *COMMON, *options], named


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_usage_error_naming_it(tmp_path, case):
    """In this process (the command line parsed as the script parses it): each bad input stops main() with an error
    that names it, before anything slow starts."""
    options, named = damaged_checkpoint(tmp_path, case)
    start = time.time()
    with pytest.raises((grpo.UsageError, vla.CheckpointError)) as error:
        grpo.main(tyro.cli(grpo.Args, args=options))
    assert named in str(error.value) and "\n" not in str(error.value)
    assert time.time() - start < 30  # nothing slow started: building the envs alone takes longer
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["no envs", "truncated weights"])  # an option, and a damaged checkpoint
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, case):
    options, named = damaged_checkpoint(tmp_path, case)
    start = time.time()
    proc = subprocess.run([sys.executable, "flow_grpo.py", *options], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and named in last and "Traceback" not in proc.stderr
    assert time.time() - start < 30  # nothing slow started: building the envs alone takes longer
    assert not (tmp_path / "run").exists()

"""Helpers shared by the RL script tests."""

import importlib.util
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

import vla


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the benchmarks folder is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_policy(action_dim=7, state_dim=42, seed=0):
    """A random tiny policy and a normaliser of plausible ManiSkill statistics."""
    torch.manual_seed(seed)
    policy = vla.build("tiny", action_dim=action_dim, state_dim=state_dim)
    rng = np.random.default_rng(seed)
    norm = vla.Normalizer.from_data(rng.normal(size=(100, state_dim)), rng.uniform(-1, 1, (100, action_dim)))
    return policy, norm


def backward_grads(loss_fn, *modules):
    """Clear the modules' gradients, run loss_fn() -> (loss, stats) and its backward; -> loss, stats and a copy of
    every gradient (the gradients stay in place for further checks)."""
    for m in modules:
        m.zero_grad(set_to_none=True)
    loss, stats = loss_fn()
    loss.backward()
    grads = {f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters()
             if p.grad is not None}
    return loss, stats, grads


def main_checking_threads(module, args, monkeypatch, rollout_fn: str, loss_fn: str):
    """module.main(args) at --update-threads one above this process's torch threads. Asserts that every call of the
    loss (the update) ran at that count and every call of the rollout's sampler at the process's own, which the run
    leaves as it found it. -> what main returns."""
    threads = torch.get_num_threads()
    seen = {rollout_fn: [], loss_fn: []}  # name -> torch's thread count at each call
    for name, calls in seen.items():
        def record(*a, _f=getattr(module, name), _calls=calls, **kw):
            _calls.append(torch.get_num_threads())
            return _f(*a, **kw)
        monkeypatch.setattr(module, name, record)
    out = module.main(replace(args, update_threads=threads + 1))
    assert set(seen[loss_fn]) == {threads + 1} and set(seen[rollout_fn]) == {threads} == {torch.get_num_threads()}
    return out


def write_sft_checkpoint(tmp_path, action_dim=7):
    """What sft_baseline.py leaves for the RL scripts, without training: tmp_path/sft."""
    policy, norm = tiny_policy(action_dim)
    vla.save_checkpoint(tmp_path / "sft", policy, norm, meta={"obs_mode": "state", "control_mode": "pd_ee_delta_pose"})


def small_rl_args(module, tmp_path, **kw):
    """A seconds-long configuration of an RL script: 2 iterations of tiny rollouts, 2-episode evaluations."""
    small = dict(checkpoint=str(tmp_path / "sft"), output_dir=str(tmp_path / "run"), num_envs=2, num_steps=2,
                 group_size=2, num_minibatches=2, update_epochs=2, total_iterations=2, eval_every=0, eval_episodes=2,
                 num_eval_envs=2, max_episode_steps=10, save_every=1, critic_warmup_iters=1)
    names = {f.name for f in fields(module.Args)}
    return replace(module.Args(), **{k: v for k, v in {**small, **kw}.items() if k in names})


def assert_same(x, y, where=""):
    """Nested dicts / tuples / lists of tensors (or None) equal entry by entry, dtype and device included."""
    if isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            assert_same(x[k], y[k], f"{where}/{k}")
    elif isinstance(x, (tuple, list)):
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            assert_same(u, v, f"{where}[{i}]")
    else:
        assert (x is None and y is None) or (x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)), where


def to_openpi(policy):
    """Write our weights under openpi's key names (METHOD.md section 5), independently of vla's mapping."""
    out = {}
    for k, v in policy.state_dict().items():
        k = k.replace("pi0.model.vlm.", "paligemma_with_expert.paligemma.model.")
        k = k.replace("pi0.model.dit.", "paligemma_with_expert.gemma_expert.model.")
        k = k.replace("pi0.embed_action_time.", "").replace("pi0.action_out_proj", "action_out_proj")
        out[k] = v.clone()
    # openpi saves the tied VLM embedding as lm_head only; the expert's lm_head is unused.
    out["paligemma_with_expert.paligemma.lm_head.weight"] = out.pop(
        "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight")
    out["paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.zeros(3, 64)
    return out

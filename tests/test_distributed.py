"""torchrun on CPU: 2 ranks with the gloo backend. After the updates both ranks hold identical parameters (the
gradients were averaged), and the logged evaluation is the mean over both ranks' episodes."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flow_grpo
import flow_noise_ppo
import flow_sde_ppo
import sft_baseline
import vla
from conftest import write_sft_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EVAL = dict(eval_episodes=4, num_eval_envs=2, max_episode_steps=10)  # 2 rounds of 2 episodes: one per rank
RL = dict(num_envs=4, total_iterations=2, eval_every=0, save_every=1, update_epochs=2, num_minibatches=2,
          lr=1e-3, **EVAL)
CASES = {
    "flow_sde_ppo": (flow_sde_ppo, dict(RL, num_steps=2, critic_warmup_iters=0)),
    "flow_noise_ppo": (flow_noise_ppo, dict(RL, num_steps=2, critic_warmup_iters=0)),
    "flow_grpo": (flow_grpo, dict(RL, group_size=2)),
    "sft_baseline": (sft_baseline, dict(train_steps=3, batch_size=8, num_demos=3, lr=1e-3, **EVAL)),
}


def run_two_ranks(module_name: str, fields: dict, out: Path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "distributed_worker.py"), module_name, json.dumps(fields), str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_stay_identical_and_reduce_metrics(tmp_path, name):
    module, fields = CASES[name]
    fields = {**fields, "output_dir": str(tmp_path / "run")}
    if name == "sft_baseline":
        fields["demo_path"] = str(sft_baseline.generate_maniskill_demos(
            "PickCube-v1", 3, "state", "pd_ee_delta_pose", root=tmp_path / "demos"))
    else:
        write_sft_checkpoint(tmp_path)
        fields["checkpoint"] = str(tmp_path / "sft")
    run_two_ranks(name, fields, tmp_path)

    # identical parameters on both ranks, and the RL update really moved the (trainable part of the) policy
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), f"{k} differs between the ranks"
    if name != "sft_baseline":
        start = vla.load_checkpoint(tmp_path / "sft")[0].state_dict()
        changed = [k for k, v in start.items() if not torch.equal(ranks[0][f"0.{k}"], v)]
        assert changed and not any(".vlm." in k for k in changed), changed

    # the logged evaluation = a one-process evaluation of the saved policy over all 4 episodes
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "eval/return" in r][-1]
    policy, norm, _, meta = vla.load_checkpoint(tmp_path / "run" / "checkpoint")
    assert all(torch.equal(v, ranks[0][f"0.{k}"]) for k, v in policy.state_dict().items())  # rank 0 saved
    args = replace(module.Args(), **{k: v for k, v in fields.items() if k != "checkpoint"},
                   obs_mode=meta["obs_mode"], control_mode=meta["control_mode"], action_chunk=meta["action_chunk"])
    envs = module.make_envs(args, 2, ignore_terminations=True, device=torch.device("cpu"))
    mine = module.evaluate(policy, norm, envs, args, 4)
    envs.close()
    assert mine["return"] == pytest.approx(logged["eval/return"], rel=1e-4)
    assert mine["success_once"] == pytest.approx(logged["eval/success_once"])
    if name in ("flow_sde_ppo", "flow_noise_ppo"):  # env steps are counted over both ranks
        assert rows[-1]["global_step"] == 2 * 4 * 2 * meta["action_chunk"]

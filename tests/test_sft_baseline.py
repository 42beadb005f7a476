"""sft_baseline.py: loss, demo readers, env conventions, end-to-end run, clear errors."""

import contextlib
import importlib
import json
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import tyro

import environments
import sft_baseline as sft
import vla
from conftest import assert_same

CTRL = "pd_ee_delta_pose"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def maniskill_demos(tmp_path_factory):
    """Three motion-planner PickCube demos converted to pd_ee_delta_pose + state obs (about 10 s)."""
    return sft.generate_maniskill_demos("PickCube-v1", 3, "state", CTRL, root=tmp_path_factory.mktemp("demos"))


def small_args(tmp_path, **kw):
    return replace(sft.Args(), train_steps=4, batch_size=8, num_demos=3, eval_episodes=2, num_eval_envs=2,
                   max_episode_steps=10, output_dir=str(tmp_path / "run"), **kw)


def test_loss_decreases_on_fixed_batch():
    torch.manual_seed(0)
    policy = vla.build("tiny", action_dim=7, state_dim=12, chunk_size=8)
    state, actions = torch.randn(16, 12), torch.randn(16, 8, 7)
    mask = torch.ones(16, 8)
    prompts = ["pick"] * 16

    def loss_at_fixed_noise():
        torch.manual_seed(123)  # same eps and t each time: a deterministic measure of fit
        with torch.no_grad():
            return sum(sft.flow_matching_loss(policy, state, prompts, None, actions, mask) for _ in range(8)).item() / 8

    before = loss_at_fixed_noise()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    for _ in range(150):
        loss = sft.flow_matching_loss(policy, state, prompts, None, actions, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = loss_at_fixed_noise()
    assert after < 0.6 * before, (before, after)


def test_flow_matching_loss_target_mask_and_padding():
    """An oracle velocity (eps - a, recovered from x_t) has zero loss, whatever it outputs on masked steps and
    padded action dims; an error on one valid entry is counted with the right weight."""
    actions = torch.randn(4, 8, 3)
    mask = torch.ones(4, 8)
    mask[:, 5:] = 0

    class Oracle:
        spec = {"max_action_dim": 6}
        bump = 0.0

        def encode_prefix(self, *args):
            return None

        def velocity(self, prefix, x_t, t):
            a = torch.nn.functional.pad(actions, (0, 3))
            u = (x_t - a) / t[:, None, None]  # x_t = t eps + (1 - t) a  =>  eps - a = (x_t - a) / t
            u[:, 5:] += 100.0  # masked steps
            u[..., 3:] += 100.0  # padded action dims
            u[0, 0, 0] += self.bump  # one valid entry
            return u, None

    oracle = Oracle()
    assert sft.flow_matching_loss(oracle, None, None, None, actions, mask).item() < 1e-10
    oracle.bump = 2.0
    expected = 2.0 ** 2 / 3 / mask.sum()  # squared error averaged over 3 dims, then over valid steps
    torch.testing.assert_close(sft.flow_matching_loss(oracle, None, None, None, actions, mask), expected)


def test_flow_matching_time_distribution(monkeypatch):
    """t ~ 0.001 + 0.999 Beta(1.5, 1): mean 0.6004 (a uniform t would have 0.5), and Beta's 0 and 1 map to 0.001
    (the path's clean end is never trained at exactly t = 0) and 1."""
    seen = []

    class Recorder:
        spec = {"max_action_dim": 2}

        def encode_prefix(self, *args):
            return None

        def velocity(self, prefix, x_t, t):
            seen.append(t)
            return torch.zeros_like(x_t), None

    torch.manual_seed(0)
    sft.flow_matching_loss(Recorder(), None, None, None, torch.zeros(8000, 1, 2), torch.ones(8000, 1))
    t = seen[0]
    assert t.shape == (8000,) and t.min() >= 0.001 and t.max() <= 1.0
    assert abs(t.mean().item() - 0.6004) < 0.01 and abs(t.var().item() - 0.999 ** 2 * 1.5 / (2.5 ** 2 * 3.5)) < 0.005
    monkeypatch.setattr(torch.distributions.Beta, "sample", lambda self, shape: torch.tensor([0.0, 1.0]))
    sft.flow_matching_loss(Recorder(), None, None, None, torch.zeros(2, 1, 2), torch.ones(2, 1))
    torch.testing.assert_close(seen[1], torch.tensor([0.001, 1.0]))


@pytest.mark.parametrize("steps", [1, 4])
def test_sample_actions_integrates_a_straight_flow_exactly(steps):
    """With the exact velocity of the straight path to a chunk a, v(x, t) = (x - a) / t, K Euler steps from noise
    at t = 1 to t = 0 land on a exactly, whatever K: the sign, step size and time grid of the ODE are right."""
    a = torch.randn(3, 8, 5)

    class Straight:
        spec = {"chunk_size": 8, "max_action_dim": 5}

        def encode_prefix(self, *args):
            return None

        def velocity(self, prefix, x, t):
            assert 0 < t <= 1
            return (x - a) / t, None

    class Identity:
        def normalize(self, key, x):
            return x

        def unnormalize(self, key, x):
            return x

    out = sft.sample_actions(Straight(), Identity(), {"state": torch.zeros(3, 4), "images": None}, None, steps, 3)
    torch.testing.assert_close(out, a[..., :3], atol=1e-5, rtol=1e-5)


def test_make_chunks_pads_and_masks_episode_tails():
    ep = {"actions": np.arange(4, dtype=np.float32)[:, None].repeat(2, 1)}
    chunks, mask = sft.make_chunks([ep], 3)
    assert chunks.shape == (4, 3, 2) and mask.shape == (4, 3)
    np.testing.assert_array_equal(chunks[:, :, 0], [[0, 1, 2], [1, 2, 3], [2, 3, 3], [3, 3, 3]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]])


def test_maniskill_demo_reader_shapes(maniskill_demos):
    eps = sft.load_maniskill_demos(maniskill_demos, 2, CTRL)
    assert len(eps) == 2
    for ep in eps:
        T = len(ep["actions"])
        assert ep["actions"].shape == (T, 7) and ep["state"].shape == (T, 42) and ep["images"] is None
        assert ep["actions"].dtype == np.float32 and np.abs(ep["actions"]).max() <= 1.0
    meta = json.loads(maniskill_demos.with_suffix(".json").read_text())
    assert meta["episodes"][0]["success"] and meta["env_info"]["env_kwargs"]["control_mode"] == CTRL


def test_demos_start_as_the_envs_reset(maniskill_demos):
    """The replay tool resets its scene between demos without stepping it, so the file's first observations carry
    the previous demo's is_grasped; the reader clears it, and each demo then starts exactly as the training envs'
    reset with its seed does (the rest of the episode as the file holds it)."""
    eps = sft.load_maniskill_demos(maniskill_demos, 3, CTRL)
    seeds = [ep["episode_seed"] for ep in json.loads(maniskill_demos.with_suffix(".json").read_text())["episodes"]]
    envs = environments.ManiSkillEnvs("PickCube-v1", 3, "state", CTRL, max_steps=10, ignore_terminations=True,
                             device=torch.device("cpu"), workers=1)
    reset = envs.reset(seed=seeds)["state"].numpy()  # [3, 42]
    envs.close()
    with h5py.File(maniskill_demos, "r") as f:
        stored = [f[f"traj_{i}"]["obs"][: len(ep["actions"])] for i, ep in enumerate(eps)]  # [T, 42] each
    assert [s[0, 18] for s in stored] == [0, 1, 1]  # is_grasped: stale after demos that ended holding the cube
    for ep, s, r in zip(eps, stored, reset):
        np.testing.assert_array_equal(ep["state"][0], r)
        np.testing.assert_array_equal(ep["state"][1:], s[1:])


def test_planner_acceleration_limit_sets_demo_pace(tmp_path, maniskill_demos, capsys):
    """The same seeds planned at 2.0 rad/s^2 take fewer steps than at ManiSkill's own 0.9 (the default), in the
    planner's file and after conversion, and each setting has its own cache (a 0.9 file is never reused for 2.0),
    which another control mode converts without planning again."""
    fast = sft.generate_maniskill_demos("PickCube-v1", 3, "state", CTRL, root=tmp_path, joint_acc=2.0)
    assert fast != maniskill_demos and "planner_acc2" in str(fast) and "planner_acc0.9" in str(maniskill_demos)

    def lengths(h5):
        episodes = json.loads(h5.with_suffix(".json").read_text())["episodes"]
        return [ep["elapsed_steps"] for ep in episodes]

    for name in ("mp3.h5", "mp3.state.pd_ee_delta_pose.physx_cpu.h5"):
        short, base = lengths(fast.parent / name), lengths(maniskill_demos.parent / name)
        assert len(short) == len(base) == 3
        assert all(f < b for f, b in zip(short, base)), (short, base)
    assert sft.generate_maniskill_demos("PickCube-v1", 3, "state", CTRL, root=tmp_path, joint_acc=2.0) == fast

    # Another control mode converts the planner's file of that pace instead of planning again.
    planned = fast.parent / "mp3.h5"
    stamp, _ = planned.stat().st_mtime_ns, capsys.readouterr()
    joint = sft.generate_maniskill_demos("PickCube-v1", 2, "state", "pd_joint_delta_pos", root=tmp_path, joint_acc=2.0)
    assert joint == fast.parent / "mp3.state.pd_joint_delta_pos.physx_cpu.h5"
    assert planned.stat().st_mtime_ns == stamp and "generating" not in capsys.readouterr().out
    episodes = sft.load_maniskill_demos(joint, 3, "pd_joint_delta_pos")
    assert len(episodes) == 3 and all(ep["actions"].shape[1] == 8 for ep in episodes)  # 7 joints + gripper


def test_maniskill_envs_cpu_batch_and_final_obs():
    envs = environments.ManiSkillEnvs("PickCube-v1", 2, "state", CTRL, max_steps=3, ignore_terminations=True,
                             device=torch.device("cpu"))
    obs = envs.reset(seed=0)
    assert obs["state"].shape == (2, 42) and obs["images"] is None and envs.action_dim == 7
    for step in range(3):
        obs, rew, term, trunc, info = envs.step(torch.zeros(2, 7))
        assert rew.shape == (2,) and info["success"].dtype == torch.bool
    assert trunc.all() and not term.any()
    # Auto-reset in the same step: obs is the new episode's first, final_obs the old episode's last.
    assert not torch.equal(obs["state"], info["final_obs"]["state"])
    assert set(info["episode"]) >= {"success_once", "success_at_end", "return", "episode_len"}
    assert info["episode"]["episode_len"].tolist() == [3, 3]
    envs.close()


SCRIPTS = ["sft_baseline", "flow_sde_ppo", "flow_noise_ppo", "flow_grpo"]  # each builds its envs with environments.py


def test_env_worker_processes_match_one_process(monkeypatch):
    """3 CPU envs split over 2 worker processes return exactly what one in-process SyncVectorEnv returns, through
    two auto-resets (the new episodes come from each env's own seeded RNG, not a process's global one); and the
    inference mode they step in (for speed) returns what stepping with autograd on does."""
    def rollout(workers):
        envs = environments.ManiSkillEnvs("PickCube-v1", 3, "state", CTRL, max_steps=4, ignore_terminations=True,
                               device=torch.device("cpu"), workers=workers)
        g = torch.Generator().manual_seed(0)
        out = [envs.reset(seed=5)] + [envs.step(torch.rand(3, 7, generator=g) * 2 - 1) for _ in range(9)]
        envs.close()
        return out

    one, two = rollout(1), rollout(2)
    assert_same(one, two)
    tensors = [one[0]["state"]]
    for o, r, te, tr, i in one[1:]:
        tensors += [o["state"], r, te, tr, i["success"], i["final_obs"]["state"], *i["episode"].values()]
    assert not any(t.is_inference() for t in tensors)  # later in-place writes and autograd would refuse them
    monkeypatch.setattr(environments.ManiSkillEnvs, "cpu_sim", lambda self: contextlib.nullcontext())
    assert_same(one, rollout(1))
    assert one[4][4]["episode"]["episode_len"].tolist() == [4, 4, 4]  # the steps did cross episode ends


def test_concat_envs_fills_keys_a_worker_left_out():
    """A worker whose envs did not finish has no final_obs / final_info: they come back as SyncVectorEnv fills them."""
    done = {"success": np.array([True, False]), "final_obs": np.array([np.ones(2), None], dtype=object),
            "final_info": {"episode": {"return": np.array([3.0, 0.0]), "_return": np.array([True, False])}}}
    running = {"success": np.array([False])}
    obs = (np.zeros((2, 4)), np.ones((1, 4)))
    out_obs, info = environments.concat_envs([(obs[0], done), (obs[1], running)], [2, 1])
    assert out_obs.shape == (3, 4) and out_obs[2].tolist() == [1, 1, 1, 1]
    assert info["success"].tolist() == [True, False, False] and info["final_obs"][2] is None
    assert info["final_obs"].dtype == object and info["final_obs"][0].tolist() == [1, 1]
    assert info["final_info"]["episode"]["return"].tolist() == [3, 0, 0]
    assert info["final_info"]["episode"]["_return"].tolist() == [True, False, False]


@pytest.mark.parametrize("module", SCRIPTS)
def test_sim_backend_errors_name_the_fix(module, monkeypatch):
    """A bad --sim-backend, physx_cuda without CUDA, and a GPU simulator whose PhysX library cannot be fetched
    (SAPIEN downloads it on first use) each fail with a message that names --sim-backend physx_cpu."""
    import sapien

    m = importlib.import_module(module)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="choose auto, physx_cuda or physx_cpu"):
        m.make_envs(replace(m.Args(), sim_backend="gpu"), 2, True, cpu)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        m.make_envs(replace(m.Args(), sim_backend="physx_cuda"), 2, True, cpu)

    def offline():
        raise ConnectionError("Failed to resolve 'github.com'")

    monkeypatch.setattr(sapien.physx, "enable_gpu", offline)
    with pytest.raises(RuntimeError, match=r"libPhysXGpu_64\.so.*--sim-backend physx_cpu"):
        environments.ManiSkillEnvs("PickCube-v1", 2, "state", CTRL, 10, True, cpu, batched="physx_cuda")


def test_end_to_end_smoke_and_resume(tmp_path, maniskill_demos, capsys, monkeypatch):
    args = small_args(tmp_path, demo_path=str(maniskill_demos))
    metrics, _ = sft.main(args)
    assert 0.0 <= metrics["success_once"] <= 1.0 and metrics["episode_len"] == 10
    ckpt = Path(args.output_dir) / "checkpoint"
    policy, norm, extra, meta = vla.load_checkpoint(ckpt)
    assert meta["step"] == 4 and norm is not None and any(k.startswith("optim.") for k in extra)
    assert policy.config.action_dim == 7 and policy.config.state_dim == 42
    rows = [json.loads(line) for line in (Path(args.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/success_once" in r for r in rows) and any("loss" in r for r in rows)
    # The checkpoint evaluates on its own.
    envs = sft.make_envs(args, 2, ignore_terminations=True, device=torch.device("cpu"))
    out = sft.evaluate(policy, norm, envs, args, 2)
    envs.close()
    assert set(out) >= {"success_once", "success_at_end"}
    # Resume continues from step 4 to 6 with the saved optimiser state. A run killed after its checkpoint had logged
    # steps 5 and 6 and half a row: the resumed run logs them again, and each step stands once in metrics.jsonl.
    metrics = Path(args.output_dir) / "metrics.jsonl"
    logged = metrics.read_text()
    metrics.write_text(logged + json.dumps({"step": 5, "loss": 9.0}) + "\n" + '{"step": 6, "lo')
    capsys.readouterr()
    sft.main(replace(args, train_steps=6, resume=True, eval_episodes=0))
    assert vla.load_checkpoint(ckpt)[3]["step"] == 6
    assert f"resuming {args.output_dir} from step 4" in capsys.readouterr().out
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert metrics.read_text().startswith(logged) and [r["step"] for r in rows if "loss" in r] == [1, 4, 6]
    # A finished run says so and builds nothing.
    monkeypatch.setattr(sft, "make_envs", None)
    monkeypatch.setattr(sft, "load_maniskill_demos", None)
    sft.main(replace(args, train_steps=6, resume=True))
    assert f"{args.output_dir} already finished at step 6 of 6: raise --train-steps" in capsys.readouterr().out


def test_bad_inputs(tmp_path, maniskill_demos):
    with pytest.raises(ValueError, match="unknown --env-id 'PickBall'.*PickCube"):
        sft.resolve_env_id("PickBall")
    assert sft.resolve_env_id("PickCube") == ("maniskill", "PickCube-v1")
    assert sft.resolve_env_id("StackCube-v1") == ("maniskill", "StackCube-v1")
    with pytest.raises(FileNotFoundError, match="missing"):
        sft.load_maniskill_demos(tmp_path / "none.h5", 2, CTRL)
    with pytest.raises(ValueError, match="control mode 'pd_ee_delta_pose', not 'pd_joint_delta_pos'"):
        sft.load_maniskill_demos(maniskill_demos, 2, "pd_joint_delta_pos")
    raw = maniskill_demos.parent / "mp3.h5"  # the planner's own file: no observations
    with pytest.raises(ValueError, match="control mode"):
        sft.load_maniskill_demos(raw, 2, CTRL)
    with pytest.raises(ValueError, match="lacks 'actions' or 'obs'"):
        sft.load_maniskill_demos(raw, 2, "pd_joint_pos")
    with pytest.raises(ValueError, match="pass --demo-path"):
        sft.main(small_args(tmp_path, env_id="libero_spatial"))
    with pytest.raises(ValueError, match="--action-chunk 17: exceeds --chunk-size 16"):
        sft.main(small_args(tmp_path, action_chunk=17))
    with pytest.raises(ValueError, match="--planner-joint-acc 0.0: must be positive"):
        sft.main(small_args(tmp_path, planner_joint_acc=0.0))
    # Demos whose action dim does not fit the env: pd_joint_pos demos (8-D) for a pd_ee_delta_pose env (7-D).
    # Fake the planner file as an 8-D-action file with state obs by adding obs to a copy.
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        g = f.create_group("traj_0")
        g["actions"] = np.zeros((5, 8), np.float32)
        g["obs"] = np.zeros((6, 42), np.float32)
    meta = {"env_info": {"env_kwargs": {"control_mode": CTRL}}, "episodes": [{"episode_id": 0}]}
    bad.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="bad.h5 has 8-D actions but PickCube-v1"):
        sft.main(small_args(tmp_path, demo_path=str(bad)))
    with pytest.raises(FileNotFoundError, match="LIBERO demo file"):
        sft.load_libero_demos(tmp_path / "nope.hdf5", 1)
    with h5py.File(tmp_path / "empty.hdf5", "w") as f:
        f.create_group("other")
    with pytest.raises(ValueError, match="empty.hdf5 has no 'data' group"):
        sft.load_libero_demos(tmp_path / "empty.hdf5", 1)


def a_checkpoint(run: Path, meta: str) -> Path:
    """The JSON files of a PickCube checkpoint in run/checkpoint (what the options are checked against)."""
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "meta.json").write_text(meta)
    (run / "checkpoint" / "config.json").write_text(json.dumps({"preset": "tiny", "action_dim": 7, "state_dim": 42,
                                                                "overrides": {"chunk_size": 16}}))
    return run


BAD_OPTIONS = {  # options -> what the one-line error must say (a regular expression)
    "no demos": (["--num-demos", "0"], "--num-demos 0: must be at least 1"),
    "no denoise steps": (["--denoise-steps", "0"], "--denoise-steps 0: must be at least 1"),
    "negative denoise steps": (["--denoise-steps", "-2"], "--denoise-steps -2: must be at least 1"),
    "no training": (["--train-steps", "0"], "--train-steps 0: must be at least 1"),
    "empty batch": (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    "chunk past the horizon": (["--action-chunk", "17"], "--action-chunk 17: exceeds --chunk-size 16"),
    "zero learning rate": (["--lr", "0"], "--lr 0.0: must be positive"),
    "unknown task": (["--env-id", "PickBall"], "unknown --env-id 'PickBall'"),
    "no eval envs": (["--num-eval-envs", "0", "--eval-episodes", "4"], "--num-eval-envs 0: must be at least 1"),
    "unknown simulator": (["--sim-backend", "gpu"], "--sim-backend 'gpu': choose auto, physx_cuda or physx_cpu"),
    "missing demo file": (["--demo-path", "nope.h5"], "--demo-path nope.h5: no such file"),
    "nothing to resume": (["--resume"], "--resume: no checkpoint in"),
    "another task's checkpoint": (["--resume", "--env-id", "StackCube"],
                                  "--env-id StackCube: .* trained on PickCube-v1; resume it with --env-id PickCube-v1"),
    "another horizon": (["--resume", "--chunk-size", "8", "--action-chunk", "4"],
                        "--chunk-size 8: .* predicts 16-step chunks; resume it with --chunk-size 16"),
    "damaged checkpoint": (["--resume"], "meta.json is not valid JSON"),
}


def bad_run(tmp_path, case) -> list[str]:
    """The command line of a BAD_OPTIONS case, with the checkpoint it needs written into its run directory."""
    options, _ = BAD_OPTIONS[case]
    run = tmp_path / "run"
    if case in ("another task's checkpoint", "another horizon"):
        a_checkpoint(run, json.dumps({"env_id": "PickCube-v1", "step": 3}))
    elif case == "damaged checkpoint":
        a_checkpoint(run, '{"env_id": "PickCube-v1", "st')
    return [*options, "--output-dir", str(run)]


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_options_fail_fast_naming_the_option(case, tmp_path, monkeypatch):
    """In this process (the command line parsed as the script parses it): each mistake stops main() with a one-line
    error naming the option, before any demo, env or model is made."""
    def never(*args, **kwargs):
        raise AssertionError("reached past the option checks")

    for name in ("init_distributed", "generate_maniskill_demos", "load_maniskill_demos", "load_libero_demos",
                 "make_envs"):
        monkeypatch.setattr(sft, name, never)
    monkeypatch.setattr(vla, "build", never)
    options, start = bad_run(tmp_path, case), time.time()
    with pytest.raises((sft.UsageError, vla.CheckpointError)) as error:
        sft.main(tyro.cli(sft.Args, args=options))
    assert re.search(BAD_OPTIONS[case][1], str(error.value)) and "\n" not in str(error.value), str(error.value)
    assert time.time() - start < 45 and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("case", ["no demos", "damaged checkpoint"])  # an option, and a damaged checkpoint
def test_bad_options_exit_2_with_one_line(case, tmp_path):
    """The script itself: exit status 2 and one `error:` line, no traceback; seconds, where building the envs alone
    takes about a minute."""
    start = time.time()
    proc = subprocess.run([sys.executable, "sft_baseline.py", *bad_run(tmp_path, case)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and re.search(BAD_OPTIONS[case][1], proc.stderr), proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr and proc.stdout == ""
    assert time.time() - start < 45 and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def libero_file(tmp_path_factory):
    from libero_demo import write_libero_demo_file
    return write_libero_demo_file(tmp_path_factory.mktemp("libero") / "demo.hdf5", num_demos=2, steps=12)


def test_libero_demo_reader_shapes(libero_file):
    eps = sft.load_libero_demos(Path(libero_file), 5)
    assert len(eps) == 2
    with h5py.File(libero_file) as f:
        raw = f["data/demo_0/obs/agentview_rgb"][:]
        prompt = json.loads(f["data"].attrs["problem_info"])["language_instruction"]
    ep = eps[0]
    assert ep["images"].shape == (12, 2, 64, 64, 3) and ep["images"].dtype == np.uint8
    assert ep["state"].shape == (12, 8) and ep["actions"].shape == (12, 7) and ep["prompt"] == prompt
    np.testing.assert_array_equal(ep["images"][:, 0], raw[:, ::-1, ::-1])  # rotated upright
    # Corrupt copies: missing obs key, wrong action dim.
    for damage, message in (("drop", "has no 'obs/eye_in_hand_rgb'"), ("dims", r"has shape \(12, 6\)")):
        bad = Path(libero_file).with_name(f"bad_{damage}.hdf5")
        with h5py.File(libero_file) as src, h5py.File(bad, "w") as dst:
            src.copy("data", dst)
            if damage == "drop":
                del dst["data/demo_0/obs/eye_in_hand_rgb"]
            else:
                del dst["data/demo_0/actions"]
                dst["data/demo_0/actions"] = np.zeros((12, 6))
        with pytest.raises(ValueError, match=f"bad_{damage}.hdf5.*{message}"):
            sft.load_libero_demos(bad, 5)


def test_libero_envs_interface():
    envs = environments.LiberoEnvs("libero_spatial", (0,), 1, max_steps=3, ignore_terminations=True,
                                   device=torch.device("cpu"))
    obs = envs.reset(seed=0)
    assert obs["state"].shape == (1, 8) and obs["images"].shape == (1, 2, 128, 128, 3)
    assert obs["state"][0, 2] > 0.5  # eef height above the table, in metres: the 8-D proprio is in place
    for _ in range(3):
        obs, rew, term, trunc, info = envs.step(torch.zeros(1, 7))
    assert trunc.tolist() == [True] and info["episode"]["episode_len"].tolist() == [3]
    assert "pick" in envs.prompt or "place" in envs.prompt
    envs.close()
    with pytest.raises(ValueError, match=r"--task-ids \[10\] out of range: libero_spatial has tasks 0..9"):
        environments.LiberoEnvs("libero_spatial", (10,), 1, 3, True, torch.device("cpu"))


def test_rgb_mode_env_and_demo_reader(tmp_path, maniskill_demos):
    """Camera observations: images into the image slots, robot qpos as the state (the GPU default)."""
    envs = environments.ManiSkillEnvs("PickCube-v1", 1, "rgb", CTRL, max_steps=5, ignore_terminations=True,
                             device=torch.device("cpu"))
    obs = envs.reset(seed=0)
    assert obs["images"].dtype == torch.uint8 and obs["images"].shape[:2] == (1, 1) and obs["images"].shape[-1] == 3
    assert obs["state"].shape == (1, 9)  # panda qpos
    envs.close()
    raw = maniskill_demos.parent / "mp3.h5"
    subprocess.run([sys.executable, "-m", "mani_skill.trajectory.replay_trajectory", "--traj-path", str(raw),
                    "-b", "physx_cpu", "-o", "rgb", "-c", CTRL, "--save-traj", "--count", "1"],
                   check=True, capture_output=True)
    eps = sft.load_maniskill_demos(raw.with_name("mp3.rgb.pd_ee_delta_pose.physx_cpu.h5"), 1, CTRL)
    T = len(eps[0]["actions"])
    assert eps[0]["images"].shape[:2] == (T, 1) and eps[0]["images"].dtype == np.uint8
    assert eps[0]["state"].shape == (T, 9)


def test_evaluate_writes_video(tmp_path):
    policy = vla.build("tiny", action_dim=7, state_dim=42, chunk_size=16)
    norm = vla.Normalizer.from_data(np.random.randn(50, 42), np.random.rand(50, 7))
    args = small_args(tmp_path)
    envs = sft.make_envs(args, 1, ignore_terminations=True, device=torch.device("cpu"))
    sft.evaluate(policy, norm, envs, args, 1, video_path=tmp_path / "v.mp4")
    envs.close()
    assert (tmp_path / "v.mp4").stat().st_size > 1000


@pytest.mark.parametrize("workers", [2, 1])
def test_plain_resets_replay_as_new_envs(workers):
    """A CPU scene reports its last contacts until it steps, so a plain reset after a held cube read is_grasped = 1
    (ManiSkill 3.0.1), and the same seed then replayed differently for a policy that reads it. The envs report 0 at
    every reset, explicit or automatic at the time limit, and keep the true 1 in the ended episode's final
    observation: a plain reset replays the seed exactly as new envs and rebuilt scenes do."""
    envs = environments.ManiSkillEnvs("PickCube-v1", 2, "state", CTRL, max_steps=30, ignore_terminations=True,
                           device=torch.device("cpu"), workers=workers)
    new, info = scripted_grasp(envs, rebuild=False, steps=30)  # the 30th step ends the episode: auto-reset
    assert (new[-2, :, 18] == 1).all() and (info["final_obs"]["state"][:, 18] == 1).all()  # held at the end
    assert (new[-1, :, 18] == 0).all()  # the auto-reset's first observation
    again, rebuilt = scripted_grasp(envs, rebuild=False)[0], scripted_grasp(envs, rebuild=True)[0]
    envs.close()
    assert (again[0, :, 18] == 0).all()
    assert torch.equal(again, new[:-1]) and torch.equal(rebuilt, new[:-1])


def scripted_grasp(envs, rebuild: bool, steps: int = 29):
    """A scripted grasp on 2 PickCube envs: to the cube, close the gripper, lift -> states [steps + 1, 2, 42] (the
    reset's first), the last step's info."""
    obs = envs.reset(seed=5, rebuild=rebuild)
    states, info = [obs["state"]], None
    for t in range(steps):
        a = torch.zeros(2, 7)  # [N, 7]: end-effector xyz and rotation deltas, gripper (1 open, -1 closed)
        if t < 15:
            a[:, :3] = (obs["state"][:, 36:39] / 0.05).clamp(-1, 1)  # towards tcp_to_obj_pos
            a[:, 6] = 1.0
        else:
            a[:, 2], a[:, 6] = (0.5 if t >= 20 else 0.0), -1.0
        obs, _, _, _, info = envs.step(a)
        states.append(obs["state"])
    return torch.stack(states), info

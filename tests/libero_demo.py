"""Writes a tiny LIBERO demonstration file by rolling out in the real simulator (no dataset can be downloaded).

Layout of LIBERO's released hdf5 files (robomimic style): data.attrs problem_info (JSON with
language_instruction), env_args, bddl_file_name; data/demo_N/{actions, dones, rewards, states, obs/{agentview_rgb,
eye_in_hand_rgb, ee_pos, ee_ori, ee_states, gripper_states, joint_states}}; images raw (upside down) from the
simulator, ee_states = eef position + axis-angle. Used by the tests and benchmarks/bench_sft.py.
"""

import json
import os

import h5py
import numpy as np


def write_libero_demo_file(path, suite="libero_spatial", task_id=0, num_demos=2, steps=20, image_size=64, seed=0):
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv
    import libero.libero.envs.bddl_utils as bddl_utils

    from environments import quat_xyzw_to_axis_angle

    bench = benchmark.get_benchmark_dict()[suite]()
    task = bench.get_task(task_id)
    init_states = bench.get_task_init_states(task_id)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=image_size, camera_widths=image_size,
                             hard_reset=False)
    env.seed(7)
    rng = np.random.default_rng(seed)
    try:
        with h5py.File(path, "w") as f:
            data = f.create_group("data")
            data.attrs["problem_info"] = json.dumps(bddl_utils.get_problem_info(bddl))
            data.attrs["env_args"] = json.dumps({"type": 1, "env_name": type(env.env).__name__, "bddl_file": bddl})
            data.attrs["bddl_file_name"] = bddl
            for d in range(num_demos):
                env.reset()
                obs = env.set_init_state(init_states[d])
                for _ in range(10):
                    obs, *_ = env.step([0.0] * 6 + [-1.0])
                rows = {k: [] for k in ("actions", "rewards", "dones", "states", "agentview_rgb", "eye_in_hand_rgb",
                                        "ee_states", "gripper_states", "joint_states")}
                for t in range(steps):  # scripted random motion; gripper closes half-way
                    action = np.concatenate([rng.normal(0, 0.3, 3).clip(-1, 1), rng.normal(0, 0.05, 3),
                                             [-1.0 if t < steps // 2 else 1.0]])
                    rows["states"].append(env.get_sim_state())
                    rows["agentview_rgb"].append(obs["agentview_image"])
                    rows["eye_in_hand_rgb"].append(obs["robot0_eye_in_hand_image"])
                    rows["ee_states"].append(np.concatenate([obs["robot0_eef_pos"],
                                                             quat_xyzw_to_axis_angle(obs["robot0_eef_quat"])]))
                    rows["gripper_states"].append(obs["robot0_gripper_qpos"])
                    rows["joint_states"].append(obs["robot0_joint_pos"])
                    obs, reward, done, _ = env.step(action)
                    rows["actions"].append(action)
                    rows["rewards"].append(reward)
                    rows["dones"].append(done)
                rows["dones"][-1] = True
                g = data.create_group(f"demo_{d}")
                for k in ("actions", "rewards", "dones", "states"):
                    g[k] = np.asarray(rows[k], dtype=np.uint8 if k == "dones" else np.float64)
                for k in ("agentview_rgb", "eye_in_hand_rgb", "ee_states", "gripper_states", "joint_states"):
                    g[f"obs/{k}"] = np.stack(rows[k])
                g["obs/ee_pos"], g["obs/ee_ori"] = g["obs/ee_states"][:, :3], g["obs/ee_states"][:, 3:]
                g.attrs["num_samples"] = steps
            data.attrs["total"] = num_demos * steps
    finally:
        env.close()
    return path

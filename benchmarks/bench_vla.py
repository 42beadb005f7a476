"""Speed of the tiny policy on CPU (one velocity call, one prefix encoding) and parameter counts of all presets.

Run: .venv/bin/python benchmarks/bench_vla.py
"""

import time

import torch

import vla


def timed(fn, reps):
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def main():
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    policy = vla.build("tiny", action_dim=7, state_dim=42).eval()
    H, A = policy.spec["chunk_size"], policy.spec["max_action_dim"]
    print("tiny preset, state-only prefix (ManiSkill state obs), CPU, ms per call:")
    print(f"{'batch':>6} {'prefix':>8} {'velocity':>9} {'prefix+2cam':>12} {'velocity+2cam':>14}")
    for B in (1, 16, 64):
        state, prompts = torch.randn(B, 42), ["pick up the cube"] * B
        images = torch.randint(0, 256, (B, 2, 64, 64, 3), dtype=torch.uint8)
        x, t = torch.randn(B, H, A), torch.rand(B)
        row = []
        with torch.no_grad():
            for imgs in (None, images):
                pre = policy.encode_prefix(state, prompts, imgs)
                row += [timed(lambda: policy.encode_prefix(state, prompts, imgs), 20),
                        timed(lambda: policy.velocity(pre, x, t), 50)]
        print(f"{B:>6} {row[0]:>8.2f} {row[1]:>9.2f} {row[2]:>12.2f} {row[3]:>14.2f}")
    print("parameter counts (total / VLM / expert+projections):")
    for preset in vla.PRESETS:
        with torch.device("meta"):  # real sizes: count without allocating
            p = vla.build(preset, action_dim=7, state_dim=8)
        total = sum(x.numel() for x in p.parameters())
        vlm = sum(x.numel() for x in p.vlm.parameters())
        print(f"  {preset:>5}: {total / 1e6:10.2f} M / {vlm / 1e6:10.2f} M / {(total - vlm) / 1e6:8.2f} M")


if __name__ == "__main__":
    main()

"""State/action normalisation from openpi-layout norm stats (per key: mean, std, q01, q99)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

KEYS, FIELDS, EPS = ("state", "actions"), ("mean", "std", "q01", "q99"), 1e-6


class Normalizer:
    """z-score (pi0): (x - mean) / (std + eps); quantile (pi0.5): 2 (x - q01) / (q99 - q01 + eps) - 1.
    Stats may be longer than the data (openpi pads to 32 dims): the first x.shape[-1] entries are used."""
    def __init__(self, stats: dict, mode: str = "zscore", source: str = "norm stats"):
        if mode not in ("zscore", "quantile"):
            raise ValueError(f"unknown normalisation mode {mode!r}; use 'zscore' (pi0) or 'quantile' (pi0.5)")
        stats = stats.get("norm_stats", stats)  # openpi wraps the keys in {"norm_stats": ...}
        missing = [f"{key}.{field}" for key in KEYS for field in FIELDS if field not in stats.get(key, {})]
        if missing:
            raise KeyError(f"{source} has no '{missing[0]}'; it needs {list(FIELDS)} for each of {list(KEYS)}")
        self.stats = {k: {f: torch.tensor(stats[k][f], dtype=torch.float32) for f in FIELDS} for k in KEYS}
        self.mode = mode

    @classmethod
    def from_data(cls, state: np.ndarray, actions: np.ndarray, mode: str = "zscore") -> "Normalizer":
        """Stats of demonstration arrays [N, state_dim] and [N, action_dim]."""
        def one(x):
            x = np.asarray(x, dtype=np.float64)
            return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(),
                    "q01": np.quantile(x, 0.01, axis=0).tolist(), "q99": np.quantile(x, 0.99, axis=0).tolist()}
        return cls({"state": one(state), "actions": one(actions)}, mode)

    def to_json(self) -> dict:
        return {"norm_stats": {k: {f: v.tolist() for f, v in s.items()} for k, s in self.stats.items()}}

    def save(self, path: str | Path):
        Path(f"{path}.tmp").write_text(json.dumps(self.to_json()))
        os.replace(f"{path}.tmp", path)

    def _params(self, key: str, x: torch.Tensor):
        s, d = self.stats[key], x.shape[-1]
        if d > s["mean"].numel():
            raise ValueError(f"{key} has {d} dims but its norm stats only {s['mean'].numel()}")
        if self.mode == "zscore":
            return s["mean"][:d].to(x), s["std"][:d].to(x) + EPS
        lo, hi = s["q01"][:d].to(x), s["q99"][:d].to(x)
        half = (hi - lo + EPS) / 2  # the quantile map written as (x - centre) / half-range
        return lo + half, half

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        centre, scale = self._params(key, x)
        return (x - centre) / scale

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        centre, scale = self._params(key, x)
        return x * scale + centre

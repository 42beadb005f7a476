"""Checkpoints: ours (safetensors + JSON, written atomically; nothing unpickled) and openpi / LeRobot pi0 dirs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.initialization import no_init_weights

from .model import PRESETS, CheckpointError, VLAConfig, VLAPolicy, build
from .normalize import Normalizer

WEIGHTS, CONFIG, NORM, META = "model.safetensors", "config.json", "norm_stats.json", "meta.json"

# openpi PyTorch key prefixes -> ours (LeRobot adds "model." in front of all of them); none starts another.
_PREFIXES = {"paligemma_with_expert.paligemma.model.": "pi0.model.vlm.",
             "paligemma_with_expert.gemma_expert.model.": "pi0.model.dit.", "action_out_proj.": "pi0.action_out_proj.",
             **{f"{n}.": f"pi0.embed_action_time.{n}." for n in ("state_proj", "action_in_proj", "action_time_mlp_in",
                                                                "action_time_mlp_out", "time_mlp_in", "time_mlp_out")}}
_TIED_LM_HEAD = "paligemma_with_expert.paligemma.lm_head.weight"  # tied to the VLM's token embeddings


def _need_dir(path: Path, what: str) -> Path:
    old = Path(f"{path}.old")  # a crash between save_checkpoint's two renames leaves the last good one here
    if not path.is_dir() and not old.is_dir():
        raise FileNotFoundError(f"{what} directory {path} does not exist")
    return path if path.is_dir() else old


def load_state_checked(model: VLAPolicy, tensors: dict[str, torch.Tensor], source: str):
    """Copy `tensors` into `model`, failing on the first shape mismatch, missing or unexpected key by name."""
    own = model.state_dict()
    for k, v in tensors.items():
        if k not in own:
            raise KeyError(f"{source}: unexpected key {k!r} (not in a {model.config.preset} model)")
        if v.shape != own[k].shape:
            raise CheckpointError(f"{source}: shape of {k!r} is {tuple(v.shape)}, the config expects "
                             f"{tuple(own[k].shape)}: the checkpoint does not match this preset/config")
    missing = [k for k in own if k not in tensors]
    if missing:
        raise KeyError(f"{source}: {len(missing)} keys missing, first {missing[0]!r}")
    model.load_state_dict(tensors, strict=False)


def save_checkpoint(path: str | Path, policy: VLAPolicy, normalizer: Normalizer | None = None,
                    extra: dict[str, torch.Tensor] | None = None, meta: dict | None = None):
    """Write path/{model.safetensors, config.json, norm_stats.json, meta.json}; `extra`: the scripts' own tensors (value
    or noise heads, optimiser state), named apart from the policy's. Built beside the target, then swapped in whole."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}
    for k, v in (extra or {}).items():
        if k in tensors:
            raise KeyError(f"extra tensor name {k!r} clashes with a policy weight")
        tensors[k] = v.detach().contiguous().cpu()
    tmp, old = Path(f"{path}.tmp"), Path(f"{path}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG).write_text(json.dumps(dataclasses.asdict(policy.config), indent=2))
    save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    os.chmod(tmp / WEIGHTS, (tmp / CONFIG).stat().st_mode)  # safetensors writes 0600; the rest follows the umask
    (tmp / META).write_text(json.dumps(meta or {}, indent=2))
    if normalizer is not None:
        normalizer.save(tmp / NORM)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def read_safetensors(files: list[Path], tensors: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor in `files`; tensors=False only opens them (each header), to refuse a damaged file early."""
    out = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys() if tensors})
        except Exception as e:  # safetensors' own messages ("incomplete metadata", ...) name no file
            raise CheckpointError(f"{f} is not a readable safetensors file ({e}): it is truncated or corrupt; "
                                  "copy it again or use another checkpoint") from None
    return out


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file, or an error that names it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the checkpoint is damaged; copy it again or use "
                              "another checkpoint") from None


def _to_be_loaded(make, vlm_dtype: torch.dtype | None) -> VLAPolicy:
    """make() without the random init (pi0's: ~50 s on CPU), as every weight is overwritten next; the VLM cast to
    vlm_dtype first, so its never-written float32 pages never become resident (pi0's VLM: 11.6 GB on the host)."""
    with no_init_weights():
        policy = make()
    if vlm_dtype is not None:
        policy.vlm.to(vlm_dtype)
    return policy


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", vlm_dtype: torch.dtype | None = None,
                    tokenizer: str | None = None, **pretrained):
    """Our checkpoint -> (policy, normalizer or None, extra tensors, meta); openpi / LeRobot dirs go to load_pretrained
    (**pretrained; no extras or meta). vlm_dtype: the VLM's, set before its weights load; tokenizer: replaces ours."""
    path = _need_dir(Path(path), "checkpoint")
    cfg = read_json(path / CONFIG) if (path / CONFIG).is_file() else {}
    if "preset" not in cfg and any(path.glob("*.safetensors")):  # not ours (LeRobot's config.json has no preset)
        return (*load_pretrained(path, vlm_dtype=vlm_dtype, tokenizer=tokenizer, **pretrained), {}, {})
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path / CONFIG} is missing (not a checkpoint written by save_checkpoint, nor "
                                "openpi / LeRobot weights)")
    if tokenizer is not None:
        cfg["overrides"] = {**cfg.get("overrides", {}), "tokenizer": tokenizer}
    policy = _to_be_loaded(lambda: VLAPolicy(VLAConfig(**cfg)), vlm_dtype)
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path / WEIGHTS} is missing")
    tensors = read_safetensors([path / WEIGHTS])
    own = set(policy.state_dict())
    load_state_checked(policy, {k: v for k, v in tensors.items() if k in own}, str(path / WEIGHTS))
    norm = Normalizer(read_json(path / NORM), policy.config.norm_mode, str(path / NORM)) if (path / NORM).exists() \
        else None
    extra = {k: v.to(map_location) for k, v in tensors.items() if k not in own}
    return policy.to(map_location), norm, extra, read_json(path / META) if (path / META).exists() else {}


def openpi_to_ours(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename openpi-layout (or LeRobot-layout: everything under "model.") pi0/pi0.5 keys to ours."""
    if tensors and all(k.startswith("model.") for k in tensors):
        tensors = {k[len("model."):]: v for k, v in tensors.items()}
    out = {dst + k[len(src):]: v for k, v in tensors.items() for src, dst in _PREFIXES.items() if k.startswith(src)}
    embed = "pi0.model.vlm.language_model.embed_tokens.weight"
    if embed not in out and _TIED_LM_HEAD in tensors:
        out[embed] = tensors[_TIED_LM_HEAD]
    return out  # anything else (the expert's unused lm_head) is dropped on purpose


def detect_preset(tensors: dict[str, torch.Tensor]) -> str:
    """The preset whose weight names and shapes (built on the meta device: no memory, no time) are `tensors`'."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    for name in PRESETS:
        with torch.device("meta"), no_init_weights():
            if shapes == {k: tuple(v.shape) for k, v in build(name, 1, 1).state_dict().items()}:
                return name
    raise CheckpointError(f"these weights ({len(shapes)} tensors) match none of the presets {list(PRESETS)}")


def load_pretrained(path: str | Path, preset: str | None = None, action_dim: int = 7, state_dim: int = 8,
                    asset_id: str | None = None, vlm_dtype: torch.dtype | None = None, tokenizer: str | None = None,
                    with_norm: bool = True, **overrides):
    """openpi / LeRobot pi0 or pi0.5 dir (*.safetensors; norm stats: [assets/]<asset_id>/norm_stats.json) -> (policy,
    normalizer or None). preset: detected if None; tokenizer: needed by real weights; vlm_dtype: as load_checkpoint."""
    path = _need_dir(Path(path), "pretrained checkpoint")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path}")
    tensors = openpi_to_ours(read_safetensors(files))
    rows = len(tensors.get("pi0.model.vlm.language_model.embed_tokens.weight", []))
    if tokenizer is None and rows > PRESETS["tiny"]["vocab"]:
        raise CheckpointError(f"{path} has a {rows}-token embedding: pass its tokenizer (--tokenizer: openpi's "
                              "paligemma_tokenizer.model or a transformers tokenizer directory); the offline byte "
                              "tokenizer would feed it byte ids")
    preset = preset or detect_preset(tensors)
    dims = PRESETS[preset]["max_action_dim"], PRESETS[preset]["max_state_dim"]
    if action_dim > dims[0] or state_dim > dims[1]:
        raise CheckpointError(f"{path} takes at most {dims[0]}-D actions and {dims[1]}-D states, not {action_dim}-D "
                              f"actions and {state_dim}-D states")
    overrides.update({"tokenizer": tokenizer} if tokenizer else {})
    policy = _to_be_loaded(lambda: build(preset, action_dim, state_dim, **overrides), vlm_dtype)
    load_state_checked(policy, tensors, str(path))
    stats = [s for where in ("", "*/", "assets/*/") for s in sorted(path.glob(where + "norm_stats.json"))]
    if asset_id is not None and not (stats := [s for s in stats if s.parent.name == asset_id]):
        raise CheckpointError(f"no norm_stats.json for asset_id {asset_id!r} under {path}")
    if len(stats) > 1 and with_norm:
        raise CheckpointError(f"{path} holds norm stats for {', '.join(s.parent.name for s in stats)}: pick one with "
                              "asset_id (--asset-id)")
    norm = Normalizer(read_json(stats[0]), policy.config.norm_mode, str(stats[0])) if stats and with_norm else None
    return policy, norm

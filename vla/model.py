"""pi0 / pi0.5 policy on transformers' PI0. The VLM (PaliGemma) runs once per observation batch over the prefix [images,
prompt] and leaves a KV cache; the action expert then runs over the suffix ([state token,] H action tokens) for any
(x_t, t) against that cache. Time runs from t=1 (noise) to t=0 (action), as in openpi."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint
from transformers import AutoTokenizer, DynamicCache, PI0Config, PI0ForConditionalGeneration
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, GemmaModel
from transformers.models.pi0.modeling_pi0 import PI0TimestepEmbeddings

# `tiny` (the CPU default) is the real architecture at a size whose batch-16 denoising step takes milliseconds. The VLM
# text model and the expert share depth, KV heads and head_dim: the expert attends to the VLM's per-layer keys/values.
_PI0_REAL = dict(
    variant="pi0", text_hidden=2048, depth=18, text_mlp=16384, text_heads=8, kv_heads=1, head_dim=256,
    vocab=257152, vision_hidden=1152, vision_layers=27, vision_mlp=4304, vision_heads=16, image_size=224,
    patch=14, expert_hidden=1024, expert_mlp=4096, expert_heads=8, chunk_size=50, max_action_dim=32,
    max_state_dim=32, max_cameras=3, max_prompt_tokens=48, tokenizer="bytes")
_TINY = dict(
    variant="pi0", text_hidden=64, depth=2, text_mlp=128, text_heads=2, kv_heads=1, head_dim=16, vocab=260,
    vision_hidden=32, vision_layers=1, vision_mlp=64, vision_heads=2, image_size=28, patch=14,
    expert_hidden=64, expert_mlp=128, expert_heads=2, chunk_size=8, max_action_dim=8, max_state_dim=64,
    max_cameras=3, max_prompt_tokens=32, tokenizer="bytes")
# pi0.5: adaRMS time conditioning, state discretised into the (longer) prompt, no state token.
PRESETS = {"tiny": _TINY, "tiny_pi05": {**_TINY, "variant": "pi05", "max_prompt_tokens": 256},  # ~4 byte tokens/bin
           "pi0": _PI0_REAL, "pi05": {**_PI0_REAL, "variant": "pi05", "max_prompt_tokens": 200}}


@dataclass
class VLAConfig:
    """Everything needed to rebuild a policy; stored as config.json next to the weights."""
    preset: str = "tiny"
    action_dim: int = 7  # the env's real action dims (<= max_action_dim; the rest is zero padding)
    state_dim: int = 8  # the env's real state dims (<= max_state_dim)
    norm_mode: str = "zscore"  # "zscore" (pi0) or "quantile" (pi0.5)
    overrides: dict = field(default_factory=dict)  # preset fields changed by the user

    def spec(self) -> dict:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        unknown = set(self.overrides) - set(PRESETS[self.preset])
        if unknown:
            raise ValueError(f"unknown preset fields {sorted(unknown)}; valid: {sorted(PRESETS[self.preset])}")
        s = {**PRESETS[self.preset], **self.overrides}
        if self.action_dim > s["max_action_dim"] or self.state_dim > s["max_state_dim"]:
            raise ValueError(f"action_dim {self.action_dim} / state_dim {self.state_dim} exceed the preset's "
                             f"max_action_dim {s['max_action_dim']} / max_state_dim {s['max_state_dim']}: raise them "
                             "with overrides")
        return s


def pi0_config(s: dict) -> PI0Config:
    def gemma(width: int, mlp: int, heads: int, **vocab) -> dict:  # the VLM's text model or the expert
        return dict(model_type="gemma", hidden_size=width, num_hidden_layers=s["depth"], intermediate_size=mlp,
                    num_attention_heads=heads, num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], **vocab)
    text = gemma(s["text_hidden"], s["text_mlp"], s["text_heads"], vocab_size=s["vocab"])
    vision = dict(model_type="siglip_vision_model", hidden_size=s["vision_hidden"], intermediate_size=s["vision_mlp"],
                  num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
                  image_size=s["image_size"], patch_size=s["patch"], vision_use_head=False)
    vlm = dict(model_type="paligemma", text_config=text, vision_config=vision, projection_dim=s["text_hidden"],
               image_token_id=s["vocab"])
    return PI0Config(vlm_config=vlm, dit_config=gemma(s["expert_hidden"], s["expert_mlp"], s["expert_heads"]),
                     chunk_size=s["chunk_size"], max_action_dim=s["max_action_dim"], max_state_dim=s["max_state_dim"])


class AdaNorm(nn.Module):
    """adaRMS: RMS-normalise, then scale/shift from the time condition; also returns the residual gate."""
    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        scale, shift, gate = self.dense(cond)[:, None, :].chunk(3, dim=-1)  # each [B, 1, dim]
        return (normed * (1 + scale) + shift).type_as(x), gate.type_as(x)


class AdaDecoderLayer(GemmaDecoderLayer):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.input_layernorm = AdaNorm(config.hidden_size, config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = AdaNorm(config.hidden_size, config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, adarms_cond=None, **kwargs):
        h, gate = self.input_layernorm(hidden_states, adarms_cond)
        h, _ = self.self_attn(hidden_states=h, **kwargs)
        hidden_states = hidden_states + h * gate
        h, gate = self.post_attention_layernorm(hidden_states, adarms_cond)
        return hidden_states + self.mlp(h) * gate


class AdaGemmaModel(GemmaModel):
    """Gemma expert whose every norm (final one included) is conditioned on the flow time."""
    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.ModuleList(AdaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = AdaNorm(config.hidden_size, config.hidden_size, config.rms_norm_eps)
        for norm in [m for m in self.modules() if isinstance(m, AdaNorm)]:
            # Zero weights as in pi0.5; bias gives scale=shift=0, gate=1 so a fresh expert is a plain Gemma.
            nn.init.zeros_(norm.dense.weight)
            nn.init.zeros_(norm.dense.bias)
            norm.dense.bias.data[2 * config.hidden_size:] = 1.0

    def forward(self, inputs_embeds, attention_mask, position_ids, cache, adarms_cond, **kwargs):
        h, rope = inputs_embeds, self.rotary_emb(inputs_embeds, position_ids=position_ids)
        for layer in self.layers:
            h = layer(h, adarms_cond=adarms_cond, attention_mask=attention_mask, position_ids=position_ids,
                      cache=cache, use_cache=False, position_embeddings=rope)
        return self.norm(h, adarms_cond)[0]


class PI05TimeEmbedding(nn.Module):
    """pi0.5 suffix: actions are projected alone; the time goes to the adaRMS condition through an MLP."""
    def __init__(self, config: PI0Config):
        super().__init__()
        width = config.dit_config.hidden_size
        self.sinusoid_embeds = PI0TimestepEmbeddings(config)
        self.action_in_proj = nn.Linear(config.max_action_dim, width)
        self.time_mlp_in = nn.Linear(width, width)
        self.time_mlp_out = nn.Linear(width, width)

    def forward(self, x_t, t):
        cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(self.sinusoid_embeds(t).to(x_t.dtype)))))  # [B, W]
        return self.action_in_proj(x_t), cond


class CheckpointError(ValueError):
    """A checkpoint or tokenizer file that cannot be read: the message names the file and what to do."""


class Tokenizer:
    """Prompt text -> ids: "bytes" (UTF-8 bytes past pad=0 / bos=1; offline), SentencePiece .model or tokenizer dir."""
    def __init__(self, source: str = "bytes"):
        if source == "bytes":
            self.bos, self.size, self._encode = 1, 258, lambda text: [b + 2 for b in text.encode("utf-8")]
        elif Path(source).is_file():
            import sentencepiece  # only real weights need it
            sp = sentencepiece.SentencePieceProcessor(model_file=str(source))
            self.bos, self.size, self._encode = sp.bos_id(), sp.vocab_size(), sp.encode
        elif Path(source).is_dir():
            tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
            self.bos, self.size = tok.bos_token_id, len(tok)
            self._encode = functools.partial(tok.encode, add_special_tokens=False)
        else:
            raise CheckpointError(f"tokenizer {source} does not exist: pass a SentencePiece .model file (openpi's "
                                  "paligemma_tokenizer.model) or a transformers tokenizer directory")

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return [self.bos] * bos + list(self._encode(text))


def resize_with_pad(x: torch.Tensor, size: int) -> torch.Tensor:
    """openpi's resize: [M, 3, h, w] in [-1, 1] -> [M, 3, size, size], bilinear, aspect kept, -1-padded evenly."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    ratio = max(h / size, w / size)
    x = F.interpolate(x, size=(int(h / ratio), int(w / ratio)), mode="bilinear", align_corners=False)
    ph, pw = size - x.shape[-2], size - x.shape[-1]
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=-1.0)


def additive(see: torch.Tensor, dtype) -> torch.Tensor:
    """Boolean visibility -> additive attention mask (works for both the sdpa and the eager kernels)."""
    return torch.zeros(see.shape, dtype=dtype, device=see.device).masked_fill_(~see, torch.finfo(dtype).min)


class PrefixView:
    """Read-only prefix KV cache for the expert: `update` returns the prefix keys/values (in the expert's dtype), then
    the suffix's, and stores nothing: velocity calls and gradient-checkpoint replays share one untouched prefix."""
    def __init__(self, cache: DynamicCache):
        self.cache = cache

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.cache.layers[layer_idx]
        return (torch.cat([layer.keys.to(key_states.dtype), key_states], -2),
                torch.cat([layer.values.to(value_states.dtype), value_states], -2))


@dataclass
class Prefix:
    """What one VLM pass over an observation batch leaves for the expert."""
    cache: DynamicCache  # per-layer keys/values of the prefix, length P
    mask: torch.Tensor  # [B, P] bool, valid prefix tokens
    features: torch.Tensor  # [B, D_vlm] masked mean of the VLM output (pi0.5-style critic input)
    state: torch.Tensor | None  # [B, max_state_dim] normalised, padded state for pi0's state token
    length: int

    def tensors(self) -> list[torch.Tensor]:
        """Every per-row tensor: the layers' keys and values, mask, features, state."""
        kv = [t for layer in self.cache.layers for t in (layer.keys, layer.values)]
        return kv + [self.mask, self.features] + ([] if self.state is None else [self.state])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def select(self, rows: torch.Tensor) -> Prefix:
        """The prefix of the batch rows `rows` [M] (indices): what encode_prefix returns for those observations."""
        return self._build([t[rows] for t in self.tensors()])

    @staticmethod
    def cat(prefixes: list[Prefix]) -> Prefix:
        """One prefix of several batches' rows, in order (all of one policy and prefix length)."""
        return prefixes[0]._build([torch.cat(ts) for ts in zip(*(p.tensors() for p in prefixes))])

    def _build(self, ts: list[torch.Tensor]) -> Prefix:  # ts ordered as tensors()
        n = 2 * len(self.cache.layers)
        cache = DynamicCache(ddp_cache_data=list(zip(ts[0:n:2], ts[1:n:2])))
        return Prefix(cache, ts[n], ts[n + 1], ts[n + 2] if self.state is not None else None, self.length)


class VLAPolicy(nn.Module):
    def __init__(self, config: VLAConfig):
        super().__init__()
        self.config = config
        self.spec = spec = config.spec()
        self.pi05 = spec["variant"] == "pi05"
        self.pi0 = PI0ForConditionalGeneration(pi0_config(spec))
        if self.pi05:
            self.pi0.embed_action_time = PI05TimeEmbedding(self.pi0.config)
            self.pi0.model.dit = AdaGemmaModel(self.pi0.config.dit_config)
        self.pi0.model.dit.embed_tokens = None  # the expert only takes embeddings: drop its 257k-row table
        self.tokenizer = Tokenizer(spec["tokenizer"])  # never downloaded
        if self.tokenizer.size > spec["vocab"]:
            raise CheckpointError(f"the tokenizer {spec['tokenizer']} has {self.tokenizer.size} ids, the model's "
                                  f"embedding only {spec['vocab']}: it is not this model's tokenizer")
        self._token_cache: dict[str, list[int]] = {}
        self.vlm_frozen = False

    @property
    def vlm(self):
        return self.pi0.model.vlm

    def freeze_vlm(self, frozen: bool = True, dtype: torch.dtype | None = None):
        """RL trains only the expert, projections and heads: the VLM gets no gradients, runs in no_grad. dtype=bfloat16
        halves its weights and prefix cache (pi0: 11.6 -> 5.8 GB); the expert keeps its dtype for the log-probs."""
        self.vlm_frozen = frozen
        self.vlm.requires_grad_(not frozen)
        if dtype is not None:
            self.vlm.to(dtype)
        return self

    def expert_checkpointing(self, enabled: bool = True):
        """Gradient checkpointing of the expert's layers: safe, as they only read the prefix cache (PrefixView)."""
        for layer in self.pi0.model.dit.layers:
            layer.gradient_checkpointing = enabled
            layer._can_checkpoint_with_cache = True
            layer._gradient_checkpointing_func = functools.partial(grad_checkpoint, use_reentrant=False)
        return self

    def tokenize(self, prompts: list[str], states: torch.Tensor | None = None):
        """openpi's prompt: ids [B, L] (0-padded, truncated) and mask [B, L]. pi0: encode(clean, bos) + encode("\\n");
        pi0.5: encode("Task: {clean}, State: {bins};\\nAction: ", bos), the state in [-1, 1] as 256 bins."""
        L, enc = self.spec["max_prompt_tokens"], self.tokenizer.encode
        ids = torch.zeros(len(prompts), L, dtype=torch.long)  # [B, L]
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)  # [B, L]
        if self.pi05:
            bins = np.digitize(states.detach().float().cpu().numpy(), np.linspace(-1, 1, 257)[:-1]) - 1
        for i, p in enumerate(prompts):
            clean = p.strip().replace("_", " ").replace("\n", " ")  # no lower-casing, as openpi
            if self.pi05:  # a new state every step: not cached
                t = enc(f"Task: {clean}, State: {' '.join(map(str, bins[i]))};\nAction: ", bos=True)[:L]
            else:  # the prompt repeats every step of a rollout
                if clean not in self._token_cache:
                    self._token_cache[clean] = (enc(clean, bos=True) + enc("\n"))[:L]
                t = self._token_cache[clean]
            ids[i, : len(t)] = torch.tensor(t)
            mask[i, : len(t)] = True
        return ids, mask

    def encode_prefix(self, state: torch.Tensor, prompts: list[str], images: torch.Tensor | None = None,
                      image_mask: torch.Tensor | None = None) -> Prefix:
        """state [B, state_dim] (normalised); images [B, N, H, W, 3] uint8 or None (state-only mode);
        image_mask [B, N] bool marks cameras present per sample."""
        B, dev = state.shape[0], state.device
        if state.shape[1] != self.config.state_dim:
            raise ValueError(f"state has {state.shape[1]} dims, the policy was built for {self.config.state_dim}")
        expert_dtype = self.pi0.action_out_proj.weight.dtype
        state = F.pad(state.to(expert_dtype), (0, self.spec["max_state_dim"] - state.shape[1]))  # [B, max_state_dim]
        ids, mask = (x.to(dev) for x in self.tokenize(prompts, state[:, :self.config.state_dim] if self.pi05 else None))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.vlm_frozen):
            lm = self.vlm.language_model
            embeds = lm.embed_tokens(ids)  # [B, L, D]
            if images is not None:
                N = images.shape[1]
                if N > self.spec["max_cameras"]:
                    raise ValueError(f"{N} cameras given, the model takes at most {self.spec['max_cameras']}")
                x = images.flatten(0, 1).permute(0, 3, 1, 2).float()  # [B*N, 3, H, W]
                x = resize_with_pad(x / 127.5 - 1.0 if images.dtype == torch.uint8 else x, self.spec["image_size"])
                feats = self.vlm.get_image_features(x.to(embeds.dtype)).pooler_output  # [B*N, T, D]
                T = feats.shape[1]
                embeds = torch.cat([feats.reshape(B, N * T, -1), embeds], 1)  # [B, N*T + L, D]
                cam = torch.ones(B, N, dtype=torch.bool, device=dev) if image_mask is None else image_mask.to(dev)
                mask = torch.cat([cam.repeat_interleave(T, 1), mask], 1)
            P = embeds.shape[1]
            # Prefix is bidirectional over valid tokens; padded queries see themselves so no row is all -inf.
            see = mask[:, None, :] | torch.eye(P, dtype=torch.bool, device=dev)  # [B, P, P]
            cache = DynamicCache(config=lm.config)
            out = lm(inputs_embeds=embeds, attention_mask=additive(see[:, None], embeds.dtype),  # out: [B, P, D]
                     position_ids=mask.long().cumsum(-1) - 1, cache=cache, use_cache=True).last_hidden_state
            m = mask[..., None].to(out.dtype)
            features = (out * m).sum(1) / m.sum(1).clamp(min=1)  # [B, D]
        return Prefix(cache, mask, features, None if self.pi05 else state, P)

    def velocity(self, prefix: Prefix, x_t: torch.Tensor, t: torch.Tensor | float):
        """v_theta(x_t, t) [B, H, max_action_dim] and the expert's hidden states [B, H, W]; reads the prefix only."""
        (B, H), dev = x_t.shape[:2], x_t.device
        t = torch.as_tensor(t, dtype=torch.float32, device=dev).expand(B)  # [B]
        kwargs = {}
        if self.pi05:
            suffix, kwargs["adarms_cond"] = self.pi0.embed_action_time(x_t, t)  # [B, H, W], [B, W]
        else:
            suffix = self.pi0.embed_action_time(prefix.state, x_t, t)  # [B, 1 + H, W]: state token then actions
        S, P = suffix.shape[1], prefix.length
        # Suffix queries see valid prefix keys; the state token sees itself; action tokens see the whole suffix.
        attn = torch.ones(B, 1, S, P + S, dtype=torch.bool, device=dev)  # [B, 1, S, P+S]
        attn[:, 0, :, :P] = prefix.mask[:, None, :]
        if not self.pi05:
            attn[:, 0, 0, P + 1:] = False
        pos = prefix.mask.long().sum(-1, keepdim=True) + torch.arange(S, device=dev)  # [B, S]
        h = self.pi0.model.dit(inputs_embeds=suffix, attention_mask=additive(attn, suffix.dtype), position_ids=pos,
                               cache=PrefixView(prefix.cache), use_cache=False, **kwargs)  # read, never store
        h = (h if torch.is_tensor(h) else h.last_hidden_state)[:, -H:]  # [B, H, W]
        return self.pi0.action_out_proj(h), h

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]


def build(preset: str = "tiny", action_dim: int = 7, state_dim: int = 8, norm_mode: str | None = None,
          **overrides) -> VLAPolicy:
    """Random-init policy of a preset; `overrides` change preset fields (e.g. chunk_size=10)."""
    mode = norm_mode or ("quantile" if PRESETS.get(preset, {}).get("variant") == "pi05" else "zscore")
    return VLAPolicy(VLAConfig(preset, action_dim, state_dim, mode, overrides))

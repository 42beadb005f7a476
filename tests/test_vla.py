"""Properties of the shared model package: cache correctness, checkpoint round-trips, layouts, errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import vla
from conftest import to_openpi
from vla.model import Tokenizer

PROMPTS = ["pick up the red cube", "push it", "a much longer instruction that uses more prompt tokens", "go"]


def make_inputs(policy, seed=0, images=True):
    g = torch.Generator().manual_seed(seed)
    B = len(PROMPTS)
    state = torch.randn(B, policy.config.state_dim, generator=g)
    imgs = torch.randint(0, 256, (B, 2, 40, 40, 3), generator=g, dtype=torch.uint8) if images else None
    x = torch.randn(B, policy.spec["chunk_size"], policy.spec["max_action_dim"], generator=g)
    t = torch.rand(B, generator=g)
    return state, imgs, x, t


def tiny(variant="pi0", seed=0):
    torch.manual_seed(seed)
    return vla.build("tiny", action_dim=7, state_dim=10, variant=variant).eval()


def joint_velocity(policy, state, images, image_mask, x, t):
    """Reference: ONE pass over [prefix, suffix] in which each token uses its own module's weights and all
    tokens share one attention per layer (openpi's joint formulation); no cache involved."""
    lm, dit = policy.vlm.language_model, policy.pi0.model.dit
    B = x.shape[0]
    padded = F.pad(state, (0, policy.spec["max_state_dim"] - state.shape[1]))
    ids, tmask = policy.tokenize(PROMPTS, state if policy.pi05 else None)
    pixels = F.interpolate(images.flatten(0, 1).permute(0, 3, 1, 2).double() / 127.5 - 1, size=28, mode="bilinear")
    feats = policy.vlm.get_image_features(pixels).pooler_output  # [B*2, T, D]
    hp = torch.cat([feats.reshape(B, -1, feats.shape[-1]), lm.embed_tokens(ids)], 1)
    pmask = torch.cat([image_mask.repeat_interleave(feats.shape[1], 1), tmask], 1)
    if policy.pi05:
        hs, cond = policy.pi0.embed_action_time(x, t)
        blocks = [0] * hp.shape[1] + [1] * hs.shape[1]
    else:
        hs, cond = policy.pi0.embed_action_time(padded, x, t), None
        blocks = [0] * hp.shape[1] + [1] + [2] * (hs.shape[1] - 1)  # prefix, state token, actions
    P, S = hp.shape[1], hs.shape[1]
    valid = torch.cat([pmask, torch.ones(B, S, dtype=torch.bool)], 1)  # [B, P+S]
    blocks = torch.tensor(blocks)
    see = (blocks[None, :] <= blocks[:, None])[None] & valid[:, None, :]  # a query sees keys of blocks <= its own
    see |= torch.eye(P + S, dtype=torch.bool)[None]
    cos, sin = lm.rotary_emb(hp, valid.long().cumsum(-1) - 1)
    cos, sin = cos[:, None], sin[:, None]

    def norm(layer_norm, h, expert):  # -> (normed, residual gate)
        return layer_norm(h, cond) if expert and cond is not None else (layer_norm(h), 1.0)

    def rope(v):
        half = v.shape[-1] // 2
        return v * cos + torch.cat([-v[..., half:], v[..., :half]], -1) * sin

    for lp, ls in zip(lm.layers, dit.layers):
        q, k, v, gates = [], [], [], []
        for layer, h, expert in ((lp, hp, False), (ls, hs, True)):
            a, g = norm(layer.input_layernorm, h, expert)
            att = layer.self_attn
            shape = (B, h.shape[1], -1, att.head_dim)
            for out, proj in ((q, att.q_proj), (k, att.k_proj), (v, att.v_proj)):
                out.append(proj(a).view(shape).transpose(1, 2))
            gates.append(g)
        q, k, v = rope(torch.cat(q, 2)), rope(torch.cat(k, 2)), torch.cat(v, 2)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        w = (q @ k.transpose(-1, -2) * lp.self_attn.scaling).masked_fill(~see[:, None], float("-inf")).softmax(-1)
        o = (w @ v).transpose(1, 2).reshape(B, P + S, -1)
        new = []
        for layer, h, part, g, expert in ((lp, hp, o[:, :P], gates[0], False), (ls, hs, o[:, P:], gates[1], True)):
            h = h + layer.self_attn.o_proj(part) * g
            a, g = norm(layer.post_attention_layernorm, h, expert)
            new.append(h + layer.mlp(a) * g)
        hp, hs = new
    hs = norm(dit.norm, hs, True)[0]
    return policy.pi0.action_out_proj(hs[:, -x.shape[1]:])


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_cached_prefix_equals_joint_forward(variant):
    policy = tiny(variant).double()
    state, imgs, x, t = make_inputs(policy)
    image_mask = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
    with torch.no_grad():
        pre = policy.encode_prefix(state.double(), PROMPTS, imgs, image_mask)
        v, h = policy.velocity(pre, x.double(), t)
        ref = joint_velocity(policy, state.double(), imgs, image_mask, x.double(), t)
    assert v.shape == (4, 8, 8) and h.shape == (4, 8, 64)
    # float64 on both sides, but Gemma's RMSNorm and the time embedding compute in float32, so differences in
    # summation order surface at float32 rounding (~1e-7). A wrong mask or position differs by O(0.1).
    torch.testing.assert_close(v, ref, rtol=0, atol=2e-6)
    policy.float()
    with torch.no_grad():
        v32 = policy.velocity(policy.encode_prefix(state, PROMPTS, imgs, image_mask), x, t)[0]
    torch.testing.assert_close(v32.double(), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_cache_survives_20_calls(variant):
    policy = tiny(variant)
    state, imgs, _, _ = make_inputs(policy)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        pre = policy.encode_prefix(state, PROMPTS, imgs)
        length = pre.cache.get_seq_length()
        for i in range(20):
            x = torch.randn(4, 8, 8, generator=g)
            t = torch.rand(4, generator=g)
            v_reused = policy.velocity(pre, x, t)[0]
            v_fresh = policy.velocity(policy.encode_prefix(state, PROMPTS, imgs), x, t)[0]
            assert pre.cache.get_seq_length() == length
            assert torch.equal(v_reused, v_fresh), f"call {i}: cached prefix was modified"



@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_stored_prefixes_select_and_cat(variant):
    """The RL update keeps the rollout's prefixes (Prefix.cat of each step's) and takes minibatch rows (select): the
    expert must see what encode_prefix gives for those rows."""
    policy = tiny(variant)
    state, imgs, x, t = make_inputs(policy)
    with torch.no_grad():
        parts = [policy.encode_prefix(state[i:i + 2], PROMPTS[i:i + 2], imgs[i:i + 2]) for i in (0, 2)]
        joined = vla.Prefix.cat(parts)
        rows = torch.tensor([3, 0, 2])
        got = joined.select(rows)
        want = policy.encode_prefix(state[rows], [PROMPTS[i] for i in rows], imgs[rows])
        assert got.length == want.length and torch.equal(got.mask, want.mask)
        torch.testing.assert_close(got.features, want.features)
        torch.testing.assert_close(policy.velocity(got, x[:3], t[:3])[0], policy.velocity(want, x[:3], t[:3])[0])
        assert (got.state is None) == (variant == "pi05")
        assert joined.nbytes() == sum(p.nbytes() for p in parts) > 0
        assert got.nbytes() == joined.nbytes() * 3 // 4
@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_expert_checkpointing_gives_the_same_gradients(variant):
    # Two velocity calls on one prefix in one graph (as Flow-Noise's update does): the layers' backward replays
    # must see the same prefix keys/values as the forward did.
    policy = tiny(variant).freeze_vlm().train()
    state, imgs, x, t = make_inputs(policy)
    grads = []
    for checkpointing in (False, True):
        policy.expert_checkpointing(checkpointing)
        policy.zero_grad(set_to_none=True)
        pre = policy.encode_prefix(state, PROMPTS, imgs)
        v1, _ = policy.velocity(pre, x, t)
        v2, _ = policy.velocity(pre, x - v1 / 4, t - 0.25)
        (v1.square().sum() + v2.sin().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad})
        assert pre.cache.get_seq_length() == pre.length
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)
    assert sum(g.abs().sum() for g in grads[0].values()) > 0


def test_bfloat16_frozen_vlm_keeps_a_float32_expert():
    policy = tiny()
    state, imgs, x, t = make_inputs(policy)
    with torch.no_grad():
        ref = policy.velocity(policy.encode_prefix(state, PROMPTS, imgs), x, t)[0]
        policy.freeze_vlm(dtype=torch.bfloat16)
        pre = policy.encode_prefix(state, PROMPTS, imgs)
        v = policy.velocity(pre, x, t)[0]
    assert pre.cache.layers[0].keys.dtype == torch.bfloat16 and v.dtype == torch.float32
    assert policy.pi0.action_out_proj.weight.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: the velocity moves by about 1e-2 of its scale, a real bug by O(1).
    assert (v - ref).abs().max() < 0.05 * ref.abs().max()
    assert not torch.equal(v, ref)


def test_velocity_depends_on_inputs():
    # Guards the two tests above against a degenerate model that ignores its inputs.
    policy = tiny()
    state, _, x, t = make_inputs(policy, images=False)
    with torch.no_grad():
        pre = policy.encode_prefix(state, PROMPTS)
        v = policy.velocity(pre, x, t)[0]
        assert not torch.allclose(v, policy.velocity(pre, x, t * 0.5)[0])
        assert not torch.allclose(v, policy.velocity(pre, x + 1, t)[0])
        assert not torch.allclose(v, policy.velocity(policy.encode_prefix(state + 1, PROMPTS), x, t)[0])


def test_freeze_vlm_gradients():
    policy = tiny().freeze_vlm()
    state, imgs, x, t = make_inputs(policy)
    pre = policy.encode_prefix(state, PROMPTS, imgs)
    v, h = policy.velocity(pre, x, t)
    (v.square().mean() + h.square().mean()).backward()
    assert all(p.grad is None for p in policy.vlm.parameters())
    expert = [p.grad for p in policy.pi0.model.dit.parameters()] + [policy.pi0.action_out_proj.weight.grad]
    assert all(g is not None and torch.isfinite(g).all() for g in expert)
    assert sum(g.abs().sum() for g in expert) > 0


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_checkpoint_roundtrip_bit_for_bit(tmp_path, variant):
    policy = tiny(variant)
    heads = {"value_head.0.weight": torch.randn(16, 64), "noise_head.2.bias": torch.randn(8)}
    norm = vla.Normalizer.from_data(np.random.randn(50, 10), np.random.randn(50, 7))
    vla.save_checkpoint(tmp_path / "ckpt", policy, norm, heads, {"iteration": 3})
    vla.save_checkpoint(tmp_path / "ckpt", policy, norm, heads, {"iteration": 4})  # overwrite in place
    rng = torch.get_rng_state()
    loaded, norm2, extra, meta = vla.load_checkpoint(tmp_path / "ckpt")
    # Loading skips the random init that every stored weight overwrites (48 s for pi0 on 2 CPU cores): no draws.
    assert torch.equal(torch.get_rng_state(), rng)
    assert meta == {"iteration": 4} and loaded.config == policy.config
    a, b = policy.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # buffers that are not saved (rotary frequencies, position ids) are rebuilt as a fresh build has them
    assert all(torch.equal(x, y) for x, y in zip(policy.buffers(), loaded.buffers(), strict=True))
    assert extra.keys() == heads.keys() and all(torch.equal(extra[k], heads[k]) for k in heads)
    assert json.dumps(norm.to_json()) == json.dumps(norm2.to_json())
    assert not (tmp_path / "ckpt.tmp").exists() and not (tmp_path / "ckpt.old").exists()


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
@pytest.mark.parametrize("layout", ["openpi", "lerobot"])
def test_openpi_and_lerobot_layouts_load(tmp_path, variant, layout):
    policy = tiny(variant, seed=3)
    tensors = to_openpi(policy)
    if layout == "lerobot":
        tensors = {f"model.{k}": v for k, v in tensors.items()}
    assert not any(k.startswith("pi0.") for k in tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "assets" / "maniskill").mkdir(parents=True)
    stats = {"norm_stats": {k: {f: [0.5] * 32 for f in ("mean", "std", "q01", "q99")} for k in ("state", "actions")}}
    (tmp_path / "assets" / "maniskill" / "norm_stats.json").write_text(json.dumps(stats))
    rng = torch.get_rng_state()
    loaded, norm = vla.load_pretrained(tmp_path, "tiny", 7, 10, variant=variant)
    assert torch.equal(torch.get_rng_state(), rng)  # no random init under weights that are all overwritten
    assert norm is not None and norm.stats["state"]["mean"].shape == (32,)
    state, imgs, x, t = make_inputs(policy)
    with torch.no_grad():
        v0 = policy.velocity(policy.encode_prefix(state, PROMPTS, imgs), x, t)[0]
        v1 = loaded.eval().velocity(loaded.encode_prefix(state, PROMPTS, imgs), x, t)[0]
    assert torch.equal(v0, v1)


def test_loading_into_a_bfloat16_vlm_equals_casting_after_loading(tmp_path):
    policy = tiny("pi0", seed=5)
    vla.save_checkpoint(tmp_path / "ckpt", policy)
    save_file(to_openpi(policy), tmp_path / "model.safetensors")
    pairs = [(vla.load_checkpoint(tmp_path / "ckpt", vlm_dtype=torch.bfloat16)[0],
              vla.load_checkpoint(tmp_path / "ckpt")[0]),
             (vla.load_pretrained(tmp_path, "tiny", 7, 10, vlm_dtype=torch.bfloat16)[0],
              vla.load_pretrained(tmp_path, "tiny", 7, 10)[0])]
    for direct, cast in pairs:
        cast.freeze_vlm(dtype=torch.bfloat16)  # what the RL scripts did before loading took a dtype
        assert {p.dtype for p in direct.vlm.parameters()} == {torch.bfloat16}
        assert direct.pi0.action_out_proj.weight.dtype == torch.float32
        a, b = direct.state_dict(), cast.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        assert all(x.dtype == y.dtype and torch.equal(x, y)
                   for x, y in zip(direct.buffers(), cast.buffers(), strict=True))


@pytest.mark.parametrize("mode", ["zscore", "quantile"])
def test_normalize_roundtrip_and_formula(mode):
    rng = np.random.default_rng(0)
    state, actions = rng.normal(3, 2, (200, 5)), rng.uniform(-4, 9, (200, 7))
    norm = vla.Normalizer.from_data(state, actions, mode)
    x = torch.tensor(actions[:10], dtype=torch.float32)
    y = norm.normalize("actions", x)
    torch.testing.assert_close(norm.unnormalize("actions", y), x, rtol=0, atol=1e-5)
    s = norm.stats["actions"]
    if mode == "zscore":
        expected = (x - s["mean"]) / (s["std"] + 1e-6)
    else:
        expected = 2 * (x - s["q01"]) / (s["q99"] - s["q01"] + 1e-6) - 1
        assert y.min() > -1.5 and y.max() < 1.5
    torch.testing.assert_close(y, expected)


def test_byte_tokenizer_and_pi05_state_prompt():
    assert Tokenizer().encode("ab", bos=True) == [1, 99, 100]
    policy = tiny("pi05")
    ids_lo, _ = policy.tokenize(["go"], -torch.ones(1, 10))
    ids_hi, _ = policy.tokenize(["go"], torch.ones(1, 10) * 0.999)
    text = lambda ids: bytes(i - 2 for i in ids[0].tolist() if i > 1).decode()
    assert text(ids_lo).startswith("Task: go, State: 0 0 0") and text(ids_hi).startswith("Task: go, State: 255 255")


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'pi7'"):
        vla.build("pi7")
    with pytest.raises(ValueError, match="unknown preset fields"):
        vla.build("tiny", depthh=3)
    with pytest.raises(ValueError, match="max_action_dim"):
        vla.build("tiny", action_dim=9)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vla.load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        vla.load_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        vla.load_pretrained(tmp_path / "empty", "tiny")
    # A tiny checkpoint loaded as a config with a wider expert: the first mismatching key is named.
    vla.save_checkpoint(tmp_path / "ck", tiny())
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["overrides"]["expert_hidden"] = 32
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    shapes = r"shape of 'pi0.action_out_proj.weight' is \(8, 64\), the config expects \(8, 32\)"
    with pytest.raises(vla.CheckpointError, match=shapes):
        vla.load_checkpoint(tmp_path / "ck")
    with pytest.raises(KeyError, match="has no 'actions.q99'"):
        vla.Normalizer({"state": {f: [0] for f in ("mean", "std", "q01", "q99")},
                        "actions": {"mean": [0], "std": [1], "q01": [0]}})
    policy = tiny()
    with pytest.raises(ValueError, match="state has 3 dims"):
        policy.encode_prefix(torch.zeros(1, 3), ["go"])
    with pytest.raises(ValueError, match="at most 3"):
        policy.encode_prefix(torch.zeros(1, 10), ["go"], torch.zeros(1, 4, 28, 28, 3, dtype=torch.uint8))


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "config.json", "meta.json", "norm_stats.json"])
def test_damaged_checkpoint_names_the_file(tmp_path, damage):
    vla.save_checkpoint(tmp_path / "ck", tiny(), vla.Normalizer.from_data(np.zeros((4, 10)), np.zeros((4, 7))))
    weights = tmp_path / "ck" / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
        bad = weights
    elif damage == "random bytes":
        weights.write_bytes(np.random.default_rng(0).bytes(5000))
        bad = weights
    else:
        bad = tmp_path / "ck" / damage
        bad.write_text('{"preset": "tiny",')
    with pytest.raises(vla.CheckpointError, match=str(bad)):
        vla.load_checkpoint(tmp_path / "ck")


def test_checkpoint_files_share_one_mode(tmp_path):
    vla.save_checkpoint(tmp_path / "ck", tiny(), vla.Normalizer.from_data(np.zeros((4, 10)), np.zeros((4, 7))))
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ck").iterdir()}
    assert len(set(modes.values())) == 1, modes

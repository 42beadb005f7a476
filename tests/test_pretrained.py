"""Real weights from the command line: openpi's prompt and image preprocessing checked against independent
computations; openpi / LeRobot directories through sft_baseline.py --pretrained and the RL scripts' --checkpoint;
a tiny pi0.5 from SFT through each RL script."""

import io
import json
from dataclasses import replace

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import flow_grpo as grpo
import flow_noise_ppo as noise
import flow_sde_ppo as sde
import sft_baseline as sft
import vla
from conftest import small_rl_args, to_openpi
from vla.model import Tokenizer, resize_with_pad

SENTENCES = ["pick up the cube and move it to the goal position", "Task: push the cube, State: 12 200 3;\nAction: ",
             "put the black bowl on the plate", "Open the top drawer of the cabinet", "0 1 2 3 4 5 6 7 8 9 -"]


def train_sentencepiece(path, **options):
    """A 60-piece SentencePiece model, trained in a second (PaliGemma's cannot be downloaded here)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 20), model_writer=model, vocab_size=60,
                                   model_type="bpe", character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                   user_defined_symbols=["\n"], remove_extra_whitespaces=False, minloglevel=2,
                                   **options)
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("tok") / "paligemma_tokenizer.model")


FAST = dict(env_workers=1, eval_episodes=0)  # envs in this process, no evaluation: the runs take seconds


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    return sft.generate_maniskill_demos("PickCube-v1", 3, "state", "pd_ee_delta_pose",
                                        root=tmp_path_factory.mktemp("demos"))


def test_pi0_prompt_is_openpis(sp_file):
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    policy = vla.build("tiny", 7, 10, tokenizer=str(sp_file))
    ids, mask = policy.tokenize(["Pick_up the Cube\n", "  push the cube to the goal  "])
    for i, clean in enumerate(["Pick up the Cube", "push the cube to the goal"]):  # cleaned by hand
        want = sp.encode(clean, add_bos=True) + sp.encode("\n")
        assert ids[i, :len(want)].tolist() == want and mask[i].sum() == len(want) and not ids[i, len(want):].any()
    # the two calls are not one call, and the case is kept
    assert want != sp.encode(clean + "\n", add_bos=True)
    assert policy.tokenize(["Pick up the Cube"])[0][0].tolist() != policy.tokenize(["pick up the cube"])[0][0].tolist()


def test_pi05_prompt_is_openpis(sp_file):
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    policy = vla.build("tiny_pi05", 7, 5, tokenizer=str(sp_file))
    ids, mask = policy.tokenize(["Pick_up the Cube"], torch.tensor([[-1.5, -1.0, -0.2, 0.51, 1.2]]))
    # bins of the normalised state: 256 equal bins of [-1, 1), -1 below, 255 above
    want = sp.encode("Task: Pick up the Cube, State: -1 0 102 193 255;\nAction: ", add_bos=True)
    assert ids[0, :len(want)].tolist() == want and mask[0].sum() == len(want)


def test_prompt_truncated_to_the_presets_length(sp_file):
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    policy = vla.build("tiny", 7, 10, tokenizer=str(sp_file))
    long = " ".join(SENTENCES[:4])
    ids, mask = policy.tokenize([long])
    assert len(sp.encode(long)) > 32 == ids.shape[1] == mask.sum()
    assert ids[0].tolist() == sp.encode(long, add_bos=True)[:32]


def test_transformers_tokenizer_dir_equals_its_sentencepiece_model(tmp_path):
    # Gemma's conventions: no dummy prefix, <bos> / <eos>; transformers converts such a model without changes
    sp_path = train_sentencepiece(tmp_path / "tokenizer.model", add_dummy_prefix=False, bos_piece="<bos>",
                                  eos_piece="<eos>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    sp, tok = spm.SentencePieceProcessor(model_file=str(sp_path)), Tokenizer(str(tmp_path))
    for text in SENTENCES + ["\n"]:
        assert tok.encode(text, bos=True) == sp.encode(text, add_bos=True)
        assert tok.encode(text) == sp.encode(text)


def test_resize_with_pad_is_openpis():
    x = torch.rand(2, 3, 25, 40) * 2 - 1
    # 40 -> 28 wide, so 25 -> int(25 * 28 / 40) = 17 high; 11 rows of padding: 5 above, 6 below, black (-1)
    want = torch.full((2, 3, 28, 28), -1.0)
    want[:, :, 5:22] = F.interpolate(x, size=(17, 28), mode="bilinear", align_corners=False)
    assert torch.equal(resize_with_pad(x, 28), want)
    want_t = torch.full((2, 3, 28, 28), -1.0)
    want_t[..., 5:22] = F.interpolate(x.transpose(2, 3), size=(28, 17), mode="bilinear", align_corners=False)
    assert torch.equal(resize_with_pad(x.transpose(2, 3), 28), want_t)
    # the policy applies it to uint8 images after scaling them to [-1, 1]
    policy = vla.build("tiny", 7, 10).eval()
    img = torch.randint(0, 256, (2, 1, 25, 40, 3), dtype=torch.uint8)
    by_hand = resize_with_pad(img[:, 0].permute(0, 3, 1, 2) / 127.5 - 1, 28).permute(0, 2, 3, 1)[:, None]
    with torch.no_grad():
        a, b = (policy.encode_prefix(torch.zeros(2, 10), ["go"] * 2, im).features for im in (img, by_hand))
    assert torch.equal(a, b)


@pytest.mark.parametrize("preset", ["tiny", "tiny_pi05"])
def test_a_masked_camera_slot_equals_no_slot(preset):
    """openpi feeds three slots (base, left wrist, right wrist) and masks the missing one out."""
    torch.manual_seed(0)
    policy = vla.build(preset, 7, 10).eval()
    imgs = torch.randint(0, 256, (2, 3, 28, 28, 3), dtype=torch.uint8)
    x, t = torch.randn(2, 8, 8), torch.rand(2)
    with torch.no_grad():
        three = policy.encode_prefix(torch.zeros(2, 10), ["go"] * 2, imgs, torch.tensor([[True, True, False]] * 2))
        two = policy.encode_prefix(torch.zeros(2, 10), ["go"] * 2, imgs[:, :2])
        torch.testing.assert_close(policy.velocity(three, x, t)[0], policy.velocity(two, x, t)[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(three.features, two.features, rtol=0, atol=1e-6)


def write_pretrained(path, policy, layout, assets=("maniskill",)):
    """policy's weights as an openpi (or LeRobot) directory, with norm stats for each asset id."""
    tensors = to_openpi(policy)
    path.mkdir(parents=True)
    if layout == "lerobot":  # everything under "model.", and LeRobot's own config.json (no preset in it)
        tensors = {f"model.{k}": v for k, v in tensors.items()}
        (path / "config.json").write_text(json.dumps({"type": policy.spec["variant"], "chunk_size": 50}))
    save_file(tensors, path / "model.safetensors")
    stats = {k: {"mean": [0.1] * 64, "std": [1.0] * 64, "q01": [-1.0] * 64, "q99": [1.0] * 64}
             for k in ("state", "actions")}
    for asset in assets:
        (path / "assets" / asset).mkdir(parents=True)
        (path / "assets" / asset / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))
    return path


@pytest.mark.parametrize("layout", ["openpi", "lerobot"])
@pytest.mark.parametrize("preset", ["tiny", "tiny_pi05"])
def test_layout_and_preset_detected(tmp_path, sp_file, layout, preset):
    torch.manual_seed(1)
    policy = vla.build(preset, 7, 10, tokenizer=str(sp_file)).eval()
    path = write_pretrained(tmp_path / "w", policy, layout, assets=("maniskill", "libero"))
    load = lambda **kw: vla.load_checkpoint(path, tokenizer=str(sp_file), action_dim=7, state_dim=10, **kw)  # noqa
    with pytest.raises(vla.CheckpointError, match=r"norm stats for libero, maniskill: pick one with asset_id"):
        load()
    with pytest.raises(vla.CheckpointError, match="no norm_stats.json for asset_id 'droid'"):
        load(asset_id="droid")
    loaded, norm, extra, meta = load(asset_id="libero")
    assert loaded.config.preset == preset and norm is not None and extra == {} and meta == {}
    assert loaded.spec["tokenizer"] == str(sp_file)
    state, x, t = torch.randn(2, 10), torch.randn(2, 8, 8), torch.rand(2)
    with torch.no_grad():
        v0, v1 = (p.eval().velocity(p.encode_prefix(state, ["push the cube"] * 2), x, t)[0] for p in (policy, loaded))
    assert torch.equal(v0, v1)


def test_refusals(tmp_path, sp_file):
    # a PaliGemma-size embedding (here 1000 rows stand in for 257152) with the byte tokenizer
    path = write_pretrained(tmp_path / "big", vla.build("tiny", 7, 10, vocab=1000), "openpi")
    with pytest.raises(vla.CheckpointError, match=r"1000-token embedding: pass its tokenizer \(--tokenizer"):
        vla.load_checkpoint(path, action_dim=7, state_dim=10)
    with pytest.raises(vla.CheckpointError, match="has 60 ids, the model's embedding only 40"):
        vla.build("tiny", 7, 10, vocab=40, tokenizer=str(sp_file))
    with pytest.raises(vla.CheckpointError, match="tokenizer .*nope.model does not exist"):
        vla.build("tiny", 7, 10, tokenizer=str(tmp_path / "nope.model"))
    path = write_pretrained(tmp_path / "small", vla.build("tiny", 7, 10), "openpi")
    with pytest.raises(vla.CheckpointError, match="takes at most 8-D actions and 64-D states, not 9-D actions"):
        vla.load_checkpoint(path, action_dim=9, state_dim=10)
    torch.save({}, tmp_path / "small" / "model.safetensors")  # not safetensors: named, never unpickled
    with pytest.raises(vla.CheckpointError, match="model.safetensors is not a readable safetensors file"):
        vla.load_checkpoint(path, action_dim=7, state_dim=10)


@pytest.mark.parametrize("layout", ["openpi", "lerobot"])
def test_pretrained_directories_through_sft_and_flow_sde_ppo(tmp_path, sp_file, demos, layout):
    torch.manual_seed(2)
    path = write_pretrained(tmp_path / "w", vla.build("tiny", 7, 42, tokenizer=str(sp_file)), layout)
    # SFT from the weights: the preset is read from them, the tokenizer goes into our checkpoint
    args = replace(sft.Args(), pretrained=str(path), tokenizer=str(sp_file), demo_path=str(demos), num_demos=3,
                   train_steps=2, batch_size=8, eval_episodes=0, output_dir=str(tmp_path / "sft"), chunk_size=8,
                   env_workers=1)
    _, policy = sft.main(args)
    assert policy.config.preset == "tiny" and policy.spec["tokenizer"] == str(sp_file)
    # RL straight from the weights (their norm stats), and from the SFT checkpoint
    for ckpt, out in ((path, "rl_pretrained"), (tmp_path / "sft" / "checkpoint", "rl_sft")):
        rl = small_rl_args(sde, tmp_path, checkpoint=str(ckpt), output_dir=str(tmp_path / out), obs_mode="state",
                           tokenizer=str(sp_file) if ckpt == path else None, **FAST)
        sde.main(rl)
        loaded, _, _, meta = vla.load_checkpoint(tmp_path / out / "checkpoint")
        assert meta["iteration"] == 2 and loaded.spec["tokenizer"] == str(sp_file)
    with pytest.raises(vla.CheckpointError, match="pass its tokenizer"):  # PaliGemma-size: needs --tokenizer
        write_pretrained(tmp_path / "big", vla.build("tiny", 7, 42, vocab=1000), layout)
        sde.main(small_rl_args(sde, tmp_path, checkpoint=str(tmp_path / "big"), output_dir=str(tmp_path / "x"), **FAST))


def test_tiny_pi05_from_sft_through_each_rl_script(tmp_path, demos):
    args = replace(sft.Args(), preset="tiny_pi05", demo_path=str(demos), num_demos=3, train_steps=2, batch_size=8,
                   eval_episodes=0, output_dir=str(tmp_path / "sft"), env_workers=1)
    _, policy = sft.main(args)
    assert policy.pi05 and policy.config.norm_mode == "quantile"
    ckpt = str(tmp_path / "sft" / "checkpoint")
    with pytest.raises(ValueError, match=r"--critic-input expert_state: needs pi0's state token; .* use vlm"):
        sde.main(small_rl_args(sde, tmp_path, checkpoint=ckpt))
    for module in (sde, noise, grpo):
        out = tmp_path / module.__name__
        module.main(small_rl_args(module, tmp_path, checkpoint=ckpt, output_dir=str(out), critic_input="vlm", **FAST))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in rows if "rollout_time" in r] == [1, 2]
        assert vla.load_checkpoint(out / "checkpoint")[0].pi05

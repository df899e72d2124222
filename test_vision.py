"""
Parity tests of the vision path: qwen35_mtp.py's section 7 and load.py's image handling against
transformers 5.24's Qwen3_5(Moe)ForConditionalGeneration (fp32, eager), on the official-layout cases of
conftest.py, whose checkpoints carry a random vision tower (2 blocks, a 5 x 5 position table).

    1. the tower, 3-D positions, 3-D rotary
    2. logits, losses and MTP logits with images in the sequence
    3. decoding with images: cached steps, greedy parity, speculative decoding
    4. loading, configs, bad input
    5. images -> pixel_values, and the command line
"""

import copy
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen3_5Config
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_5.modeling_qwen3_5 import (Qwen3_5TextRotaryEmbedding, Qwen3_5VisionAttention,
                                                          Qwen3_5VisionModel)

import load
import qwen35_mtp
from conftest import (GRIDS, IMAGE, MOE_CASE, VISION, all_tensors, assert_close, get_case, image_batch,
                      image_tokens, max_diff, oracle_vl_forward, oracle_vl_mtp_logits, run_cli, write_checkpoint,
                      write_word_tokenizer)
from load import (config_from_hf, config_to_hf, describe, image_patches, image_prompt, image_settings, load_checkpoint,
                  read_images, save_checkpoint, vision_config_from_hf)
from qwen35_mtp import Cache, VisionTower, generate, mrope_positions, rotary_cos_sin

DENSE_VL = "dense-tied-official"
VL_CASES = [DENSE_VL, MOE_CASE]

# Row 0: two images of different grids (same token count) between text; row 1: a 2-frame grid, left padded.
PADDED = [[3, GRIDS[0], 4, GRIDS[1], 2], [2, GRIDS[2], 5]]
# Unpadded (MtpModel takes no padding): an image at the very start, and a thin one.
UNPADDED = [[GRIDS[3], 4, GRIDS[0], 3], [5, GRIDS[1], 9]]


@pytest.fixture(scope="module", params=VL_CASES)
def vl_case(request, tmp_path_factory):
    return get_case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def dense_vl(tmp_path_factory):
    return get_case(DENSE_VL, tmp_path_factory)


def image_labels(batch):
    """Labels -100 at image tokens, at padding and at each row's first real token (no real token before it
    predicts it: the row before is padding, whose logits are arbitrary)."""
    return batch.ids.masked_fill((batch.ids == IMAGE) | (batch.mask.cumsum(1) <= 1), -100)


def forward(model, batch, **kwargs):
    with torch.no_grad():
        return model(batch.ids, attention_mask=batch.mask, pixel_values=batch.pixels, image_grid_thw=batch.grid_thw,
                     **kwargs)


# ==============================================================================================
# 1. The tower, 3-D positions, 3-D rotary

def test_tower_matches_transformers(dense_vl):
    """The tower alone (one row per image token) equals Qwen3_5VisionModel's pooler_output: two images,
    then four (a 2-frame and a thin grid too); the 5 x 5 table is resampled both down and up."""
    for grids in (GRIDS[:2], GRIDS):
        grid_thw = torch.tensor(grids)
        pixels = torch.randn(int(grid_thw.prod(-1).sum()), 1536, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = dense_vl.vl.model.visual(pixels, grid_thw=grid_thw).pooler_output
            got = dense_vl.model.visual(pixels, grid_thw)
        assert_close(got, expected, f"tower {grids}")
        assert expected.abs().max() > 0.3


def test_tower_at_unit_scale_matches_transformers():
    """The tower equals Qwen3_5VisionModel with weights at the scale of trained ones (unit LayerNorms, linears
    ~ 1/sqrt(fan_in)): with the cases' N(0, 0.1) weights the attention logits are ~1e-3, so attention is
    uniform, and a wrong 2-D rotary moves the output by 1e-5 at most, the exact GELU in the blocks instead of
    the tanh one by 2e-7 (both within TOL); here, by 0.3 .. 0.7 and 3e-4, against a measured error of 2e-6."""
    config = Qwen3_5Config(vision_config=VISION).vision_config
    torch.manual_seed(0)
    theirs = Qwen3_5VisionModel._from_config(config).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name == "pos_embed.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    ours = VisionTower(vision_config_from_hf(VISION)).eval()
    ours.load_state_dict(theirs.state_dict())
    grid_thw = torch.tensor(GRIDS)
    pixels = torch.randn(int(grid_thw.prod(-1).sum()), 1536, generator=g)
    with torch.no_grad():
        expected = theirs(pixels, grid_thw=grid_thw).pooler_output
        got = ours(pixels, grid_thw)
    assert_close(got, expected, "tower at unit scale")
    assert expected.abs().max() > 1


def test_vision_attention_in_bfloat16_matches_transformers():
    """In bfloat16 the tower's 2-D rotary turns q and k in fp32, as Qwen3_5VisionAttention does: one head of 64
    over an 8 x 8 grid, within bf16 rounding (measured 0.03 of 16) of transformers' attention; turning them
    in bf16 is off by 0.75. (The fp32 tests cannot tell the two apart.)"""
    vision = dict(VISION, hidden_size=64, num_heads=1)
    config = Qwen3_5Config(vision_config=vision).vision_config
    config._attn_implementation = "sdpa"
    theirs = Qwen3_5VisionAttention(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    c = vision_config_from_hf(vision)
    ours = qwen35_mtp.VisionAttention(c).eval()
    ours.load_state_dict(theirs.state_dict())
    theirs, ours = theirs.to(torch.bfloat16), ours.to(torch.bfloat16)
    cos, sin = VisionTower(c).rotary(8, 8)
    x = (4 * torch.randn(64, 64, generator=g)).to(torch.bfloat16)
    with torch.no_grad():
        expected = theirs(x, cu_seqlens=torch.tensor([0, 64]), position_embeddings=(cos, sin)).float()
        got = ours(x, cos[None], sin[None], [64]).float()
    assert expected.abs().max() > 10
    assert_close(got, expected, "vision attention in bf16", tol=0.2)


def test_positions_match_get_rope_index(dense_vl):
    """3-D positions equal transformers' get_rope_index: left padding, two images in a row, an image at the
    very start, a 2-frame grid, a 4-frame grid of 1 x 1 merged tokens (the text after it goes on at start +
    max(h, w), not start + frames); and the rope deltas a cache derives from them equal transformers' too (its
    rule, the largest position + 1, is the text's next position when the prompt ends in text whose
    position is the largest; test_cached_decoding_after_images_equals_full_forward has the other case)."""
    batch = image_batch([PADDED[0], UNPADDED[0], PADDED[1], [2, (4, 2, 2), 3]], seed=2)
    expected, deltas = dense_vl.vl.model.get_rope_index(batch.ids, mm_token_type_ids=batch.mm,
                                                        image_grid_thw=batch.grid_thw, attention_mask=batch.mask)
    positions = mrope_positions(batch.ids, batch.mask.bool(), batch.grid_thw, dense_vl.model.config)
    assert torch.equal(positions, expected)
    padding_only = torch.cat([batch.mask, torch.zeros_like(batch.mask[:1])]).bool()   # a row of padding: 0s
    with_padding = mrope_positions(torch.cat([batch.ids, batch.ids[:1]]), padding_only, batch.grid_thw,
                                   dense_vl.model.config)
    assert torch.equal(with_padding, torch.cat([expected, torch.zeros_like(expected[:, :1])], dim=1))
    cache = Cache([], batch.ids.shape[1])
    cache.begin_step(*batch.mask.shape, batch.mask.device)
    cache.step(batch.mask.bool(), dense_vl.model.config, torch.float32, positions=positions)
    assert torch.equal(cache.rope_deltas, deltas)


@pytest.mark.parametrize("head_dim, theta, section", [(32, 1e4, [2, 1, 1]), (256, 1e7, [11, 11, 10]),
                                                     (64, 1e7, [4, 2, 2]), (64, 1e7, [4, 3, 1])],
                         ids=["tiny", "real", "short H and W", "short W"])
def test_rotary_3d_matches_transformers(head_dim, theta, section):
    """cos/sin of 3-D positions equal Qwen3_5TextRotaryEmbedding's, bit for bit, for the tiny and the real
    rotary (64 of 256 dims, frequencies T H W interleaved), for a section under which the last pair
    turns with T, not H as under the others, and for one whose W frequencies stop early ([4, 3, 1]: the
    sixth pair turns with T, not W) (so the file's section must be read: config_from_hf parses
    the text config transformers writes); [B, T] positions, or three equal rows, give the 1-D RoPE exactly."""
    rope = dict(rope_type="default", rope_theta=theta, partial_rotary_factor=0.25, mrope_section=section,
                mrope_interleaved=True)
    hf_config = Qwen3_5Config(text_config=dict(head_dim=head_dim, rope_parameters=rope))
    hf = Qwen3_5TextRotaryEmbedding(hf_config.text_config)
    config = config_from_hf(json.loads(hf_config.text_config.to_json_string()))
    assert config.mrope_section == tuple(section) and config.rope_theta == theta
    positions = torch.randint(0, 5000, (3, 2, 40), generator=torch.Generator().manual_seed(3))
    cos, sin = rotary_cos_sin(positions, config, torch.float32)
    hf_cos, hf_sin = hf(torch.zeros(1), positions)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)
    text = positions[0]
    cos_1d, sin_1d = rotary_cos_sin(text, config, torch.float32)
    cos_3d, sin_3d = rotary_cos_sin(text.expand(3, -1, -1), config, torch.float32)
    assert torch.equal(cos_1d, cos_3d) and torch.equal(sin_1d, sin_3d)


# ==============================================================================================
# 2. Logits, losses and MTP logits with images in the sequence

def test_logits_and_loss_with_images_match_oracle(vl_case):
    """A left-padded batch with three images (two of different grids in one row, a 2-frame one in the
    other): logits at real tokens and the loss (labels -100 at image tokens, see image_labels) equal
    Qwen3_5(Moe)ForConditionalGeneration's. With text positions instead, the logits would be far off."""
    batch = image_batch(PADDED, seed=4)
    labels = image_labels(batch)
    ref, _, _ = oracle_vl_forward(vl_case.vl, batch, labels=labels)
    out = forward(vl_case.model, batch, labels=labels, mtp=False)
    real = batch.mask.bool()
    assert_close(out.logits[real], ref.logits[real], f"{vl_case.name} logits with images")
    assert_close(out.loss, ref.loss, f"{vl_case.name} loss with images")
    with torch.no_grad():
        embeds, _ = vl_case.model.embed_inputs(batch.ids, real, batch.pixels, batch.grid_thw)
        text_positions = vl_case.model.model(batch.ids, real, embeds=embeds)
    assert max_diff(vl_case.model.lm_head(text_positions)[real], ref.logits[real]) > 1e-2


def test_mtp_logits_with_images_match_oracle(vl_case):
    """MTP row t reads h_t, the MERGED input embedding of token t+1 (the image feature at image tokens)
    and the main model's 3-D position of t: equal to transformers' MtpModel layer fed the VL oracle's own
    merged embeddings and positions. The MTP loss is CE against token t+2. Feeding the placeholder's
    token embedding instead, or the positions of t+1, changes the logits (the test sees both)."""
    batch = image_batch(UNPADDED, seed=5)
    labels = batch.ids.masked_fill(batch.ids == IMAGE, -100)
    batch.mask = None
    ref, embeds, positions = oracle_vl_forward(vl_case.vl, batch)
    ref_mtp = oracle_vl_mtp_logits(vl_case.vl, vl_case.mtp, embeds, ref.hidden_states[-1], positions)
    out = forward(vl_case.model, batch, labels=labels)
    assert_close(out.mtp_logits, ref_mtp, f"{vl_case.name} MTP logits with images")
    expected_loss = torch.nn.functional.cross_entropy(ref_mtp[:, :-1].flatten(0, 1), labels[:, 2:].flatten(),
                                                      ignore_index=-100)
    assert_close(out.mtp_loss, expected_loss, f"{vl_case.name} MTP loss with images")
    model = vl_case.model
    with torch.no_grad():
        merged, _ = model.embed_inputs(batch.ids, None, batch.pixels, batch.grid_thw)
        placeholders = model.lm_head(model.mtp_hidden(model.model.embed_tokens(batch.ids), out.hidden, None, 1, positions)[0])
        next_positions = model.lm_head(model.mtp_hidden(merged, out.hidden, None, 1, positions[..., 1:])[0])
    assert max_diff(placeholders, ref_mtp) > 0.1 and max_diff(next_positions, ref_mtp) > 1e-3


def test_backward_with_images_matches_oracle(dense_vl):
    """Gradients of the loss with images equal the oracle's, for the vision tower's weights too: each within
    1e-5 of its own largest entry (the tower's are 1e-4 .. 4e-3, 100 to 3000 times smaller than the
    embeddings', so one bound from the largest gradient would let them be off by percents)."""
    batch = image_batch(PADDED, seed=6)
    labels = image_labels(batch)
    model = load_checkpoint(dense_vl.path).requires_grad_(True)
    vl = dense_vl.vl
    vl.zero_grad()
    vl(input_ids=batch.ids, attention_mask=batch.mask, pixel_values=batch.pixels, image_grid_thw=batch.grid_thw,
       mm_token_type_ids=batch.mm, labels=labels).loss.backward()
    model(batch.ids, labels=labels, attention_mask=batch.mask, mtp=False, pixel_values=batch.pixels,
          image_grid_thw=batch.grid_thw).loss.backward()
    oracle = dict(vl.model.visual.named_parameters(prefix="visual"))
    oracle.update(vl.model.language_model.named_parameters(prefix="model"))
    grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith("mtp.")}
    assert grads.keys() <= oracle.keys() and any(n.startswith("visual.") for n in grads)
    for n, g in grads.items():
        assert_close(g, oracle[n].grad, f"grad {n}", tol=1e-5 * oracle[n].grad.abs().max().item())
    vl.zero_grad()


# ==============================================================================================
# 3. Decoding with images

def test_cached_decoding_after_images_equals_full_forward(vl_case):
    """Prefill a prompt with images into the cache, then feed the text after it (a 3-token step, then
    single tokens): every step's logits equal the full forward's, so the positions after the images
    continue where they should (rope deltas), per row of a left-padded batch. The third row's prompt ends
    on the last token of a 4-frame image of one merged token per frame (its vision_end comes in the first
    cached step): its frames (time axis) run past where the text after it goes on."""
    rows = PADDED + [[2, (4, 2, 2)]]
    batch = image_batch([row + [12] for row in rows], seed=7)     # the prompt, then 12 text tokens
    model, real = vl_case.model, batch.mask.bool()
    full = forward(model, batch, mtp=False).logits
    T, P = batch.ids.shape[1], batch.ids.shape[1] - 13      # row 2: [..., image, image] | [vision_end, 12 text]
    assert batch.ids[2, P - 1] == IMAGE and batch.ids[2, P] != IMAGE
    with torch.no_grad():
        cache = Cache(model.config.layer_types, 200)
        embeds, positions = model.embed_inputs(batch.ids[:, :P], real[:, :P], batch.pixels, batch.grid_thw)
        got = [model.model(batch.ids[:, :P], real[:, :P], cache, embeds=embeds, positions=positions)]
        for a, b in [(P, P + 3)] + [(t, t + 1) for t in range(P + 3, T)]:
            got.append(model.model(batch.ids[:, a:b], None, cache))
        got = model.lm_head(torch.cat(got, dim=1))
    assert_close(got[real], full[real], f"{vl_case.name} cached steps after images")


def test_greedy_generate_with_images_matches_transformers(tmp_path_factory):
    """Greedy tokens after a left-padded prompt with images equal transformers' generate (untied MoE: its
    output does not just repeat the last token)."""
    case = get_case(MOE_CASE, tmp_path_factory)
    batch = image_batch(PADDED, seed=8)
    expected = case.vl.generate(input_ids=batch.ids, attention_mask=batch.mask, pixel_values=batch.pixels,
                                image_grid_thw=batch.grid_thw, mm_token_type_ids=batch.mm, max_new_tokens=20,
                                do_sample=False, pad_token_id=0)
    ours, _ = generate(case.model, batch.ids, 20, attention_mask=batch.mask, pixel_values=batch.pixels,
                       image_grid_thw=batch.grid_thw)
    assert torch.equal(ours, expected)
    assert len(set(ours[:, -20:].flatten().tolist())) > 4


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_with_images_is_lossless(vl_case, k, monkeypatch):
    """Speculative decoding after a prompt with an image gives plain greedy decoding's tokens; and in every
    round the rows the head's cache takes (the whole prompt in the first) equal the uncached MTP rows, and
    the first draft is the argmax at the end of the accepted prefix: the head's cache holds the image rows
    at the right positions (the argmax alone does not see them at text positions). (The uncached forward
    is built by hand: generated tokens are text even when one happens to be the image token id.)"""
    recorded = []

    def recording_draft(model_, hidden, next_embeds, valid, mtp_cache, *rest):
        fed = []            # the head's outputs: the first is for the rows the cache takes
        hook = model_.mtp.register_forward_hook(lambda module, args, out: fed.append(out))
        try:
            drafts, probs = real_draft(model_, hidden, next_embeds, valid, mtp_cache, *rest)
        finally:
            hook.remove()
        if drafts:
            recorded.append((len(mtp_cache), drafts[0].item(), fed[0][0]))
        return drafts, probs

    real_draft = qwen35_mtp.draft
    monkeypatch.setattr(qwen35_mtp, "draft", recording_draft)
    batch = image_batch([[2, GRIDS[0], 3]], seed=9)
    model, images = vl_case.model, dict(pixel_values=batch.pixels, image_grid_thw=batch.grid_thw)
    plain, _ = generate(model, batch.ids, 24, **images)
    spec, stats = generate(model, batch.ids, 24, draft_tokens=k, **images)
    assert torch.equal(spec, plain) and stats["drafted"] > 0
    P, T = batch.ids.shape[1], spec.shape[1]
    with torch.no_grad():
        embeds, positions = model.embed_inputs(batch.ids, None, **images)
        after = torch.arange(P, T) + positions.max() + 1 - P          # text after the prompt: +1 per token
        embeds = torch.cat([embeds, model.model.embed_tokens(spec[:, P:])], dim=1)
        positions = torch.cat([positions, after.expand(3, 1, -1)], dim=2)
        hidden = model.model(spec, embeds=embeds, positions=positions)
        mtp_rows = model.mtp_hidden(embeds, hidden, None, 1, positions)[0][0]
        mtp_choice = model.lm_head(mtp_rows).argmax(-1)
    assert recorded[0][2].shape[0] == P                # the first round feeds the prompt's rows
    for rows, first_draft, fed in recorded:           # rows (h_t, x_{t+1}) in the cache: row rows-1 is the last
        assert_close(fed, mtp_rows[rows - len(fed):rows], f"{vl_case.name} MTP rows {rows - len(fed)}..{rows - 1}")
        assert mtp_choice[rows - 1].item() == first_draft


# ==============================================================================================
# 4. Loading, configs, bad input

def test_loader_is_strict_about_the_tower(dense_vl, tmp_path):
    """A missing or misshapen vision tensor is named; tower tensors without a vision_config are refused;
    without model.visual.* tensors the model is text only (visual None) and says so if given images."""
    tensors, config = dense_vl.tensors, dense_vl.config
    key = "model.visual.blocks.1.attn.qkv.bias"
    with pytest.raises(ValueError, match=r"missing.*visual\.blocks\.1\.attn\.qkv\.bias"):
        load_checkpoint(write_checkpoint(tmp_path / "missing", {k: v for k, v in tensors.items() if k != key}, config))
    with pytest.raises(ValueError, match=r"model\.visual\.blocks\.1\.attn\.qkv\.bias has shape \(95,\).*\(96,\)"):
        load_checkpoint(write_checkpoint(tmp_path / "shape", {**tensors, key: tensors[key][:95]}, config))
    no_vision = {k: v for k, v in config.items() if k != "vision_config"}
    with pytest.raises(ValueError, match="model.visual.*config.json has no vision_config"):
        load_checkpoint(write_checkpoint(tmp_path / "no-config", tensors, no_vision))
    text_only = {k: v for k, v in tensors.items() if not k.startswith("model.visual.")}
    model = load_checkpoint(write_checkpoint(tmp_path / "text", text_only, config))
    assert model.visual is None and model.config.vision is None
    batch = image_batch([[2, GRIDS[0], 3]], seed=10)
    with pytest.raises(ValueError, match="no vision tower"):
        model(batch.ids, pixel_values=batch.pixels, image_grid_thw=batch.grid_thw)


def test_vl_checkpoint_round_trips(dense_vl, tmp_path):
    """save_checkpoint writes the tower as model.visual.* and its config; loading it back gives the same
    model (same config, same logits with images)."""
    save_checkpoint(dense_vl.model, tmp_path)
    assert any(k.startswith("model.visual.") for k in all_tensors(tmp_path))
    model = load_checkpoint(str(tmp_path))
    assert model.config == dense_vl.model.config
    assert config_from_hf(config_to_hf(model.config)) == model.config
    batch = image_batch(PADDED, seed=11)
    assert torch.equal(forward(model, batch).logits, forward(dense_vl.model, batch).logits)


# the published vision_config of Qwen3.5-27B (the 35B-A3B one differs only in out_hidden_size 2048)
REAL_VISION = dict(deepstack_visual_indexes=[], depth=27, hidden_act="gelu_pytorch_tanh", hidden_size=1152,
                   in_channels=3, initializer_range=0.02, intermediate_size=4304, model_type="qwen3_5", num_heads=16,
                   num_position_embeddings=2304, out_hidden_size=5120, patch_size=16, spatial_merge_size=2,
                   temporal_patch_size=2)


def test_real_vision_config_builds_transformers_tower():
    """The published vision_config parses, and builds (on the meta device) exactly transformers' tower:
    the same parameter names and shapes, 460.7M parameters."""
    d = {"image_token_id": 248056, "vision_start_token_id": 248053, "vision_end_token_id": 248054,
         "vision_config": REAL_VISION,
         "text_config": dict(vocab_size=248320, hidden_size=5120, num_hidden_layers=4, num_attention_heads=24,
                             num_key_value_heads=4, linear_num_key_heads=16, linear_num_value_heads=48,
                             linear_key_head_dim=128, linear_value_head_dim=128, intermediate_size=17408,
                             rope_parameters=dict(rope_type="default", rope_theta=10000000, partial_rotary_factor=0.25,
                                                  mrope_section=[11, 11, 10], mrope_interleaved=True))}
    config = config_from_hf(d)
    v = config.vision
    assert (v.depth, v.hidden_size, v.num_heads, v.head_dim, v.out_hidden_size) == (27, 1152, 16, 72, 5120)
    assert config.mrope_section == (11, 11, 10) and config.image_token_id == 248056
    with torch.device("meta"):
        theirs = Qwen3_5VisionModel._from_config(Qwen3_5Config(vision_config=REAL_VISION).vision_config)
        ours = VisionTower(v)
    shapes = lambda m: {k: tuple(p.shape) for k, p in m.state_dict().items()}
    assert shapes(ours) == shapes(theirs)
    assert round(sum(p.numel() for p in ours.parameters()) / 1e6, 1) == 460.7


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["vision_config"].update(deepstack_visual_indexes=[8, 16]), "deepstack_visual_indexes=\\[8, 16\\]"),
    (lambda d: d["vision_config"].update(hidden_act="gelu"), "vision_config field hidden_act='gelu'"),
    (lambda d: d["vision_config"].update(patch_size=[16, 16]), "config field patch_size=\\[16, 16\\] \\(list\\)"),
    (lambda d: d["vision_config"].update(num_position_embeddings=2300), "num_position_embeddings=2300 is not a square"),
    (lambda d: d["vision_config"].update(out_hidden_size=32), "vision out_hidden_size=32 must equal hidden_size=64"),
    (lambda d: d["text_config"]["rope_parameters"].update(mrope_interleaved=False), "mrope_interleaved=False"),
    (lambda d: d["text_config"]["rope_parameters"].update(mrope_section=[2, 2]), "mrope_section=\\(2, 2\\)"),
    (lambda d: d["vision_config"].pop("out_hidden_size"), "vision_config is missing required field out_hidden_size"),
    (lambda d: d["vision_config"].update(rope_parameters=dict(rope_type="default")),
     "vision_config rope_parameters=.*expected rope_type 'axial'"),
], ids=["deepstack", "act", "patch list", "table", "width", "not interleaved", "section", "no width", "vision rope"])
def test_bad_vision_configs_are_named(dense_vl, edit, message):
    d = json.loads(json.dumps(dense_vl.config))
    edit(d)
    with pytest.raises(ValueError, match=message):
        config_from_hf(d)


def test_bad_image_inputs_are_named(dense_vl):
    """Image tokens that do not match the grids, pixel rows of the wrong width, or a grid without pixels; grids
    with odd rows or no frames; as many image tokens as the grids make, but not in one run per image."""
    model, batch = dense_vl.model, image_batch([[2, GRIDS[0], 3]], seed=12)
    ids = batch.ids.clone()
    ids[0, 4] = 7                                               # one image token fewer
    with pytest.raises(ValueError, match="input_ids hold 5 image tokens.*the images make 6"):
        model(ids, pixel_values=batch.pixels, image_grid_thw=batch.grid_thw)
    with pytest.raises(ValueError, match=r"pixel_values has shape \(24, 1535\); expected \[patches, 1536\]"):
        model(batch.ids, pixel_values=batch.pixels[:, 1:], image_grid_thw=batch.grid_thw)
    with pytest.raises(ValueError, match="image_grid_thw covers 48 patches, but pixel_values has 24"):
        model(batch.ids, pixel_values=batch.pixels, image_grid_thw=batch.grid_thw * torch.tensor([2, 1, 1]))
    with pytest.raises(ValueError, match="pixel_values and image_grid_thw go together"):
        model(batch.ids, pixel_values=batch.pixels)
    with pytest.raises(ValueError, match="image_grid_thw must be a tensor of integers; got torch.float32"):
        model(batch.ids, pixel_values=batch.pixels, image_grid_thw=batch.grid_thw.float())
    for grids in ([[1, 3, 8]], [[1, 4, 6], [0, 4, 4]]):        # odd rows; an image of no frames (24 patches too)
        with pytest.raises(ValueError, match=r"image_grid_thw must be \[images, 3\] rows .* multiples of "
                                             r"spatial_merge_size=2; got " + re.escape(str(grids))):
            model(batch.ids, pixel_values=batch.pixels, image_grid_thw=torch.tensor(grids))
    split = batch.ids.clone()
    split[0, 5], split[0, 10] = 7, IMAGE                        # 6 image tokens, but not one run of 6
    with pytest.raises(ValueError, match=r"row 0: an image of 1x2x3 tokens \(grid 1x4x6\) does not fit the run of "
                                         "image tokens at real token 3"):
        model(split, pixel_values=batch.pixels, image_grid_thw=batch.grid_thw)


# ==============================================================================================
# 5. Images -> pixel_values, and the command line

def noise(width, height, mode="RGB", seed=0):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def palette_with_transparency(width, height):
    """A palette image whose colour 0 is transparent (a GIF or palette PNG): no "A" band, info["transparency"]."""
    image = noise(width, height).convert("P")
    image.info["transparency"] = 0
    return image


QWEN35_PROCESSOR = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.mark.parametrize("images, max_pixels", [
    ([noise(37, 91), noise(91, 37, seed=1)], 4096 ** 2),             # tiny: scaled up to >= 256^2 pixels
    # 400 x 272: 12.5 and 8.5 round to even; 470 x 310: 14.7 and 9.7 round up (not floor)
    ([noise(300, 200), noise(17, 500), noise(400, 272), noise(470, 310)], 4096 ** 2),
    # transparency onto white (an alpha band, or a palette's transparent colour); grey
    ([noise(64, 48, "RGBA"), palette_with_transparency(60, 45), noise(50, 70, "L")], 4096 ** 2),
    # scaled down to <= max_pixels (a side of at least 32, whichever it is); 126 x 130 rounds to 128 x 128,
    # exactly max_pixels: kept, not scaled down
    ([noise(300, 200), noise(1000, 37), noise(37, 1000), noise(126, 130)], 128 ** 2),
    # 240 x 272: 7.5 and 8.5 round to 256 x 256, exactly min_pixels: kept, not scaled up (to 256 x 288)
    ([noise(240, 272), noise(272, 240, seed=1)], 4096 ** 2),
], ids=["small", "odd", "modes", "large", "exactly min"])
def test_image_patches_match_transformers(dense_vl, tmp_path, images, max_pixels):
    """pixel_values and grids equal transformers' Qwen2VLImageProcessorPil with Qwen3.5's settings, bit for
    bit, on random images of odd sizes; preprocessor_config.json's size (pixel counts) is read."""
    size = {"shortest_edge": 256 ** 2, "longest_edge": max_pixels}
    expected = Qwen2VLImageProcessorPil(size=size, **QWEN35_PROCESSOR)(images, return_tensors="pt")
    with open(tmp_path / "preprocessor_config.json", "w") as f:
        json.dump({"size": size, **QWEN35_PROCESSOR}, f)
    settings = image_settings(str(tmp_path), dense_vl.model.config.vision)
    patches, grids = zip(*(image_patches(image, **settings) for image in images))
    assert torch.equal(torch.tensor(grids), expected["image_grid_thw"])
    assert torch.equal(torch.cat(patches), expected["pixel_values"])


def test_image_files_read_as_transformers_reads_them(dense_vl, tmp_path):
    """read_images on files equals transformers' processor on load_image(file) of the same files, bit for bit:
    a JPEG stored sideways with EXIF orientation 6 (a phone photo) is turned upright, a PNG's alpha channel
    is dropped, a palette PNG made RGB."""
    exif = Image.Exif()
    exif[0x0112] = 6                                        # orientation: rotate 90 degrees to display
    noise(120, 60).save(tmp_path / "sideways.jpg", exif=exif)
    noise(64, 48, "RGBA").save(tmp_path / "alpha.png")
    noise(50, 70).convert("P").save(tmp_path / "palette.png")
    files = [tmp_path / name for name in ("sideways.jpg", "alpha.png", "palette.png")]
    expected = Qwen2VLImageProcessorPil(size={"shortest_edge": 256 ** 2, "longest_edge": 4096 ** 2},
                                        **QWEN35_PROCESSOR)([load_image(str(f)) for f in files], return_tensors="pt")
    pixel_values, grids = read_images(files, image_settings(str(tmp_path), dense_vl.model.config.vision))
    assert grids[0].tolist() == [1, 24, 12]                 # upright: taller than wide
    assert torch.equal(grids, expected["image_grid_thw"]) and torch.equal(pixel_values, expected["pixel_values"])


def test_min_and_max_pixels_override_size_as_in_transformers(dense_vl, tmp_path):
    """preprocessor_config.json's top-level min_pixels / max_pixels override its size, as in transformers'
    processor; switches Qwen3.5 never changes (do_normalize, resample, ...) are refused by name."""
    config = {"size": {"shortest_edge": 256 ** 2, "longest_edge": 4096 ** 2}, "min_pixels": 100_000,
              "max_pixels": 150_000, **QWEN35_PROCESSOR}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    image = noise(640, 480)
    expected = Qwen2VLImageProcessorPil(**copy.deepcopy(config))(image, return_tensors="pt")
    patches, grid = image_patches(image, **image_settings(str(tmp_path), dense_vl.model.config.vision))
    assert grid == (1, 20, 26) and torch.equal(torch.tensor([grid]), expected["image_grid_thw"])
    assert torch.equal(patches, expected["pixel_values"])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, "do_normalize": False}))
    with pytest.raises(ValueError, match="do_normalize=False is not supported: every Qwen3.5 checkpoint has True"):
        image_settings(str(tmp_path), dense_vl.model.config.vision)


def test_image_mean_and_std_are_read_from_the_file(dense_vl, tmp_path):
    """image_mean and image_std come from preprocessor_config.json (Qwen3.5's are 0.5 and 0.5, under which
    swapping or ignoring them changes nothing): with CLIP's, pixel_values equal transformers' processor's."""
    clip = dict(QWEN35_PROCESSOR, image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(clip))
    image = noise(300, 200)
    expected = Qwen2VLImageProcessorPil(size={"shortest_edge": 256 ** 2, "longest_edge": 4096 ** 2}, **clip)(
        image, return_tensors="pt")
    patches, grid = image_patches(image, **image_settings(str(tmp_path), dense_vl.model.config.vision))
    assert torch.equal(torch.tensor([grid]), expected["image_grid_thw"])
    assert torch.equal(patches, expected["pixel_values"])
    qwen, _ = image_patches(image, **image_settings(str(tmp_path / "none"), dense_vl.model.config.vision))
    assert max_diff(patches, qwen) > 0.1


def test_preprocessor_config_that_does_not_fit_the_tower_is_refused(dense_vl, tmp_path):
    """A preprocessor_config.json whose patch_size, temporal_patch_size or merge_size differs from the vision
    tower's is refused by name (the pixel rows would not fit the tower); min_pixels / max_pixels of null
    override nothing, as in transformers' processor."""
    vision = dense_vl.model.config.vision
    for name, value in [("patch_size", 14), ("temporal_patch_size", 1), ("merge_size", 4)]:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({**QWEN35_PROCESSOR, name: value}))
        with pytest.raises(ValueError, match=f"{name}={value}, but the vision tower's is"):
            image_settings(str(tmp_path), vision)
    config = {"size": {"shortest_edge": 128 ** 2, "longest_edge": 512 ** 2}, "min_pixels": None, "max_pixels": None,
              **QWEN35_PROCESSOR}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    settings = image_settings(str(tmp_path), vision)
    assert (settings["min_pixels"], settings["max_pixels"]) == (128 ** 2, 512 ** 2)
    image = noise(700, 500)
    expected = Qwen2VLImageProcessorPil(**copy.deepcopy(config))(image, return_tensors="pt")
    patches, grid = image_patches(image, **settings)
    assert torch.equal(torch.tensor([grid]), expected["image_grid_thw"]) and grid == (1, 26, 36)
    assert torch.equal(patches, expected["pixel_values"])


def test_frames_per_patch_and_merge_size_are_the_towers(dense_vl, tmp_path):
    """image_settings takes frames per patch from the tower's temporal_patch_size and the merge from its
    spatial_merge_size (equal, 2, in Qwen3.5, so that swapping them changes nothing there): with 3 frames per
    patch, pixel_values equal transformers' processor's."""
    vision = dataclasses.replace(dense_vl.model.config.vision, temporal_patch_size=3)
    processor = dict(QWEN35_PROCESSOR, temporal_patch_size=3)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    image = noise(300, 200)
    expected = Qwen2VLImageProcessorPil(size={"shortest_edge": 256 ** 2, "longest_edge": 4096 ** 2}, **processor)(
        image, return_tensors="pt")
    patches, grid = image_patches(image, **image_settings(str(tmp_path), vision))
    assert patches.shape[1] == 3 * 3 * 16 * 16
    assert torch.equal(torch.tensor([grid]), expected["image_grid_thw"])
    assert torch.equal(patches, expected["pixel_values"])


def test_default_image_settings_are_qwen35s(dense_vl, tmp_path):
    """Without preprocessor_config.json, the settings are those of the file Qwen3.5 checkpoints ship."""
    published = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
                 "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                 "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}
    (tmp_path / "published").mkdir()
    (tmp_path / "published" / "preprocessor_config.json").write_text(json.dumps(published))
    vision = dense_vl.model.config.vision
    assert image_settings(str(tmp_path), vision) == image_settings(str(tmp_path / "published"), vision)


def test_extreme_aspect_ratios_as_in_transformers(dense_vl):
    """An aspect ratio of 200 is processed as transformers does; past 200 both refuse the image."""
    settings = image_settings(dense_vl.path, dense_vl.model.config.vision)
    expected = Qwen2VLImageProcessorPil(size={"shortest_edge": 256 ** 2, "longest_edge": 4096 ** 2},
                                        **QWEN35_PROCESSOR)(noise(400, 2), return_tensors="pt")
    patches, grid = image_patches(noise(400, 2), **settings)
    assert torch.equal(torch.tensor([grid]), expected["image_grid_thw"])
    assert torch.equal(patches, expected["pixel_values"])
    with pytest.raises(ValueError, match="aspect ratio"):
        Qwen2VLImageProcessorPil(**QWEN35_PROCESSOR)(noise(402, 2))
    with pytest.raises(ValueError, match="an image of 402x2 pixels: the aspect ratio must be at most 200"):
        image_patches(noise(402, 2), **settings)


def test_image_prompt_holds_each_images_tokens(dense_vl):
    """The command line's prompt: per image, vision_start, t*h*w/m^2 image tokens, vision_end (as the prompts
    of the oracle tests hold them), which the model takes with those images."""
    grids = torch.tensor(GRIDS)
    ids = image_prompt(grids, dense_vl.model.config)
    assert ids == [token for grid in GRIDS for token in image_tokens(*grid)]
    pixels = torch.randn(int(grids.prod(-1).sum()), 1536, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        dense_vl.model(torch.tensor([ids]), pixel_values=pixels, image_grid_thw=grids, mtp=False)


@pytest.mark.subprocess
def test_cli_with_an_image(tmp_path_factory, tmp_path):
    """`load.py CKPT --image FILE --prompt TEXT` streams what generate returns for vision_start, the
    image's tokens, vision_end, then the prompt (MTP drafts on). The untied MoE case: the tied dense one
    only repeats the prompt's last word, with or without the image."""
    case = get_case(MOE_CASE, tmp_path_factory)
    path = write_checkpoint(tmp_path / "ckpt", case.tensors, case.config)
    tokenizer = write_word_tokenizer(path)
    noise(70, 40).save(tmp_path / "image.png")
    result = run_cli(path, "--image", tmp_path / "image.png", "--prompt", "the dog ran home", "--max-new-tokens", 8,
                     "--draft-tokens", 2)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "image.png") as image:
        pixels, grid = image_patches(image, **image_settings(path, case.model.config.vision))
    assert grid == (1, 14, 22)                                   # 70 x 40 -> 352 x 224 (>= 256^2 pixels)
    text = tokenizer.encode("the dog ran home").ids
    ids = torch.tensor([image_tokens(*grid) + text])
    out, _ = generate(case.model, ids, 8, pixel_values=pixels, image_grid_thw=torch.tensor([grid]))
    assert result.stdout == tokenizer.decode(text + out[0, ids.shape[1]:].tolist()) + "\n"
    without_image, _ = generate(case.model, torch.tensor([text]), 8)
    assert without_image[0, len(text):].tolist() != out[0, ids.shape[1]:].tolist()      # the output reads the image


def test_cli_refuses_images_without_a_tower(dense_vl, tmp_path, capsys):
    """--image with a checkpoint that has no vision tower (no vision_config; or one, but no model.visual.*
    tensors): one line naming the problem, status 2 (in-process, a traceback would be any other exception)."""
    noise(40, 30).save(tmp_path / "image.png")
    text_only = {k: v for k, v in dense_vl.tensors.items() if not k.startswith("model.visual.")}
    no_config = {k: v for k, v in dense_vl.config.items() if k != "vision_config"}
    for name, config, message in [("no-config", no_config, "config.json has no vision_config"),
                                  ("no-tensors", dense_vl.config, "holds no model.visual.* tensors")]:
        path = write_checkpoint(tmp_path / name, text_only, config)
        write_word_tokenizer(path)
        with pytest.raises(SystemExit) as exit:
            load.main([path, "--image", str(tmp_path / "image.png"), "--prompt", "the dog", "--max-new-tokens", "2"])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and f"--image needs a vision tower; {path}" in err and message in err, err
        assert err.count("\n") == 1, err


def test_info_describes_the_tower_and_videos_are_refused(dense_vl, tmp_path):
    """--info's description names the tower's sizes and parameters; a file Pillow cannot read (a video), or a
    directory, is refused by name (the command line prints such errors as one line, status 2)."""
    tower = sum(p.numel() for p in dense_vl.model.visual.parameters())
    assert (f"vision tower: 2 blocks, width 32, 2 heads (head_dim 16), MLP 64, patch 16x16x2 frames, merge 2x2 "
            f"-> 64, {tower:,} ") in describe(dense_vl.path)
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    settings = image_settings(dense_vl.path, dense_vl.model.config.vision)
    with pytest.raises(ValueError, match="clip.mp4: not an image file Pillow can read \\(videos are not supported\\)"):
        read_images([tmp_path / "clip.mp4"], settings)
    with pytest.raises(ValueError, match=f"{tmp_path}: cannot read this image: "):     # a directory
        read_images([tmp_path], settings)

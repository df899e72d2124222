"""
Load a Qwen3.5 checkpoint, as published (safetensors), into `qwen35_mtp.Qwen35`, and save one.

    model = load_checkpoint("Qwen3.5-0.8B/", dtype=torch.bfloat16)
    save_checkpoint(model, "runs/mine")        # config.json + model.safetensors, loadable here and by transformers
    save_updated("Qwen3.5-0.8B/", "runs/tuned", {"mtp.fc.weight": w, ...})   # the source's own layout, updated
    model = checkpoint_model("Qwen3.5-0.8B/")  # on the meta device; then, one parameter at a time:
    for name, tensor in checkpoint_tensors("Qwen3.5-0.8B/", model): ...      # (train.py keeps a shard of each)

Module names mirror checkpoint keys, so loading is a prefix strip plus one table for experts:

    checkpoint key                                  model parameter
    model.language_model.X   (official, VL-wrapped) model.X
    model.X                  (Qwen3_5ForCausalLM)   model.X
    lm_head.weight           (absent when tied)     lm_head.weight
    mtp.X                    (top level)            mtp.X
    model.visual.X           (vision tower)         visual.X   (absent: a text-only model, visual = None)

The loader is strict: every parameter is loaded exactly once, every tensor in the files is used,
shapes must match, tensors must be stored as floating-point numbers, and nothing is left randomly
initialised; all of it is checked from the files' headers before the first tensor is read.

From the command line (see main at the end):

    python load.py Qwen3.5-0.8B/ --prompt "The capital of France is" --draft-tokens 2
    python load.py Qwen3.5-0.8B/ --image photo.jpg --prompt "Describe this image."
    python load.py Qwen3.5-0.8B/ --info        # what the checkpoint holds, without loading weights
    python load.py Qwen3.5-0.8B/ --build-draft-vocab 32768 --text en.txt zh.txt --weights 1 1
    python load.py Qwen3.5-0.8B/ --prompt "你好" --draft-tokens 2 --draft-vocab Qwen3.5-0.8B/draft_vocab.json
"""

import argparse
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import fields, replace

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from fast import speed_up
from qwen35_mtp import LAYER_TYPES, Qwen35, Qwen35Config, VisionConfig, check_draft_vocab, generate

# Experts appear fused in official main layers (mlp.experts.gate_up_proj [E, 2I, H],
# mlp.experts.down_proj [E, H, I]: the model's own layout) but per expert in the official MTP layer
# and in transformers re-saves. Per-expert tensors are stacked into the fused ones:
#     experts.{e}.gate_proj.weight [I, H]  ->  experts.gate_up_proj[e, :I]
#     experts.{e}.up_proj.weight   [I, H]  ->  experts.gate_up_proj[e, I:]
#     experts.{e}.down_proj.weight [H, I]  ->  experts.down_proj[e]
PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
INDEX = "model.safetensors.index.json"        # a sharded checkpoint's map from tensor names to files


# ----------------------------------------------------------------------------------------------
# config.json <-> Qwen35Config

def config_from_hf(d: dict) -> Qwen35Config:
    """Parse an official config.json (VL-wrapped: text fields under `text_config`) or a flat text
    config (`qwen3_5_text` / `qwen3_5_moe_text`, as transformers re-saves it), dense or MoE."""
    text = d.get("text_config", d)
    where = "text_config" if "text_config" in d else "the config"
    if not isinstance(text, dict):
        raise ValueError(f"config: text_config must be an object; got {json.dumps(text)}")
    is_moe = "moe" in str(text.get("model_type", "")) or "num_experts" in text
    required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "linear_num_key_heads", "linear_num_value_heads",
                "linear_key_head_dim", "linear_value_head_dim"]
    required += (["num_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "shared_expert_intermediate_size"] if is_moe else ["intermediate_size"])
    if missing := [name for name in required if name not in text]:
        raise ValueError(f"config is missing required field(s) {missing} (looked in {where})")
    for name, expected in [("hidden_act", "silu"), ("attn_output_gate", True),
                           ("mtp_use_dedicated_embeddings", False), ("attention_bias", False)]:
        if text.get(name, expected) != expected:
            raise ValueError(f"config field {name}={text[name]!r} is not supported: every Qwen3.5 "
                             f"checkpoint has {expected!r}")
    if text.get("mlp_only_layers"):
        raise ValueError(f"config field mlp_only_layers={text['mlp_only_layers']} is not supported: "
                         "Qwen3.5 uses the same MLP kind in every layer")
    # rope: transformers 5 nests it in `rope_parameters`, older files use flat fields
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"config field rope_parameters={rope!r} is not valid: expected an object")
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type={rope['rope_type']!r} is not supported; Qwen3.5 uses 'default'")
    if rope.get("mrope_interleaved", True) is not True:
        raise ValueError(f"mrope_interleaved={rope['mrope_interleaved']!r} is not supported: every Qwen3.5 "
                         "checkpoint interleaves the time/height/width rotary frequencies")
    kwargs = {f.name: text[f.name] for f in fields(Qwen35Config) if f.name in text}
    # every official file gives rope_theta (1e7); a file without it gets transformers' default, as there
    kwargs["rope_theta"] = rope.get("rope_theta", text.get("rope_theta", 10000.0))
    kwargs["partial_rotary_factor"] = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    if isinstance(section := rope.get("mrope_section", [11, 11, 10]), list):
        section = tuple(section)
    kwargs["mrope_section"] = section
    # the image token ids sit at the top level (nested) or beside the text fields (flat)
    kwargs.update({name: d[name] for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id")
                   if name in d})
    if "vision_config" in d:
        kwargs["vision"] = vision_config_from_hf(d["vision_config"])
    # the tie flag may sit at the top level, in text_config, or both: the top level decides
    kwargs["tie_word_embeddings"] = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    kwargs["eos_token_id"] = text.get("eos_token_id", d.get("eos_token_id"))
    if "layer_types" not in text and "full_attention_interval" in text:
        n = text["full_attention_interval"]
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"config field full_attention_interval={n!r} is not valid: expected an integer > 0")
        if isinstance(text["num_hidden_layers"], int):
            kwargs["layer_types"] = [LAYER_TYPES[(i + 1) % n == 0] for i in range(text["num_hidden_layers"])]
    return Qwen35Config(**kwargs)


def vision_config_from_hf(v: dict) -> VisionConfig:
    """An official `vision_config`. Fields Qwen3.5 never varies must have its values."""
    if not isinstance(v, dict):
        raise ValueError(f"config field vision_config={v!r} is not valid: expected an object")
    for name, expected in [("hidden_act", "gelu_pytorch_tanh"), ("deepstack_visual_indexes", [])]:
        if v.get(name, expected) != expected:
            raise ValueError(f"vision_config field {name}={v[name]!r} is not supported: every Qwen3.5 "
                             f"checkpoint has {expected!r}")
    rope = v.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"vision_config rope_parameters={rope!r} is not supported: expected rope_type 'axial'")
    if "out_hidden_size" not in v:
        raise ValueError("vision_config is missing required field out_hidden_size")
    kwargs = {f.name: v[f.name] for f in fields(VisionConfig) if f.name in v}
    kwargs["rope_theta"] = rope.get("rope_theta", 10000.0)
    return VisionConfig(**kwargs)


def config_to_hf(config: Qwen35Config) -> dict:
    """A flat text config that transformers reads as Qwen3_5(Moe)ForCausalLM, plus the vision tower's
    config and token ids when the model has one (read back by config_from_hf)."""
    d = {f.name: getattr(config, f.name) for f in fields(config)
         if f.name not in ("rope_theta", "partial_rotary_factor", "mrope_section", "vision", "image_token_id",
                           "vision_start_token_id", "vision_end_token_id")}
    if not config.is_moe:
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
            del d[name]
    d["model_type"] = "qwen3_5_moe_text" if config.is_moe else "qwen3_5_text"
    d["architectures"] = ["Qwen3_5MoeForCausalLM" if config.is_moe else "Qwen3_5ForCausalLM"]
    d["hidden_act"] = "silu"
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta,
                            "partial_rotary_factor": config.partial_rotary_factor,
                            "mrope_section": list(config.mrope_section), "mrope_interleaved": True}
    if config.vision is not None:
        v = config.vision
        d["vision_config"] = {**{f.name: getattr(v, f.name) for f in fields(v) if f.name != "rope_theta"},
                              "hidden_act": "gelu_pytorch_tanh", "deepstack_visual_indexes": [],
                              "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}}
        d.update({name: getattr(config, name) for name in ("image_token_id", "vision_start_token_id",
                                                             "vision_end_token_id")})
    return d


# ----------------------------------------------------------------------------------------------
# Reading checkpoints

def model_name(key):
    """The model parameter a checkpoint key feeds."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def read_json(file):
    """The JSON object in `file`; one that does not parse, or is not an object, is named in the error."""
    try:
        with open(file) as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    except IsADirectoryError as e:
        raise ValueError(f"{file} is a directory, not a JSON file") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{file}: expected a JSON object, found {type(doc).__name__}")
    return doc


def checkpoint_files(path):
    """The safetensors files of a checkpoint directory: the index's shards, or model.safetensors."""
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f'{index}: expected a "weight_map" object from tensor names to file names')
        shards = sorted(set(weight_map.values()))
        files = [os.path.join(path, shard) for shard in shards]
        if missing := [f for f in files if not os.path.exists(f)]:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path} holds neither model.safetensors nor {INDEX}")
    return [single]


def read_config(path):
    if os.path.isfile(path):
        raise FileNotFoundError(f"{path} is a file: give the checkpoint directory (config.json and the "
                                "safetensors files)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: a checkpoint directory needs its config.json")
    return config_from_hf(read_json(config_path))


def open_safetensors(file, device):
    try:
        return safe_open(file, framework="pt", device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def checkpoint_keys(files):
    """{key: file} over all files, reading headers only."""
    owner = {}
    for file in files:
        with open_safetensors(file, "cpu") as f:
            for key in f.keys():
                if key in owner:
                    raise ValueError(f"tensor {key} appears twice: in {owner[key]} and {file}")
                owner[key] = file
    return owner


def mtp_layer_count(keys):
    """How many MTP decoder layers the checkpoint keys hold (0: no `mtp.*` tensors at all)."""
    layers = {int(m.group(1)) for k in keys if (m := re.match(r"^mtp\.layers\.(\d+)\.", k))}
    if not any(k.startswith("mtp.") for k in keys):
        return 0
    return max(layers) + 1 if layers else 1


def checkpoint_model(path) -> Qwen35:
    """The model a checkpoint directory describes, on the meta device (no memory yet): its config.json,
    with the MTP head and the vision tower that the files hold. checkpoint_tensors reads its weights."""
    config = read_config(path)
    keys = checkpoint_keys(checkpoint_files(path))
    # The MTP head is whatever the files hold: transformers re-saves keep mtp_num_hidden_layers in
    # config.json but drop the mtp.* tensors. So is the vision tower (a CausalLM re-save has none).
    has_tower = any(key.startswith("model.visual.") for key in keys)
    if has_tower and config.vision is None:
        raise ValueError(f"{path}: the files hold the vision tower (model.visual.*), but config.json has no "
                         "vision_config")
    config = replace(config, mtp_num_hidden_layers=mtp_layer_count(keys),
                     vision=config.vision if has_tower else None)
    with torch.device("meta"):
        return Qwen35(config)


def feeds(key, tied):
    """What checkpoint tensor `key` holds, by the loader's mapping: (parameter name, None) for a whole
    parameter, (fused parameter name, (expert, part)) for one expert's slice (see PER_EXPERT)."""
    name = model_name(key)
    if name == "lm_head.weight" and tied:
        return "model.embed_tokens.weight", None         # a tied head stored anyway: the embedding again
    if m := PER_EXPERT.match(name):
        prefix, expert, part = m.groups()
        return f"{prefix}.{'down_proj' if part == 'down_proj' else 'gate_up_proj'}", (int(expert), part)
    return name, None


def expert_part(fused, e, part):
    """The slice of a fused expert tensor that per-expert tensor `part` of expert e is (see PER_EXPERT)."""
    expert = fused[e]
    half = expert.shape[0] // 2
    return {"gate_proj": expert[:half], "up_proj": expert[half:], "down_proj": expert}[part]


FLOAT_TYPES = ("F64", "F32", "F16", "BF16")     # safetensors' names of the dtypes a model can hold


def checkpoint_key(name, wrapped):
    """The key that would feed parameter `name` (model_name's inverse), in the official VL-wrapped layout
    or the flat one: errors name what a user can look for in the files."""
    if name.startswith("visual."):
        return "model." + name
    return "model.language_model." + name[len("model."):] if wrapped and name.startswith("model.") else name


def plan_reads(path, files, model):
    """What each file feeds into `model` (a meta model is enough), checked from the files' headers alone,
    so that a bad checkpoint fails before any tensor is read. Returns {file: [(key, parameter name,
    part)]} (part: None for a whole parameter, or (expert, "gate_proj" | "up_proj" | "down_proj") for a
    slice of a fused one), {fused parameter: how many slices it takes}, and the (key, file) of a tied
    lm_head, which must equal embed_tokens (compared when read)."""
    expected = dict(model.named_parameters())  # a tied lm_head appears once, as embed_tokens
    tied = model.config.tie_word_embeddings
    plan, seen, unexpected, tied_head = {}, {}, [], None
    for file in files:
        plan[file] = []
        with open_safetensors(file, "cpu") as f:
            for key in f.keys():
                header = f.get_slice(key)
                shape = tuple(header.get_shape())
                if (stored := header.get_dtype()) not in FLOAT_TYPES:
                    raise ValueError(f"{file}: tensor {key} is stored as {stored}; expected one of "
                                     f"{', '.join(FLOAT_TYPES)} (quantized checkpoints are not supported)")
                if model_name(key) == "lm_head.weight" and tied:
                    tied_head = (key, file)
                    continue
                name, part = feeds(key, tied)
                if name not in expected:
                    unexpected.append(key)
                    continue
                target = expected[name]
                if part is not None:
                    if part[0] >= len(target):
                        raise ValueError(f"{file}: tensor {key} names expert {part[0]}, but the config has "
                                         f"{len(target)} experts")
                    target = expert_part(target, *part)
                if shape != tuple(target.shape):
                    raise ValueError(f"{file}: tensor {key} has shape {shape}, but the config expects "
                                     f"{tuple(target.shape)} for {name}")
                got = seen.setdefault(name, set())
                if got and (part is None) != (None in got):
                    raise ValueError(f"{file}: {key}: {name} is stored both fused and per expert")
                if part in got:
                    raise ValueError(f"{file}: tensor {key} loads {name}, which was already loaded")
                got.add(part)
                plan[file].append((key, name, part))

    if unexpected:
        raise ValueError(f"{path}: tensors that match no model parameter (wrong config, or not a "
                         f"Qwen3.5 checkpoint?): {sorted(unexpected)[:20]}{' ...' if len(unexpected) > 20 else ''}")
    slices = {name: got for name, got in seen.items() if None not in got}
    for name, got in slices.items():
        kinds = ["down_proj"] if name.endswith("down_proj") else ["gate_proj", "up_proj"]
        wanted = {(e, kind) for e in range(len(expected[name])) for kind in kinds}
        if missing := sorted(f"{e}.{kind}" for e, kind in wanted - got):
            raise ValueError(f"{path}: missing expert tensors for {name}: {missing[:20]}")
    if missing := sorted(set(expected) - set(seen)):
        wrapped = any(key.startswith("model.language_model.") for file in plan for key, _, _ in plan[file])
        missing = [checkpoint_key(name, wrapped) for name in missing]
        raise ValueError(f"{path}: tensors missing from the checkpoint: {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''}")
    return plan, {name: len(got) for name, got in slices.items()}, tied_head


def checkpoint_tensors(path, model, dtype=None, device="cpu", skip=()):
    """The weights of `model` (checkpoint_model(path)), read from the checkpoint's files one parameter at
    a time: an iterator of (parameter name, tensor), cast to dtype (None: as stored), on device; the
    parameters named in `skip` are checked but neither read nor yielded (train.py's resumed runs take
    their trained ones from the saved state). Everything is checked before this returns (plan_reads);
    while reading, only the parameter being yielded, and a fused expert parameter whose per-expert
    slices are still arriving, are held here: a process that keeps a shard of each parameter never
    holds the whole model."""
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type; got {dtype}")
    files = checkpoint_files(path)
    plan, slices, tied_head = plan_reads(path, files, model)
    shapes = {name: p.shape for name, p in model.named_parameters()}

    def read(f, file, key):
        try:
            tensor = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{file}: cannot read tensor {key} (truncated or corrupt?): {e}") from e
        return tensor if dtype is None else tensor.to(dtype)

    def tensors():
        assembling = {}                 # fused expert parameters whose slices are still arriving
        for file in files:
            with open_safetensors(file, device) as f:
                for key, name, part in plan[file]:
                    if name in skip:
                        continue
                    tensor = read(f, file, key)
                    if part is not None:
                        if name not in assembling:
                            assembling[name] = torch.empty(shapes[name], dtype=tensor.dtype, device=tensor.device)
                        expert_part(assembling[name], *part).copy_(tensor)
                        slices[name] -= 1
                        if slices[name]:
                            continue
                        tensor = assembling.pop(name)
                    if tied_head is not None and name == "model.embed_tokens.weight":
                        head_key, head_file = tied_head
                        with open_safetensors(head_file, device) as g:
                            if not torch.equal(read(g, head_file, head_key), tensor):
                                raise ValueError(f"{head_file}: config ties lm_head to embed_tokens, but "
                                                 f"{head_key} differs from them")
                    yield name, tensor

    return tensors()


def load_checkpoint(path, dtype=None, device="cpu") -> Qwen35:
    """Build Qwen35 from a checkpoint directory (config.json + safetensors, single or sharded).
    dtype=None keeps the dtype as stored, and where the files mix dtypes (an fp32 head beside bf16
    weights, say), every weight takes the embedding's, as in transformers: one layer's matrix products
    need one dtype. A dtype casts every weight to it. Weights kept in their stored dtype on the CPU are
    safetensors' memory maps of the files: a file rewritten in place changes the model that maps it
    (save_checkpoint and save_updated write new files, and are safe)."""
    model = checkpoint_model(path)
    for name, tensor in checkpoint_tensors(path, model, dtype, device):
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    common = model.model.embed_tokens.weight.dtype
    for module in model.modules():
        for leaf, p in module._parameters.items():
            if p is not None and p.dtype != common:
                module._parameters[leaf] = nn.Parameter(p.to(common), requires_grad=False)
    model.tie_weights()
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Writing checkpoints

def write_safetensors(tensors, file, metadata):
    """save_file, leaving the file readable as any file written here is (safetensors 0.8 leaves it 0600)."""
    save_file(tensors, file, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)


def save_checkpoint(model, directory):
    """config.json (a flat text config) + model.safetensors with `model.*`, `lm_head.weight` (untied only),
    `mtp.*` (experts per expert, as official checkpoints store them) and `model.visual.*` (if any):
    loadable by load_checkpoint and by transformers' Qwen3_5ForCausalLM (which ignores the vision tower
    and the MTP head)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_to_hf(model.config), f, indent=2)
    state = model.state_dict()
    mtp = {name: state.pop(name) for name in list(state) if name.startswith("mtp.")}
    tensors = {("model." + name if name.startswith("visual.") else name): p.detach().contiguous()
               for name, p in state.items() if not (name == "lm_head.weight" and model.config.tie_word_embeddings)}
    tensors.update(official_mtp_tensors(mtp, model.model.embed_tokens.weight.dtype))
    write_safetensors(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def official_mtp_tensors(params, dtype):
    """`mtp.*` parameters {name: tensor} under official checkpoint keys: top level, experts per expert."""
    out = {}
    for name, value in params.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith(".mlp.experts"):
            parts = ["gate_proj", "up_proj"] if leaf == "gate_up_proj" else ["down_proj"]
            out.update({f"{prefix}.{e}.{part}.weight": expert_part(value, e, part)
                        for e in range(len(value)) for part in parts})
        else:
            out[name] = value
    return {key: value.detach().to(dtype).contiguous() for key, value in out.items()}


MTP_SHARD = "model-mtp.safetensors"          # where an added MTP head goes in a sharded checkpoint


def updated(key, stored, feed, params):
    """The tensor to write under `key`: the stored one, or the value of the parameter it feeds."""
    if feed[0] not in params:
        return stored
    name, part = feed
    value = params[name] if part is None else expert_part(params[name], *part)
    if value.shape != stored.shape:
        raise ValueError(f"{key}: the checkpoint stores shape {tuple(stored.shape)}, but parameter {name} "
                         f"gives {tuple(value.shape)}")
    return value.detach().to(stored.dtype).contiguous()


def updated_files(source, names):
    """The order in which save_updated writes files and reads parameter values: [(source file, [names])],
    each file with the parameters among `names` that its tensors hold, in key order. Parameters that no
    tensor holds (a freshly added MTP head) come with the single file of an unsharded checkpoint, or as
    (None, [names]) last: one more shard, MTP_SHARD. Every process that gathers values for process 0's
    save walks this list too (train.py), so each takes part in the same gathers in the same order."""
    tied = read_config(source).tie_word_embeddings
    names, plan, held = set(names) - ({"lm_head.weight"} if tied else set()), [], set()   # a state_dict's tied head
    for file in checkpoint_files(source):
        with open_safetensors(file, "cpu") as f:
            fed = dict.fromkeys(feeds(key, tied)[0] for key in f.keys())
        held.update(fed)
        plan.append((file, [name for name in fed if name in names]))
    fresh = sorted(names - held)
    if added := [name for name in fresh if not name.startswith("mtp.")]:
        raise ValueError(f"{source}: no tensor holds parameter(s) {added[:5]}; only an MTP head can be added")
    if fresh and os.path.exists(os.path.join(source, INDEX)):
        plan.append((None, fresh))
    elif fresh:
        plan[0][1].extend(fresh)
    return plan


def write_mtp_shard(source, directory, tensors):
    """An added MTP head's tensors as one more shard of a sharded checkpoint, listed in its index."""
    write_safetensors(tensors, os.path.join(directory, MTP_SHARD), metadata={"format": "pt"})
    index = read_json(os.path.join(source, INDEX))
    index["weight_map"].update({key: MTP_SHARD for key in tensors})
    if "total_size" in index.get("metadata", {}):
        index["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump(index, f, indent=2)


def save_updated(source, directory, params):
    """Write the checkpoint in `source` to the new directory `directory` in exactly its layout (files,
    index, tensor names, shapes, dtypes, file metadata), with the model parameters `params`
    {name: tensor} put in: a tensor that feeds one of them (see feeds) holds its value cast to the stored
    dtype; every other tensor is copied bit for bit (the vision tower, whatever was not trained).
    Parameters that no tensor feeds (a freshly added MTP head) are written as official top-level `mtp.*`
    keys, experts per expert, in one more shard listed in the index or in the single file, and
    config.json's mtp_num_hidden_layers counts their layers. Every other file beside the weights
    (tokenizer.json, ...) is copied. One file at a time: `params` is read once per file that needs a
    value, in updated_files' order, so it may be a mapping that gathers each value when read."""
    tied = read_config(source).tie_word_embeddings
    plan = updated_files(source, params)
    os.makedirs(directory)
    dtype, added = None, []        # dtype: of the stored embedding, the dtype an added head is written in
    for file, wanted in plan:
        values = {name: params[name] for name in wanted}
        if file is None:           # the added head of a sharded checkpoint
            added += wanted
            write_mtp_shard(source, directory, official_mtp_tensors(values, dtype))
            continue
        tensors, held = {}, set()
        with open_safetensors(file, "cpu") as f:
            metadata = f.metadata()
            for key in f.keys():
                tensor, feed = f.get_tensor(key), feeds(key, tied)
                if feed[0] == "model.embed_tokens.weight":
                    dtype = tensor.dtype
                tensors[key] = updated(key, tensor, feed, values)
                held.add(feed[0])
        if fresh := {name: value for name, value in values.items() if name not in held}:   # unsharded
            added += list(fresh)
            tensors.update(official_mtp_tensors(fresh, dtype))
        write_safetensors(tensors, os.path.join(directory, os.path.basename(file)), metadata=metadata)
        shutil.copymode(file, os.path.join(directory, os.path.basename(file)))
    if added:
        config = read_json(os.path.join(source, "config.json"))
        config.get("text_config", config)["mtp_num_hidden_layers"] = mtp_layer_count(added)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        written = name.endswith(".safetensors") or (added and name in (INDEX, "config.json"))
        if os.path.isfile(path) and not written:
            shutil.copyfile(path, os.path.join(directory, name))


# ----------------------------------------------------------------------------------------------
# Images -> pixel_values and image_grid_thw, as Qwen's image processor makes them
# (transformers' Qwen2VLImageProcessor with Qwen3.5's preprocessor_config.json). Videos are not supported.

# preprocessor_config.json switches that every Qwen3.5 checkpoint leaves at these values (resample 3: bicubic)
FIXED_PREPROCESSING = dict(do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                           do_convert_rgb=True, resample=3)


def image_settings(path, vision):
    """Resizing and normalisation from the checkpoint's preprocessor_config.json, Qwen3.5's values
    where it is absent. Qwen3.5 quirk: its `size` holds PIXEL COUNTS, under the names shortest_edge
    (256^2) and longest_edge (4096^2); top-level min_pixels / max_pixels (older files, or set by hand to
    bound an image's tokens) override them, as in transformers' processor."""
    file = os.path.join(path, "preprocessor_config.json")
    settings = read_json(file) if os.path.exists(file) else {}
    for name, ours in [("patch_size", vision.patch_size), ("temporal_patch_size", vision.temporal_patch_size),
                       ("merge_size", vision.spatial_merge_size)]:
        if settings.get(name, ours) != ours:
            raise ValueError(f"{file}: {name}={settings[name]!r}, but the vision tower's is {ours}")
    for name, qwen in FIXED_PREPROCESSING.items():
        if settings.get(name, qwen) != qwen:
            raise ValueError(f"{file}: {name}={settings[name]!r} is not supported: every Qwen3.5 checkpoint "
                             f"has {qwen!r}")
    size = dict(settings.get("size") or {})
    for key, override in [("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")]:
        if settings.get(override) is not None:
            size[key] = settings[override]
    return dict(patch=vision.patch_size, merge=vision.spatial_merge_size, frames=vision.temporal_patch_size,
                min_pixels=size.get("shortest_edge", 256 * 256), max_pixels=size.get("longest_edge", 4096 * 4096),
                mean=settings.get("image_mean", [0.5] * 3), std=settings.get("image_std", [0.5] * 3))


def smart_size(height, width, factor, min_pixels, max_pixels):
    """(height, width) in multiples of `factor` (patch * merge), about the same aspect ratio, with a
    pixel count in [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"an image of {width}x{height} pixels: the aspect ratio must be at most 200")
    # Python's round(): halves go to the even multiple (12.5 -> 12), as in Qwen's processor
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * scale / factor) * factor, math.ceil(width * scale / factor) * factor
    return h, w


def image_patches(image, patch, merge, frames, min_pixels, max_pixels, mean, std):
    """A PIL image -> patches [gh*gw, 3*frames*patch*patch] (float32) and its grid (1, gh, gw)."""
    if "A" in image.getbands() or "transparency" in image.info:       # transparency: onto white
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    image = image.convert("RGB")
    h, w = smart_size(image.height, image.width, patch * merge, min_pixels, max_pixels)
    pixels = np.asarray(image.resize((w, h), resample=Image.BICUBIC))             # uint8 [h, w, 3]
    x = torch.from_numpy((pixels.astype(np.float64) / 255).astype(np.float32))     # rescaled in fp64
    x = ((x - torch.tensor(mean)) / torch.tensor(std)).permute(2, 0, 1)            # [3, h, w]
    gh, gw = h // patch, w // patch
    x = x.reshape(3, gh // merge, merge, patch, gw // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
    # [gh/m, gw/m, m, m, 3, p, p]: merge groups in raster order (see qwen35_mtp.merge_order); a still
    # image is `frames` identical frames, so each row is laid out [channel, frame, y, x]
    x = x[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, frames, -1, -1)
    return x.reshape(gh * gw, 3 * frames * patch * patch), (1, gh, gw)


def read_images(files, settings):
    """Image files -> pixel_values [patches, 3*frames*patch*patch] and image_grid_thw [images, 3]. Each file
    is read as transformers reads one for its processor (load_image): turned upright by its EXIF
    orientation (a phone photo is stored sideways), then made RGB (an alpha channel is dropped)."""
    patches, grids = [], []
    for file in files:
        try:
            with Image.open(file) as image:
                x, grid = image_patches(ImageOps.exif_transpose(image).convert("RGB"), **settings)
        except UnidentifiedImageError as e:
            raise ValueError(f"{file}: not an image file Pillow can read (videos are not supported)") from e
        except (OSError, Image.DecompressionBombError) as e:         # a directory, a truncated file, ...
            raise ValueError(f"{file}: cannot read this image: {e}") from e
        patches.append(x)
        grids.append(grid)
    return torch.cat(patches), torch.tensor(grids)


def image_prompt(grids, config):
    """The token ids before the text: each image as vision_start, t*h*w/m^2 image tokens, vision_end
    (Qwen's chat template writes them so; here without the chat roles)."""
    ids = []
    for t, h, w in grids.tolist():
        n = t * h * w // config.vision.spatial_merge_size ** 2
        ids += [config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id]
    return ids


# ----------------------------------------------------------------------------------------------
# Command line: generate text from a prompt (optionally with MTP drafts), or describe a checkpoint

def count(n):
    return f"{n:,} ({n / 1e9:.2f}B)" if n >= 1e9 else f"{n:,} ({n / 1e6:.2f}M)"


def describe(path):
    """What a checkpoint holds, from config.json and the safetensors headers only (no weights read)."""
    c = read_config(path)
    files = checkpoint_files(path)
    numel, dtypes = {}, Counter()
    for file in files:
        with open_safetensors(file, "cpu") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                numel[key] = torch.Size(tensor.get_shape()).numel()
                dtypes[tensor.get_dtype()] += 1
    mtp = [k for k in numel if k.startswith("mtp.")]
    visual = [k for k in numel if k.startswith("model.visual.")]
    # a tied lm_head, if stored at all, is the embedding again (the loader checks that): count it once
    main = [k for k in numel if k not in mtp and k not in visual
            and not (k == "lm_head.weight" and c.tie_word_embeddings)]
    params = lambda keys: sum(numel[k] for k in keys)
    v = c.vision
    vision = ("vision tower: none (no model.visual.* tensors: text only)" if not visual else
              f"vision tower: {len(visual)} tensors, but config.json has no vision_config" if v is None else
              f"vision tower: {v.depth} blocks, width {v.hidden_size}, {v.num_heads} heads (head_dim {v.head_dim}), "
              f"MLP {v.intermediate_size}, patch {v.patch_size}x{v.patch_size}x{v.temporal_patch_size} frames, "
              f"merge {v.spatial_merge_size}x{v.spatial_merge_size} -> {v.out_hidden_size}, "
              f"{count(params(visual))} parameters")
    full = [str(i) for i, t in enumerate(c.layer_types) if t == "full_attention"]
    return "\n".join([
        f"checkpoint: {path}, {len(files)} file(s), {len(numel)} tensors, dtypes "
        + ", ".join(f"{d} ({n} tensors)" for d, n in dtypes.most_common()),
        f"hidden size: {c.hidden_size}, vocab: {c.vocab_size:,}, "
        f"lm_head {'tied to the embeddings' if c.tie_word_embeddings else 'untied'}",
        f"{c.num_hidden_layers} layers: {c.num_hidden_layers - len(full)} linear_attention (Gated DeltaNet) "
        f"+ {len(full)} full_attention, full attention at {', '.join(full) or 'none'}",
        f"full attention: {c.num_attention_heads} query heads, {c.num_key_value_heads} key/value heads, "
        f"head_dim {c.head_dim} (rotary on {c.rotary_dim})",
        f"Gated DeltaNet: {c.linear_num_key_heads} key heads, {c.linear_num_value_heads} value heads, "
        f"dk {c.linear_key_head_dim}, dv {c.linear_value_head_dim}",
        f"MLP: MoE, {c.num_experts} experts, top-{c.num_experts_per_tok}, expert width "
        f"{c.moe_intermediate_size}, shared expert width {c.shared_expert_intermediate_size}" if c.is_moe
        else f"MLP: dense SwiGLU, width {c.intermediate_size}",
        f"MTP head: {mtp_layer_count(mtp)} layer(s), {count(params(mtp))} parameters" if mtp
        else f"MTP head: none (no mtp.* tensors; config.json says {c.mtp_num_hidden_layers} layer(s))",
        vision,
        f"parameters: main model {count(params(main))}, MTP head {count(params(mtp))}, vision tower "
        f"{count(params(visual))}",
    ])


def read_tokenizer(path, vocab_size):
    """The checkpoint's own tokenizer.json, or None for a byte-level checkpoint (vocab 256, no
    tokenizer.json: the one `python train.py` writes), whose tokens are raw UTF-8 bytes."""
    file = os.path.join(path, "tokenizer.json")
    if os.path.exists(file):
        try:
            return Tokenizer.from_file(file)
        except Exception as e:
            raise ValueError(f"{file}: cannot read the tokenizer: {e}") from e
    if vocab_size != 256:
        raise ValueError(f"{path} has no tokenizer.json (only byte-level checkpoints, vocab 256, go without)")
    return None


def text_codec(path, vocab_size):
    """encode_batch(texts) -> [ids] and decode(ids) -> str for a checkpoint (see read_tokenizer)."""
    tokenizer = read_tokenizer(path, vocab_size)
    if tokenizer is None:
        return (lambda texts: [list(text.encode("utf-8")) for text in texts],
                lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    return (lambda texts: [e.ids for e in tokenizer.encode_batch(texts)],
            lambda ids: tokenizer.decode(ids, skip_special_tokens=False))


def prompt_codec(path, prompt, vocab_size):
    """The prompt's token ids and the checkpoint's decode(ids) -> str."""
    encode_batch, decode = text_codec(path, vocab_size)
    try:
        ids = encode_batch([prompt])[0]
    except Exception as e:                  # e.g. a word-level tokenizer without an unknown token
        raise ValueError(f"the tokenizer cannot encode the prompt {prompt!r}: {e}") from e
    if not ids:
        raise ValueError(f"the prompt {prompt!r} encodes to no tokens")
    if outside := sorted({i for i in ids if not 0 <= i < vocab_size}):
        raise ValueError(f"the prompt {prompt!r} encodes to token ids outside the model's vocabulary "
                         f"[0, {vocab_size}): {outside}")
    if (back := decode(ids)) != prompt:
        raise ValueError(f"the prompt {prompt!r} does not survive encoding: it decodes back as {back!r}")
    return ids, decode


# ----------------------------------------------------------------------------------------------
# Draft vocabularies: the token ids most frequent in text, for generate(draft_vocab=...)
#
# Qwen3.5's ids are BPE merge ranks, so the first N ids are the merges learned first: bytes, English
# and code. Not one of the first 95,726 holds a Chinese character. A draft vocabulary counted on text
# like the text to be generated covers it whatever its language.

LINE_START = re.compile(r"(?<=\n)(?=\S)")     # where a line starts with a non-space character


def text_chunks(text, size=1 << 16):
    """The text in chunks of about `size` characters, each cut where a line starts with a non-space
    character. Qwen3.5's pre-tokenizer never joins across such a cut (every piece with a newline ends
    there), so the chunks encode to the ids of the whole text (a test checks), in parallel batches and
    bounded memory. (A tokenizer that treats the start of a text specially would differ at the cuts.)"""
    chunk, length = [], 0
    for piece in LINE_START.split(text):
        chunk.append(piece)
        length += len(piece)
        if length >= size:
            yield "".join(chunk)
            chunk, length = [], 0
    if chunk:
        yield "".join(chunk)


def count_tokens(encode_batch, texts, batch=64):
    """How often each token id occurs in the texts (a Counter)."""
    counts = Counter()
    chunks = (chunk for text in texts for chunk in text_chunks(text))
    while group := list(itertools.islice(chunks, batch)):
        for ids in encode_batch(group):
            counts.update(ids)
    return counts


def rank_tokens(counts, weights=None):
    """Token ids, most frequent first (ties: the lower id). counts: one Counter per source of text.
    Without weights the counts add up, so a source weighs as much as it has tokens. With weights each
    source's counts are first divided by its own total: source i then makes up weights[i] / sum(weights)
    of the mix, however long its text."""
    scale = [1.0] * len(counts) if weights is None else \
        [w / max(sum(c.values()), 1) for c, w in zip(counts, weights)]
    score = Counter()
    for c, s in zip(counts, scale):
        for i, n in c.items():
            score[i] += s * n
    return sorted((i for i in score if score[i] > 0), key=lambda i: (-score[i], i))   # weight 0: left out


def build_draft_vocab(path, size, files, weights=None):
    """A draft vocabulary for the checkpoint at `path`: the `size` token ids most frequent in the text
    files (UTF-8), counted with the checkpoint's tokenizer and mixed by `weights` (see rank_tokens).
    Returns what the command line writes as draft_vocab.json: the ids, most frequent first, and per
    file its tokens, its share of the mix and the share of its tokens the ids cover (in-sample, so
    optimistic for other text)."""
    if weights is not None and len(weights) != len(files):
        raise ValueError(f"{len(weights)} weight(s) for {len(files)} text file(s): give one weight per file")
    if weights is not None and not (all(0 <= w < math.inf for w in weights) and sum(weights) > 0):   # nan too
        raise ValueError(f"weights must be finite and >= 0 with a positive sum; got {weights}")
    if size <= 0:
        raise ValueError(f"the draft vocabulary size must be > 0; got {size}")
    vocab_size = read_config(path).vocab_size
    encode_batch, _ = text_codec(path, vocab_size)
    counts = []
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                counts.append(count_tokens(encode_batch, [f.read()]))
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the text file {file} (UTF-8 expected): {e}") from e
    # a tokenizer id the model has no row for could not be drafted anyway
    eligible = [i for i in rank_tokens(counts, weights) if i < vocab_size]      # seen, in a text weighed > 0
    ids = eligible[:size]
    if not ids:
        raise ValueError(f"the text files {list(map(str, files))} hold no tokens")
    tokens = [sum(c.values()) for c in counts]
    shares = [n / sum(tokens) for n in tokens] if weights is None else [w / sum(weights) for w in weights]
    kept = set(ids)
    texts = [dict(file=os.path.basename(file), tokens=n, share=round(share, 4),
                  covered=round(sum(c[i] for i in kept) / max(n, 1), 4))
             for file, c, n, share in zip(files, counts, tokens, shares)]
    return dict(vocab_size=vocab_size, size=len(ids), distinct_ids_seen=len(eligible), texts=texts, ids=ids)


def read_draft_vocab(file, vocab_size):
    """The ids of a draft vocabulary file, as a tensor for generate(draft_vocab=...), checked against
    the model's vocabulary size."""
    try:
        doc = read_json(file)
    except OSError as e:
        raise ValueError(f"cannot read the draft vocabulary {file}: {e}") from e
    if not isinstance(doc.get("ids"), list):
        raise ValueError(f"{file} is not a draft vocabulary: expected a JSON object with a list \"ids\"")
    if doc.get("vocab_size") != vocab_size:
        raise ValueError(f"{file} was built for a vocabulary of {doc.get('vocab_size')} ids; this model has "
                         f"{vocab_size}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in doc["ids"]):
        raise ValueError(f"{file}: \"ids\" must hold integer token ids only")
    try:
        ids = torch.tensor(doc["ids"], dtype=torch.long)
        check_draft_vocab(ids, vocab_size)
    except (ValueError, RuntimeError) as e:              # RuntimeError: an id past int64 ("Overflow ...")
        raise ValueError(f"{file}: {e}") from e
    return ids


def describe_draft_vocab(doc, file):
    lines = [f"draft vocabulary: the {doc['size']:,} most frequent of {doc['distinct_ids_seen']:,} distinct ids "
             f"in {sum(t['tokens'] for t in doc['texts']):,} tokens, written to {file}"]
    lines += [f"  {t['file']}: {t['tokens']:,} tokens, {t['share']:.1%} of the mix, {t['covered']:.1%} of them in "
              "the draft vocabulary" for t in doc["texts"]]
    return "\n".join(lines)


def acceptance_by_position(stats):
    """generate's stats as text: the share of drafts accepted at each draft position, e.g. "0.81 0.62"."""
    return " ".join(f"{a / max(d, 1):.2f}" for a, d in zip(stats["accepted_at"], stats["drafted_at"]))


def check_device(device):
    """A device torch can allocate on here, else one line naming it (not an error from deep in loading)."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, NotImplementedError) as e:   # what torch raises, by device
        raise ValueError(f"--device {device} cannot be used here: {str(e).splitlines()[0]}") from e
    if torch.device(device).type == "meta":
        raise ValueError("--device meta cannot be used here: it holds no values")


def command_line():
    parser = argparse.ArgumentParser(description="Generate text with a Qwen3.5 checkpoint, optionally "
                                     "drafting with its MTP head, describe what the checkpoint holds, or build "
                                     "a draft vocabulary for it from text.")
    parser.add_argument("checkpoint", help="directory with config.json and safetensors file(s)")
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--prompt", help="text to continue")
    task.add_argument("--info", action="store_true", help="describe the checkpoint without loading weights")
    task.add_argument("--build-draft-vocab", type=int, metavar="N", help="count the tokens of the --text files "
                      "with the checkpoint's tokenizer and write the N most frequent ids as a draft vocabulary "
                      "(to --draft-vocab FILE, by default CHECKPOINT/draft_vocab.json)")
    parser.add_argument("--text", nargs="+", metavar="FILE", help="UTF-8 text files to count (--build-draft-vocab)")
    parser.add_argument("--weights", nargs="+", type=float, metavar="W", help="one per --text file: its share "
                        "of the mix, however long it is (default: each file weighs as much as it has tokens)")
    parser.add_argument("--image", action="append", default=[], metavar="FILE",
                        help="an image to put before the prompt (repeatable; needs a vision tower; no videos)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--draft-tokens", type=int, default=0, help="k MTP drafts per step (0 = plain)")
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--draft-vocab", metavar="FILE", help="draft among the token ids of this file only "
                       "(cheaper drafts on a large vocabulary; the output is unchanged); built with "
                       "--build-draft-vocab, which writes it")
    vocab.add_argument("--draft-vocab-size", type=int, metavar="N", help="draft among the first N token ids "
                       "only (right for English and code, wrong for Chinese, Japanese, Korean: see the README)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="auto = as stored")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoding steps (CUDA graphs on "
                        "a GPU) and each decoder layer for the prompt (see fast.py): the first steps take a while, "
                        "then each step costs less")
    parser.add_argument("--seed", type=int, help="seed for sampling")
    return parser


GENERATION_OPTIONS = ("image", "max_new_tokens", "temperature", "top_p", "draft_tokens", "draft_vocab_size", "dtype",
                      "device", "compile", "seed")


def write_draft_vocab(args):
    """--build-draft-vocab N: count the --text files' tokens, write the N most frequent ids, describe them."""
    file = args.draft_vocab or os.path.join(args.checkpoint, "draft_vocab.json")
    if os.path.isdir(file):             # found before the counting, not after
        raise ValueError(f"--draft-vocab {file} is a directory: give the file to write")
    doc = build_draft_vocab(args.checkpoint, args.build_draft_vocab, args.text, args.weights)
    try:
        with open(file, "w") as f:
            json.dump(doc, f)
    except OSError as e:
        raise ValueError(f"cannot write the draft vocabulary {file}: {e}") from e
    print(describe_draft_vocab(doc, file))


def main(argv=None):
    parser = command_line()
    args = parser.parse_args(argv)
    fail = lambda e: parser.exit(2, f"{parser.prog}: error: {e}\n")   # one line, no traceback
    for name in ("max_new_tokens", "draft_tokens"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, not {getattr(args, name)}")
    if args.prompt is not None and (args.draft_vocab or args.draft_vocab_size) and not args.draft_tokens:
        fail("--draft-vocab and --draft-vocab-size choose what drafts are drawn from: give --draft-tokens k > 0")
    if (args.build_draft_vocab is None) == bool(args.text) or args.weights and not args.text:
        fail("--build-draft-vocab N and --text FILE [FILE ...] (with optional --weights) go together")
    if args.prompt is None:      # --info and --build-draft-vocab generate nothing: refuse, not ignore, such options
        ignored = GENERATION_OPTIONS + (("draft_vocab",) if args.info else ())   # (it names the file to write)
        if given := [name for name in ignored if getattr(args, name) != parser.get_default(name)]:
            fail(f"--{given[0].replace('_', '-')} applies to --prompt only")

    try:
        if args.info:
            print(describe(args.checkpoint))
            return
        if args.build_draft_vocab is not None:
            write_draft_vocab(args)
            return
        check_device(args.device)
        config = read_config(args.checkpoint)                      # check the prompt before loading weights
        ids, decode = prompt_codec(args.checkpoint, args.prompt, config.vocab_size)
        images, before = {}, []
        if args.image:
            if config.vision is None:
                raise ValueError(f"--image needs a vision tower; {args.checkpoint}/config.json has no vision_config")
            pixel_values, grids = read_images(args.image, image_settings(args.checkpoint, config.vision))
            before = image_prompt(grids, config)
            images = dict(pixel_values=pixel_values.to(args.device), image_grid_thw=grids.to(args.device))
        draft_vocab = read_draft_vocab(args.draft_vocab, config.vocab_size) if args.draft_vocab else None
        model = load_checkpoint(args.checkpoint, None if args.dtype == "auto" else getattr(torch, args.dtype),
                                args.device)
        if images and model.visual is None:
            raise ValueError(f"--image needs a vision tower; {args.checkpoint} holds no model.visual.* tensors")
        prompt = torch.tensor([before + ids], device=args.device)
        options = dict(temperature=args.temperature, top_p=args.top_p, draft_tokens=args.draft_tokens,
                       draft_vocab=draft_vocab, draft_vocab_size=args.draft_vocab_size,
                       eos_token_id=model.config.eos_token_id,
                       generator=None if args.seed is None else
                       torch.Generator(args.device).manual_seed(args.seed))
        generate(model, prompt, 0, **options)   # checks the options (drafts need an MTP head), decodes nothing
        speed_up(model, compile=args.compile)
    except (FileNotFoundError, ValueError) as e:
        fail(e)

    # Stream: decode the prompt and ALL generated ids each time and print what is new, so that BPE merges
    # and characters split over several tokens come out right (the prompt decodes back to itself, checked
    # above, so the text starts with it); a trailing U+FFFD (an incomplete character) waits.
    generated, shown = [], args.prompt
    def stream(tokens):
        nonlocal shown
        generated.extend(tokens[0].tolist())
        text = decode(ids + generated).rstrip("\ufffd")
        if text.startswith(shown):
            print(text[len(shown):], end="", flush=True)
            shown = text

    print(args.prompt, end="", flush=True)
    start = time.time()
    _, stats = generate(model, prompt, args.max_new_tokens, stream=stream, **options, **images)
    seconds = max(time.time() - start, 1e-9)
    print(decode(ids + generated)[len(shown):], flush=True)
    summary = f"{len(generated)} new tokens in {seconds:.2f} s, {len(generated) / seconds:.1f} tokens/s"
    if args.draft_tokens:
        rate = stats["accepted"] / max(stats["drafted"], 1)
        summary += (f"; MTP drafts: {stats['drafted']} drafted, {stats['accepted']} accepted ({rate:.0%}), "
                    f"acceptance per draft position {acceptance_by_position(stats)}")
    print(summary, file=sys.stderr)


if __name__ == "__main__":
    main()

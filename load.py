"""
Load a Qwen3.5 checkpoint, as published (safetensors), into `qwen35_mtp.Qwen35`.

    model = load_checkpoint("Qwen3.5-0.8B/", dtype=torch.bfloat16)

Module names mirror checkpoint keys, so loading is a prefix strip plus one table for experts:

    checkpoint key                                  model parameter
    model.language_model.X   (official, VL-wrapped) model.X
    model.X                  (Qwen3_5ForCausalLM)   model.X
    lm_head.weight           (absent when tied)     lm_head.weight
    mtp.X                    (top level)            mtp.X
    model.visual.X           (vision tower)         skipped on purpose: this is the language model

The loader is strict: every parameter is loaded exactly once, every tensor in the files is used or
deliberately skipped, shapes must match, and nothing is left randomly initialised.
"""

import json
import os
import re
from dataclasses import replace

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from qwen35_mtp import Qwen35, Qwen35Config

SKIPPED_PREFIXES = ("model.visual.",)

# Experts appear fused in official main layers (mlp.experts.gate_up_proj [E, 2I, H],
# mlp.experts.down_proj [E, H, I]: the model's own layout) but per expert in the official MTP layer
# and in transformers re-saves. Per-expert tensors are stacked into the fused ones:
#     experts.{e}.gate_proj.weight [I, H]  ->  experts.gate_up_proj[e, :I]
#     experts.{e}.up_proj.weight   [I, H]  ->  experts.gate_up_proj[e, I:]
#     experts.{e}.down_proj.weight [H, I]  ->  experts.down_proj[e]
PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def model_name(key):
    """The model parameter a checkpoint key feeds, or None for tensors skipped on purpose."""
    if key.startswith(SKIPPED_PREFIXES):
        return None
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def checkpoint_files(path):
    """The safetensors files of a checkpoint directory: the index's shards, or model.safetensors."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, shard) for shard in shards]
        if missing := [f for f in files if not os.path.exists(f)]:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path} holds neither model.safetensors nor model.safetensors.index.json")
    return [single]


def read_config(path):
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: a checkpoint directory needs its config.json")
    with open(config_path) as f:
        return Qwen35Config.from_hf(json.load(f))


def open_safetensors(file, device):
    try:
        return safe_open(file, framework="pt", device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def checkpoint_keys(files, device):
    """{key: file} over all files, reading headers only."""
    owner = {}
    for file in files:
        with open_safetensors(file, device) as f:
            for key in f.keys():
                if key in owner:
                    raise ValueError(f"tensor {key} appears twice: in {owner[key]} and {file}")
                owner[key] = file
    return owner


def load_checkpoint(path, dtype=None, device="cpu") -> Qwen35:
    """Build Qwen35 from a checkpoint directory (config.json + safetensors, single or sharded).
    dtype=None keeps each tensor's dtype as stored; a dtype casts every tensor to it."""
    config = read_config(path)
    files = checkpoint_files(path)
    owner = checkpoint_keys(files, device)
    # The MTP head is whatever the files hold: transformers re-saves keep mtp_num_hidden_layers in
    # config.json but drop the mtp.* tensors.
    mtp_layers = {int(m.group(1)) for k in owner if (m := re.match(r"^mtp\.layers\.(\d+)\.", k))}
    has_mtp = any(k.startswith("mtp.") for k in owner)
    config = replace(config, mtp_num_hidden_layers=(max(mtp_layers) + 1 if mtp_layers else 1) if has_mtp else 0)

    with torch.device("meta"):
        model = Qwen35(config)              # no memory: every parameter is assigned below
    expected = dict(model.named_parameters())  # a tied lm_head appears once, as embed_tokens
    loaded, fused_filled, unexpected, tied_head = {}, {}, [], None

    def take(name, tensor, key, file):
        if name not in expected:
            unexpected.append(key)
            return
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{file}: tensor {key} has shape {tuple(tensor.shape)}, but the config "
                             f"expects {tuple(expected[name].shape)} for {name}")
        if name in loaded:
            raise ValueError(f"{file}: tensor {key} loads {name}, which was already loaded")
        loaded[name] = tensor

    for file in files:
        with open_safetensors(file, device) as f:
            for key in f.keys():
                name = model_name(key)
                if name is None:
                    continue
                try:
                    tensor = f.get_tensor(key)
                except (SafetensorError, OSError, RuntimeError) as e:
                    raise ValueError(f"{file}: cannot read tensor {key} (truncated or corrupt?): {e}") from e
                if dtype is not None:
                    tensor = tensor.to(dtype)
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    tied_head = (tensor, key, file)       # checked against embed_tokens below
                elif m := PER_EXPERT.match(name):
                    fill_expert(expected, loaded, fused_filled, m, tensor, key, file, unexpected)
                else:
                    take(name, tensor, key, file)

    if unexpected:
        raise ValueError(f"{path}: tensors that match no model parameter (wrong config, or not a "
                         f"Qwen3.5 checkpoint?): {sorted(unexpected)[:20]}{' ...' if len(unexpected) > 20 else ''}")
    for name, filled in fused_filled.items():
        if not all(filled.values()):
            raise ValueError(f"{path}: missing expert tensors for {name}: "
                             f"{sorted(part for part, ok in filled.items() if not ok)[:20]}")
    if missing := sorted(set(expected) - set(loaded)):
        raise ValueError(f"{path}: parameters missing from the checkpoint: {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''}")
    if tied_head is not None:
        tensor, key, file = tied_head
        if not torch.equal(tensor, loaded["model.embed_tokens.weight"]):
            raise ValueError(f"{file}: config ties lm_head to embed_tokens, but {key} differs from them")

    for name, tensor in loaded.items():
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    model.tie_weights()
    return model.eval()


def fill_expert(expected, loaded, fused_filled, match, tensor, key, file, unexpected):
    """Copy one per-expert tensor into its slice of the fused expert parameter (see PER_EXPERT)."""
    prefix, e, part = match.group(1), int(match.group(2)), match.group(3)
    fused = f"{prefix}.{'down_proj' if part == 'down_proj' else 'gate_up_proj'}"
    if fused not in expected:
        unexpected.append(key)
        return
    E, rows, cols = expected[fused].shape
    if fused not in loaded:
        if fused in fused_filled:
            raise ValueError(f"{file}: {key}: {fused} is stored both fused and per expert")
        loaded[fused] = torch.empty(E, rows, cols, dtype=tensor.dtype, device=tensor.device)
        parts = ["down_proj"] if part == "down_proj" else ["gate_proj", "up_proj"]
        fused_filled[fused] = {f"{i}.{p}": False for i in range(E) for p in parts}
    elif fused not in fused_filled:
        raise ValueError(f"{file}: {key}: {fused} is stored both fused and per expert")
    half = rows // 2
    target = {"gate_proj": loaded[fused][e, :half] if e < E else None,
              "up_proj": loaded[fused][e, half:] if e < E else None,
              "down_proj": loaded[fused][e] if e < E else None}[part]
    if target is None:
        raise ValueError(f"{file}: tensor {key} names expert {e}, but the config has {E} experts")
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(f"{file}: tensor {key} has shape {tuple(tensor.shape)}, but the config expects "
                         f"{tuple(target.shape)}")
    if fused_filled[fused][f"{e}.{part}"]:
        raise ValueError(f"{file}: tensor {key} was already loaded")
    target.copy_(tensor.to(target.dtype))
    fused_filled[fused][f"{e}.{part}"] = True

"""
Train Qwen3.5 with its MTP head: the demo from scratch, or a real checkpoint on your own text.

    python train.py                    # the demo: a small Qwen3.5 + MTP from scratch (3-6 min on 2 CPU cores)
    python train.py --init Qwen3.5-0.8B --data notes/ --freeze-backbone --out runs/head
    torchrun --nproc-per-node 4 train.py --init Qwen3.5-0.8B --data notes/ --out runs/all

The demo needs nothing to download: it trains on the Python standard library's own source files,
byte by byte (vocabulary 256), holds every 20th file out for evaluation and prompts, saves the model
as a checkpoint (runs/demo: config.json + model.safetensors, loadable by load.py and transformers), and
then reports, on held-out text:
  - the LM and MTP losses;
  - the teacher-forced acceptance per depth: over positions t, how often the depth-d head's argmax for
    token t+d+1 (given the true tokens up to t+d) equals the main model's argmax for that token. This
    is the acceptance rate greedy drafting would see on that text, without the feedback loop of the
    model's own output;
  - greedy decoding of a held-out prompt, plainly and with k = 1, 2, 3 MTP drafts: identical output
    (checked), acceptance per draft position and speed. The small model's greedy continuation soon
    repeats itself, which is easy to draft, so these acceptances overstate what the head does on text;
  - one sampled run (temperature 0.8, fixed seed) with k = 2 drafts: its acceptance and speed.

With --init DIR (any checkpoint load.py reads: dense or MoE, VL-wrapped or flat, sharded or not):
  - data: --data takes .txt files (a document each), .jsonl files (a document per line, its "text"
    field) or directories of them; without it, the standard library's .py files. Documents are
    tokenized with DIR/tokenizer.json (a byte-level checkpoint without one: UTF-8 bytes), each followed
    by the end-of-text token, concatenated and cut into --seq-len windows; every 20th document
    (--eval-share) is held out. The global batch of step s depends on --seed and s only.
  - --freeze-backbone trains only mtp.* on the MTP loss (a checkpoint without an MTP head gets a fresh
    one); otherwise everything trains on lm_loss + w * mtp_loss. Each term is a mean over its target
    tokens in the whole global batch, computed over chunks of rows (no full-vocabulary logits).
  - --out gets the input's layout exactly (load.save_updated: untrained tensors copied bit for bit) plus
    train_state/ for --resume, every --save-every steps and at the end, each save replacing the last
    atomically. Under torchrun each process trains on its share of each global batch, the model
    sharded with FSDP2, and reaches the weights one process would; it reads the checkpoint one tensor
    at a time and keeps only its own shards (materialize), and saves its own shards of train_state/,
    so no process holds the whole model (process 0 writes --out one file at a time).
  - held-out LM loss, MTP loss and teacher-forced acceptance per depth: at the start, every
    --eval-every steps and at the end, over --eval-windows windows, the same ones whatever the number
    of processes.
"""

import argparse
import functools
import gc
import glob
import itertools
import json
import math
import os
import shutil
import sys
import sysconfig
import time
import warnings
import zlib
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from fast import compile_long_steps, speed_up
from load import (acceptance_by_position, checkpoint_model, checkpoint_tensors, read_config, read_tokenizer,
                  save_checkpoint, save_updated, updated_files)
from qwen35_mtp import MTPHead, Qwen35, Qwen35Config, generate, loss_targets, mtp_mean


# ----------------------------------------------------------------------------------------------
# Data: the demo's bytes, and real text

DEMO_SIZES = {   # the rest of the shape is in demo_config
    "tiny": dict(hidden_size=128, num_hidden_layers=4, intermediate_size=384),
    "small": dict(hidden_size=192, num_hidden_layers=4, intermediate_size=576),
    "medium": dict(hidden_size=320, num_hidden_layers=6, intermediate_size=960),
}


def demo_config(size="medium", **overrides):
    sizes = dict(vocab_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
                 linear_value_head_dim=32, tie_word_embeddings=True, mtp_num_hidden_layers=1)
    return Qwen35Config(**{**sizes, **DEMO_SIZES[size], **overrides})


def stdlib_files():
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def stdlib_corpus(every=20):
    """(train bytes, held-out bytes) of the standard library's top-level .py files, as token ids [N]."""
    text = [open(f, "rb").read() for f in stdlib_files()]
    held_out = b"".join(t for i, t in enumerate(text) if i % every == 0)
    train = b"".join(t for i, t in enumerate(text) if i % every != 0)
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).long()
    return as_tensor(train), as_tensor(held_out)


def random_windows(data, batch_size, length, generator):
    starts = torch.randint(0, len(data) - length, (batch_size,), generator=generator)
    return torch.stack([data[s:s + length] for s in starts.tolist()])


def data_files(paths):
    """The .txt and .jsonl files named, and those under the directories named (sorted), each once."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                           if name.endswith((".txt", ".jsonl")))
            if not found:
                raise ValueError(f"--data {path}: no .txt or .jsonl files in this directory")
            files += found
        elif not os.path.exists(path):
            raise FileNotFoundError(f"--data {path}: no such file or directory")
        elif not path.endswith((".txt", ".jsonl")):
            raise ValueError(f"--data {path}: expected a .txt or .jsonl file, or a directory of them")
        else:
            files.append(path)
    # a file named twice (also through a directory) would be two documents, one perhaps held out
    first = {}
    for file in files:
        first.setdefault(os.path.realpath(file), file)
    return list(first.values())


def read_documents(files):
    """[(where, text)]: each .jsonl line's "text" is a document, any other file is one. Empty ones are left out."""
    documents = []
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                if not file.endswith(".jsonl"):
                    documents.append((file, f.read()))
                    continue
                for n, line in enumerate(f, start=1):
                    record = json.loads(line) if line.strip() else {"text": ""}
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise ValueError(f"{file}:{n}: expected a JSON object with a \"text\" string")
                    documents.append((f"{file}:{n}", record["text"]))
        except UnicodeDecodeError as e:
            raise ValueError(f"{file}: not UTF-8 text ({e})") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{n}: not JSON ({e.msg})") from e
    documents = [(where, text) for where, text in documents if text]
    if not documents:
        raise ValueError(f"--data holds no text: {len(files)} file(s), all empty")
    return documents


def text_encoder(checkpoint, config):
    """(encode: texts -> id lists, end-of-text id or None, a description) for the checkpoint: its
    tokenizer.json, or UTF-8 bytes for a byte-level checkpoint (vocab 256) without one."""
    tokenizer = read_tokenizer(checkpoint, config.vocab_size)
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    if tokenizer is None:
        return lambda texts: [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts], eos, "UTF-8 bytes"
    end = tokenizer.token_to_id("<|endoftext|>")             # the document separator of Qwen's pretraining
    encode = lambda texts: [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return encode, eos if end is None else end, os.path.join(checkpoint, "tokenizer.json")


def tokenize(documents, encode, eos, vocab_size, every):
    """(training ids, held-out ids) int32 [N]: each document's ids and then eos (if any), concatenated;
    documents 0, every, 2 * every, ... are held out."""
    texts = [text for _, text in documents]
    try:
        encoded = encode(texts)
    except Exception:                        # say which document (a tokenizer without an unknown token)
        for where, text in documents:
            try:
                encode([text])
            except Exception as e:
                raise ValueError(f"{where}: the tokenizer cannot encode this text: {e}") from e
        raise
    ends = np.array([] if eos is None else [eos], np.int64)
    parts = [np.concatenate([np.asarray(ids, np.int64), ends]) for ids in encoded]
    for (where, _), ids in zip(documents, parts):
        if ids.size and not 0 <= ids.min() <= ids.max() < vocab_size:
            raise ValueError(f"{where}: encodes to token ids outside the model's vocabulary [0, {vocab_size})")
    joined = lambda held: torch.from_numpy(np.concatenate(
        [ids for i, ids in enumerate(parts) if (i % every == 0) == held] or [np.zeros(0, np.int64)]).astype(np.int32))
    return joined(False), joined(True)


def pack_windows(ids, seq_len, what):
    """ids [N] cut into [N // seq_len, seq_len] (the rest dropped)."""
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"--data: the {what} text is {len(ids)} tokens, shorter than one window of --seq-len "
                         f"{seq_len}")
    return ids[:n * seq_len].view(n, seq_len)


def global_batch(windows, step, batch_size, seed):
    """Rows step * B ... step * B + B - 1 of an endless stream of epochs, each a fresh permutation of the
    windows (seeded by seed and epoch): the same batch for the same step, however many processes."""
    n = len(windows)
    positions = range(step * batch_size, (step + 1) * batch_size)
    orders = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
              for epoch in {p // n for p in positions}}
    return windows[torch.stack([orders[p // n][p % n] for p in positions])].long()


# ----------------------------------------------------------------------------------------------
# Model setup

def add_mtp_head(model):
    """Give a backbone without MTP weights (on the meta device) an MTP head there too, and return the
    head's fresh initial weights, (name, tensor) pairs to put in with the checkpoint's."""
    model.config = replace(model.config, mtp_num_hidden_layers=1)
    head = MTPHead(model.config)
    head.apply(model._init_weights)
    with torch.device("meta"):
        model.mtp = MTPHead(model.config)
    return [("mtp." + name, p.detach()) for name, p in head.named_parameters()]


def materialize(model, weights, device):
    """Give a model built on the meta device (sharded or not) memory on `device` (in its parameters'
    dtype), and its weights from (name, full tensor) pairs, one at a time (a parameter without a pair
    keeps what to_empty left: a resumed run's trained ones, until load_train_state). A sharded
    parameter (FSDP2's DTensor) keeps only its own shard of each tensor, so no process ever holds the
    whole model."""
    model.to_empty(device=device)
    model.tie_weights()                  # to_empty may have given a tied lm_head memory of its own
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights:
            param = params[name]
            if isinstance(param, DTensor):
                tensor = distribute_tensor(tensor, param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(tensor)


def set_trainable(model, freeze_backbone):
    """mtp.* trains; so does the rest of the language model unless the backbone is frozen (a vision
    tower never does: text has no images). Returns the trained parameters' names."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("mtp.") or not (freeze_backbone or name.startswith("visual.")))
    return [name for name, p in model.named_parameters() if p.requires_grad]


def make_optimizer(model, lr, steps):
    """AdamW with linear warmup and cosine decay to 10%; weight decay on tensors of 2 or more dims
    (projections, conv kernels, routers), not on norms, A_log or dt_bias."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def decoder_layers(model):
    return list(model.model.layers) + (list(model.mtp.layers) if model.mtp is not None else [])


def prepare(model, compile):
    """What pays on the model's device (fast.speed_up: fla's kernels on a GPU), and with compile each
    decoder layer compiled (fast.compile_long_steps: the first steps wait for the compiler)."""
    speed_up(model)
    if compile:
        compile_long_steps(model)


def checkpoint_activations(model):
    """Keep only each decoder layer's input in forward and recompute the rest in backward."""
    for layer in decoder_layers(model):
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


# ----------------------------------------------------------------------------------------------
# Distributed: one process per device under torchrun, the model sharded with FSDP2

def init_distributed():
    """(rank, world size, device): under torchrun, a process group (NCCL on GPUs, gloo on CPUs)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def shard(model):
    """FSDP2: a group per decoder layer (the MTP head's too), one for the rest of the MTP head, and the
    root, which holds the embedding and lm_head (a tied weight must live in one group). Each process's
    loss is already its share of the global batch's loss, so gradients are summed, not averaged."""
    for layer in decoder_layers(model):
        fully_shard(layer)
    if model.mtp is not None:
        fully_shard(model.mtp)
    fully_shard(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)     # else a PREMUL_SUM, which gloo lacks
    return model


def all_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def gather(obj):
    """[obj of process 0, obj of process 1, ...]."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------
# Loss, training step, evaluation

def resolve_precision(precision, device):
    """--precision auto: "bf16" (autocast) where the device has bf16 matrix kernels, a CUDA GPU that
    supports bf16 or a CPU for which PyTorch's oneDNN reports bf16 support (AVX-512, ARM's bf16), and
    "fp32" elsewhere. Without such kernels a CPU's bf16 products take a slow path: one step of the demo
    took 53 s in bf16 against 3.5 s in fp32 on an AVX2-only AMD EPYC (2026-11-29)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bf16" if native else "fp32"


def target_counts(labels, depth):
    """[1 + depth]: the targets each term scores (the main model, then each MTP depth), as forward does."""
    return torch.stack([(t != -100).sum() for t in loss_targets(labels, depth)])


def train_step(model, optimizer, scheduler, ids, labels, counts, *, mtp_depth, freeze_backbone, precision,
               micro_batches=1):
    """One optimizer step on this process's rows (ids, labels) of the global batch, in micro-batches,
    with precision "bf16" (autocast) or "fp32" (resolve_precision's answer, which its callers ask once).
    Each term is its token sum over `counts`, the term's target count in the global batch: summed over
    micro-batches and processes, that is the global batch's mean, however the -100 labels fall. (A mean
    per micro-batch or process, averaged, would weigh their tokens unequally.) Returns the terms
    [1 + D] summed over micro-batches (this process's share)."""
    weight, total = model.config.mtp_loss_weight, torch.zeros(len(counts), device=ids.device)
    parts = list(zip(ids.chunk(micro_batches), labels.chunk(micro_batches)))
    for i, (x, y) in enumerate(parts):
        if isinstance(model, FSDPModule):      # reduce the gradients once, after the last micro-batch
            model.set_requires_gradient_sync(i == len(parts) - 1)
        # bf16 autocast runs the matrix products (the DeltaNet's included) in bf16 while weights and
        # AdamW state stay fp32: 2.5x faster per step on a CPU with bf16 units (0.36 s vs 0.9 s), 15x
        # slower on one without (see resolve_precision)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x, labels=y, mtp_depth=mtp_depth, logits=False)
        # each term on its own: a depth with no target has a NaN term (0/0) that must stay out of backward
        lm, mtp = out.loss_sums[0] / counts[0], mtp_mean(out.loss_sums[1:], counts[1:])
        (mtp if freeze_backbone else lm + weight * mtp).backward()
        total += out.loss_sums.detach() / counts
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return total


def log_step(log, step, steps, terms, tokens_per_s, eta_s):
    row = dict(step=step, lm_loss=terms[0].item(), mtp_losses=terms[1:].tolist(), tokens_per_s=tokens_per_s,
               eta_s=eta_s)
    log(f"step {step:4d}/{steps}  lm {row['lm_loss']:.3f}  mtp " + " ".join(f"{l:.3f}" for l in row["mtp_losses"])
        + f"  {tokens_per_s:,.0f} tok/s  {eta_s:.0f}s left")
    return row


def acceptance_counts(out, rows=None):
    """Per depth d: (agreements, positions) between the depth-d head's argmax for token t+d+1 (its row t)
    and the main model's argmax for the same token (its row t+d), over every such pair of rows in the
    first `rows` sequences (None: all)."""
    predictions = out.predictions or [l.argmax(-1) for l in [out.logits] + out.mtp_logits_per_depth]
    main = predictions[0][:rows]                                   # [B, T]: row j predicts token j+1
    counts = []
    for d, heads in enumerate(predictions[1:], start=1):
        agree = heads[:rows] == main[:, d:]                        # [B, T-d]
        counts.append((agree.sum().item(), agree.numel()))
    return counts


@torch.no_grad()
def held_out_totals(model, windows, *, micro_batch, mtp_depth, rank=0, world=1):
    """This process's share of the held-out sums over windows [W, T]: float64 [4, 1 + depth], rows the
    loss sums, their target counts, the acceptance hits and positions (column 0, the main model's, has
    no acceptance). Every process runs ceil(W / world) windows, as FSDP's forward gathers each layer from
    all of them: a share that comes up short runs copies of window 0 with no targets, counted nowhere.
    So the same W windows are scored whatever the number of processes."""
    device = next(model.parameters()).device
    share = -(-len(windows) // world)
    mine = windows[rank * share:(rank + 1) * share]
    real = len(mine)
    mine = torch.cat([mine, windows[:1].expand(share - real, -1)])
    totals = torch.zeros(4, mtp_depth + 1, dtype=torch.float64, device=device)
    for start in range(0, share, micro_batch):
        x = mine[start:start + micro_batch].to(device).long()
        scored = max(0, real - start)                              # x's first rows are windows, the rest filler
        labels = x.clone()
        labels[scored:] = -100
        out = model(x, labels=labels, mtp_depth=mtp_depth, logits=False)
        totals[0] += out.loss_sums
        totals[1] += out.loss_counts
        totals[2:, 1:] += torch.tensor(acceptance_counts(out, scored), device=device).t()
    return totals


def evaluate_windows(model, windows, *, micro_batch, mtp_depth):
    """Over windows [W, T], shared among the processes: the LM loss and per depth the MTP loss, each a
    mean over all target tokens, and the teacher-forced acceptance (see acceptance_counts)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    totals = held_out_totals(model, windows, micro_batch=micro_batch, mtp_depth=mtp_depth, rank=rank, world=world)
    sums, counts, hits, positions = all_sum(totals).cpu()
    losses = sums / counts
    return dict(lm_loss=losses[0].item(), mtp_losses=losses[1:].tolist(), acceptance=(hits / positions)[1:].tolist())


def evaluate(model, data, *, seq_len=256, batches=4, batch_size=16, mtp_depth=1):
    """The demo's evaluation: fixed, evenly spaced held-out windows of the byte stream `data`."""
    starts = torch.linspace(0, len(data) - seq_len - 1, batches * batch_size).long()
    windows = torch.stack([data[s:s + seq_len] for s in starts.tolist()])
    return evaluate_windows(model, windows, micro_batch=batch_size, mtp_depth=mtp_depth)


def describe_evaluation(result):
    depths = len(result["mtp_losses"])
    return (f"lm loss {result['lm_loss']:.3f}, mtp loss " + " ".join(f"{l:.3f}" for l in result["mtp_losses"])
            + ", teacher-forced acceptance " + " ".join(f"{a:.3f}" for a in result["acceptance"])
            + f" (depth {'1' if depths == 1 else f'1..{depths}'})")


# ----------------------------------------------------------------------------------------------
# Checkpointing: the checkpoint in the input's layout, plus the training state --resume reads

STATE = "train_state"                    # torch.distributed.checkpoint's files: every process's shards
RUN = os.path.join(STATE, "run.pt")       # and beside them the step, schedule, random states, data


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def replaced_atomically(directory, rank=0):
    """Yield a temporary directory that then replaces `directory` by two renames: a run killed while
    saving leaves the previous checkpoint intact (in DIR.previous if killed between the renames).
    Under torchrun every process writes into it, and process 0 renames it once all are done."""
    tmp, previous = directory + ".tmp", directory + ".previous"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)                 # left by a save that was killed
    try:
        yield tmp
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if rank == 0:
        if os.path.exists(directory):
            shutil.rmtree(previous, ignore_errors=True)
            os.rename(directory, previous)
        os.rename(tmp, directory)
        shutil.rmtree(previous, ignore_errors=True)
    barrier()


def check_out(out, overwrite, resume=None, replaceable=()):
    """Refuse, unless --overwrite, an --out whose contents a save would replace: files other than
    `replaceable` (a demo run's own), or the last save of an interrupted run, left in OUT.previous.
    A run resumed in place (--out is --resume) is the one case where --out may hold a checkpoint."""
    if overwrite or (resume and os.path.exists(out) and os.path.samefile(out, resume)):
        return
    if os.path.exists(out + ".previous") and not os.path.exists(out):
        raise ValueError(f"--out {out}: {out}.previous holds the last save of a run killed while saving; rename "
                         f"it back to {out} (then --resume it), or --overwrite replaces it")
    if os.path.exists(out) and (not os.path.isdir(out) or set(os.listdir(out)) - set(replaceable)):
        raise ValueError(f"--out {out} already holds files (another checkpoint?); --overwrite replaces it")


def trained_state(model, optimizer, trained):
    """{"weights": the trained parameters by name, "optimizer": AdamW's state by parameter name}: each
    process's shards, or whole tensors in one process."""
    weights, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"weights": {name: weights[name] for name in trained},       # not a frozen tied lm_head.weight
            "optimizer": optimizer_state}


def sharded_checkpoint(save_or_load, state, path):
    """dcp.save or dcp.load of `state` at `path`, each process writing or reading its own shards. Without a
    process group, torch.distributed.checkpoint warns at each call that it assumes one process: it is so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
        save_or_load(state, checkpoint_id=path)


class WholeParameters(Mapping):
    """The named parameters' values, each whole and on the CPU when read: a sharded one (FSDP2's
    DTensor) is gathered from every process's shard then, so every process must read the same names
    in the same order."""

    def __init__(self, model, names):
        params = dict(model.named_parameters())
        self.params = {name: params[name] for name in names}

    def __getitem__(self, name):
        value = self.params[name].detach()
        return (value.full_tensor() if isinstance(value, DTensor) else value).cpu()

    def __iter__(self):
        return iter(self.params)

    def __len__(self):
        return len(self.params)


def save_run(model, optimizer, scheduler, step, source, out, trained, run_key, rank):
    """--out: the checkpoint in source's layout with the trained parameters put in (load.save_updated),
    written by process 0 one file at a time, each file's parameters gathered as it needs them; and
    train_state/: the trained parameters' fp32 values and the optimizer's state, each process writing
    its own shards (torch.distributed.checkpoint), with run.pt: the step, schedule, random states and
    what identifies the data. No process holds more than one file's parameters whole."""
    weights = WholeParameters(model, trained)
    rng = gather(torch.get_rng_state())
    with replaced_atomically(out, rank) as tmp:
        if rank == 0:
            save_updated(source, tmp, weights)
        else:                    # take part in the same gathers, in save_updated's order
            for _, names in updated_files(source, trained):
                for name in names:
                    weights[name]
        barrier()                # tmp exists: every process may write its shards into it
        sharded_checkpoint(dcp.save, trained_state(model, optimizer, trained), os.path.join(tmp, STATE))
        if rank == 0:
            torch.save(dict(step=step, scheduler=scheduler.state_dict(), rng=rng, data=run_key),
                       os.path.join(tmp, RUN))


def resume_state(resume, model, trained, run_key, steps):
    """The saved run in `resume` (its run.pt), checked against this one from the shards' metadata: the
    same parameters trained, the same data, batches and options (run_key; --steps may grow). load_train_state
    reads the shards later."""
    path = os.path.join(resume, RUN)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume {resume}: no {RUN} in it (train.py writes one at each save)")
    try:                    # a damaged or partly copied save: one line naming it, not the reader's traceback
        metadata = dcp.FileSystemReader(os.path.join(resume, STATE)).read_metadata()
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--resume {resume}: {STATE} cannot be read ({type(e).__name__}: {str(e)[:200]})") from e
    missing = sorted({info.relative_path for info in metadata.storage_data.values()}
                     - set(os.listdir(os.path.join(resume, STATE))))
    if missing:
        raise FileNotFoundError(f"--resume {resume}: {STATE} lacks {len(missing)} of its shard files: {missing[:3]}")
    saved = {key.removeprefix("weights."): tuple(m.size) for key, m in metadata.state_dict_metadata.items()
             if key.startswith("weights.")}
    params = dict(model.named_parameters())
    wanted = {name: tuple(params[name].shape) for name in trained}
    if saved != wanted:
        differ = sorted(set(saved.items()) ^ set(wanted.items()))
        raise ValueError(f"--resume {resume}: the saved state does not match this model and --freeze-backbone: "
                         f"it trains {len(saved)} tensors, this run {len(wanted)}; differing: {differ[:3]}")
    saved = state["data"]            # what an older save did not record is not compared
    differ = [k for k, v in run_key.items() if k in saved and saved[k] != v]
    changed = [f"--{k.replace('_', '-')} {saved[k]} (now {run_key[k]})" for k in differ if k not in ("tokens", "crc32")]
    if {"tokens", "crc32"} & set(differ):
        changed.append(f"other training text ({saved['tokens']:,} tokens, now {run_key['tokens']:,})")
    if changed:
        raise ValueError(f"--resume {resume}: saved by a run with {', '.join(changed)}: a resumed run continues "
                         "the saved one; give its options (only --steps may grow)")
    if steps <= state["step"]:
        raise ValueError(f"--steps {steps}: the run in {resume} was saved at step {state['step']}; give more")
    return state


def load_train_state(resume, model, optimizer, trained):
    """Put the saved fp32 weights and optimizer state in (the model has its memory, sharded or not): each
    process reads only its own shards, whatever the number of processes that saved them."""
    state = trained_state(model, optimizer, trained)          # the shapes and shards to read into
    sharded_checkpoint(dcp.load, state, os.path.join(resume, STATE))
    # then into the model and AdamW: not all of state is their live tensors (without this, a resumed run
    # in one process logged other losses); strict=False: the frozen parameters are not in it
    set_state_dict(model, optimizer, model_state_dict=state["weights"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))


# ----------------------------------------------------------------------------------------------
# Training loops: the demo's, and a checkpoint's on text

def train(model, data, *, steps, batch_size=16, seq_len=256, lr=2e-3, mtp_depth=1, freeze_backbone=False,
          seed=0, time_budget=None, precision="auto", log=print, log_every=10):
    """The demo's loop: random windows of the byte stream `data`; train_step's loss and AdamW.
    freeze_backbone trains only mtp.* on mtp_loss, the way an MTP head is added to an existing model.
    Returns the logged rows."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    precision = resolve_precision(precision, next(model.parameters()).device)
    log(f"training: {steps} steps of {batch_size} x {seq_len}, matrix products in {precision}")
    set_trainable(model, freeze_backbone)
    optimizer, scheduler = make_optimizer(model, lr, steps)
    model.train()
    history, start, tokens = [], time.time(), 0
    for step in range(steps):
        x = random_windows(data, batch_size, seq_len, generator)
        terms = train_step(model, optimizer, scheduler, x, x, target_counts(x, mtp_depth), mtp_depth=mtp_depth,
                           freeze_backbone=freeze_backbone, precision=precision)
        tokens += x.numel()
        elapsed = time.time() - start
        out_of_time = time_budget is not None and elapsed > time_budget
        if step % log_every == 0 or step == steps - 1 or out_of_time:      # the last step is always logged
            history.append(log_step(log, step, steps, terms, tokens / elapsed,
                                    elapsed / (step + 1) * (steps - step - 1)))
        if out_of_time:
            log(f"time budget of {time_budget}s reached after {step + 1} steps")
            break
    model.eval()
    return history


def check_settings(args, world):
    value, flag = (lambda name: getattr(args, name)), (lambda name: "--" + name.replace("_", "-"))
    problems = [f"{flag(n)} must be > 0, not {value(n)}" for n in ("steps", "batch_size", "grad_accum", "lr",
                                                                   "log_every", "new_tokens", "eval_windows")
                if not value(n) > 0]
    problems += [f"{flag(n)} must be >= 0, not {value(n)}" for n in ("mtp_loss_weight", "save_every", "eval_every")
                 if not value(n) >= 0]                                  # written so that nan fails too
    problems += [f"{flag(n)} must be finite, not inf" for n in ("lr", "mtp_loss_weight") if value(n) == math.inf]
    if args.time_budget is not None and not args.time_budget > 0:
        problems.append(f"--time-budget must be > 0 seconds, not {args.time_budget}")
    if args.grad_accum > 0 and args.batch_size % (world * args.grad_accum):     # else reported above
        problems.append(f"--batch-size {args.batch_size} must be a multiple of processes ({world}) x "
                        f"--grad-accum ({args.grad_accum})")
    if args.seq_len < 3:                   # a window of T tokens has T - 2 targets for the MTP head
        problems.append(f"--seq-len must be >= 3, not {args.seq_len}")
    elif not 1 <= args.mtp_depth <= args.seq_len - 2:
        problems.append(f"--mtp-depth must be in 1..seq_len - 2 = {args.seq_len - 2}")
    if not 0 < args.eval_share <= 0.5:     # one document in round(1 / share) is held out: at least every 2nd
        problems.append(f"--eval-share must be in (0, 0.5], not {args.eval_share}")
    if problems:
        raise ValueError("; ".join(problems))


def setup_run(args, world, device, log):
    """Read and check everything a run needs, writing nothing: bad input raises ValueError or
    FileNotFoundError. Returns the model (on the meta device), its weights ((name, tensor) pairs, read
    when materialize puts them in), the data and the state to resume."""
    check_settings(args, world)
    source = args.resume or args.init
    if args.resume and not os.path.exists(args.resume) and os.path.exists(args.resume + ".previous"):
        raise FileNotFoundError(f"--resume {args.resume}: not found, but {args.resume}.previous is (a save was "
                                "interrupted between two renames): rename it back")
    config = read_config(source)
    encode, eos, tokenizer_file = text_encoder(source, config)
    documents = read_documents(data_files(args.data) if args.data else stdlib_files())
    if len(documents) < 2:
        raise ValueError("--data holds one document; at least two are needed, as some are held out for "
                         "evaluation (a .txt file is one document, each .jsonl line another)")
    every = round(1 / args.eval_share)
    train_ids, held_ids = tokenize(documents, encode, eos, config.vocab_size, every)
    train_windows = pack_windows(train_ids, args.seq_len, "training")
    held_windows = pack_windows(held_ids, args.seq_len, f"held-out (one document in {every})")
    n = min(args.eval_windows, len(held_windows))
    eval_windows = held_windows[torch.linspace(0, len(held_windows) - 1, n).long()]
    check_out(args.out, args.overwrite, args.resume)
    log(f"data: {len(documents):,} documents, {len(train_ids):,} training tokens ({len(train_windows):,} windows "
        f"of {args.seq_len}), {len(held_ids):,} held-out tokens (one document in {every}; {n} windows evaluated); "
        f"tokenizer {tokenizer_file}, end of text {eos}")

    torch.manual_seed(args.seed)            # a fresh MTP head starts the same in every process
    model = checkpoint_model(source)        # no memory yet: each process gets its weights once sharded
    weights = checkpoint_tensors(source, model)    # checked now, read later; as stored, made fp32 on copy
    if model.mtp is None:
        weights = itertools.chain(weights, add_mtp_head(model))
        log(f"{source} has no MTP head (no mtp.* tensors): training a freshly initialised one")
    model.config.mtp_loss_weight = args.mtp_loss_weight
    trained = set_trainable(model, args.freeze_backbone)
    # what a resumed run must share with the saved one: the options that shape its batches, its held-out
    # split and its losses, and the training text (the number of processes and --grad-accum may change)
    run_key = dict(seed=args.seed, batch_size=args.batch_size, seq_len=args.seq_len, eval_share=args.eval_share,
                   lr=args.lr, mtp_depth=args.mtp_depth, mtp_loss_weight=args.mtp_loss_weight,
                   precision=args.precision, tokens=len(train_ids), crc32=zlib.crc32(train_ids.numpy().tobytes()))
    state = resume_state(args.resume, model, trained, run_key, args.steps) if args.resume else None
    if state is not None:       # its trained parameters come from the saved fp32 state: read only the rest
        weights = checkpoint_tensors(source, model, skip=set(trained))
    return SimpleNamespace(source=source, model=model, weights=weights, device=device, trained=trained,
                           train_windows=train_windows, eval_windows=eval_windows, run_key=run_key, state=state)


def train_checkpoint(args, run, rank, world, log):
    """Train run.model on its text (see the module docstring). Returns the logged rows and the held-out
    results by step."""
    model, device = run.model, run.device
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:,.2f}M parameters; training "
        + (f"mtp.* only ({n_trained / 1e6:,.2f}M) on the MTP loss" if args.freeze_backbone else
           f"all {n_trained / 1e6:,.2f}M on lm + {args.mtp_loss_weight} * mtp")
        + f", depth {args.mtp_depth}; {world} process(es), global batch {args.batch_size} x {args.seq_len} "
        f"in {args.grad_accum} micro-batch(es) per process; matrix products in {args.precision}")
    if world > 1:
        shard(model)
    materialize(model, run.weights, device)
    prepare(model, args.compile)
    if args.checkpoint_activations:
        checkpoint_activations(model)    # around the compiled layers, if any
    optimizer, scheduler = make_optimizer(model, args.lr, args.steps)
    start = 0
    if run.state is not None:
        load_train_state(args.resume, model, optimizer, run.trained)   # fp32, not the checkpoint's rounding
        scheduler.load_state_dict(run.state["scheduler"])
        # AdamW's saved lr is the saved run's schedule at this step: with more --steps, this run's takes over here
        for group, base, schedule in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * schedule(scheduler.last_epoch)
        torch.set_rng_state(run.state["rng"][rank % len(run.state["rng"])])
        start = run.state["step"]
        log(f"resumed from {args.resume} at step {start}")
    micro = args.batch_size // world // args.grad_accum
    held_out = {}

    def evaluation(step):
        held_out[step] = evaluate_windows(model, run.eval_windows, micro_batch=micro, mtp_depth=args.mtp_depth)
        log(f"held-out at step {step}: {describe_evaluation(held_out[step])}")

    evaluation(start)
    history, began = [], time.time()
    for step in range(start, args.steps):
        ids = global_batch(run.train_windows, step, args.batch_size, args.seed)
        counts = target_counts(ids, args.mtp_depth).to(device)
        mine = ids.chunk(world)[rank].to(device)                    # this process's rows
        terms = all_sum(train_step(model, optimizer, scheduler, mine, mine, counts, mtp_depth=args.mtp_depth,
                                   freeze_backbone=args.freeze_backbone, micro_batches=args.grad_accum,
                                   precision=args.precision)).cpu()
        done, elapsed = step + 1, time.time() - began
        if step % args.log_every == 0 or done == args.steps:
            history.append(log_step(log, step, args.steps, terms, (done - start) * ids.numel() / elapsed,
                                    elapsed / (done - start) * (args.steps - done)))
        if done == args.steps or args.save_every and done % args.save_every == 0:
            save_run(model, optimizer, scheduler, done, run.source, args.out, run.trained, run.run_key, rank)
            log(f"saved {args.out} at step {done}")
        if done == args.steps or args.eval_every and done % args.eval_every == 0:
            evaluation(done)
    return dict(steps=history, held_out=held_out)


# ----------------------------------------------------------------------------------------------
# The demo's decoding: with and without MTP drafts

def timed_generate(model, prompt, new_tokens, runs=3, **options):
    """(ids, tokens per second as the median of `runs`, stats); a short warm-up first. Sampling runs
    get a fresh generator with the same seed each time, so every run produces the same tokens."""
    seed = options.pop("seed", None)
    run = lambda n: generate(model, prompt, n, generator=None if seed is None else
                             torch.Generator().manual_seed(seed), **options)
    run(8)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        ids, stats = run(new_tokens)
        seconds.append(time.perf_counter() - start)
    return ids, (ids.shape[1] - prompt.shape[1]) / sorted(seconds)[runs // 2], stats


def describe_drafting(stats):
    return (f"acceptance per draft position {acceptance_by_position(stats)}; "
            f"{stats['accepted'] / max(stats['main_forwards'], 1):.2f} drafts accepted per verification")


def compare_decoding(model, prompt, new_tokens, draft_counts=(1, 2, 3), sampled_draft_tokens=2, log=print):
    """Greedy-decode the same prompt plainly and with k MTP drafts; check the outputs agree and report
    acceptance and speed; then one sampled run (temperature 0.8, seed 0) with and without drafts.
    Returns the plain greedy ids."""
    plain, plain_speed, _ = timed_generate(model, prompt, new_tokens)
    log(f"plain greedy: {plain_speed:.1f} tokens/s")
    for k in draft_counts:
        ids, speed, stats = timed_generate(model, prompt, new_tokens, draft_tokens=k)
        if not torch.equal(ids, plain):
            raise AssertionError(f"speculative decoding with k={k} changed the output")
        log(f"k={k}: identical output; {describe_drafting(stats)}; {speed:.1f} tokens/s, "
            f"speedup {speed / plain_speed:.2f}x")
    sampled = dict(temperature=0.8, seed=0)
    _, sampled_plain, _ = timed_generate(model, prompt, new_tokens, **sampled)
    k = sampled_draft_tokens
    _, speed, stats = timed_generate(model, prompt, new_tokens, draft_tokens=k, **sampled)
    log(f"sampled (temperature 0.8, seed 0), k={k}: {describe_drafting(stats)}; {speed:.1f} tokens/s, "
        f"plain sampling {sampled_plain:.1f} tokens/s, speedup {speed / sampled_plain:.2f}x")
    return plain


def demo_prompt(held_out, length=200):
    """A held-out prompt [1, length] that ends at the start of a method, so the continuation is code."""
    text = bytes(held_out[:200_000].tolist())
    end = text.find(b"\n    def ", len(text) // 3) + len(b"\n    def ")
    return held_out[end - length:end][None]


def demo(args):
    torch.manual_seed(args.seed)
    train_data, held_out = stdlib_corpus()
    print(f"data: {len(train_data):,} training bytes, {len(held_out):,} held-out bytes (Python stdlib)")
    model = Qwen35(demo_config(args.size))
    model.config.mtp_loss_weight = args.mtp_loss_weight
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, layers {model.config.layer_types}")
    prepare(model, args.compile)
    train(model, train_data, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
          mtp_depth=args.mtp_depth, freeze_backbone=args.freeze_backbone, seed=args.seed,
          time_budget=args.time_budget, precision=args.precision, log_every=args.log_every)
    depths = max(args.mtp_depth, 3)     # the chain as deep as the drafting below, trained that deep or not
    result = evaluate(model, held_out, seq_len=args.seq_len, mtp_depth=depths)
    print(f"held-out: lm loss {result['lm_loss']:.3f}, mtp loss "
          + " ".join(f"{l:.3f}" for l in result["mtp_losses"][:args.mtp_depth]) + " (nats per byte; depth 1 first)")
    print("held-out, teacher-forced: the depth-d head's argmax agrees with the main model's for "
          + ", ".join(f"depth {d} {a:.2f}" for d, a in enumerate(result["acceptance"], start=1))
          + f" (trained to depth {args.mtp_depth})")
    with replaced_atomically(args.out) as directory:
        save_checkpoint(model, directory)
    print(f"saved {args.out}/config.json and model.safetensors")
    prompt = demo_prompt(held_out)
    print(f"prompt (held-out): {bytes(prompt[0].tolist()).decode(errors='replace')!r}")
    ids = compare_decoding(model, prompt, args.new_tokens)
    print("continuation:\n" + bytes(ids[0, prompt.shape[1]:].tolist()).decode(errors="replace"))


# ----------------------------------------------------------------------------------------------
# Command line

CHECKPOINT_ONLY = ["data", "resume", "grad_accum", "save_every", "eval_every", "eval_share", "eval_windows",
                   "checkpoint_activations"]
DEMO_FILES = ["config.json", "model.safetensors"]      # a demo's --out: the next demo run may replace them
DEMO_ONLY = ["size", "time_budget", "new_tokens"]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train Qwen3.5 with its MTP head: the demo (a small model from "
                                     "scratch on the standard library's bytes, then decoding with MTP drafts), "
                                     "or, with --init, a checkpoint on your text.")
    parser.add_argument("--init", help="train this checkpoint (a directory load.py reads) instead of the demo")
    parser.add_argument("--data", nargs="+", help=".txt / .jsonl files or directories of them (default: the "
                        "standard library's .py files)")
    parser.add_argument("--out", help="checkpoint directory (demo: runs/demo)")
    parser.add_argument("--resume", help="continue the run saved in this directory (its --out)")
    parser.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=16, help="the global batch, in sequences")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per process and step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--mtp-loss-weight", type=float, default=0.3)
    parser.add_argument("--mtp-depth", type=int, default=1, help="chain the MTP head D times in training")
    parser.add_argument("--freeze-backbone", action="store_true", help="train only the MTP head")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="bf16: autocast matrix products in training (weights stay fp32); auto: bf16 where "
                        "the device has bf16 kernels (GPUs; CPUs with AVX-512 or ARM bf16), else fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (fast.py's "
                        "compile_long_steps): faster steps on a GPU once the first ones have compiled")
    parser.add_argument("--checkpoint-activations", action="store_true", help="recompute each decoder "
                        "layer's activations in backward: less memory, more time")
    parser.add_argument("--save-every", type=int, default=0, help="also save every N steps (for --resume)")
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps")
    parser.add_argument("--eval-share", type=float, default=0.05, help="share of documents held out (at most 0.5)")
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows evaluated (the same "
                        "ones whatever the number of processes)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=list(DEMO_SIZES), default="medium", help="the demo model's size")
    parser.add_argument("--time-budget", type=float, help="demo: stop training after this many seconds")
    parser.add_argument("--new-tokens", type=int, default=256, help="demo: tokens decoded after training")
    args = parser.parse_args(argv)
    fail = lambda e: parser.exit(2, f"{parser.prog}: error: {e}\n")   # one line, no traceback
    checkpoint_mode = bool(args.init or args.resume)
    if args.init and args.resume:
        fail("--init and --resume: a resumed run continues from the checkpoint saved in --resume; give one")
    other_mode = DEMO_ONLY if checkpoint_mode else CHECKPOINT_ONLY
    if given := [f"--{name.replace('_', '-')}" for name in other_mode
                 if getattr(args, name) != parser.get_default(name)]:
        fail(f"{' '.join(given)}: " + ("the demo's options, not for --init/--resume" if checkpoint_mode
                                       else "for training a checkpoint: give --init"))
    if checkpoint_mode and not args.out:
        fail("--init/--resume need --out, the directory the trained checkpoint goes to")
    # "out/" would put a save's temporary OUT.tmp inside OUT (replaced_atomically writes it beside)
    args.out, args.resume = (path and os.path.normpath(path) for path in (args.out or "runs/demo", args.resume))
    if not checkpoint_mode:
        try:
            check_settings(args, world=1)    # the checkpoint-only ones are at their defaults here
            check_out(args.out, args.overwrite, replaceable=DEMO_FILES)
        except ValueError as e:
            fail(e)
        return demo(args)
    rank, world, device = init_distributed()
    args.precision = resolve_precision(args.precision, device)     # before setup_run: a resume compares it
    log = print if rank == 0 else lambda *a, **k: None
    try:
        run = setup_run(args, world, device, log)
    except (FileNotFoundError, ValueError) as e:
        if rank == 0:
            fail(e)
        sys.exit(2)
    results = train_checkpoint(args, run, rank, world, log)
    if dist.is_initialized():
        # Free the sharded model and its optimizer (reference cycles, which hold the process group) now:
        # freed at interpreter exit instead, gloo's threads aborted 1 run in 6 ("terminate called
        # without an active exception"), after the work was done and saved.
        del run
        gc.collect()
        dist.barrier()                     # no process leaves while another still talks to it
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()

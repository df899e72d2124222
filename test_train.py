"""
Training a checkpoint with train.py --init: tiny official-layout checkpoints trained on text, in process
(train.main) and under torchrun; what the saved checkpoint keeps; the chunked loss; resuming; bad input.

    python -m pytest -q test_train.py
"""

import functools
import glob
import json
import math
import os
import random
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

import fast
import load
import train
from conftest import (EVERY_4TH, REPO, all_tensors, build_oracle, build_vl_oracle, max_diff, new_file_mode,
                      official_config, official_tensors, tiny_model, write_checkpoint, write_sharded_checkpoint,
                      write_word_tokenizer)
from load import load_checkpoint
from qwen35_mtp import linear_cross_entropy
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

PHRASES = ["the cat sat on a mat", "and the dog ran home", "a cat ran on the mat", "the dog sat home"]
SMALL = ["--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--precision", "fp32", "--log-every", "1",
         "--eval-share", "0.25"]


def official_checkpoint(path, moe, sharded, mtp=True):
    """A tiny checkpoint as published: VL-wrapped `model.language_model.*` in bf16, per-expert `mtp.*`
    (or none, and mtp_num_hidden_layers 0), fp32 `model.visual.*`, a word-level tokenizer.json with
    <|endoftext|>; sharded over 3 files with an index, or one file."""
    spec = dict(moe=moe, tied=not moe, layout="official", layer_types=EVERY_4TH, seed=7)
    hf, mtp_oracle = build_oracle(spec)
    vl = build_vl_oracle(hf, spec)
    tensors, config = official_tensors(hf, mtp_oracle, vl, spec), official_config(hf, spec)
    if not mtp:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("mtp.")}
        config["text_config"]["mtp_num_hidden_layers"] = 0
    tensors = {k: v if k.startswith("model.visual.") else v.to(torch.bfloat16) for k, v in tensors.items()}
    if sharded:
        write_sharded_checkpoint(path, tensors, config)
    else:
        write_checkpoint(path, tensors, config)
    write_word_tokenizer(path, 128, end_of_text=True)
    return str(path)


def assert_transformers_agrees(path, official_class):
    """transformers' official class reads the checkpoint and gives our logits."""
    ours = load_checkpoint(path, dtype=torch.float32)
    theirs = official_class.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert max_diff(theirs(input_ids=ids).logits, ours(ids).logits) <= 1e-5


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Twelve .txt documents and a .jsonl of six more, from four phrases."""
    path = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    document = lambda: " ".join(rng.choice(PHRASES) for _ in range(40))
    for i in range(12):
        (path / f"{i:02d}.txt").write_text(document())
    (path / "more.jsonl").write_text("".join(json.dumps({"text": document()}) + "\n" for _ in range(6)))
    return str(path)


def run(*args):
    return train.main([str(a) for a in args])


def saved_weights(out):
    """The fp32 trained weights a run saved in OUT/train_state (torch.distributed.checkpoint's files), whole."""
    path = os.path.join(out, train.STATE)
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    weights = {key.removeprefix("weights."): torch.empty(m.size, dtype=m.properties.dtype)
               for key, m in metadata.items() if key.startswith("weights.")}
    train.sharded_checkpoint(dcp.load, {"weights": weights}, path)
    return weights


def bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def layout(path):
    """{key: (file, shape, dtype)} and the other files of a checkpoint directory."""
    keys = {}
    for file in load.checkpoint_files(path):
        with load.safe_open(file, "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                keys[key] = (os.path.basename(file), tuple(t.get_shape()), t.get_dtype())
    return keys, sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))


@pytest.fixture(scope="module")
def head_only(tmp_path_factory, text):
    """Eight head-only steps on a dense, tied, sharded official checkpoint (the run several tests read),
    logged every 3rd step."""
    root = tmp_path_factory.mktemp("head-only")
    source = official_checkpoint(root / "in", moe=False, sharded=True)
    results = run("--init", source, "--data", text, "--out", root / "out", "--freeze-backbone", "--steps", 8, *SMALL,
                  "--log-every", 3)
    return source, str(root / "out"), results


def test_head_only_training_changes_only_mtp_and_keeps_the_layout(head_only):
    """Only mtp.* changes, every other tensor is bit-identical (the vision tower's fp32 ones included);
    files, index, names, shapes, dtypes, config.json and tokenizer.json are the input's; the held-out
    MTP loss goes down while the frozen model's LM loss stays exactly the same; transformers' official
    class loads the result and gives our logits."""
    source, out, results = head_only
    assert layout(out) == layout(source)
    for name in ("config.json", "tokenizer.json", "model.safetensors.index.json"):
        assert open(os.path.join(out, name)).read() == open(os.path.join(source, name)).read()
    before, after = all_tensors(source), all_tensors(out)
    changed = {k for k in before if not torch.equal(bits(before[k]), bits(after[k]))}
    assert changed == {k for k in before if k.startswith("mtp.")}
    assert [row["step"] for row in results["steps"]] == [0, 3, 6, 7]     # every 3rd step, and the last
    first, last = results["held_out"][0], results["held_out"][8]
    assert last["mtp_losses"][0] < first["mtp_losses"][0] - 0.5, results["held_out"]
    assert last["lm_loss"] == first["lm_loss"]
    assert_transformers_agrees(out, Qwen3_5ForConditionalGeneration)


def test_full_training_of_a_moe_checkpoint_writes_every_trained_tensor(tmp_path, text):
    """Everything but the vision tower trains; the single-file layout, the fused main experts and the
    per-expert MTP experts are kept; each written tensor is the trained fp32 value cast to bf16;
    load.py and transformers read it back."""
    source = official_checkpoint(tmp_path / "in", moe=True, sharded=False)
    run("--init", source, "--data", text, "--out", tmp_path / "out", "--steps", 2, "--mtp-depth", 2, *SMALL)
    out = str(tmp_path / "out")
    assert layout(out) == layout(source)
    before, after = all_tensors(source), all_tensors(out)
    assert {k for k in before if torch.equal(bits(before[k]), bits(after[k]))} == \
        {k for k in before if k.startswith("model.visual.")}
    trained = saved_weights(out)
    loaded = dict(load_checkpoint(out).named_parameters())
    assert all(torch.equal(bits(loaded[n]), bits(w.to(torch.bfloat16))) for n, w in trained.items())
    assert_transformers_agrees(out, Qwen3_5MoeForConditionalGeneration)


@pytest.mark.parametrize("moe, sharded", [(False, True), (True, False)])
def test_a_checkpoint_without_mtp_gets_an_official_style_head(tmp_path, text, moe, sharded, capsys):
    """A fresh head (and the log says so) is written as top-level mtp.* keys, experts per expert: in one
    more shard listed in the index (whose total_size counts it), or in the single file; config.json then
    counts its layer."""
    source = official_checkpoint(tmp_path / "in", moe=moe, sharded=sharded, mtp=False)
    run("--init", source, "--data", text, "--out", tmp_path / "out", "--freeze-backbone", "--steps", 1, *SMALL)
    assert "has no MTP head (no mtp.* tensors): training a freshly initialised one" in capsys.readouterr().out
    out = str(tmp_path / "out")
    keys, _ = layout(out)
    old_keys, _ = layout(source)
    added = {k: file for k, (file, _, dtype) in keys.items() if k not in old_keys}
    assert added and all(k.startswith("mtp.") for k in added) and {keys[k][2] for k in added} == {"BF16"}
    assert all(keys[k] == old_keys[k] for k in old_keys)
    assert set(added.values()) == {load.MTP_SHARD if sharded else "model.safetensors"}
    if sharded:                       # the index's total_size (tensor bytes) counts the added shard
        with open(os.path.join(out, load.INDEX)) as f:
            assert json.load(f)["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                                 for t in all_tensors(out).values())
    mode = lambda *path: os.stat(os.path.join(*path)).st_mode & 0o777    # a rewritten file keeps its mode
    for f in os.listdir(out):
        if os.path.isfile(os.path.join(out, f)):
            assert mode(out, f) == (mode(source, f) if os.path.exists(os.path.join(source, f)) else new_file_mode()), f
    if moe:
        assert "mtp.layers.0.mlp.experts.5.up_proj.weight" in added
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["text_config"]["mtp_num_hidden_layers"] == 1
    trained = saved_weights(out)
    loaded = dict(load_checkpoint(out).named_parameters())
    assert all(torch.equal(bits(loaded[n]), bits(w.to(torch.bfloat16))) for n, w in trained.items())


def test_chunked_cross_entropy_equals_the_plain_one():
    """linear_cross_entropy over chunks of 7 rows: the same sum, argmax and gradients as cross-entropy
    on the full logits, -100 targets included; and forward(logits=False) gives the losses and gradients
    of forward(logits=True), with the logits' argmax as predictions."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 20, 16, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (3, 20), generator=g).masked_fill(torch.rand(3, 20, generator=g) < 0.3, -100)
    loss, argmax = linear_cross_entropy(h, W, t, rows=7)
    grads = torch.autograd.grad(loss * 0.3, (h, W))
    expected = F.cross_entropy(F.linear(h, W).flatten(0, 1), t.flatten(), reduction="sum")
    assert torch.allclose(loss, expected, rtol=1e-12) and torch.equal(argmax, F.linear(h, W).argmax(-1))
    for got, want in zip(grads, torch.autograd.grad(expected * 0.3, (h, W))):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)

    model = tiny_model(moe=True)
    ids = torch.randint(0, 128, (2, 30), generator=g)
    labels = ids.masked_fill(torch.rand(2, 30, generator=g) < 0.3, -100)
    outs, grads = [], []
    for logits in (True, False):
        out = model(ids, labels=labels, mtp_depth=2, logits=logits)
        grads.append(torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True))
        outs.append(out)
    plain, chunked = outs
    assert chunked.logits is None and chunked.mtp_logits is None
    for name in ("loss", "lm_loss", "mtp_loss", "loss_sums"):
        assert torch.allclose(getattr(chunked, name), getattr(plain, name), rtol=1e-6), name
    assert torch.equal(chunked.loss_counts, plain.loss_counts)
    assert all(a is b is None or (a - b).abs().max() <= 1e-6 for a, b in zip(*grads))
    assert torch.allclose(torch.stack(chunked.mtp_losses), torch.stack(plain.mtp_losses), rtol=1e-6)
    assert all(torch.equal(p, l.argmax(-1)) for p, l in zip(chunked.predictions,
                                                            [plain.logits] + plain.mtp_logits_per_depth))


@pytest.mark.parametrize("labelled", ["uneven", "short answers"])
def test_micro_batches_share_the_global_token_count(labelled):
    """train_step over 3 micro-batches applies the gradient of the model's own loss over the whole batch: each
    term is divided by its target count in the whole batch, with -100 labels placed unevenly, or leaving
    depth 2 no target at all (real labels at positions 1 and 2 only: the depth is left out of mtp_loss
    rather than put a NaN in every gradient)."""
    ids = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(3))
    labels = ids.masked_fill(torch.rand(6, 24, generator=torch.Generator().manual_seed(4))
                             < torch.linspace(0.1, 0.9, 6)[:, None], -100)
    if labelled == "short answers":
        labels = torch.full_like(ids, -100)
        labels[:, 1:3] = ids[:, 1:3]
        assert train.target_counts(labels, 2).tolist() == [12, 6, 0]
    stepped, whole = tiny_model(seed=5), tiny_model(seed=5)
    train.set_trainable(stepped, freeze_backbone=False)
    optimizer, scheduler = train.make_optimizer(stepped, 1e-3, 10)
    applied = []
    optimizer.register_step_pre_hook(lambda *_: applied.extend(p.grad.clone() for p in stepped.parameters()))
    terms = train.train_step(stepped, optimizer, scheduler, ids, labels, train.target_counts(labels, 2), mtp_depth=2,
                             freeze_backbone=False, micro_batches=3, precision="fp32")
    out = whole(ids, labels=labels, mtp_depth=2)
    out.loss.backward()
    # what train.py logs: the whole batch's lm_loss and mtp_losses (NaN for a depth without targets)
    assert torch.allclose(terms, torch.stack([out.lm_loss, *out.mtp_losses]).detach(), rtol=1e-6, equal_nan=True)
    torch.nn.utils.clip_grad_norm_(list(whole.parameters()), 1.0)       # as train_step does
    assert all(a.isfinite().all() and (a - p.grad).abs().max() <= 1e-6 for a, p in zip(applied, whole.parameters()))


def test_batches_depend_on_seed_and_step_only():
    """Each epoch is a permutation of the windows; a batch may run across an epoch's end."""
    windows = torch.arange(10)[:, None]
    stream = torch.cat([train.global_batch(windows, step, 4, seed=3) for step in range(5)])[:, 0]
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:20].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:20])                     # a fresh order each epoch
    assert torch.equal(train.global_batch(windows, 2, 4, seed=3), train.global_batch(windows, 2, 4, seed=3))
    assert not torch.equal(train.global_batch(windows, 2, 4, seed=3), train.global_batch(windows, 2, 4, seed=4))


def test_seeds_do_not_share_epochs():
    """Seed s's epoch e + 1 is not seed s + 1's epoch e (a seed mixed in as seed + epoch would make it so)."""
    windows = torch.arange(10)[:, None]
    assert not torch.equal(train.global_batch(windows, 1, 10, seed=0), train.global_batch(windows, 0, 10, seed=1))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_is_bf16_only_where_the_device_has_bf16_kernels(monkeypatch, device, native):
    """--precision auto: bf16 autocast on a GPU that supports bf16 and on a CPU for which oneDNN reports
    bf16 kernels, fp32 elsewhere (a CPU without them runs bf16 products 15x slower than fp32); an
    explicit choice is kept whatever the device."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: native and device == "cuda")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native and device == "cpu")
    assert train.resolve_precision("auto", torch.device(device)) == ("bf16" if native else "fp32")
    for explicit in ("bf16", "fp32"):
        assert train.resolve_precision(explicit, torch.device(device)) == explicit


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_trains_as_the_precision_it_names(monkeypatch, tmp_path, text, head_only, native):
    """train.py --init with --precision auto: the run logs the precision it chose, trains exactly as that
    precision given by name does (the same fp32 weights after 2 steps), and saves that name in run.pt,
    which a resume compares."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    chosen = "bf16" if native else "fp32"
    common = ["--init", head_only[0], "--data", text, "--steps", 2, "--freeze-backbone", *SMALL]
    lines = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    run(*common, "--precision", "auto", "--out", tmp_path / "auto")
    run(*common, "--precision", chosen, "--out", tmp_path / "named")
    assert sum(line.endswith(f"matrix products in {chosen}") for line in lines) == 2
    a, b = (saved_weights(tmp_path / d) for d in ("auto", "named"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(tmp_path / "auto" / train.RUN, weights_only=True)["data"]["precision"] == chosen


def test_held_out_figures_are_means_over_all_tokens_whatever_the_micro_batches():
    """evaluate_windows over 5 windows in micro-batches of 2 (the last one smaller): each loss is the mean
    over every target token and the acceptance the share of all positions, as one forward over the 5 gives
    them, not a mean of the micro-batches' means."""
    model = tiny_model().eval()
    windows = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(3))
    got = train.evaluate_windows(model, windows, micro_batch=2, mtp_depth=2)
    with torch.no_grad():
        out = model(windows, labels=windows, mtp_depth=2)
    assert got["lm_loss"] == pytest.approx(out.lm_loss.item(), rel=1e-6, abs=0)
    assert got["mtp_losses"] == pytest.approx([l.item() for l in out.mtp_losses], rel=1e-6, abs=0)
    assert got["acceptance"] == [hits / n for hits, n in train.acceptance_counts(out)]


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_held_out_shares_sum_to_one_process_whatever_the_process_count(world):
    """held_out_totals of 5 windows shared among `world` processes (micro-batches of 2): each process runs
    ceil(5 / world) windows, the short shares padded with filler, and the shares add up to what one
    process counts over the 5 (the filler scored nowhere)."""
    model = tiny_model().eval()
    windows = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(4))
    one = train.held_out_totals(model, windows, micro_batch=2, mtp_depth=2)
    calls = []
    original = model.forward
    model.forward = lambda x, **kw: calls.append(len(x)) or original(x, **kw)
    shares = [train.held_out_totals(model, windows, micro_batch=2, mtp_depth=2, rank=r, world=world)
              for r in range(world)]
    share = -(-5 // world)
    assert sum(calls) == world * share and len(calls) == world * -(-share // 2)   # the same batches everywhere
    assert torch.equal(sum(shares)[1:], one[1:])                    # counts, hits and positions exactly
    assert torch.allclose(sum(shares)[0], one[0], rtol=1e-6, atol=0)
    assert one[1, 0] == one[3, 1] == 5 * 11          # 5 windows of 12: 11 targets and 11 depth-1 positions each


def test_resumed_run_gives_the_same_losses(head_only, tmp_path, text, monkeypatch):
    """Stopped right after the save at step 3, then resumed with --resume: the same losses at steps 3-5 as
    a run never stopped (bit for bit), the same held-out figures at the same steps (--eval-every 2: at the
    start, every 2nd step and the last), and the same checkpoint (the directory given as "cut/"), saved at
    step 6 (the last step, a multiple of --save-every too), with no OUT.previous left beside it."""
    source = head_only[0]
    common = ["--data", text, "--steps", 6, "--save-every", 3, "--eval-every", 2, "--mtp-depth", 2, *SMALL]
    whole = run("--init", source, "--out", tmp_path / "whole", *common)
    save = train.save_run

    def save_then_stop(*args):
        save(*args)
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_run", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run("--init", source, "--out", tmp_path / "cut", *common)
    monkeypatch.setattr(train, "save_run", save)
    resumed = run("--resume", f"{tmp_path}/cut/", "--out", f"{tmp_path}/cut/", *common)    # as a shell completes
    losses = lambda rows: [(r["step"], r["lm_loss"], r["mtp_losses"]) for r in rows]
    assert losses(resumed["steps"]) == losses(whole["steps"])[3:] and len(resumed["steps"]) == 3
    assert list(whole["held_out"]) == [0, 2, 4, 6] and list(resumed["held_out"]) == [3, 4, 6]
    assert all(resumed["held_out"][step] == whole["held_out"][step] for step in (4, 6))
    a, b = all_tensors(tmp_path / "whole"), all_tensors(tmp_path / "cut")
    assert all(torch.equal(bits(a[k]), bits(b[k])) for k in a)
    for d in ("whole", "cut"):
        assert torch.load(tmp_path / d / train.RUN, weights_only=True)["step"] == 6
        assert not os.path.exists(tmp_path / f"{d}.previous") and not os.path.exists(tmp_path / f"{d}.tmp")


@pytest.mark.subprocess
@pytest.mark.parametrize("source", ["dense", "moe-without-head"])
def test_torchrun_two_processes_reach_the_weights_of_one(tmp_path, text, head_only, source):
    """torchrun --nproc-per-node 2 (gloo, FSDP2, activation checkpointing), two micro-batches each, full
    training at depth 2: the same losses and, after 4 AdamW steps, the same fp32 weights as one process
    (up to the order of float additions). Each process reads the checkpoint into its own shards only
    (train.materialize), from a dense tied checkpoint with an MTP head, and from a sharded MoE one
    without: the fresh head's initial weights go in the same way. Both score the same 3 held-out windows.
    What the two processes saved (each its own shards of train_state/) then resumes in one process as
    what one process saved does."""
    init = head_only[0] if source == "dense" else official_checkpoint(tmp_path / "in", moe=True, sharded=True,
                                                                       mtp=False)
    common = ["--init", init, "--data", text, "--steps", 4, "--grad-accum", 2, "--mtp-depth", 2, "--eval-windows", 3,
              *SMALL]
    one = run(*common, "--out", tmp_path / "one")
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
                             "--nproc-per-node", "2", "train.py", *map(str, common), "--checkpoint-activations",
                             "--out", str(tmp_path / "two")],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [line.split()[3] for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [f"{r['lm_loss']:.3f}" for r in one["steps"]] == logged and result.stdout.count("saved ") == 1
    # the same 3 held-out windows (one process runs a filler window): the same figures before training
    assert "3 windows evaluated" in result.stdout
    assert f"held-out at step 0: {train.describe_evaluation(one['held_out'][0])}\n" in result.stdout
    a, b = (saved_weights(tmp_path / d) for d in ("one", "two"))
    assert a.keys() == b.keys() and max_diff_all(a, b) <= 1e-4
    # what two processes saved (each its own shards) resumes in one as what one process saved does
    resume = lambda d: run(*common[2:], "--steps", 6, "--resume", tmp_path / d, "--out", tmp_path / f"{d}-more")
    losses = lambda rows: [(r["lm_loss"], *r["mtp_losses"]) for r in rows]
    more_one, more_two = resume("one"), resume("two")
    assert len(more_two["steps"]) == 2
    assert torch.allclose(torch.tensor(losses(more_two["steps"])), torch.tensor(losses(more_one["steps"])), rtol=1e-5)
    a, b = (saved_weights(tmp_path / f"{d}-more") for d in ("one", "two"))
    assert max_diff_all(a, b) <= 1e-4 and max_diff_all(a, saved_weights(tmp_path / "one")) > 1e-3


def test_compiled_layers_train_as_eager_ones(tmp_path, text, head_only, monkeypatch):
    """--compile (each decoder layer through torch.compile: fast.compile_long_steps, here with the
    aot_eager backend, inductor's capture without its code generation), with activation checkpointing
    around the compiled layers: full training at depth 2 logs the same losses and reaches the same fp32
    weights as the eager run (up to the order of float additions). At lr 1e-3: AdamW turns rounding in
    near-zero gradients into steps of up to lr's size (8e-6 apart after 3 steps at 1e-2, 8e-7 at 1e-3)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    monkeypatch.setattr(train, "compile_long_steps", functools.partial(fast.compile_long_steps, backend="aot_eager"))
    common = ["--init", head_only[0], "--data", text, "--steps", 3, "--mtp-depth", 2, "--checkpoint-activations",
              *SMALL, "--lr", "1e-3"]
    eager = run(*common, "--out", tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    compiled = run(*common, "--compile", "--out", tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] > 0
    torch._dynamo.reset()
    losses = lambda rows: [(r["lm_loss"], *r["mtp_losses"]) for r in rows]
    assert torch.allclose(torch.tensor(losses(compiled["steps"])), torch.tensor(losses(eager["steps"])), rtol=1e-5)
    a, b = (saved_weights(tmp_path / d) for d in ("eager", "compiled"))
    assert a.keys() == b.keys() and max_diff_all(a, b) <= 1e-5


def max_diff_all(a, b):
    return max(max_diff(a[k], b[k]) for k in a)


@pytest.mark.parametrize("moe, mtp", [(True, True), (False, False)])
def test_save_reads_each_value_in_the_order_updated_files_gives(tmp_path, moe, mtp):
    """Under torchrun, process 0's save_updated and the other processes' walk over load.updated_files
    must gather the same parameters in the same order (else a gather waits forever): save_updated reads
    exactly that sequence, each value once per file, over three shards and an added head's shard."""
    source = official_checkpoint(tmp_path / "in", moe=moe, sharded=True, mtp=mtp)
    model = load.checkpoint_model(source)
    if not mtp:
        train.add_mtp_head(model)
    names = train.set_trainable(model, freeze_backbone=False)
    values = {name: torch.zeros(p.shape) for name, p in model.named_parameters()}
    reads = []

    class Recorded(dict):
        def __getitem__(self, name):
            reads.append(name)
            return super().__getitem__(name)
    load.save_updated(source, str(tmp_path / "out"), Recorded((name, values[name]) for name in names))
    plan = load.updated_files(source, names)
    if not moe:       # tied: a state_dict()'s lm_head.weight is the embedding, which the plan holds already
        assert load.updated_files(source, [*names, "lm_head.weight"]) == plan
    assert reads == [name for _, wanted in plan for name in wanted] and sorted(set(reads)) == sorted(names)
    assert len(plan) == 3 + (not mtp) and (plan[-1][0] is None) == (not mtp)


def test_killed_save_leaves_the_previous_checkpoint(head_only, tmp_path, text, monkeypatch):
    """A save that dies half-way (here: after its first shard) leaves --out exactly as it was."""
    out = tmp_path / "out"
    shutil.copytree(head_only[1], out)
    files = {name: (out / name).read_bytes() for name in os.listdir(out) if (out / name).is_file()}
    save_file, writes = load.save_file, []

    def fail_second(*args, **kwargs):
        writes.append(args)
        if len(writes) == 2:
            raise OSError("disk full")
        return save_file(*args, **kwargs)
    monkeypatch.setattr(load, "save_file", fail_second)
    with pytest.raises(OSError, match="disk full"):
        run("--resume", out, "--out", out, "--data", text, "--steps", 9, "--freeze-backbone", *SMALL)
    assert {name: (out / name).read_bytes() for name in files} == files
    assert not os.path.exists(f"{out}.tmp") and not os.path.exists(f"{out}.previous")


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, head_only):
    """Files the bad-input cases point at."""
    root = tmp_path_factory.mktemp("bad")
    for name, content in [("empty/a.txt", ""), ("empty/b.txt", ""), ("short/a.txt", "the cat"),
                          ("short/b.txt", "the dog"), ("unknown/a.txt", "the zebra sat"), ("unknown/b.txt", "a cat"),
                          ("huge/a.txt", "the huge cat"), ("huge/b.txt", "a cat"), ("one/a.txt", "the cat sat"),
                          ("bad.jsonl", '{"text": "the cat"}\n{"txt": "the dog"}\n'), ("notes.md", "the cat")]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    no_tokenizer = root / "no-tokenizer"
    shutil.copytree(head_only[0], no_tokenizer)
    os.remove(no_tokenizer / "tokenizer.json")
    taken = root / "taken"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    (root / "killed.previous").mkdir()             # a save killed between its two renames left only this
    (root / "killed.previous" / "config.json").write_text("{}")
    damaged, partial = root / "damaged", root / "partial"     # a saved run's train_state, broken two ways
    for broken in (damaged, partial):
        shutil.copytree(head_only[1], broken)
    (damaged / train.RUN).write_bytes(b"not a torch.save file")
    os.remove(sorted(glob.glob(str(partial / train.STATE / "*.distcp")))[0])
    return root


BAD = [  # (arguments, beyond --init/--data/--out, message)
    (["--data", "{root}/missing"], "--data {root}/missing: no such file or directory"),
    (["--data", "{root}/empty"], "--data holds no text: 2 file(s), all empty"),
    (["--data", "{root}/notes.md"], "expected a .txt or .jsonl file, or a directory"),
    (["--data", "{root}/bad.jsonl"], 'bad.jsonl:2: expected a JSON object with a "text" string'),
    (["--data", "{root}/one"], "--data holds one document; at least two are needed"),
    (["--data", "{root}/short"], "shorter than one window of --seq-len 32"),
    (["--data", "{root}/unknown"], "unknown/a.txt: the tokenizer cannot encode this text"),
    (["--data", "{root}/huge"], "huge/a.txt: encodes to token ids outside the model's vocabulary [0, 128)"),
    (["--init", "{root}/no-tokenizer"], "has no tokenizer.json (only byte-level checkpoints, vocab 256, go without)"),
    (["--out", "{root}/taken"], "--out {root}/taken already holds files (another checkpoint?); --overwrite replaces it"),
    (["--resume", "{out}", "--init", None], "--resume {out}: the saved state does not match this model"),
    (["--resume", "{out}"], "--init and --resume: a resumed run continues from the checkpoint saved in --resume"),
    (["--eval-share", "0.7"], "--eval-share must be in (0, 0.5], not 0.7"),
    (["--batch-size", "6", "--grad-accum", "4"], "--batch-size 6 must be a multiple of processes (1) x --grad-accum (4)"),
    (["--size", "tiny"], "--size: the demo's options, not for --init/--resume"),
    (["--log-every", "0"], "--log-every must be > 0, not 0"),
    (["--lr", "nan"], "--lr must be > 0, not nan"),
    (["--seq-len", "2"], "--seq-len must be >= 3, not 2"),
    (["--grad-accum", "0"], "--grad-accum must be > 0, not 0"),
    (["--eval-windows", "0"], "--eval-windows must be > 0, not 0"),
    (["--lr", "inf"], "--lr must be finite, not inf"),
    (["--mtp-loss-weight", "-1"], "--mtp-loss-weight must be >= 0, not -1.0"),
    (["--save-every", "-1"], "--save-every must be >= 0, not -1"),
    (["--out", "{root}/killed"], "--out {root}/killed: {root}/killed.previous holds the last save of a run killed"),
    (["--resume", "{root}/damaged", "--init", None], "--resume {root}/damaged: train_state cannot be read ("),
    (["--resume", "{root}/partial", "--init", None], "--resume {root}/partial: train_state lacks 1 of its shard files"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[m.split(":")[0][:40] for _, m in BAD])
def test_bad_input_is_one_line_and_exit_2(bad_inputs, head_only, text, tmp_path, capsys, args, message):
    """Each bad input: exit code 2, one line naming the problem, and nothing written."""
    fill = lambda s: s.format(root=bad_inputs, out=head_only[1])
    given = {"--init": head_only[0], "--data": text, "--out": str(tmp_path / "out")}
    extra = []
    for flag, value in zip(args[::2], args[1::2]):
        if flag in given:
            given[flag] = value and fill(value)
        else:
            extra += [flag, fill(value)]
    argv = [x for flag, value in given.items() if value for x in (flag, value)] + ["--steps", "2", *SMALL] + extra
    with pytest.raises(SystemExit) as exit:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and fill(message) in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "out")
    assert os.listdir(bad_inputs / "taken") == ["config.json"]
    assert os.listdir(bad_inputs / "killed.previous") == ["config.json"]


@pytest.mark.parametrize("args, message", [
    (["--log-every", "0"], "--log-every must be > 0, not 0"),
    (["--time-budget", "nan"], "--time-budget must be > 0 seconds, not nan"),
    (["--new-tokens", "0"], "--new-tokens must be > 0, not 0"),
    (["--out", "{taken}"], "--out {taken} already holds files (another checkpoint?); --overwrite replaces it"),
])
def test_demo_settings_are_checked_before_training(tmp_path, capsys, args, message):
    """The demo's --out may hold a demo's own two files (a rerun replaces them), nothing else."""
    taken = tmp_path / "taken"
    taken.mkdir()
    for name in [*train.DEMO_FILES, "model.safetensors.index.json"]:
        (taken / name).write_text("{}")
    with pytest.raises(SystemExit) as exit:
        train.main([a.format(taken=taken) for a in args] + ["--steps", "1"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message.format(taken=taken) in err and err.count("\n") == 1, err
    os.remove(taken / "model.safetensors.index.json")
    train.check_out(str(taken), overwrite=False, replaceable=train.DEMO_FILES)      # a demo's own: accepted


def settings(**changes):
    """train.py's defaults (the arguments check_settings reads), with changes."""
    return SimpleNamespace(**{**dict(steps=240, batch_size=16, grad_accum=1, lr=2e-3, log_every=10, new_tokens=256,
                                     eval_windows=32, mtp_loss_weight=0.3, save_every=0, eval_every=0, time_budget=None,
                                     seq_len=256, mtp_depth=1, eval_share=0.05), **changes})


@pytest.mark.parametrize("world, changes, message", [
    (1, dict(steps=0), "--steps must be > 0, not 0"),
    (1, dict(batch_size=0), "--batch-size must be > 0, not 0"),
    (1, dict(grad_accum=0), "--grad-accum must be > 0, not 0"),
    (1, dict(eval_every=-1), "--eval-every must be >= 0, not -1"),
    (1, dict(mtp_loss_weight=math.inf), "--mtp-loss-weight must be finite, not inf"),
    (1, dict(mtp_loss_weight=math.nan), "--mtp-loss-weight must be >= 0, not nan"),
    (1, dict(time_budget=0.0), "--time-budget must be > 0 seconds, not 0.0"),
    (1, dict(seq_len=32, mtp_depth=31), "--mtp-depth must be in 1..seq_len - 2 = 30"),
    (1, dict(mtp_depth=0), "--mtp-depth must be in 1..seq_len - 2 = 254"),
    (1, dict(eval_share=0.0), "--eval-share must be in (0, 0.5], not 0.0"),
    (2, dict(batch_size=6, grad_accum=2), "--batch-size 6 must be a multiple of processes (2) x --grad-accum (2)"),
    (1, dict(seq_len=32, mtp_depth=30, eval_share=0.5, time_budget=0.5), None),
    (1, dict(seq_len=3), None),
    (2, dict(batch_size=12, grad_accum=3), None),
])
def test_check_settings_names_the_one_bad_setting(world, changes, message):
    """Each bad setting alone: exactly its message (a ValueError, which main prints as one line); the edges of
    each range are accepted."""
    if message is None:
        train.check_settings(settings(**changes), world)
    else:
        with pytest.raises(ValueError) as error:
            train.check_settings(settings(**changes), world)
        assert str(error.value) == message


def test_check_out_refuses_a_file_and_a_checkpoint_unless_overwrite(tmp_path):
    """--out may be missing or empty; a file or a directory with files in it is refused, unless --overwrite.
    With both OUT and OUT.previous (a save killed after its second rename), OUT is what is refused."""
    file, taken = str(tmp_path / "file"), str(tmp_path / "taken")
    open(file, "w").close()
    os.mkdir(taken)
    open(os.path.join(taken, "config.json"), "w").close()
    os.mkdir(tmp_path / "empty")
    train.check_out(str(tmp_path / "missing"), overwrite=False)
    train.check_out(str(tmp_path / "empty"), overwrite=False)
    for out in (file, taken):
        with pytest.raises(ValueError, match=f"^--out {out} already holds files"):
            train.check_out(out, overwrite=False)
        train.check_out(out, overwrite=True)
    os.mkdir(taken + ".previous")
    with pytest.raises(ValueError, match=f"^--out {taken} already holds files"):
        train.check_out(taken, overwrite=False)
    train.check_out(taken, overwrite=True)


def test_resume_keeps_the_saved_options_and_may_add_steps(head_only, text, tmp_path, capsys, monkeypatch):
    """head_only saved its run at step 8 of 8 (--lr 1e-2, depth 1). Resumed with another --lr or depth,
    or with no step left: refused, naming the options. With --steps 12: steps 8-11 run at the lr of a
    12-step schedule, the first of them too (not at the saved 8-step schedule's last lr)."""
    out, common = head_only[1], ["--data", text, "--freeze-backbone", *SMALL]
    for extra, message in [(["--steps", 9, "--lr", 0.5, "--mtp-depth", 2],
                            f"--resume {out}: saved by a run with --lr 0.01 (now 0.5), --mtp-depth 1 (now 2)"),
                           (["--steps", 9, "--data", *(os.path.join(text, f"0{i}.txt") for i in range(4))],
                            f"--resume {out}: saved by a run with other training text ("),
                           (["--steps", 9, "--seed", 1, "--batch-size", 8, "--seq-len", 16, "--eval-share", 0.5,
                             "--mtp-loss-weight", 0.5, "--precision", "bf16"],
                            f"--resume {out}: saved by a run with --seed 0 (now 1), --batch-size 4 (now 8), --seq-len "
                            "32 (now 16), --eval-share 0.25 (now 0.5), --mtp-loss-weight 0.3 (now 0.5), --precision "
                            "fp32 (now bf16), other training text ("),
                           (["--steps", 8], f"--steps 8: the run in {out} was saved at step 8; give more")]:
        with pytest.raises(SystemExit) as exit:
            run("--resume", out, "--out", tmp_path / "more", *common, *extra)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and message in err and err.count("\n") == 1, err
    lrs, train_step = [], train.train_step
    def recording(model, optimizer, *args, **kwargs):
        lrs.append(optimizer.param_groups[0]["lr"])
        return train_step(model, optimizer, *args, **kwargs)
    monkeypatch.setattr(train, "train_step", recording)
    run("--resume", out, "--out", tmp_path / "more", *common, "--steps", 12)
    optimizer, scheduler = train.make_optimizer(torch.nn.Linear(2, 2), 1e-2, 12)
    planned = []
    for _ in range(12):
        planned.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == planned[8:]


def test_data_files_are_read_once(text):
    """A file named twice, or named and inside a directory named, is one document (it could otherwise
    be held out and trained on)."""
    files = train.data_files([text, os.path.join(text, "00.txt"), os.path.join(text, ".", "00.txt")])
    assert files == train.data_files([text]) and len(files) == 13


def test_data_files_are_the_txt_and_jsonl_files_under_a_directory_sorted(tmp_path):
    """A directory gives its .txt and .jsonl files, in subdirectories too, sorted by path; one without any is
    refused."""
    for name in ["b.txt", "a.jsonl", "notes.md", "sub/c.txt", "sub/d.py", "none/notes.md"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    root = str(tmp_path)
    assert train.data_files([root]) == [os.path.join(root, n) for n in ["a.jsonl", "b.txt", "sub/c.txt"]]
    with pytest.raises(ValueError, match=f"^--data {root}/none: no .txt or .jsonl files in this directory$"):
        train.data_files([os.path.join(root, "none")])


def test_read_documents_numbers_jsonl_lines_and_names_the_bad_one(tmp_path):
    """A .jsonl line is a document named FILE:LINE (blank lines skipped but counted); any other file (the
    default data's .py files too) is one document, whole. Bad input: a ValueError naming the file (and line)."""
    files = {"a.jsonl": '{"text": "one"}\n\n{"text": "three", "id": 3}\n', "b.py": 'import os\n{"text": 1}\n',
             "list.jsonl": '{"text": "one"}\n[1]\n', "number.jsonl": '{"text": 5}\n', "broken.jsonl": '{"text": "a"}\n{oops\n'}
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    at = lambda name: str(tmp_path / name)
    assert train.read_documents([at("a.jsonl"), at("b.py")]) == [
        (at("a.jsonl") + ":1", "one"), (at("a.jsonl") + ":3", "three"), (at("b.py"), files["b.py"])]
    for name, message in [("list.jsonl", ':2: expected a JSON object with a "text" string'),
                          ("number.jsonl", ':1: expected a JSON object with a "text" string'),
                          ("broken.jsonl", ":2: not JSON ("), ("latin1.txt", ": not UTF-8 text (")]:
        with pytest.raises(ValueError) as error:
            train.read_documents([at(name)])
        assert str(error.value).startswith(at(name) + message), error.value


def test_tokenize_keeps_ids_inside_the_vocabulary():
    """Ids 0 .. vocab_size - 1 pass, eos after each document; an id of vocab_size, or below 0, is refused, naming
    the document."""
    encode = lambda texts: [[int(word) for word in text.split()] for text in texts]
    documents = [("a", "0 127"), ("b", "5"), ("c", "1 2")]
    trained, held = train.tokenize(documents, encode, 127, 128, 2)
    assert trained.tolist() == [5, 127] and held.tolist() == [0, 127, 127, 1, 2, 127] and held.dtype == torch.int32
    for bad in ["1 128", "-1 3"]:
        with pytest.raises(ValueError, match=r"^b: encodes to token ids outside the model's vocabulary \[0, 128\)$"):
            train.tokenize([("a", "0"), ("b", bad)], encode, None, 128, 2)


def test_a_byte_level_checkpoint_reads_utf8_bytes_and_its_first_eos(tmp_path):
    """Without tokenizer.json (vocab 256): each text's UTF-8 bytes; the end of text is config.eos_token_id, the
    first of a list."""
    encode, eos, described = train.text_encoder(str(tmp_path), SimpleNamespace(vocab_size=256, eos_token_id=[3, 4]))
    assert [list(ids) for ids in encode(["é a", "b"])] == [[0xC3, 0xA9, 0x20, 0x61], [0x62]]
    assert (eos, described) == (3, "UTF-8 bytes")
    assert train.text_encoder(str(tmp_path), SimpleNamespace(vocab_size=256, eos_token_id=None))[1] is None


def test_without_data_a_byte_level_checkpoint_trains_on_the_standard_library(tmp_path, monkeypatch):
    """No --data: the standard library's top-level .py files (sorted), each a document of UTF-8 bytes ended by the
    checkpoint's eos; with --eval-share 0.05 every 20th is held out, as in the demo."""
    load.save_checkpoint(train.Qwen35(train.demo_config("tiny", eos_token_id=[3])), str(tmp_path / "in"))
    runs = []
    monkeypatch.setattr(train, "train_checkpoint", lambda args, run, *rest: runs.append(run) or {})
    run("--init", tmp_path / "in", "--out", tmp_path / "out", "--steps", 1, "--batch-size", 4, "--seq-len", 64)
    (got,) = runs
    stream = b"".join(open(f, encoding="utf-8").read().encode() + b"\x03"
                      for i, f in enumerate(train.stdlib_files()) if i % 20)     # sorted: test_mtp's corpus test
    expected = torch.frombuffer(bytearray(stream[:len(stream) // 64 * 64]), dtype=torch.uint8).int()
    assert torch.equal(got.train_windows.flatten(), expected)


def test_held_out_documents_are_every_nth_and_end_with_end_of_text(head_only, text, tmp_path, monkeypatch):
    """--eval-share 0.25: documents 0, 4, 8, ... (data_files' order, each .jsonl line one) are held out. The
    training windows are the other documents' ids, each followed by <|endoftext|>, cut into --seq-len
    windows; every evaluated window is a window of the held-out stream. Tokenised here document by document."""
    runs = []
    monkeypatch.setattr(train, "train_checkpoint", lambda args, run, *rest: runs.append(run) or {})
    run("--init", head_only[0], "--data", text, "--out", tmp_path / "out", "--steps", 1, *SMALL)
    (got,) = runs
    tokenizer = Tokenizer.from_file(os.path.join(head_only[0], "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    docs = [open(os.path.join(text, f"{i:02d}.txt")).read() for i in range(12)]
    docs += [json.loads(line)["text"] for line in open(os.path.join(text, "more.jsonl"))]
    stream = lambda held: [i for n, doc in enumerate(docs) if (n % 4 == 0) == held
                           for i in tokenizer.encode(doc, add_special_tokens=False).ids + [eos]]
    train_ids, held_ids, T = stream(False), stream(True), 32
    assert got.train_windows.flatten().tolist() == train_ids[:len(train_ids) // T * T]
    held = torch.tensor(held_ids[:len(held_ids) // T * T]).view(-1, T)
    assert len(got.eval_windows) > 1 and all((held == w.long()).all(1).any() for w in got.eval_windows)


def test_evaluated_windows_are_evenly_spaced_held_out_windows(head_only, text, tmp_path, monkeypatch):
    """--eval-share 0.15: one document in round(1 / 0.15) = 7 held out (0, 7, 14). --eval-windows 3: the held-out
    stream's first, middle and last windows; more than there are: each window once."""
    runs = []
    monkeypatch.setattr(train, "train_checkpoint", lambda args, run, *rest: runs.append(run) or {})
    for n in (3, 1000):
        run("--init", head_only[0], "--data", text, "--out", tmp_path / "out", "--steps", 1, *SMALL,
            "--eval-share", 0.15, "--eval-windows", n)
    tokenizer = Tokenizer.from_file(os.path.join(head_only[0], "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    docs = [open(os.path.join(text, f"{i:02d}.txt")).read() for i in range(12)]
    docs += [json.loads(line)["text"] for line in open(os.path.join(text, "more.jsonl"))]
    held = [i for doc in docs[::7] for i in tokenizer.encode(doc, add_special_tokens=False).ids + [eos]]
    held = torch.tensor(held[:len(held) // 32 * 32]).view(-1, 32)
    middle = (len(held) - 1) // 2
    assert len(held) > 3 and torch.equal(runs[0].eval_windows.long(), held[[0, middle, len(held) - 1]])
    assert torch.equal(runs[1].eval_windows.long(), held)


def test_weight_decay_spares_norms_and_decay_rates_and_the_schedule_ends_at_a_tenth():
    """make_optimizer: an AdamW step on zero gradients moves each tensor of 2+ dims by weight decay alone,
    by the first step's lr (lr / warmup, warmup = steps // 20) x 0.1, and leaves the norms, A_log and
    dt_bias as they are; after the last of the steps the schedule has decayed to 10% of lr."""
    model = tiny_model(moe=True)
    lr, steps = 1e-2, 100
    optimizer, scheduler = train.make_optimizer(model, lr, steps)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    spared = {name for name in before if "norm" in name or name.endswith(("A_log", "dt_bias"))}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        if name in spared:
            assert torch.equal(p, before[name]), name
        else:
            assert torch.allclose(p, before[name] * (1 - lr / 5 * 0.1), rtol=1e-7, atol=0), name
    for _ in range(steps):
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * lr, rel=1e-9)


def test_a_tied_head_stored_anyway_is_written_as_the_trained_embedding(tmp_path):
    """A tied checkpoint that stores lm_head.weight too (the embedding again): save_updated writes the
    trained embedding into both, so the result still loads (the loader checks that they are equal)."""
    source = official_checkpoint(tmp_path / "in", moe=False, sharded=False)      # dense: tied
    file = os.path.join(source, "model.safetensors")
    tensors = load_file(file)
    tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"].clone()
    save_file(tensors, file, metadata={"format": "pt"})
    trained = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    load.save_updated(source, str(tmp_path / "out"), {"model.embed_tokens.weight": trained})
    out = all_tensors(tmp_path / "out")
    for key in ("lm_head.weight", "model.language_model.embed_tokens.weight"):
        assert torch.equal(bits(out[key]), bits(trained.to(torch.bfloat16))), key
    assert torch.equal(load_checkpoint(str(tmp_path / "out")).lm_head.weight, trained.to(torch.bfloat16))


def test_a_fresh_head_starts_as_from_scratch_training_does():
    """add_mtp_head's initial weights follow Qwen35._init_weights: projections N(0, 0.02), norm offsets 0
    (not nn.Linear's default init, whose spread here is 2.5 to 3.6 times larger)."""
    model = tiny_model(mtp_num_hidden_layers=0)
    weights = dict(train.add_mtp_head(model))
    assert weights.keys() == {"mtp." + name for name, _ in model.mtp.named_parameters()}
    for name, w in weights.items():
        if "norm" in name:
            assert not w.any(), name
        else:
            assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3, (name, w.std().item())


@pytest.mark.parametrize("moe, sharded", [(False, True), (True, False)])
def test_save_updated_keeps_the_inputs_layout_and_adds_a_head_in_the_embeddings_dtype(tmp_path, moe, sharded):
    """save_updated alone (no training run, so each detail is checked fast): every language-model
    parameter and a fresh fp32 MTP head put into a bf16 checkpoint without a head. The input's keys keep
    their file, shape and dtype; each trained tensor holds its value cast to the stored dtype and the
    fp32 vision tower is copied bit for bit; the head is written as per-expert top-level mtp.* keys in
    the embedding's dtype (bf16, not the fp32 of the tower read last), in one more shard listed in the
    index (whose total_size counts it) or in the single file; each rewritten file keeps its safetensors
    metadata and its permission bits; config.json differs only in text_config's mtp_num_hidden_layers;
    every other file beside the weights (not only JSON ones) is copied byte for byte."""
    source = official_checkpoint(tmp_path / "in", moe=moe, sharded=sharded, mtp=False)
    for i, file in enumerate(load.checkpoint_files(source)):      # metadata and a mode worth keeping
        save_file(load_file(file), file, metadata={"format": "pt", "source": f"file {i}"})
        os.chmod(file, 0o640 if i == 0 else 0o604)
    (tmp_path / "in" / "merges.txt").write_text("c a\nd o\n")
    (tmp_path / "in" / "generation_config.json").write_text('{"eos_token_id": 127}')
    model = load.checkpoint_model(source)
    head = dict(train.add_mtp_head(model))
    generator = torch.Generator().manual_seed(0)
    trained = {name: torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()
               if name.startswith(("model.", "lm_head."))}
    load.save_updated(source, str(tmp_path / "out"), {**trained, **head})
    out = str(tmp_path / "out")

    keys, files = layout(out)
    old_keys, old_files = layout(source)
    added = {k: v for k, v in keys.items() if k not in old_keys}
    assert {k: keys[k] for k in old_keys} == old_keys
    assert added and all(k.startswith("mtp.") and file == (load.MTP_SHARD if sharded else "model.safetensors")
                         and dtype == "BF16" for k, (file, _, dtype) in added.items())
    if moe:
        assert "mtp.layers.0.mlp.experts.5.up_proj.weight" in added and not any("gate_up_proj" in k for k in added)
    assert files == sorted(old_files + ([load.MTP_SHARD] if sharded else []))
    before, after = all_tensors(source), all_tensors(out)
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("model.visual."))
    loaded = dict(load_checkpoint(out).named_parameters())
    for name, value in {**trained, **head}.items():
        assert torch.equal(bits(loaded[name]), bits(value.to(torch.bfloat16))), name

    for file in os.listdir(out):
        if file.endswith(".safetensors"):
            with load.safe_open(os.path.join(out, file), "pt") as f:
                metadata = f.metadata()
            if file == load.MTP_SHARD:
                mode = os.stat(os.path.join(out, file)).st_mode & 0o777
                assert metadata == {"format": "pt"} and mode == new_file_mode()
            else:
                with load.safe_open(os.path.join(source, file), "pt") as f:
                    assert metadata == f.metadata(), file
                assert os.stat(os.path.join(out, file)).st_mode == os.stat(os.path.join(source, file)).st_mode, file
    if sharded:
        with open(os.path.join(out, load.INDEX)) as f:
            index = json.load(f)
        assert index["weight_map"] == {k: file for k, (file, _, _) in keys.items()}
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in after.values())
    config, old_config = (load.read_json(os.path.join(path, "config.json")) for path in (out, source))
    assert config["text_config"].pop("mtp_num_hidden_layers") == 1
    old_config["text_config"].pop("mtp_num_hidden_layers")
    assert config == old_config
    for name in ("tokenizer.json", "merges.txt", "generation_config.json"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(source, name), "rb").read(), name


def test_save_updated_refuses_what_it_cannot_write(tmp_path):
    """A value whose shape is not the stored tensor's, and a parameter no tensor holds that is not part of
    an MTP head, are refused by name (written, a wrong-shaped tensor would make a checkpoint that does not
    load, and a stray parameter a key that nothing reads)."""
    source = official_checkpoint(tmp_path / "in", moe=False, sharded=False)
    with pytest.raises(ValueError, match=r"model\.language_model\.norm\.weight: the checkpoint stores shape "
                                         r"\(64,\), but parameter model\.norm\.weight gives \(65,\)"):
        load.save_updated(source, str(tmp_path / "out"), {"model.norm.weight": torch.zeros(65)})
    with pytest.raises(ValueError, match=r"no tensor holds parameter\(s\) \['model\.extra\.weight'\]; only an "
                                         "MTP head can be added"):
        load.save_updated(source, str(tmp_path / "out2"), {"model.extra.weight": torch.zeros(3)})

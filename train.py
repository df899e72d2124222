"""
Train Qwen3.5 with its MTP head, then measure what the head is worth for speculative decoding.

    python train.py                    # the demo: a small Qwen3.5 + MTP from scratch (~3 min on 2 CPU cores)

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
"""

import argparse
import glob
import math
import os
import sysconfig
import time
from dataclasses import replace

import torch

from fast import speed_up
from load import load_checkpoint, save_checkpoint
from qwen35_mtp import MTPHead, Qwen35, Qwen35Config, generate


# ----------------------------------------------------------------------------------------------
# The demo's model and data

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


def stdlib_corpus(every=20):
    """(train bytes, held-out bytes) of the standard library's top-level .py files, as token ids [N]."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    text = [open(f, "rb").read() for f in files]
    held_out = b"".join(t for i, t in enumerate(text) if i % every == 0)
    train = b"".join(t for i, t in enumerate(text) if i % every != 0)
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).long()
    return as_tensor(train), as_tensor(held_out)


def random_windows(data, batch_size, length, generator):
    starts = torch.randint(0, len(data) - length, (batch_size,), generator=generator)
    return torch.stack([data[s:s + length] for s in starts.tolist()])


def add_mtp_head(model):
    """Give a backbone without MTP weights a freshly initialised MTP head."""
    model.config = replace(model.config, mtp_num_hidden_layers=1)
    model.mtp = MTPHead(model.config)
    model.mtp.apply(model._init_weights)
    return model


# ----------------------------------------------------------------------------------------------
# Training

def train(model, data, *, steps, batch_size=16, seq_len=256, lr=2e-3, mtp_depth=1, freeze_backbone=False,
          seed=0, time_budget=None, precision="bf16", log=print, log_every=10):
    """AdamW with linear warmup and cosine decay, gradient clipping at 1.0, on the model's own loss
    (lm_loss + mtp_loss_weight * mtp_loss). freeze_backbone trains only mtp.* on mtp_loss, the way
    an MTP head is added to an existing model. Returns the logged rows."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("mtp.") or not freeze_backbone)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]   # norms, gates
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    history, start, tokens = [], time.time(), 0
    for step in range(steps):
        x = random_windows(data, batch_size, seq_len, generator)
        # bf16 autocast runs the matrix products (the DeltaNet's included) in bf16 while weights and
        # AdamW state stay fp32: 2.5x faster per step on a CPU with bf16 units (0.36 s vs 0.9 s here)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x, labels=x, mtp_depth=mtp_depth)
        loss = out.mtp_loss if freeze_backbone else out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        tokens += x.numel()
        elapsed = time.time() - start
        if step % log_every == 0 or step == steps - 1:
            row = dict(step=step, lm_loss=out.lm_loss.item(), mtp_losses=[l.item() for l in out.mtp_losses],
                       tokens_per_s=tokens / elapsed, eta_s=elapsed / (step + 1) * (steps - step - 1))
            history.append(row)
            log(f"step {step:4d}/{steps}  lm {row['lm_loss']:.3f}  mtp "
                + " ".join(f"{l:.3f}" for l in row["mtp_losses"])
                + f"  {row['tokens_per_s']:,.0f} tok/s  {row['eta_s']:.0f}s left")
        if time_budget is not None and elapsed > time_budget:
            log(f"time budget of {time_budget}s reached after {step + 1} steps")
            break
    model.eval()
    return history


# ----------------------------------------------------------------------------------------------
# Evaluation: held-out losses and teacher-forced acceptance

def acceptance_counts(out, valid=None):
    """Per depth d: (agreements, positions) between the depth-d head's argmax for token t+d+1 (its row t)
    and the main model's argmax for the same token (its row t+d), over rows where both tokens are real."""
    main = out.logits.argmax(-1)                                   # [B, T]: row j predicts token j+1
    counts = []
    for d, logits in enumerate(out.mtp_logits_per_depth, start=1):
        agree = logits.argmax(-1) == main[:, d:]                   # [B, T-d]
        rows = torch.ones_like(agree) if valid is None else valid[:, :-d] & valid[:, d:]
        counts.append(((agree & rows).sum().item(), rows.sum().item()))
    return counts


@torch.no_grad()
def evaluate(model, data, *, seq_len=256, batches=4, batch_size=16, mtp_depth=1):
    """Over fixed, evenly spaced held-out windows: the mean lm_loss, and per depth 1..mtp_depth the
    mean mtp loss and the teacher-forced acceptance (see acceptance_counts)."""
    starts = torch.linspace(0, len(data) - seq_len - 1, batches * batch_size).long()
    windows = torch.stack([data[s:s + seq_len] for s in starts.tolist()]).split(batch_size)
    outs = [model(x, labels=x, mtp_depth=mtp_depth) for x in windows]
    lm = sum(o.lm_loss.item() for o in outs) / len(outs)
    mtp = [sum(o.mtp_losses[d].item() for o in outs) / len(outs) for d in range(len(outs[0].mtp_losses))]
    counts = [acceptance_counts(o) for o in outs]
    acceptance = [sum(c[d][0] for c in counts) / sum(c[d][1] for c in counts) for d in range(len(counts[0]))]
    return dict(lm_loss=lm, mtp_losses=mtp, acceptance=acceptance)


# ----------------------------------------------------------------------------------------------
# Decoding with and without MTP drafts

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
    per_position = [a / max(d, 1) for a, d in zip(stats["accepted_at"], stats["drafted_at"])]
    return ("acceptance per draft position " + " ".join(f"{r:.2f}" for r in per_position)
            + f"; {stats['accepted'] / max(stats['main_forwards'], 1):.2f} drafts accepted per verification")


def compare_decoding(model, prompt, new_tokens, draft_counts=(1, 2, 3), sampled_draft_tokens=2, log=print):
    """Greedy-decode the same prompt plainly and with k MTP drafts; check the outputs agree and report
    acceptance and speed; then one sampled run (temperature 0.8, seed 0) with and without drafts.
    Returns ({k: (tokens per second, stats)} with k = 0 for plain, the plain greedy ids)."""
    plain, plain_speed, _ = timed_generate(model, prompt, new_tokens)
    results = {0: (plain_speed, None)}
    log(f"plain greedy: {plain_speed:.1f} tokens/s")
    for k in draft_counts:
        ids, speed, stats = timed_generate(model, prompt, new_tokens, draft_tokens=k)
        if not torch.equal(ids, plain):
            raise AssertionError(f"speculative decoding with k={k} changed the output")
        log(f"k={k}: identical output; {describe_drafting(stats)}; {speed:.1f} tokens/s, "
            f"speedup {speed / plain_speed:.2f}x")
        results[k] = (speed, stats)
    sampled = dict(temperature=0.8, seed=0)
    _, sampled_plain, _ = timed_generate(model, prompt, new_tokens, **sampled)
    k = sampled_draft_tokens
    _, speed, stats = timed_generate(model, prompt, new_tokens, draft_tokens=k, **sampled)
    log(f"sampled (temperature 0.8, seed 0), k={k}: {describe_drafting(stats)}; {speed:.1f} tokens/s, "
        f"plain sampling {sampled_plain:.1f} tokens/s, speedup {speed / sampled_plain:.2f}x")
    return results, plain


def demo_prompt(held_out, length=200):
    """A held-out prompt [1, length] that ends at the start of a method, so the continuation is code."""
    text = bytes(held_out[:200_000].tolist())
    end = text.find(b"\n    def ", len(text) // 3) + len(b"\n    def ")
    return held_out[end - length:end][None]


# ----------------------------------------------------------------------------------------------
# The demo

def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a small Qwen3.5 with its MTP head on the Python "
                                     "standard library's source (bytes), then decode with MTP drafts.")
    parser.add_argument("--size", choices=list(DEMO_SIZES), default="medium")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--mtp-loss-weight", type=float, default=0.3)
    parser.add_argument("--mtp-depth", type=int, default=1, help="chain the MTP head D times in training")
    parser.add_argument("--freeze-backbone", action="store_true", help="train only the MTP head")
    parser.add_argument("--init", help="start from a checkpoint (a directory load.py reads)")
    parser.add_argument("--time-budget", type=float, help="stop training after this many seconds")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="bf16: autocast matrix products in training (weights stay fp32)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/demo", help="checkpoint directory")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train_data, held_out = stdlib_corpus()
    print(f"data: {len(train_data):,} training bytes, {len(held_out):,} held-out bytes (Python stdlib)")
    if args.init:
        model = load_checkpoint(args.init, dtype=torch.float32)
        if model.mtp is None:
            print(f"{args.init} has no MTP head: adding a freshly initialised one")
            add_mtp_head(model)
    else:
        model = Qwen35(demo_config(args.size))
    model.config.mtp_loss_weight = args.mtp_loss_weight
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, layers {model.config.layer_types}")
    train(model, train_data, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
          mtp_depth=args.mtp_depth, freeze_backbone=args.freeze_backbone, seed=args.seed,
          time_budget=args.time_budget, precision=args.precision)
    depths = max(args.mtp_depth, 3)     # the chain as deep as the drafting below, trained that deep or not
    result = evaluate(model, held_out, seq_len=args.seq_len, mtp_depth=depths)
    print(f"held-out: lm loss {result['lm_loss']:.3f}, mtp loss "
          + " ".join(f"{l:.3f}" for l in result["mtp_losses"][:args.mtp_depth]) + " (nats per byte; depth 1 first)")
    print("held-out, teacher-forced: the depth-d head's argmax agrees with the main model's for "
          + ", ".join(f"depth {d} {a:.2f}" for d, a in enumerate(result["acceptance"], start=1))
          + f" (trained to depth {args.mtp_depth})")
    save_checkpoint(model, args.out)
    print(f"saved {args.out}/config.json and model.safetensors")
    prompt = demo_prompt(held_out)
    print(f"prompt (held-out): {bytes(prompt[0].tolist()).decode(errors='replace')!r}")
    _, ids = compare_decoding(speed_up(model), prompt, args.new_tokens)
    print("continuation:\n" + bytes(ids[0, prompt.shape[1]:].tolist()).decode(errors="replace"))


if __name__ == "__main__":
    main()

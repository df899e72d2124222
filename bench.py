"""
Benchmarks: this reference side by side with transformers 5.24, same process, same weights, same
dtype, same threads. Prints each figure for both and the cost ratio ours/theirs: our time over
theirs (for a throughput, their figure over ours), so below 1.0 means we are faster. Medians of
several runs.

    python bench.py            # the full run (~8 min on 2 cores): 0.8B-shape random checkpoint
    python bench.py --quick    # a smoke test on tiny shapes (seconds)

Sections: machine limits, prefill, decode, load to first logits (fresh processes), training step, the
peak memory of a head-only training step with the full-logits and the chunked loss (fresh processes),
MTP speculative decoding (demo checkpoint, and projected on the 0.8B shape). "Ours" is the model with
fast.speed_up applied, as load.py's command line and the demo run it: on the CPU that changes only
fp32 products of at most 16 rows (fp32 decoding and verification; see fast.FewRowLinear).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")      # no progress bars or kernel notices
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
from transformers import Qwen3_5ForCausalLM
from transformers.modeling_layers import MtpModel

from fast import speed_up
from load import load_checkpoint, read_config, save_checkpoint
from qwen35_mtp import Cache, Qwen35, Qwen35Config, Sampling, draft, generate
from train import demo_config, demo_prompt, stdlib_corpus

REAL_08B = {  # the text config of Qwen3.5-0.8B (published values)
    "vocab_size": 248320, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 256, "intermediate_size": 3584, "linear_num_key_heads": 16,
    "linear_num_value_heads": 16, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "mtp_num_hidden_layers": 1, "eos_token_id": 248044,
}
QUICK = {**REAL_08B, "vocab_size": 4096, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
         "head_dim": 64, "intermediate_size": 512, "linear_num_key_heads": 4, "linear_num_value_heads": 4,
         "linear_key_head_dim": 32, "linear_value_head_dim": 32}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
rows = []


def report(section, what, ours, theirs=None, unit="", better="lower"):
    """One row: our figure, theirs, and the cost ratio (< 1: ours is faster or smaller)."""
    ratio = None if not theirs else ours / theirs if better == "lower" else theirs / ours
    rows.append(dict(section=section, what=what, ours=ours, theirs=theirs, ratio=ratio, unit=unit, better=better))
    theirs_text = f"{theirs:10.2f}" if theirs is not None else " " * 10
    ratio_text = f"{ratio:6.2f}" if ratio is not None else ""
    print(f"  {what:44s} {ours:10.2f} {theirs_text}  {unit:9s} {ratio_text}", flush=True)


def median_time(fn, runs, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def header(title):
    print(f"\n{title}\n  {'':44s} {'ours':>10s} {'theirs':>10s}  {'unit':9s} cost ratio", flush=True)


def random_checkpoint(path, text_config):
    """A checkpoint with random weights and real shapes, stored in bf16 (CausalLM layout + mtp.*)."""
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    torch.manual_seed(0)
    model = Qwen35(Qwen35Config(**text_config)).to(torch.bfloat16)
    save_checkpoint(model, path)
    return path


def non_embedding_params(model):
    return sum(p.numel() for name, p in model.named_parameters()
               if not name.startswith(("model.embed_tokens", "lm_head", "mtp.")))


# ----------------------------------------------------------------------------------------------

def machine_limits(quick):
    header("Machine limits")
    n = 1024 if quick else 2048
    flops = {}
    for name, dtype in DTYPES.items():
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = median_time(lambda: a @ b, 3 if quick else 5)
        flops[name] = 2 * n ** 3 / t / 1e9
        report("machine", f"matmul {n}^3 {name}", flops[name], unit="GFLOP/s", better="higher")
    x = torch.ones((64 if quick else 256) * 2 ** 20 // 4)
    bandwidth = x.numel() * 4 / median_time(lambda: x.sum(), 5) / 1e9
    report("machine", "memory read bandwidth (sum)", bandwidth, unit="GB/s", better="higher")
    return flops, bandwidth


def prefill_and_decode(path, quick, flops, bandwidth):
    lengths = (64, 128) if quick else (512, 2048)
    results = {}
    for name, dtype in DTYPES.items():
        ours = speed_up(load_checkpoint(path, dtype=dtype))
        theirs = Qwen3_5ForCausalLM.from_pretrained(path, dtype=dtype).eval()
        header(f"Prefill and decode, {name} (batch 1, last-position logits)")
        params = non_embedding_params(ours)
        with torch.no_grad():
            for T in lengths:
                ids = torch.randint(0, ours.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
                runs = 2 if T >= 2048 or name == "fp32" else 3
                t_ours = median_time(lambda: ours.lm_head(ours.model(ids)[:, -1]), runs)
                t_theirs = median_time(lambda: theirs(ids, logits_to_keep=1), runs)
                report("prefill", f"prefill T={T} {name}", T / t_ours, T / t_theirs, "tokens/s", "higher")
                report("prefill", f"  share of {name} matmul peak (weights only)",
                       2 * params * T / t_ours / 1e9 / flops[name] * 100,
                       2 * params * T / t_theirs / 1e9 / flops[name] * 100, "%", "higher")
                results[(name, T)] = (t_ours, t_theirs)
            prompt = torch.randint(0, ours.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
            n = 16 if quick else 64
            ours_gen = lambda k: generate(ours, prompt, k)
            theirs_gen = lambda k: theirs.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                                   pad_token_id=0)
            per_token = []
            for gen in (ours_gen, theirs_gen):
                gen(4)
                full, first = median_time(lambda: gen(n + 1), 2, 0), median_time(lambda: gen(1), 2, 0)
                per_token.append((full - first) / n)
            report("decode", f"decode ms/token {name} ({n} after 64)", per_token[0] * 1e3, per_token[1] * 1e3, "ms")
            weight_bytes = (params + ours.lm_head.weight.numel()) * dtype.itemsize
            report("decode", f"  share of memory bandwidth (weights once)", weight_bytes / per_token[0] / 1e9 / bandwidth * 100,
                   weight_bytes / per_token[1] / 1e9 / bandwidth * 100, "%", "higher")
        del ours, theirs
    return results


LOAD_CHILD = """
import sys, time, torch
start = time.perf_counter()
which, path = sys.argv[1], sys.argv[2]
if which == "ours":
    from fast import speed_up
    from load import load_checkpoint
    model = speed_up(load_checkpoint(path, dtype=torch.bfloat16))
    forward = lambda ids: model.lm_head(model.model(ids)[:, -1])
else:
    from transformers import Qwen3_5ForCausalLM
    model = Qwen3_5ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    forward = lambda ids: model(ids, logits_to_keep=1).logits
with torch.no_grad():
    forward(torch.arange(8)[None])
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024   # this process's peak RSS
print(time.perf_counter() - start, peak)
"""


def load_time_and_memory(path):
    header("Load to first logits (bf16 checkpoint into bf16, fresh process each, imports included)")
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    figures = {}
    for which in ("ours", "hf"):
        out = subprocess.run([sys.executable, "-c", LOAD_CHILD, which, path], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
        seconds, rss = out.stdout.split()[-2:]
        figures[which] = float(seconds), int(rss)
    report("load", "wall time to first logits", figures["ours"][0], figures["hf"][0], "s")
    report("load", "peak resident memory / checkpoint bytes", figures["ours"][1] / size, figures["hf"][1] / size, "x")


def training_step(quick):
    header("Training step: forward + backward with the MTP loss (fp32, batch 8 x 256, small demo config)")
    # the last layer is full attention: MtpModel copies its norm class from the last layer
    config = demo_config("tiny" if quick else "small", vocab_size=4096)
    ours = Qwen35(config)
    path = os.path.join("runs", "bench", "train-config")
    save_checkpoint(ours, path)
    theirs = Qwen3_5ForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs.config.num_mtp_layers, theirs.config.mtp_layer_types = 1, ["full_attention"]
    mtp = MtpModel(theirs, 1)
    ids = torch.randint(0, config.vocab_size, (8, 128 if quick else 256), generator=torch.Generator().manual_seed(0))
    weight = config.mtp_loss_weight

    def ours_step():
        ours(ids, labels=ids).loss.backward()

    def theirs_step():
        out = theirs(ids, labels=ids, output_hidden_states=True)
        T = ids.shape[1]
        h = mtp.forward_layer(0, last_hidden_states=out.hidden_states[-1][:, :-1],
                              position_ids=torch.arange(T - 1)[None].expand(len(ids), -1), mtp_cache=None,
                              input_ids=ids[:, 1:])
        mtp_loss = torch.nn.functional.cross_entropy(theirs.lm_head(h)[:, :-1].flatten(0, 1), ids[:, 2:].flatten())
        (out.loss + weight * mtp_loss).backward()

    report("train", "fwd+bwd step", median_time(ours_step, 3) * 1e3, median_time(theirs_step, 3) * 1e3, "ms")


TRAIN_MEMORY_CHILD = """
import sys, time, torch
from load import load_checkpoint
from train import make_optimizer, set_trainable
path, loss, B, T = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rss = lambda field: int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024

def step(ids):   # train.py --freeze-backbone: the MTP loss, backward, AdamW
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids, logits=loss == "plain")
    out.mtp_loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

model = load_checkpoint(path, dtype=torch.float32)
set_trainable(model, freeze_backbone=True)
optimizer, _ = make_optimizer(model, 1e-4, 10)
step(torch.randint(0, model.config.vocab_size, (1, 16)))   # warm-up: AdamW state, thread pools
base = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")            # the peak (VmHWM) starts again from here
start = time.perf_counter()
step(torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0)))
print(time.perf_counter() - start, base, rss("VmHWM"))
"""


def training_memory(path, quick):
    B, T = (2, 64) if quick else (2, 512)
    header(f"Peak memory of a head-only training step on the {'tiny' if quick else '0.8B'} shape (fp32 weights, "
           f"bf16 autocast, batch {B} x {T}; fresh process each)")
    for loss in ("plain", "chunked"):
        out = subprocess.run([sys.executable, "-c", TRAIN_MEMORY_CHILD, path, loss, str(B), str(T)],
                             capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
        seconds, base, peak = map(float, out.stdout.split()[-3:])
        report("trainmem", f"{loss} loss: step time", seconds, unit="s")
        report("trainmem", f"{loss} loss: peak resident memory", peak / 2 ** 30, unit="GiB")
        report("trainmem", f"{loss} loss: peak above the resident model", (peak - base) / 2 ** 30, unit="GiB")
    vocab = read_config(path).vocab_size
    report("trainmem", "for scale: B x T x V fp32 logits, one term", B * T * vocab * 4 / 2 ** 30, unit="GiB")


def speculative(path_08b, quick):
    header("MTP speculative decoding, greedy (ours; transformers has no Qwen3.5 MTP drafting)")
    demo = os.path.join("runs", "demo")
    if os.path.exists(os.path.join(demo, "model.safetensors")) and not quick:
        model = speed_up(load_checkpoint(demo))
        prompt = demo_prompt(stdlib_corpus()[1])
        source = "demo checkpoint (runs/demo)"
    else:
        model = speed_up(Qwen35(demo_config("tiny")).eval())
        prompt = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
        source = "untrained tiny model (run `python train.py` first for the demo checkpoint)"
    print(f"  on the {source}")
    n = 64 if quick else 256
    plain_ids, _ = generate(model, prompt, n)
    plain_speed = n / median_time(lambda: generate(model, prompt, n), 3)
    report("spec", "plain greedy", plain_speed, unit="tokens/s", better="higher")
    for k in (1, 2, 3):
        ids, stats = generate(model, prompt, n, draft_tokens=k)
        assert torch.equal(ids, plain_ids), f"k={k} changed the output"
        speed = n / median_time(lambda: generate(model, prompt, n, draft_tokens=k), 3)
        per_position = " ".join(f"{a / max(d, 1):.2f}" for a, d in zip(stats["accepted_at"], stats["drafted_at"]))
        report("spec", f"k={k} (acceptance by position {per_position})", speed, unit="tokens/s", better="higher")
        report("spec", f"  speedup over plain, identical output", speed / plain_speed, unit="x", better="higher")

    header(f"MTP drafting cost on the {'tiny' if quick else '0.8B'} shape (bf16), and the speedup it implies")
    model = speed_up(load_checkpoint(path_08b, dtype=torch.bfloat16))
    ids = torch.randint(0, model.config.vocab_size, (1, 65), generator=torch.Generator().manual_seed(2))
    cache, mtp_cache = Cache(model.config.layer_types), Cache(["full_attention"])
    with torch.no_grad():
        hidden = model.model(ids[:, :64], None, cache)
        model.mtp(hidden, model.model.embed_tokens(ids[:, 1:65]), torch.ones(1, 64, dtype=torch.bool), mtp_cache)
        mtp_base = len(mtp_cache)

        def plain_step():                                  # one decode step: the cache grows by a token
            model.lm_head(model.model(ids[:, :1], None, cache)[0]).argmax(-1)

        def verify_step(T):                                # verify T tokens, then roll all of them back
            model.lm_head(model.model(ids[:, :T], None, cache, rollback=True)[0]).argmax(-1)
            cache.crop(base)

        def draft_step(vocab=model.config.vocab_size):    # one greedy draft, as generate() makes it
            draft(model, hidden[:, -1:], ids[:, -1:], None, mtp_cache, 1, Sampling(), vocab)
            mtp_cache.crop(mtp_base)

        runs = 3 if quick else 5
        plain = median_time(plain_step, runs)
        base = len(cache)
        draft_vocab = min(32768, model.config.vocab_size // 4)
        draft_costs = {"all ids": median_time(draft_step, runs),
                       f"ids < {draft_vocab}": median_time(lambda: draft_step(draft_vocab), runs)}
        report("spec08", "plain decode step (T=1)", plain * 1e3, unit="ms")
        for name, cost in draft_costs.items():
            report("spec08", f"one MTP draft over {name} / plain step", cost / plain, unit="x")
        verify = {k: median_time(lambda: verify_step(k + 1), runs) for k in (1, 2, 3)}
        for k in (1, 2, 3):
            report("spec08", f"verify k={k} ({k + 1} tokens) / plain step", verify[k] / plain, unit="x")
        # Assumptions: draft i is accepted with probability alpha once drafts 1..i-1 were (the same
        # alpha at every position, optimistic for k > 1), and the smaller draft vocabulary keeps it.
        for name, cost in draft_costs.items():
            for k in (1, 2, 3):
                for alpha in (0.65, 0.8, 0.9):
                    tokens = sum(alpha ** i for i in range(k + 1))
                    report("spec08", f"  speedup k={k}, acceptance {alpha}, {name}",
                           tokens * plain / (verify[k] + k * cost), unit="x", better="higher")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, not a measurement")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'quick smoke test' if args.quick else 'Qwen3.5-0.8B shape, random weights'}")
    path = random_checkpoint(os.path.join("runs", "bench", "quick" if args.quick else "qwen3.5-0.8b-random"),
                             QUICK if args.quick else REAL_08B)
    start = time.time()
    flops, bandwidth = machine_limits(args.quick)
    prefill_and_decode(path, args.quick, flops, bandwidth)
    load_time_and_memory(path)
    training_step(args.quick)
    training_memory(path, args.quick)
    speculative(path, args.quick)
    print(f"\ntotal {time.time() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

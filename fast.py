"""
Speed-ups that leave the model's definitions alone, chosen in one place.

qwen35_mtp.py is the reference: plain `nn.Linear` projections, the plain gated delta rules, eager
PyTorch, and the tests check those definitions against transformers. `speed_up(model)` swaps in
faster equivalents where a benchmark (bench.py) showed that they pay or where the field has a kernel,
and the tests hold each one equal to the plain version.

    from fast import speed_up
    speed_up(model)                      # load.py's command line and train.py do this
    speed_up(model, compile=True)        # also compile decoding (on a GPU: CUDA graphs) and each layer

What it changes, by device:
  - CPU, fp32, a few rows (decoding one token, verifying a few drafts): `FewRowLinear`.
  - CUDA, when flash-linear-attention (fla) is importable: its chunked gated delta rule
    (`fla_chunked_rule`, as transformers uses it) and its causal conv (`fla_causal_conv`), for
    prefill and training.
  - compile=True: `compile_decoding`, torch.compile of the cached steps of at most
    RECURRENT_MAX_TOKENS tokens (a decode step, a verification, a draft), which have static shapes
    because the caches are preallocated and written in place (their memory handed on between generate
    calls by a `CachePool`; MoE experts as `GatheredExperts`, whose shapes do not depend on the
    routing); on CUDA in "reduce-overhead" mode, so that a step replays as a CUDA graph. And
    `compile_long_steps`: each decoder layer compiled on its own for everything else (prefill,
    training), the number of tokens a symbol. train.py --compile uses that part alone.
"""

import functools
import importlib.util
import inspect
import weakref
from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F

import qwen35_mtp
from qwen35_mtp import (RECURRENT_MAX_TOKENS, Cache, DecoderLayer, Experts, GatedDeltaNet, causal_conv,
                        chunked_gated_delta_rule)


class FewRowLinear(nn.Linear):
    """nn.Linear (no bias) that computes a few fp32 rows on the CPU as W @ x^T.

    This CPU's BLAS runs 2-16 rows 2-4x slower than one, and one row (a GEMV) on a single thread at
    ~19 GB/s, while W @ x^T with two or more columns uses both threads (~30 GB/s once the weight is
    out of cache). So 2-16 rows go through W @ x^T, and a single row of a large weight (>= 1M entries)
    is padded to two columns. Measured on the 0.8B shape (2026-11-29, 32 tokens after 64, median of
    3): fp32 decoding 138 instead of 210 ms/token,
    and verifying k drafts costs about one decode step instead of k. Same result as F.linear up to
    the order of float additions."""

    def forward(self, x):
        rows = x.shape[:-1].numel()
        few = x.dtype == self.weight.dtype == torch.float32 and x.device.type == "cpu" and rows <= 16
        if not few or (rows == 1 and self.weight.numel() < 2 ** 20):
            return F.linear(x, self.weight)
        x2 = x.reshape(rows, -1)
        if rows == 1:
            x2 = x2.repeat(2, 1)                                   # two columns take the threaded path
        return (self.weight @ x2.t())[:, :rows].t().reshape(*x.shape[:-1], -1)


# Experts.forward counts tokens per expert on the host: compiled, every new routing would compile again
experts_by_expert = torch.compiler.disable(Experts.forward)


class GatheredExperts(Experts):
    """Experts that, for a few tokens, gather each (token, slot)'s expert weights and multiply them in one
    batch. Experts.forward groups tokens by expert with a host sync (.tolist()) and shapes that depend
    on the routing, which splits a compiled step into many graphs; here the shapes depend only on the
    number of tokens, so a decoding step stays one graph. Same result up to the order of additions."""

    def forward(self, x, expert_ids, weights):
        N, k = expert_ids.shape
        if N > RECURRENT_MAX_TOKENS:
            return experts_by_expert(self, x, expert_ids, weights)
        ids = expert_ids.flatten()                                               # [N*k]
        rows = x.repeat_interleave(k, dim=0)[:, :, None]                         # [N*k, H, 1]
        gate, up = torch.bmm(self.gate_up_proj[ids], rows)[..., 0].chunk(2, dim=-1)    # [N*k, I] each
        y = torch.bmm(self.down_proj[ids], (F.silu(gate) * up)[:, :, None])[..., 0]    # [N*k, H]
        return (y.view(N, k, -1) * weights[..., None]).sum(1)


def gather_experts(model):
    for module in model.modules():
        if type(module) is Experts:
            module.__class__ = GatheredExperts


@functools.cache
def fla_backward_works(device):
    """Whether fla's chunked rule can differentiate here, probed once on a tiny input: fla 0.6 refuses
    its gated backward on Hopper GPUs with Triton 3.4 to 3.7.0, which compute wrong gradients there
    (fla's issue #640)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    x = torch.randn(1, 64, 1, 64, device=device, requires_grad=True)
    g, beta = -torch.rand(1, 64, 1, device=device), torch.rand(1, 64, 1, device=device)
    try:
        chunk_gated_delta_rule(x, x, x, g, beta, scale=1.0)[0].sum().backward()
        return True
    except RuntimeError:
        return False


def fla_chunked_rule(q, k, v, g, beta, initial_state=None):
    """chunked_gated_delta_rule through fla's fused Triton kernel (CUDA only): same arguments and
    results, to the precision of its matrix products. Those run in v's dtype (bf16 in bf16 models, as
    transformers runs it) and, in fp32 models, round their inputs to tf32: outputs and states move by
    about 5e-4 of their largest value (test_fla_chunked_rule_matches_plain), so fp32 parity to 1e-5 is
    the plain model's, without speed_up. q comes already scaled, so the kernel's own scale is 1.
    Where fla cannot differentiate (fla_backward_works), a step that needs gradients takes the plain
    rule."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta))
    if needs_grad and not fla_backward_works(q.device):
        return chunked_gated_delta_rule(q, k, v, g, beta, initial_state)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    o, state = chunk_gated_delta_rule(q.to(v.dtype), k.to(v.dtype), v, g.float(), beta.to(v.dtype), scale=1.0,
                                      initial_state=initial_state, output_final_state=True)
    return o.float(), state.float()


def fla_causal_conv(x, weight):
    """causal_conv through fla's fused Triton kernel (CUDA only) for prefill and training: same arguments
    and result. Steps of a few tokens (decoding) keep the plain taps, which torch.compile fuses."""
    K = weight.shape[-1]
    if x.shape[1] - (K - 1) <= RECURRENT_MAX_TOKENS:
        return causal_conv(x, weight)
    from fla.modules.causal_conv1d import causal_conv1d
    y, _ = causal_conv1d(x, weight=weight[:, 0])     # zeros before x: its first K-1 outputs are not ours
    return y[:, K - 1:]


def fla_available():
    return torch.cuda.is_available() and importlib.util.find_spec("fla") is not None


class PooledBuffer:
    """One buffer of a CachePool: its memory, and whether a live tensor uses it."""

    def __init__(self, shape, dtype, device):
        self.memory, self.taken = torch.empty(shape, dtype=dtype, device=device), False

    def release(self):
        self.taken = False


class CachePool:
    """Cache buffers handed on from caches that are gone to the next ones (qwen35_mtp.cache_buffer). A
    CUDA graph keeps the addresses of the buffers a step writes: with the memory handed on, the next
    generate call replays the recorded graphs instead of recording them again. Each request takes the
    first free buffer of its shape, dtype and device, so caches built in the same order get the same
    buffers in the same roles. A request gets a tensor of its own over the buffer's memory, and the
    buffer is free again once that tensor is garbage collected: once its cache is gone, or has
    replaced it (a DeltaNet cache replaces its undo buffers for a step of another length). So two
    live tensors never share memory, and a cache holds no more here than it would without the pool. A
    request that finds no free buffer of its shape first drops the free buffers of every shape: the
    pool keeps what live caches use and, between generate calls, what the last call used, not every
    shape it ever handed out. (Compiling a new step leaves reference cycles that keep the caches it
    traced alive until Python's cycle collector runs; the next generate call then takes new memory,
    and its CUDA graphs are recorded once more.) Each tensor handed out is marked as a static input of
    the compiled steps: CUDA graph trees replay a graph that writes into its inputs only when those are."""

    def __init__(self):
        self.buffers = defaultdict(list)          # (shape, dtype, device) -> [PooledBuffer], oldest first

    def take(self, shape, dtype, device):
        key = (tuple(shape), dtype, torch.device(device))
        buffer = next((b for b in self.buffers[key] if not b.taken), None)
        if buffer is None:
            for buffers in self.buffers.values():
                buffers[:] = [b for b in buffers if b.taken]
            buffer = PooledBuffer(shape, dtype, device)
            self.buffers[key].append(buffer)
        buffer.taken = True
        handed = buffer.memory.detach().zero_()       # detach: another tensor over the same memory
        torch._dynamo.mark_static_address(handed)
        weakref.finalize(handed, buffer.release)
        return handed


def with_plain_strides(x):
    """x, or a contiguous copy if it is a view with other strides. A compiled graph is guarded on its
    inputs' strides, even along dimensions of size 1: the last of N rows, x[:, -1:], would otherwise
    compile a graph for each N (a draft chained on the head's output, for example)."""
    if not torch.is_tensor(x):
        return x
    plain, step = [], 1
    for size in reversed(x.shape):
        plain.insert(0, step)
        step *= size
    return x if x.stride() == tuple(plain) else x.clone(memory_format=torch.contiguous_format)


def _compiled_for_short_steps(forward, tokens_argument, compile_options, graphs):
    forward = getattr(forward, "plain", forward)        # compiled again: from the plain forward
    signature, compiled = inspect.signature(forward), torch.compile(forward, **compile_options)

    def dispatch(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        cache, tokens = arguments.get("cache"), arguments[tokens_argument]
        if cache is None or len(cache) == 0 or tokens.shape[1] > RECURRENT_MAX_TOKENS:
            return forward(*args, **kwargs)
        arguments = {name: with_plain_strides(value) for name, value in arguments.items()}
        if not graphs:
            return compiled(**arguments)
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(**arguments).clone()
    dispatch.plain = forward
    return dispatch


def compile_decoding(model, **compile_options):
    """torch.compile the backbone and the MTP head for cached steps of at most RECURRENT_MAX_TOKENS
    tokens (compile_long_steps does the rest). Each step length compiles once: the step's tensors have
    the same shapes at every position (KV caches [B, kv_heads, capacity, hd], masks [B, 1, T, capacity],
    the DeltaNet state written in place), and its slots come from a counter on the device. Only the
    caches' bookkeeping on the host (Cache.begin_step: lengths, buffers) runs before the graph, so a
    step is one graph; the buffers come from a CachePool. With CUDA graphs (mode="reduce-overhead")
    each step is a new graph-tree generation and its outputs are copied out, since the next replay
    overwrites them."""
    qwen35_mtp.cache_buffer = torch.compiler.disable(CachePool().take)   # only a first, eager step allocates
    # a graph per step length and kind (1..RECURRENT_MAX_TOKENS tokens, rollback or not): with 8 drafts
    # or more, torch's default limit of 8 graphs per function would leave the longer steps eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * RECURRENT_MAX_TOKENS + 8)
    gather_experts(model)
    Cache.begin_step = torch.compiler.disable(Cache.begin_step)
    graphs = compile_options.get("mode") == "reduce-overhead"
    model.model.forward = _compiled_for_short_steps(model.model.forward, "input_ids", compile_options, graphs)
    if model.mtp is not None:
        model.mtp.forward = _compiled_for_short_steps(model.mtp.forward, "next_embeds", compile_options, graphs)
    return model


def _compiled_for_long_steps(forward, compile_options):
    forward = getattr(forward, "plain", forward)        # compiled again: from the plain forward
    compiled = torch.compile(forward, dynamic=True, **compile_options)

    def dispatch(x, step, cache=None):
        if cache is not None and x.shape[1] <= RECURRENT_MAX_TOKENS:     # decoding: compile_decoding's part
            return forward(x, step, cache)
        return compiled(x, step, cache)
    dispatch.plain = forward
    return dispatch


def compile_long_steps(model, **compile_options):
    """torch.compile each decoder layer for the steps compile_decoding leaves alone: steps without a cache
    (training, scoring) and cached steps of more than RECURRENT_MAX_TOKENS tokens (prefill). One layer at
    a time ("regional" compilation): the layers of a kind run the same code with their weights as
    inputs, so the compiler works through one layer of each kind, not the whole stack, and the number of
    tokens is a symbol (dynamic=True), so a new prompt length compiles nothing. Three things stay eager,
    as breaks between graphs: the chunked rule (its loop over chunks depends on the length; fla's is a
    kernel already), fla's causal conv, and the experts' grouping of tokens by expert (host-side
    counts)."""
    gather_experts(model)
    for module in model.modules():
        if isinstance(module, GatedDeltaNet):
            module.chunked_rule = torch.compiler.disable(module.chunked_rule)
            if module.causal_conv is not causal_conv:
                module.causal_conv = torch.compiler.disable(module.causal_conv)
        if isinstance(module, DecoderLayer):
            module.forward = _compiled_for_long_steps(module.forward, compile_options)
    return model


def speed_up(model, compile=False):
    """Apply what pays on the model's device (see the module docstring); returns the model."""
    device = next(model.parameters()).device
    for module in model.modules():
        if type(module) is nn.Linear and module.bias is None:
            module.__class__ = FewRowLinear                    # a no-op off the CPU and in bf16
        if isinstance(module, GatedDeltaNet) and device.type == "cuda" and fla_available():
            module.chunked_rule, module.causal_conv = fla_chunked_rule, fla_causal_conv
    if compile:
        compile_decoding(model, mode="reduce-overhead" if device.type == "cuda" else None)
        compile_long_steps(model)
    return model

"""
Qwen3.5 and its Multi-Token Prediction (MTP) head, in one file of plain PyTorch.

Read top to bottom:
  1. Qwen35Config           every number the model needs
  2. norms, rotary          the (1+w) RMSNorm, the plain gated RMSNorm, 25% partial RoPE (1-D or 3-D)
  3. gated attention        full softmax attention with a sigmoid output gate (every 4th layer), its KV cache
  4. Gated DeltaNet         linear attention: the gated delta rule, recurrent and chunked; its cache
  5. MLP and MoE            dense SwiGLU, or top-k experts plus a gated shared expert
  6. decoder, model, MTP    pre-norm layers, caches, the backbone, the MTP head (predicts token t+2)
  7. vision                 the vision tower (`model.visual.*`), image features in the sequence, 3-D positions
  8. Qwen35                 logits, MTP logits and the training loss in one forward, with or without images,
                            or the loss over chunks of rows without full-vocabulary logits
  9. generation             decoding, and lossless speculative decoding with MTP drafts

Shapes: B batch, T tokens in this step, S key slots attended (T without a cache or at a cache's
first step, then the cache's capacity, the unused slots masked), H hidden size, V vocabulary.
Checkpoint names are mirrored by the module names, so `model.layers.3.self_attn.q_proj.weight` here
is `model.language_model.layers.3.self_attn.q_proj.weight` in an official checkpoint. Reading
and writing checkpoints is load.py's job; training is train.py's.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# 1. Config

LAYER_TYPES = ("linear_attention", "full_attention")


def check_types(config):
    """Name the field, its value and the expected type, before a comparison fails deep inside."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    expected = {int: ("an integer", is_int),
                float: ("a number", lambda v: is_int(v) or isinstance(v, float)),
                bool: ("true or false", lambda v: isinstance(v, bool)),
                list: ("a list of layer type names", lambda v: isinstance(v, list)
                       and all(isinstance(x, str) for x in v)),
                tuple: ("three integers", lambda v: isinstance(v, tuple) and len(v) == 3 and all(map(is_int, v))),
                object: ("an integer, a list of integers or null", lambda v: v is None or is_int(v)
                         or isinstance(v, list) and all(map(is_int, v))),
                "VisionConfig": ("a VisionConfig or None", lambda v: v is None or isinstance(v, VisionConfig))}
    for f in fields(config):
        value = getattr(config, f.name)
        what, ok = expected[f.type]
        if not ok(value):
            raise ValueError(f"config field {f.name}={value!r} ({type(value).__name__}) is not valid: "
                             f"expected {what}")


@dataclass
class Qwen35Config:
    # sizes of the language model
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int          # full attention query heads
    num_key_value_heads: int          # full attention key/value heads (GQA)
    linear_num_key_heads: int         # Gated DeltaNet query/key heads (Hk)
    linear_num_value_heads: int       # Gated DeltaNet value heads (Hv), a multiple of Hk
    linear_key_head_dim: int          # dk
    linear_value_head_dim: int        # dv
    intermediate_size: int = 0        # dense SwiGLU width; 0 in MoE models
    head_dim: int = 256               # full attention head size
    linear_conv_kernel_dim: int = 4
    layer_types: list = None          # None: every 4th layer is full attention (i % 4 == 3)
    # mixture of experts; num_experts == 0 means a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    # numerics
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e7
    partial_rotary_factor: float = 0.25
    tie_word_embeddings: bool = False
    # multi-token prediction
    mtp_num_hidden_layers: int = 1    # decoder layers in the MTP head; 0 = no MTP head
    mtp_loss_weight: float = 0.1      # loss = lm_loss + mtp_loss_weight * mtp_loss (Megatron's 0.1)
    eos_token_id: object = None       # int, list of ints, or None
    # images (section 7)
    vision: "VisionConfig" = None     # the vision tower; None: a text-only model
    mrope_section: tuple = (11, 11, 10)   # rotary frequencies per axis (time, height, width), see mrope_axes
    image_token_id: int = 248056      # placeholder tokens that image features replace
    vision_start_token_id: int = 248053   # ordinary text tokens around each image's placeholders
    vision_end_token_id: int = 248054

    def __post_init__(self):
        if self.layer_types is None and type(self.num_hidden_layers) is int:
            self.layer_types = [LAYER_TYPES[i % 4 == 3] for i in range(self.num_hidden_layers)]
        check_types(self)
        problems = []
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                            f"{self.num_hidden_layers}")
        if bad := sorted(set(self.layer_types) - set(LAYER_TYPES)):
            problems.append(f"layer_types holds {bad}; expected only {list(LAYER_TYPES)}")
        sizes = {f.name: getattr(self, f.name) for f in fields(self) if f.type is int}
        if negative := [name for name, value in sizes.items() if value < 0]:
            problems.append(f"negative sizes: {negative}")
        if zero := [name for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                      "linear_num_key_heads", "head_dim") if sizes[name] == 0]:
            problems.append(f"sizes that must be > 0: {zero}")
        elif self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}")
        elif self.linear_num_value_heads % self.linear_num_key_heads:
            problems.append(f"linear_num_value_heads={self.linear_num_value_heads} is not a multiple of "
                            f"linear_num_key_heads={self.linear_num_key_heads}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            problems.append(f"head_dim * partial_rotary_factor = {self.head_dim * self.partial_rotary_factor} "
                            f"must be an even number of dims in (0, head_dim]")
        if self.is_moe and not 0 < self.num_experts_per_tok <= self.num_experts:
            problems.append(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts="
                            f"{self.num_experts}")
        if self.is_moe and not (self.moe_intermediate_size > 0 and self.shared_expert_intermediate_size > 0):
            problems.append("an MoE model needs moe_intermediate_size and shared_expert_intermediate_size > 0")
        if not self.is_moe and self.intermediate_size <= 0:
            problems.append("a dense model needs intermediate_size > 0")
        if self.vision is not None and self.vision.out_hidden_size != self.hidden_size:
            problems.append(f"vision out_hidden_size={self.vision.out_hidden_size} must equal hidden_size="
                            f"{self.hidden_size} (image features replace token embeddings)")
        if self.vision is not None and not 0 <= self.image_token_id < self.vocab_size:
            problems.append(f"image_token_id={self.image_token_id} is outside the vocabulary [0, {self.vocab_size})")
        if problems:
            raise ValueError("inconsistent Qwen3.5 config: " + "; ".join(problems))

    @property
    def is_moe(self):
        return self.num_experts > 0

    @property
    def rotary_dim(self):
        return int(self.head_dim * self.partial_rotary_factor)


# ----------------------------------------------------------------------------------------------
# 2. Norms and rotary embedding

class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: y = x / rms(x) * (1 + w), in fp32. Qwen3.5 quirk: the weight is
    stored as an offset from 1 (initialised to 0), so loading it as a plain scale breaks the model."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """The one plain-weight norm, used only inside Gated DeltaNet: y = w * x / rms(x) * silu(z).
    Normalises each value head (size dv) on its own; the weight is shared by all heads."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, z):
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (self.weight * y * F.silu(z.float())).to(x.dtype)


def mrope_axes(half, section):
    """Which position axis (0 time, 1 height, 2 width) turns each of the rotary_dim/2 frequencies.
    Qwen3.5 quirk (mrope_interleaved): the axes take turns, T H W T H W ...: frequency i follows
    height if i % 3 == 1 and i < 3 * section[1], width if i % 3 == 2 and i < 3 * section[2], time
    otherwise (section[0] is never read). [11, 11, 10] ends with T H on frequencies 30 and 31."""
    axis = torch.zeros(half, dtype=torch.long)
    axis[1:3 * section[1]:3] = 1
    axis[2:3 * section[2]:3] = 2
    return axis


def rotary_cos_sin(positions, config, dtype):
    """cos, sin [B, T, rotary_dim] for integer positions [B, T] (text) or [3, B, T] (time, height,
    width: multimodal RoPE, section 7). Text tokens have the same position on all three axes, so for
    text the 3-D form is exactly this ordinary 1-D RoPE."""
    dim = config.rotary_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, device=positions.device).float() / dim)
    if positions.dim() == 3:
        axis = mrope_axes(dim // 2, config.mrope_section).to(positions.device)
        positions = positions[axis].permute(1, 2, 0)           # [B, T, dim/2]: each frequency's axis
    else:
        positions = positions[..., None]                       # [B, T, 1]
    angles = positions.float() * inv_freq                     # [B, T, dim/2]
    angles = torch.cat([angles, angles], dim=-1)              # rotate-half layout: [B, T, dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """x [B, T, heads, head_dim]. Qwen3.5 quirk: only the first 25% of each head (64 of 256 dims)
    rotates, in the rotate-half (NeoX) layout; the other dims pass through untouched."""
    dim = cos.shape[-1]
    rot, passthrough = x[..., :dim], x[..., dim:]
    first, second = rot.chunk(2, dim=-1)
    cos, sin = cos[:, :, None], sin[:, :, None]               # broadcast over heads
    rotated = rot * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated, passthrough], dim=-1)


# ----------------------------------------------------------------------------------------------
# 3. Gated full attention

def cache_buffer(shape, dtype, device):
    """A zeroed tensor that a cache writes into in place. Every cache allocates here; fast.py swaps in
    a pool that hands the memory on to later caches of the same shape."""
    return torch.zeros(shape, dtype=dtype, device=device)


class KVCache:
    """Keys and values of one full-attention layer, [B, kv_heads, capacity, head_dim] each, allocated at
    the first write and then written in place at each step's slots (as in gpt-fast): their shapes
    never change, so a decoding step can be compiled and replayed. Slots past the cached length are
    masked out, so rolling back needs no work here."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.k = self.v = None

    def write(self, k, v, slots):
        """k, v [B, kv_heads, T, head_dim] into slots [T]; returns the whole buffers."""
        if self.k is None:
            # two calls, not a generator expression: compiled (fast.py), an allocation is a graph break,
            # which inside a generator would leave the whole step eager
            B, kv_heads, _, D = k.shape
            self.k = cache_buffer((B, kv_heads, self.capacity, D), k.dtype, k.device)
            self.v = cache_buffer((B, kv_heads, self.capacity, D), v.dtype, v.device)
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v

    def reserve_undo(self, T):       # nothing to keep: a rolled-back slot is masked out, then rewritten
        pass

    def drop_last(self, n):
        pass


class Attention(nn.Module):
    """Causal GQA softmax attention with q/k norms, partial RoPE and a sigmoid output gate."""

    def __init__(self, config):
        super().__init__()
        H, hd = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = nn.Linear(H, self.heads * hd * 2, bias=False)     # query AND output gate
        self.k_proj = nn.Linear(H, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(H, self.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.heads * hd, H, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x, step, cache=None):
        """x [B, T, H]; step: the Step (section 6) every layer of this forward shares: rotary cos/sin,
        mask, cache slots; cache: this layer's KVCache, or None."""
        B, T, _ = x.shape
        # Qwen3.5 quirk: q_proj rows are [q_head0 | gate_head0 | q_head1 | ...]: split per head
        q, gate = self.q_proj(x).view(B, T, self.heads, 2 * self.head_dim).chunk(2, dim=-1)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        q = apply_rotary(self.q_norm(q), step.cos, step.sin)
        k = apply_rotary(self.k_norm(k), step.cos, step.sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))     # [B, heads or kv_heads, T, head_dim]
        if cache is not None:
            cached = cache.write(k, v, step.slots)            # [B, kv_heads, capacity, head_dim] each
            if step.over_cache:                               # not the first step: attend over the cache
                k, v = cached
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.attn_mask, is_causal=step.is_causal,
                                             scale=self.head_dim ** -0.5, enable_gqa=True)
        out = out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
        return self.o_proj(out * torch.sigmoid(gate.reshape(B, T, -1)))


# ----------------------------------------------------------------------------------------------
# 4. Gated DeltaNet
#
# Each value head keeps a state S [dk, dv], a fast-weight memory from keys to values. Per token:
#     S = exp(g_t) * S                              decay (g_t <= 0)
#     S = S + k_t (beta_t * (v_t - S^T k_t))^T      delta rule: write only what S mispredicts
#     o_t = S^T q_t
# The recurrent form below is the definition; the chunked form is the same map, reorganised
# so that most of the work is matrix products (a test holds them equal).

def recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=None, states_out=None):
    """The gated delta rule, one token at a time.
    q, k [B, T, Hv, dk] (l2-normalised, q already scaled), v [B, T, Hv, dv], g, beta [B, T, Hv],
    initial_state [B, Hv, dk, dv] or None (Hv: value heads, the key heads already repeated to match).
    Returns o [B, T, Hv, dv] and the state after every token [B, T, Hv, dk, dv] (the last one is the
    final state), both fp32; the states written into states_out if given (a cache's buffer)."""
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    B, T, Hv, dk = k.shape
    S = q.new_zeros(B, Hv, dk, v.shape[-1]) if initial_state is None else initial_state.float()
    outputs, states = [], []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        predicted = torch.einsum("bhkv,bhk->bhv", S, k[:, t])
        delta = beta[:, t, :, None] * (v[:, t] - predicted)
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
        states.append(S)
    return torch.stack(outputs, dim=1), torch.stack(states, dim=1, out=states_out)


def chunked_gated_delta_rule(q, k, v, g, beta, initial_state=None, chunk_size=64):
    """The same map as `recurrent_gated_delta_rule`, chunk by chunk (same arguments; returns o and the
    final state [B, Hv, dk, dv] only).

    Inside a chunk, with G_i = g_1 + ... + g_i (log decay since the chunk start) and S_0 the state
    entering it, unrolling the recurrence gives for the written deltas u_i (rows of U):
        u_i + sum_{j<i} beta_i e^(G_i-G_j) (k_i.k_j) u_j = beta_i (v_i - e^(G_i) S_0^T k_i)
    a unit lower-triangular system (I + A) U = ... Its right-hand side is linear in S_0, so
    U = X - Y S_0 with (I + A) X = beta V and (I + A) Y = beta e^G K: both are solved for every chunk
    at once, before any S_0 is known (U_from_v, U_from_S below). Then
        o_i   = e^(G_i) S_0^T q_i + sum_{j<=i} e^(G_i-G_j) (q_i.k_j) u_j
        S_end = e^(G_C) S_0 + sum_j e^(G_C-G_j) k_j u_j^T
    Only what needs S_0 (U, o, S_end: a few matrix products) runs chunk after chunk, since a chunk's
    S_0 is the previous chunk's S_end."""
    # heads first, contiguous: strided inputs send solve_triangular down a path ~30x slower
    q, k, v, g, beta = (t.float().transpose(1, 2).contiguous() for t in (q, k, v, g, beta))
    B, Hv, T, dk = k.shape
    dv = v.shape[-1]
    pad = -T % chunk_size                    # zero padding: beta = 0 and g = 0 leave S untouched
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    n, C = (T + pad) // chunk_size, chunk_size
    q, k, v = (t.reshape(B, Hv, n, C, -1) for t in (q, k, v))        # [B, Hv, n, C, d]
    g, beta = g.reshape(B, Hv, n, C), beta.reshape(B, Hv, n, C)
    G = g.cumsum(-1)                                                   # [B, Hv, n, C]
    # decay[i, j] = e^(G_i - G_j) for j <= i, 0 above the diagonal (masked before exp: no overflow)
    upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(upper, float("-inf")).exp()

    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)   # strictly lower: j < i
    system = A + torch.eye(C, device=q.device)                        # I + A, unit lower triangular
    U_from_v = torch.linalg.solve_triangular(system, beta[..., None] * v, upper=False, unitriangular=True)
    U_from_S = torch.linalg.solve_triangular(system, (beta * G.exp())[..., None] * k, upper=False,
                                             unitriangular=True)     # U = U_from_v - U_from_S @ S_0
    attn = (q @ k.transpose(-1, -2)) * decay                          # [B, Hv, n, C, C], j <= i
    q_decayed = q * G.exp()[..., None]
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]

    S = q.new_zeros(B, Hv, dk, dv) if initial_state is None else initial_state.float()
    outputs = []
    for c in range(n):
        U = U_from_v[:, :, c] - U_from_S[:, :, c] @ S
        outputs.append(q_decayed[:, :, c] @ S + attn[:, :, c] @ U)
        S = S * G[:, :, c, -1].exp()[..., None, None] + k_to_end[:, :, c].transpose(-1, -2) @ U
    o = torch.stack(outputs, dim=2).reshape(B, Hv, n * C, dv)[:, :, :T]
    return o.transpose(1, 2), S


def l2_normalize(x, eps=1e-6):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def causal_conv(x, weight):
    """Depthwise causal conv over time: x [B, K-1+T, C] (the K-1 earlier inputs first), weight
    [C, 1, K] -> [B, T, C]. Written as K shifted multiply-adds in x's layout: 3-10x faster here than
    F.conv1d, which wants [B, C, T] and copies to get it (T=2048, C=6144, bf16: 6.5 ms vs 57 ms).
    In bf16 it rounds after each tap, which a fused conv kernel does not (a bf16-rounding difference)."""
    K, T = weight.shape[-1], x.shape[1] - weight.shape[-1] + 1
    taps = weight[:, 0].t().contiguous()                             # [K, C]
    out = x[:, :T] * taps[0]
    for i in range(1, K):
        out.addcmul_(x[:, i:i + T], taps[i])
    return out


# Cached steps of at most this many tokens use the recurrent rule (decoding); longer ones, and every
# step without a cache, the chunked rule. Steps that may be rolled back always use the recurrent rule.
RECURRENT_MAX_TOKENS = 16


class DeltaNetCache:
    """Decoding state of one Gated DeltaNet layer, updated in place: `conv`, the last K-1 conv inputs
    before the activation [B, K-1, C], and `state`, the recurrent state [B, Hv, dk, dv] (fp32).

    Unlike a KV cache, a recurrent state cannot be cropped: it has already absorbed every token. So a
    step that may be rolled back (verifying drafts) keeps what undoing it needs: its conv inputs
    [B, K-1+T, C], the state before it and the state after each of its T tokens [B, T, Hv, dk, dv].
    Rolling back is then a lookup. Those go into buffers of their own, reserved before the step runs,
    so that a compiled step writes only into memory that outlives it (a CUDA graph replays into the
    same addresses)."""

    def __init__(self):
        self.conv = self.state = None
        self.undo = None                # (conv inputs, state before, states after each token) buffers
        self.undoable = False           # the last step was fed with rollback=True

    def reserve_undo(self, T):
        """Make the undo buffers fit a step of T tokens (before it runs; the first step reserves its own)."""
        if self.state is None or (self.undo is not None and self.undo[2].shape[1] == T):
            return
        B, K1, C = self.conv.shape
        like_conv, like_state = (self.conv.dtype, self.conv.device), (self.state.dtype, self.state.device)
        self.undo = (cache_buffer((B, K1 + T, C), *like_conv),
                     cache_buffer(self.state.shape, *like_state),
                     cache_buffer((B, T, *self.state.shape[1:]), *like_state))

    def update(self, conv_in, T, state, states=None):
        """conv_in [B, K-1+T, C]: the old window, then this step's T conv inputs; state: the final state;
        states [B, T, Hv, dk, dv]: the state after each token, given when the step may be rolled back."""
        if self.conv is None:                     # the first step: the buffers later steps write into
            self.conv = cache_buffer(conv_in[:, T:].shape, conv_in.dtype, conv_in.device)
            self.state = cache_buffer(state.shape, state.dtype, state.device)
        self.undoable = states is not None
        if self.undoable:
            self.reserve_undo(T)
            for buffer, value in zip(self.undo, (conv_in, self.state, states)):
                if value is not buffer:          # the states may be written there already
                    buffer.copy_(value)
        self.conv.copy_(conv_in[:, T:])
        self.state.copy_(state)

    def drop_last(self, n):
        """Forget the last n tokens of the last step, as if they had never been fed."""
        if n == 0:
            return
        if not self.undoable:
            raise RuntimeError("a Gated DeltaNet cache can only roll back a step fed with rollback=True")
        conv_in, before, states = self.undo
        keep = states.shape[1] - n
        # conv_in is the old K-1 window, then the step's T inputs: the K-1 ending with the keep-th token
        self.conv.copy_(conv_in[:, keep:keep + self.conv.shape[1]])
        self.state.copy_(before if keep == 0 else states[:, keep - 1])
        self.undoable = False


class GatedDeltaNet(nn.Module):
    """Linear attention with the gated delta rule. Checkpoint names: `linear_attn.*`."""

    def __init__(self, config):
        super().__init__()
        H = config.hidden_size
        self.k_heads, self.v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.dk, self.dv = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_dim, self.value_dim = self.k_heads * self.dk, self.v_heads * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = config.linear_conv_kernel_dim
        self.in_proj_qkv = nn.Linear(H, self.conv_dim, bias=False)        # rows: q, k, v
        self.in_proj_z = nn.Linear(H, self.value_dim, bias=False)         # output gate
        self.in_proj_b = nn.Linear(H, self.v_heads, bias=False)           # write strength beta
        self.in_proj_a = nn.Linear(H, self.v_heads, bias=False)           # decay rate
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.v_heads))
        self.norm = GatedRMSNorm(self.dv, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, H, bias=False)
        self.chunked_rule = chunked_gated_delta_rule      # by name: fast.py may swap in fused kernels
        self.causal_conv = causal_conv

    def forward(self, x, step, cache=None):
        B, T, _ = x.shape
        if step.pad_mask is not None:
            # zero padding tokens: k = v = 0 write nothing, and the conv sees zeros as at the start (they
            # still decay the state, which left padding meets while it is still zero)
            x = x * step.pad_mask
        # depthwise causal conv over time: prepend the last K-1 inputs (zeros at the start)
        qkv = self.in_proj_qkv(x)                                            # [B, T, C]
        window = cache.conv if cache is not None and cache.conv is not None else \
            qkv.new_zeros(B, self.kernel - 1, self.conv_dim)
        conv_in = torch.cat([window, qkv], dim=1)                            # [B, K-1+T, C]
        qkv = F.silu(self.causal_conv(conv_in, self.conv1d.weight))          # [B, T, C]
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q, k = q.reshape(B, T, self.k_heads, self.dk), k.reshape(B, T, self.k_heads, self.dk)
        v = v.reshape(B, T, self.v_heads, self.dv)
        # Qwen3.5 quirk: key head i serves the CONSECUTIVE value heads i*r .. i*r+r-1 (not tiling)
        r = self.v_heads // self.k_heads
        if r > 1:
            q, k = q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)
        q = l2_normalize(q.float()) * self.dk ** -0.5
        k = l2_normalize(k.float())
        beta = torch.sigmoid(self.in_proj_b(x)).float()                     # [B, T, Hv]
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)   # log decay
        state = cache.state if cache is not None else None
        if cache is None or (T > RECURRENT_MAX_TOKENS and not step.rollback):
            o, state = self.chunked_rule(q, k, v, g, beta, initial_state=state)
        else:
            into = cache.undo[2] if step.rollback and cache.undo is not None else None   # no copy later
            o, states = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state, states_out=into)
            state = states[:, -1]
        if cache is not None:
            cache.update(conv_in, T, state, states if step.rollback else None)
        z = self.in_proj_z(x).view(B, T, self.v_heads, self.dv)
        o = self.norm(o.to(x.dtype), z)                                      # per value head
        return self.out_proj(o.reshape(B, T, self.value_dim))


# ----------------------------------------------------------------------------------------------
# 5. MLP and mixture of experts

class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """All routed experts, stored fused as in official checkpoints: gate_up_proj [E, 2*I, H] (gate rows
    then up rows), down_proj [E, H, I]."""

    def __init__(self, config):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x, expert_ids, weights):
        """x [N, H]; expert_ids, weights [N, k]: each token's chosen experts and mixing weights."""
        k = expert_ids.shape[1]
        order = expert_ids.flatten().argsort()          # group (token, slot) pairs by expert
        tokens, slot_weights = order // k, weights.flatten()[order]
        counts = torch.bincount(expert_ids.flatten(), minlength=self.gate_up_proj.shape[0]).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = slice(start, start + n)
            gate, up = F.linear(x[tokens[rows]], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e]) * slot_weights[rows, None]
            out.index_add_(0, tokens[rows], y)
            start += n
        return out


class SparseMoE(nn.Module):
    """Softmax router over E experts, top-k renormalised, plus a shared expert behind a sigmoid gate."""

    def __init__(self, config):
        super().__init__()
        H = config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(H, config.num_experts, bias=False)           # the router
        self.experts = Experts(config)
        self.shared_expert = MLP(H, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(H, 1, bias=False)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                          # [N, H]
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, expert_ids = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        routed = self.experts(x, expert_ids, weights)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return (routed + shared).view(shape)


# ----------------------------------------------------------------------------------------------
# 6. Decoder layer, backbone, MTP head

@dataclass
class Step:
    """What every layer of one forward step shares: rotary tables, the attention mask, which tokens
    are padding, and where a cache keeps this step's tokens."""
    cos: torch.Tensor                # [B, T, rotary_dim]
    sin: torch.Tensor
    attn_mask: torch.Tensor = None   # bool [B, 1, T, S], True = may attend; None with is_causal
    is_causal: bool = False
    pad_mask: torch.Tensor = None    # [B, T, 1] 1.0 for real tokens, 0.0 for padding; None = no padding
    slots: torch.Tensor = None       # [T]: the cache slots of this step's tokens
    over_cache: bool = False         # attend over the whole cache (S = capacity), not only this step (S = T)
    rollback: bool = False           # keep what undoing this step's tokens needs (verifying drafts)


def text_positions(valid):
    """Positions [B, T]: how many real tokens come before each (0 at padding), so a left-padded row
    computes exactly as an unpadded one."""
    return (valid.cumsum(1) - 1).clamp(min=0)


def attention_mask(valid, query_at):
    """bool [B, 1, T, S]: query i (at key index query_at[i]) may attend to the real keys up to itself
    (valid [B, S]); and always to itself, so a padding row stays finite."""
    key_at = torch.arange(valid.shape[1], device=valid.device)[None, :]
    allowed = ((key_at <= query_at[:, None]) & valid[:, None, :]) | (key_at == query_at[:, None])
    return allowed[:, None]


def make_step(valid, config, dtype, positions=None):
    """A step over its own tokens only (no cache, or the first step of one): valid [B, T] bool marks
    the real ones; positions [B, T] or [3, B, T] (images, section 7), None: counted (text_positions)."""
    positions = text_positions(valid) if positions is None else positions
    cos, sin = rotary_cos_sin(positions, config, dtype)
    if valid.all():
        return Step(cos, sin, is_causal=valid.shape[1] > 1)
    mask = attention_mask(valid, torch.arange(valid.shape[1], device=valid.device))
    return Step(cos, sin, attn_mask=mask, pad_mask=valid[..., None].to(dtype))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config, layer_type):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = Attention(config)
        self.mlp = SparseMoE(config) if config.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, step, cache=None):
        mixer = self.linear_attn if self.layer_type == "linear_attention" else self.self_attn
        x = x + mixer(self.input_layernorm(x), step, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Cache:
    """Decoding state of a stack of layers (the backbone or the MTP head), for up to `capacity` tokens
    per row: one KVCache or DeltaNetCache per layer, `valid` [B, capacity], which slots hold real
    tokens (False: padding, or not written yet), `length`, how many slots are used (`next_slot` [1]
    holds the same on the device), and `rope_deltas` [B, 1], set by a prompt with images (zeros after
    text): later positions are the counted ones + rope_deltas.

    Feeding T tokens takes two calls: `begin_step` (the host's bookkeeping: room, length, buffers) and
    `step` (the step's tensors: slots, positions, mask), so that a compiled decoding step can be one
    graph which never reads a Python length (each new length would compile a new graph)."""

    def __init__(self, layer_types, capacity):
        self.capacity = capacity
        self.layers = [DeltaNetCache() if t == "linear_attention" else KVCache(capacity) for t in layer_types]
        self.valid = self.next_slot = self.rope_deltas = None
        self.length = 0
        self.first_step = True

    def __len__(self):
        return self.length

    def begin_step(self, B, T, device, rollback=False):
        """Make room for T more tokens per row: check the capacity, allocate at the first step, count
        them, and reserve what undoing them needs if this step may be rolled back (rollback=True)."""
        if self.length + T > self.capacity:
            raise ValueError(f"a cache for {self.capacity} tokens cannot take {T} more after {self.length}")
        self.first_step = self.length == 0
        if self.valid is None:
            self.valid = cache_buffer((B, self.capacity), torch.bool, device)
            self.next_slot = cache_buffer((1,), torch.long, device)
            self.rope_deltas = cache_buffer((B, 1), torch.long, device)
        if rollback and not self.first_step:
            for layer in self.layers:
                layer.reserve_undo(T)
        self.length += T

    def step(self, valid, config, dtype, rollback=False, positions=None):
        """The Step for the T = valid.shape[1] tokens begin_step made room for. positions [3, B, T]: given
        with images (section 7), and then every later step continues after them. The first step attends
        over its own tokens only; later ones over the whole cache, masked."""
        slots = self.next_slot + torch.arange(valid.shape[1], device=valid.device)     # [T]
        self.next_slot.add_(valid.shape[1])         # in place: += would also rebind the attribute
        self.valid[:, slots] = valid
        counted = text_positions(self.valid)[:, slots]                        # [B, T]
        if positions is not None:
            # the next token goes where mrope_positions puts text after the last one: its position + 1
            # after text, start + max(h, w) after an image token (its row and column axes; not its frame,
            # which can run past that when an image has more frames than rows and columns)
            self.rope_deltas.copy_(positions[1:, :, -1:].amax(0) - counted[:, -1:])
        else:       # text and image prompts alike, so that a compiled step has one graph for both
            positions = counted + self.rope_deltas
        if self.first_step:
            step = make_step(valid, config, dtype, positions)
        else:       # a padding mask even if all are real: a decoding step's graph never asks the data
            cos, sin = rotary_cos_sin(positions, config, dtype)
            step = Step(cos, sin, attn_mask=attention_mask(self.valid, slots), over_cache=True,
                        pad_mask=valid[..., None].to(dtype))
        step.slots, step.rollback = slots, rollback
        return step

    def crop(self, length):
        """Forget every token after the first `length` (the DeltaNet layers: within the last step,
        which must have been fed with rollback=True)."""
        for layer in self.layers:
            layer.drop_last(self.length - length)
        self.valid[:, length:] = False
        self.next_slot.fill_(length)
        self.length = length


class TextModel(nn.Module):
    """The backbone: embeddings, decoder layers, final norm. Checkpoint prefix `model.`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, t) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, valid=None, cache=None, hidden_states=None, rollback=False, embeds=None,
                positions=None):
        """input_ids [B, T] -> post-norm hidden states [B, T, H]. valid [B, T] bool marks real tokens
        (None: all). `hidden_states`, a list, if given collects the embeddings and every layer's output
        (before the final norm). rollback: this cached step may be undone by cache.crop. With images
        (Qwen35.embed_inputs): embeds [B, T, H] replace embed_tokens(input_ids), positions [3, B, T]."""
        if cache is not None:                       # the host's part first, before any tensor work
            cache.begin_step(*input_ids.shape, input_ids.device, rollback)
        x = self.embed_tokens(input_ids) if embeds is None else embeds
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid
        step = cache.step(valid, self.config, x.dtype, rollback, positions) if cache is not None else \
            make_step(valid, self.config, x.dtype, positions)
        if hidden_states is not None:
            hidden_states.append(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, step, cache.layers[i] if cache is not None else None)
            if hidden_states is not None:
                hidden_states.append(x)
        return self.norm(x)


class MTPHead(nn.Module):
    """Multi-token prediction: from the main model's hidden state at t and token t+1, predict token
    t+2. Checkpoint prefix `mtp.` (top level, beside `model.`)."""

    def __init__(self, config):
        super().__init__()
        H = config.hidden_size
        self.config = config
        self.pre_fc_norm_embedding = RMSNorm(H, config.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(H, config.rms_norm_eps)
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.layers = nn.ModuleList(DecoderLayer(config, "full_attention")
                                    for _ in range(config.mtp_num_hidden_layers))
        self.norm = RMSNorm(H, config.rms_norm_eps)

    def forward(self, hidden, next_embeds, valid, cache=None, layer=0, positions=None):
        """hidden [B, N, H]: the main model's hidden state AFTER its final norm (or, when chaining,
        this head's previous output); next_embeds [B, N, H]: input embeddings of the tokens one step
        later; valid [B, N] bool; positions: the rows' [3, B, N] positions with images (None: counted).
        Returns this head's output after `norm` [B, N, H] (feed it to lm_head)."""
        if cache is not None:
            cache.begin_step(*valid.shape, valid.device)
        step = cache.step(valid, self.config, hidden.dtype, positions=positions) if cache is not None else \
            make_step(valid, self.config, hidden.dtype, positions)
        # Qwen3.5 quirk: the embedding comes FIRST: fc.weight[:, :H] multiplies the embedding
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], -1))
        x = self.layers[layer](x, step, cache.layers[layer] if cache is not None else None)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------
# 7. The vision tower and multimodal positions
#
# Official checkpoints are vision-language models: an image becomes patches (2 frames x 16 x 16
# pixels: a still image is repeated; load.py's `image_patches` does what Qwen's processor does),
# the tower turns each 2 x 2 group of neighbouring patches into one vector of the language model's
# width, and those vectors replace the embeddings of the image's placeholder tokens. Text and image
# tokens then get 3-D rotary positions (time, height, width). Videos are not supported.
# Shapes: N patches (all images together), D the tower's width, m spatial_merge_size.

@dataclass
class VisionConfig:
    """The vision tower, config.json's `vision_config` (defaults: the 27B and 35B-A3B tower)."""
    out_hidden_size: int                    # the language model's hidden size
    depth: int = 27
    hidden_size: int = 1152                 # D
    intermediate_size: int = 4304
    num_heads: int = 16
    patch_size: int = 16                    # p: pixels per patch side
    temporal_patch_size: int = 2            # frames per patch
    spatial_merge_size: int = 2             # m: m x m patches make one language-model token
    in_channels: int = 3
    num_position_embeddings: int = 2304     # a 48 x 48 learned position table
    rope_theta: float = 10000.0             # official files give none: transformers' default
    layer_norm_eps: float = 1e-6            # fixed in every LayerNorm of the tower

    def __post_init__(self):
        check_types(self)
        problems = []
        if bad := [f.name for f in fields(self) if f.type is int and getattr(self, f.name) <= 0]:
            problems.append(f"sizes that must be > 0: {bad}")
        elif self.hidden_size % self.num_heads or self.head_dim % 4:
            problems.append(f"hidden_size / num_heads = {self.hidden_size} / {self.num_heads} must be a whole "
                            "multiple of 4 (the 2-D rotary turns head_dim/4 pairs with each axis)")
        elif math.isqrt(self.num_position_embeddings) ** 2 != self.num_position_embeddings:
            problems.append(f"num_position_embeddings={self.num_position_embeddings} is not a square")
        if problems:
            raise ValueError("inconsistent vision config: " + "; ".join(problems))

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads


def merge_order(x, m):
    """[h, w, ...] in raster order -> [h*w, ...] in the order patches come from the processor.
    Qwen3.5 quirk: patches arrive in m x m groups (one language-model token each, contiguous),
    the groups in raster order and raster order inside each group; tables must follow suit."""
    h, w = x.shape[:2]
    x = x.reshape(h // m, m, w // m, m, *x.shape[2:]).transpose(1, 2)   # [h/m, w/m, m, m, ...]
    return x.reshape(h * w, *x.shape[4:])


class PatchEmbed(nn.Module):
    def __init__(self, c):
        super().__init__()
        kernel = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.in_channels, c.hidden_size, kernel, stride=kernel)   # [D, C, tp, p, p]

    def forward(self, pixel_values):
        """[N, C*tp*p*p], one patch per row -> [N, D]: a convolution whose kernel covers its whole
        input is a matrix product with the flattened kernel."""
        return F.linear(pixel_values.to(self.proj.weight.dtype), self.proj.weight.flatten(1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads, self.head_dim = c.num_heads, c.head_dim
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)      # rows q, k, v; every linear has a bias
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, cos, sin, frames):
        """x [N, D]; cos, sin [1, N, head_dim]; frames: patches per frame, in order."""
        N, D = x.shape
        q, k, v = self.qkv(x).view(1, N, 3, self.heads, self.head_dim).unbind(2)   # [1, N, heads, hd]
        # Qwen3.5 quirk: the rotary turns the WHOLE head (the text model: 25%), in fp32
        q, k = (apply_rotary(t.float(), cos, sin).to(t.dtype) for t in (q, k))
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))                          # [heads, N, hd]
        # Qwen3.5 quirk: bidirectional attention within each frame of each image, never across
        out = torch.cat([F.scaled_dot_product_attention(*qkv) for qkv in
                         zip(q.split(frames, 1), k.split(frames, 1), v.split(frames, 1))], dim=1)
        return self.proj(out.transpose(0, 1).reshape(N, D))


class VisionMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.linear_fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.linear_fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))   # gelu_pytorch_tanh


class VisionBlock(nn.Module):
    """Pre-norm ViT block. Qwen3.5 quirk: LayerNorm with bias here, RMSNorm in the language model."""

    def __init__(self, c):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attn = VisionAttention(c)
        self.mlp = VisionMLP(c)

    def forward(self, x, cos, sin, frames):
        x = x + self.attn(self.norm1(x), cos, sin, frames)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each m x m group of patches -> one language-model token [out_hidden_size]."""

    def __init__(self, c):
        super().__init__()
        self.group = c.hidden_size * c.spatial_merge_size ** 2
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)       # per patch, before grouping
        self.linear_fc1 = nn.Linear(self.group, self.group)
        self.linear_fc2 = nn.Linear(self.group, c.out_hidden_size)

    def forward(self, x):
        x = self.norm(x).view(-1, self.group)        # [N/m^2, m^2*D]: a group's patches are consecutive rows
        # Qwen3.5 quirk: the exact (erf) GELU here, the tanh approximation inside the blocks
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionTower(nn.Module):
    """Patches -> image features, one per image placeholder token. Checkpoint prefix `model.visual.`."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c)
        self.pos_embed = nn.Embedding(c.num_position_embeddings, c.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.depth))
        self.merger = PatchMerger(c)

    def position_table(self, h, w):
        """The learned side x side table resampled to an h x w patch grid: [h*w, D] in merge order.
        Qwen3.5 quirk: bilinear with align_corners=True, so the table's corners land exactly on the
        image's corner patches, whatever its size."""
        side = math.isqrt(self.config.num_position_embeddings)
        table = self.pos_embed.weight.float().t().reshape(1, -1, side, side)     # [1, D, side, side]
        grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0]
        return merge_order(grid.permute(1, 2, 0), self.config.spatial_merge_size)

    def rotary(self, h, w):
        """cos, sin [h*w, head_dim] (fp32, merge order) of the 2-D rotary: with head_dim/2 rotated
        pairs, the first half turn with the patch's row, the second half with its column, each at
        the same head_dim/4 frequencies."""
        half = self.config.head_dim // 2
        inv_freq = 1.0 / self.config.rope_theta ** (torch.arange(0, half, 2).float() / half)
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coords = merge_order(torch.stack([rows, cols], dim=-1), self.config.spatial_merge_size)   # [h*w, 2]
        angles = (coords[..., None].float() * inv_freq).flatten(1)        # [h*w, head_dim/2]: rows | columns
        angles = torch.cat([angles, angles], dim=-1)                      # rotate-half layout
        return angles.cos(), angles.sin()

    def forward(self, pixel_values, grid_thw):
        """pixel_values [N, C*tp*p*p] and grid_thw [images, 3] (frames, rows, columns of patches), as
        the processor makes them -> [N/m^2, out_hidden_size], the images' tokens in order."""
        x = self.patch_embed(pixel_values)                                 # [N, D]
        tables, cos, sin, frames = [], [], [], []
        for t, h, w in grid_thw.tolist():
            c, s = self.rotary(h, w)
            # every frame repeats the image's spatial positions; each frame attends only within itself
            tables.append(self.position_table(h, w).repeat(t, 1))
            cos.append(c.repeat(t, 1))
            sin.append(s.repeat(t, 1))
            frames += [h * w] * t
        x = x + torch.cat(tables).to(x.device, x.dtype)
        cos, sin = torch.cat(cos)[None].to(x.device), torch.cat(sin)[None].to(x.device)   # [1, N, head_dim]
        for block in self.blocks:
            x = block(x, cos, sin, frames)
        return self.merger(x)


def check_images(pixel_values, grid_thw, c: VisionConfig):
    """Shapes that fit the tower, before anything runs on them."""
    width = c.in_channels * c.temporal_patch_size * c.patch_size ** 2
    if not torch.is_tensor(grid_thw) or grid_thw.is_floating_point() or grid_thw.dtype == torch.bool:
        raise ValueError(f"image_grid_thw must be a tensor of integers; got {getattr(grid_thw, 'dtype', grid_thw)}")
    if pixel_values.ndim != 2 or pixel_values.shape[1] != width:
        raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected [patches, {width}] "
                         f"(channels x {c.temporal_patch_size} frames x {c.patch_size} x {c.patch_size} pixels)")
    m = c.spatial_merge_size
    if grid_thw.ndim != 2 or grid_thw.shape[1] != 3 or (grid_thw[:, 1:] % m).any() or (grid_thw <= 0).any():
        raise ValueError(f"image_grid_thw must be [images, 3] rows (frames, rows, columns), rows and columns "
                         f"multiples of spatial_merge_size={m}; got {grid_thw.tolist()}")
    if int(grid_thw.prod(-1).sum()) != pixel_values.shape[0]:
        raise ValueError(f"image_grid_thw covers {int(grid_thw.prod(-1).sum())} patches, but pixel_values has "
                         f"{pixel_values.shape[0]}")


def merge_image_features(embeds, input_ids, features, image_token_id):
    """Put the tower's rows [image tokens, H] at the image tokens of embeds [B, T, H], in reading order."""
    is_image = input_ids == image_token_id
    if is_image.sum() != features.shape[0]:
        raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens (id {image_token_id}), but the images "
                         f"make {features.shape[0]} (frames x rows x columns / spatial_merge_size^2 each)")
    embeds = embeds.clone()
    embeds[is_image] = features.to(embeds.dtype)
    return embeds


def image_positions(start, t, h, w):
    """[3, t*h*w]: (start + frame, start + row, start + column) over an image's merged token grid."""
    grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack(grid).flatten(1) + start


def mrope_positions(input_ids, valid, grid_thw, config):
    """3-D rotary positions [3, B, T] (time, height, width; 0 at padding) of a sequence with images:
    each run of image tokens is the next image of grid_thw, in reading order. A text token has one
    position on all three axes, one more than the token before; so text alone is plain RoPE."""
    m = config.vision.spatial_merge_size
    grids = [(t, h // m, w // m) for t, h, w in grid_thw.tolist()]         # in merged tokens
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    for b in range(input_ids.shape[0]):
        is_image = (input_ids[b, valid[b]] == config.image_token_id).tolist()
        pieces, start, i = [], 0, 0
        while i < len(is_image):
            if not is_image[i]:
                n = next((j for j in range(i, len(is_image)) if is_image[j]), len(is_image)) - i
                pieces.append(torch.arange(start, start + n).expand(3, -1))
                start, i = start + n, i + n
                continue
            t, h, w = grids.pop(0)
            if not all(is_image[i:i + t * h * w]):
                raise ValueError(f"row {b}: an image of {t}x{h}x{w} tokens (grid {t}x{h * m}x{w * m}) does not "
                                 f"fit the run of image tokens at real token {i}")
            pieces.append(image_positions(start, t, h, w))
            # Qwen3.5 quirk: the text after an image goes on at start + max(h, w), not at start + its
            # token count (and the frames do not count)
            start, i = start + max(h, w), i + t * h * w
        if pieces:                                                          # else a row of padding only
            positions[:, b, valid[b].cpu()] = torch.cat(pieces, dim=1)
    return positions.to(input_ids.device)


# ----------------------------------------------------------------------------------------------
# 8. The language model with its MTP head, and the losses

@dataclass
class Qwen35Output:
    logits: torch.Tensor = None           # [B, T, V]: row t predicts token t+1 (None with logits=False)
    hidden: torch.Tensor = None           # [B, T, H]: post-norm hidden states (what MTP reads)
    mtp_logits: torch.Tensor = None       # [B, T-1, V]: row t predicts token t+2
    mtp_logits_per_depth: list = None     # depth d: [B, T-d, V], row t predicts token t+d+1
    loss: torch.Tensor = None             # lm_loss + mtp_loss_weight * mtp_loss
    lm_loss: torch.Tensor = None
    mtp_loss: torch.Tensor = None         # mean over depths of mtp_losses
    mtp_losses: list = None
    loss_sums: torch.Tensor = None        # [1 + D] fp32: summed token CE of the main model, then each depth
    loss_counts: torch.Tensor = None      # [1 + D]: their target counts (lm_loss = sums[0] / counts[0])
    predictions: list = None              # logits=False: argmax ids, [B, T] for the main model, [B, T-d] per depth
    hidden_states: list = None            # embeddings, then every layer's output (before the norm)


def real_rows(valid, d):
    """[B, T-d]: which rows of depth d (0: the main model) read real tokens only, at t and at t+d."""
    return valid[:, :valid.shape[1] - d] & valid[:, d:]


def loss_targets(labels, depths, valid=None):
    """Targets of each term, [B, T-d] for d = 0 (the main model: row t scores token t+1) to `depths`
    (MTP depth d: row t scores token t+d+1); the last rows have none (-100). With padding (valid [B, T]),
    a row that reads a padding position (see real_rows) scores nothing either: with left padding, the
    last padding row would otherwise be scored on the first real token, from no context."""
    targets = [F.pad(labels[:, d + 1:], (0, 1), value=-100) for d in range(depths + 1)]
    if valid is None:
        return targets
    return [t.masked_fill(~real_rows(valid, d), -100) for d, t in enumerate(targets)]


def cross_entropy_sum(logits, targets):
    """Summed cross-entropy over targets that are not -100 (the Hugging Face ignore index), in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")


def mtp_mean(sums, counts):
    """mtp_loss from the MTP depths' summed losses and target counts [D]: the mean over depths of each
    depth's mean loss. A depth with no target (all its labels -100, as in a batch of short answers) is
    left out: its 0/0 would be NaN and spread to every gradient. 0 if no depth has a target."""
    return (sums / counts.clamp(min=1)).sum() / (counts > 0).sum().clamp(min=1)


# Logits linear_cross_entropy holds at once: 2^27 fp32 numbers (512 MiB), 540 rows at Qwen3.5's
# 248,320-token vocabulary, where B x T rows of logits per term would take gigabytes.
CE_CHUNK_NUMBERS = 2 ** 27


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits hidden @ weight^T, and each row's argmax, computed `rows` rows
    at a time. Forward keeps each row's log-sum-exp [N]; backward recomputes a chunk's logits and turns
    them into gradients in place (softmax minus one-hot). Under autocast the products run in the
    autocast dtype, as lm_head's would, and the softmax in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        acc = torch.promote_types(dtype, torch.float32)
        h, W = hidden.to(dtype), weight.to(dtype)
        lse = hidden.new_empty(len(h), dtype=acc)
        argmax = torch.empty(len(h), dtype=torch.long, device=hidden.device)
        loss = hidden.new_zeros((), dtype=acc)
        with torch.autocast(device, enabled=False):
            for s in range(0, len(h), rows):
                logits = F.linear(h[s:s + rows], W).to(acc)                 # [rows, V]
                t = targets[s:s + rows]
                lse[s:s + rows] = logits.logsumexp(-1)
                argmax[s:s + rows] = logits.argmax(-1)
                picked = logits.gather(1, t.clamp(min=0)[:, None])[:, 0]
                loss += torch.where(t != -100, lse[s:s + rows] - picked, 0).sum()
                del logits        # else two chunks of logits are alive while the next one is made
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.rows, ctx.dtype = rows, dtype
        ctx.mark_non_differentiable(argmax)
        return loss, argmax

    @staticmethod
    def backward(ctx, grad_loss, grad_argmax):
        hidden, weight, targets, lse = ctx.saved_tensors
        rows, dtype = ctx.rows, ctx.dtype
        h, W = hidden.to(dtype), weight.to(dtype)
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_W = weight.new_zeros(weight.shape, dtype=lse.dtype) if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, len(h), rows):
                t = targets[s:s + rows]
                scored = t != -100
                g = F.linear(h[s:s + rows], W).to(lse.dtype).sub_(lse[s:s + rows, None]).exp_()   # softmax
                g[scored, t[scored]] -= 1
                g = g.mul_(scored[:, None] * grad_loss).to(dtype)               # unscored rows: no gradient
                if grad_h is not None:
                    grad_h[s:s + rows] = g @ W
                if grad_W is not None and g.dtype == grad_W.dtype:
                    grad_W.addmm_(g.t(), h[s:s + rows])                          # in place: no [V, H] temporary
                elif grad_W is not None:
                    grad_W += g.t() @ h[s:s + rows]                              # bf16 product, fp32 sum
                del g
        return grad_h, None if grad_W is None else grad_W.to(weight.dtype), None, None


def linear_cross_entropy(hidden, weight, targets, rows=None):
    """(summed cross-entropy over targets that are not -100, argmax per row) of the logits
    hidden @ weight^T, for hidden [..., H] and targets [...], holding at most `rows` rows of logits at
    a time (default: CE_CHUNK_NUMBERS / vocabulary). Same value and gradients as cross_entropy_sum on
    lm_head's logits (a test holds them equal)."""
    rows = rows or max(1, CE_CHUNK_NUMBERS // weight.shape[0])
    loss, argmax = LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), rows)
    return loss, argmax.view(targets.shape)


class Qwen35(nn.Module):
    """Qwen3.5 language model (dense or MoE) with its MTP head, and its vision tower if it has one."""

    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = MTPHead(config) if config.mtp_num_hidden_layers > 0 else None
        self.visual = VisionTower(config.vision) if config.vision is not None else None
        self.tie_weights()
        if self.lm_head.weight.device.type != "meta":
            self.apply(self._init_weights)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def _init_weights(self, module):
        """From-scratch initialisation (a loaded checkpoint overwrites all of it)."""
        std = 0.02
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:    # the vision tower's
                module.bias.zero_()
        elif isinstance(module, Experts):
            module.gate_up_proj.normal_(0.0, std)
            module.down_proj.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.zero_()
        elif isinstance(module, GatedRMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, GatedDeltaNet):
            module.A_log.copy_(torch.empty_like(module.A_log).uniform_(1, 16).log())   # decay rates
            module.dt_bias.fill_(1.0)
            nn.init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))

    def embed_inputs(self, input_ids, valid=None, pixel_values=None, image_grid_thw=None):
        """Input embeddings [B, T, H] and rotary positions: for text, embed_tokens(input_ids) and None
        (counted, see text_positions); with images (section 7), the image features in place of the
        image tokens' embeddings, and 3-D positions [3, B, T]."""
        embeds = self.model.embed_tokens(input_ids)
        if pixel_values is None and image_grid_thw is None:
            return embeds, None
        if self.visual is None:
            raise ValueError("images given, but this model has no vision tower (no model.visual.* tensors)")
        if pixel_values is None or image_grid_thw is None:
            raise ValueError("pixel_values and image_grid_thw go together, as the image processor returns them")
        check_images(pixel_values, image_grid_thw, self.config.vision)
        features = self.visual(pixel_values, image_grid_thw)
        embeds = merge_image_features(embeds, input_ids, features, self.config.image_token_id)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid
        return embeds, mrope_positions(input_ids, valid, image_grid_thw, self.config)

    def forward(self, input_ids, labels=None, attention_mask=None, mtp=True, mtp_depth=1,
                output_hidden_states=False, pixel_values=None, image_grid_thw=None, logits=True):
        """input_ids [B, T]; labels [B, T] unshifted, -100 ignored; attention_mask [B, T] 1/0 (left
        padding; rows that read padding score nothing, see loss_targets). mtp_depth D > 1 chains the head
        D times (depth d predicts token t+d+1), see mtp_hidden.
        Images: pixel_values [patches, C*tp*p*p] and image_grid_thw [images, 3] as Qwen's processor makes
        them, each image a run of t*h*w/m^2 image_token_id tokens in input_ids, in order.
        logits=False computes no full-vocabulary logits (out.logits and the MTP logits stay None): the
        losses, and out.predictions (each row's argmax), come from linear_cross_entropy over chunks of
        rows, with the same values and gradients. Training at a 248k vocabulary needs that: the logits
        of a batch of 8 x 2048 tokens alone take 16 GB in fp32, per term."""
        T = input_ids.shape[1]
        valid = None if attention_mask is None else attention_mask.bool()
        embeds, positions = self.embed_inputs(input_ids, valid, pixel_values, image_grid_thw)
        hidden_states = [] if output_hidden_states else None
        hidden = self.model(input_ids, valid, hidden_states=hidden_states, embeds=embeds, positions=positions)
        out = Qwen35Output(hidden=hidden, hidden_states=hidden_states)
        terms = [hidden]                  # the hidden states to score: the main model's, then each MTP depth's
        if mtp and self.mtp is not None and T > 1:
            terms += self.mtp_hidden(embeds, hidden, valid, mtp_depth, positions)
        if logits:
            out.logits, *per_depth = [self.lm_head(h) for h in terms]
            if per_depth:
                out.mtp_logits_per_depth, out.mtp_logits = per_depth, per_depth[0]
            if labels is not None:
                targets = loss_targets(labels, len(terms) - 1, valid)
                self.set_losses(out, [cross_entropy_sum(l, t) for l, t in zip([out.logits] + per_depth, targets)],
                                targets)
        else:                             # chunk by chunk; without labels, the predictions only
            targets = loss_targets(torch.full_like(input_ids, -100) if labels is None else labels, len(terms) - 1,
                                   valid)
            sums, out.predictions = map(list, zip(*[linear_cross_entropy(h, self.lm_head.weight, t)
                                                     for h, t in zip(terms, targets)]))
            if labels is not None:
                self.set_losses(out, sums, targets)
        return out

    def set_losses(self, out, sums, targets):
        """Each term's loss is its mean over its targets. Depths whose rows all lie past the last label
        (d >= T - 1) score nothing and are not reported; mtp_loss also leaves out depths whose labels
        happen to be all -100 in this batch (see mtp_mean), whose mtp_losses entry is NaN (0/0)."""
        counts = [(t != -100).sum() for t in targets]
        out.loss_sums, out.loss_counts = torch.stack(sums), torch.stack(counts)
        out.lm_loss = out.loss = sums[0] / counts[0]
        depths = min(len(sums) - 1, out.hidden.shape[1] - 2)       # d = 1 .. depths: those that may have targets
        out.mtp_losses = [sums[d] / counts[d] for d in range(1, depths + 1)]
        if depths > 0:
            out.mtp_loss = mtp_mean(out.loss_sums[1:depths + 1], out.loss_counts[1:depths + 1])
            out.loss = out.lm_loss + self.config.mtp_loss_weight * out.mtp_loss

    def mtp_hidden(self, embeds, hidden, valid, depth, positions=None):
        """Depth d (1..D): row t fuses h_t^(d-1) (h^(0) = main hidden state, then the head's own
        post-norm output) with the input embedding of token t+d (embeds: the main model's). Each depth
        attends causally over its own rows (the Megatron / DeepSeek-V3 training form); with fewer layers
        than depths, layer (d-1) % mtp_num_hidden_layers serves depth d, as vLLM drafts. Drafting
        chains the same way but attends over depth-1 rows of the context (see `draft`). Returns the
        head's output per depth, [B, T-d, H]: lm_head turns it into logits.

        With images, row t reads what the main model read at t+1, the image feature at an image token,
        and sits at the main model's 3-D position of t (positions [3, B, T]), as the engines that serve
        Qwen3.5 MTP do: vLLM's qwen3_5_mtp.py merges the image embeddings into the head's input
        (embed_input_ids) and its llm_base_proposer.py shifts the ids by one but "leave[s] the positions
        unchanged"; SGLang's qwen3_5_mtp.py feeds the target's merged `mm_input_embeds`. For text the
        positions of t and t+1 differ by the same 1 on every row, so either choice gives the same logits."""
        T = embeds.shape[1]
        valid = embeds.new_ones(embeds.shape[:2], dtype=torch.bool) if valid is None else valid
        per_depth, h = [], hidden
        for d in range(1, min(depth, T - 1) + 1):
            n = T - d
            row_positions = None if positions is None else positions[..., :n]
            h = self.mtp(h[:, :n], embeds[:, d:], real_rows(valid, d), layer=(d - 1) % len(self.mtp.layers),
                         positions=row_positions)
            per_depth.append(h)
        return per_depth


# ----------------------------------------------------------------------------------------------
# 9. Generation and speculative decoding

@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: the argmax at temperature 0, else a sample from
    softmax(logits / temperature) restricted to the top_p nucleus."""
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator = None


def token_probs(logits, sampling):
    """Sampling distribution [.., V] (fp32): softmax(logits / temperature), restricted to the smallest
    set of tokens whose probability reaches top_p (the nucleus), renormalised."""
    probs = F.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p   # mass before it already >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def pick(logits, sampling):
    """Next tokens [B] from logits [B, V]: the argmax at temperature 0, else a sample."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(token_probs(logits, sampling), 1, generator=sampling.generator)[:, 0]


def verify_drafts(drafts, draft_probs, logits, sampling):
    """Accept a prefix of the n drafts given the main model's logits [n+1, V] at the block
    [last token, drafts...]. Returns (accepted count a, the token after the accepted drafts [1]).
    Greedy: accept while each draft is the argmax. Sampling: accept draft i with probability
    min(1, p_i(d)/q_i(d)); at the first rejection sample from the residual max(0, p_i - q_i),
    renormalised; if all pass, sample from p_n. This leaves the output distributed exactly as p."""
    if sampling.temperature == 0:
        target = logits.argmax(-1)
        a = 0
        while a < len(drafts) and drafts[a].item() == target[a].item():
            a += 1
        return a, target[a:a + 1]
    p = token_probs(logits, sampling)
    for i, (d, q) in enumerate(zip(drafts, draft_probs)):
        if torch.rand(1, generator=sampling.generator, device=q.device) * q[d] < p[i, d]:
            continue
        residual = (p[i] - q).clamp(min=0)
        residual = residual if residual.sum() > 0 else p[i]      # all 0 only if p == q, up to rounding
        return i, torch.multinomial(residual / residual.sum(), 1, generator=sampling.generator)
    return len(drafts), torch.multinomial(p[-1], 1, generator=sampling.generator)


def decode(model, input_ids, embeds, positions, valid, max_new_tokens, sampling, eos, stats, stream):
    """Plain decoding: one main-model forward per token. Finished rows repeat their EOS. embeds and
    positions: the prompt's, from Qwen35.embed_inputs (with images, the cache continues the positions)."""
    cache = Cache(model.config.layer_types, input_ids.shape[1] + max_new_tokens)
    hidden = model.model(input_ids, valid, cache, embeds=embeds, positions=positions)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new = []
    while True:
        token = pick(model.lm_head(hidden[:, -1]), sampling)
        if new:
            token = torch.where(finished, new[-1], token)
        new.append(token)
        stream(token[:, None])
        finished |= torch.isin(token, eos)
        if len(new) == max_new_tokens or finished.all():
            return torch.stack(new, dim=1)
        hidden = model.model(token[:, None], None, cache)
        stats["main_forwards"] += 1


def draft_head(model, draft_vocab, draft_vocab_size):
    """The lm_head rows the MTP head drafts from [N, H] and the token id of each row [N] (None: row i
    is token i). Taken once per generate call, so that each draft reads N rows of lm_head instead of
    V: a set of ids (draft_vocab) is gathered into a copy, the first N ids (draft_vocab_size) are a
    view; neither given, all V rows."""
    weight = model.lm_head.weight
    if draft_vocab is not None:
        ids = draft_vocab.to(weight.device, torch.long)
        return weight[ids], ids
    return weight[:draft_vocab_size], None


def draft(model, hidden, next_embeds, valid, mtp_cache, n, sampling, head, positions=None):
    """Add the MTP rows (hidden_t, next_embeds_t) to the head's cache (at `positions`, if given: a
    prompt with images), then draft n tokens. Draft i > 0 feeds back the head's own post-norm output
    with draft i-1, one position later (as vLLM does); those chained rows are dropped from the cache
    afterwards, since the verified rows replace them. Drafts are text: head = (rows, ids) from
    draft_head, drafts are chosen among those rows and mapped to token ids.
    Returns the drafts ([1] each) and, when sampling, the distributions they were drawn from ([V] each)."""
    if n == 0:
        return [], []
    rows, ids = head
    V = model.config.vocab_size
    embed = model.model.embed_tokens
    if valid is None:
        valid = torch.ones(next_embeds.shape[:2], dtype=torch.bool, device=next_embeds.device)
    h = model.mtp(hidden, next_embeds, valid, mtp_cache, positions=positions)[:, -1:]
    committed = len(mtp_cache)
    drafts, probs = [], []
    for i in range(n):
        logits = F.linear(h[:, -1], rows)                # [1, N]
        row = pick(logits, sampling)
        drafts.append(row if ids is None else ids[row])
        if sampling.temperature > 0:   # q over the whole vocabulary, zero outside the draft vocabulary
            q = token_probs(logits, sampling)[0]
            probs.append(F.pad(q, (0, V - len(q))) if ids is None else q.new_zeros(V).index_copy(0, ids, q))
        if i + 1 < n:
            h = model.mtp(h, embed(drafts[-1][:, None]), valid[:, -1:], mtp_cache)
    mtp_cache.crop(committed)
    return drafts, probs


def speculative_decode(model, input_ids, embeds, positions, valid, max_new_tokens, k, sampling, eos, stats,
                       stream, head):
    """Draft k tokens with MTP, verify them in one main-model forward of k+1 tokens, keep the agreeing
    prefix and roll the caches back past the rest (batch 1). embeds, positions: as for `decode`.

    The MTP head's cache holds one row (h_t, x_{t+1}) for each position t whose next token is final;
    rows whose inputs are known but not yet fed wait as `pending`. One round, with x_{t+1} the last
    token kept so far:
        before     MTP cache: rows 1 .. t-j            pending: rows t-j+1 .. t, the last (h_t, x_{t+1})
                   (j: the last round's a+1; in the first round the pending rows are the prompt's)
        draft      feed the pending rows; the last one's output o_1 -> d_1; then (o_1, d_1) -> d_2, ...
                   (o_i: the head's own output; these chained rows are dropped again)
        verify     backbone on [x_{t+1}, d_1 .. d_n] -> h_{t+1} .. h_{t+n+1}; a drafts accepted,
                   then y, the main model's own token after them
        after      MTP cache: rows 1 .. t              pending: (h_{t+1}, d_1) .. (h_{t+a}, d_a), (h_{t+a+1}, y)
    The backbone cache drops the n - a rejected drafts (DeltaNet layers included, see DeltaNetCache)."""
    # the backbone never holds more than the prompt and max_new_tokens (drafts stop at the budget); the
    # MTP head also holds a round's chained drafts for a moment
    capacity = input_ids.shape[1] + max_new_tokens
    cache, mtp_cache = Cache(model.config.layer_types, capacity), Cache(["full_attention"], capacity + k)
    embed = model.model.embed_tokens
    hidden = model.model(input_ids, valid, cache, embeds=embeds, positions=positions)
    token = pick(model.lm_head(hidden[:, -1]), sampling)
    stream(token[:, None])
    new = [token]                                       # [1] tensors, then blocks of kept tokens
    # At prefill the pending rows are the whole prompt, so the head drafts with the prompt as context:
    # with images, the rows read the image features and the prompt's 3-D positions (see Qwen35.mtp_hidden),
    # and the head's cache continues those positions as the backbone's does.
    pending_hidden, pending_next = hidden, torch.cat([embeds[:, 1:], embed(token[:, None])], dim=1)
    # row t is real when x_t and x_{t+1} are (real_rows(valid, 1)); the last row's x_{t+1} is the token just picked
    pending_valid = None if valid is None else valid & torch.cat([valid[:, 1:], valid[:, -1:]], dim=1)
    pending_positions = positions
    produced = 1
    while produced < max_new_tokens and not torch.isin(token, eos).any():
        n = min(k, max_new_tokens - produced - 1)      # never draft past the budget
        drafts, draft_probs = draft(model, pending_hidden, pending_next, pending_valid, mtp_cache, n, sampling,
                                    head, pending_positions)
        block = torch.cat([token] + drafts)[None]       # [1, n+1]: last token, then the drafts
        hidden = model.model(block, None, cache, rollback=True)
        stats["main_forwards"] += 1
        accepted, token = verify_drafts(drafts, draft_probs, model.lm_head(hidden[0]), sampling)
        cache.crop(len(cache) - (n - accepted))        # roll back the rejected drafts
        stats["drafted"] += n
        stats["accepted"] += accepted
        for i in range(n):
            stats["drafted_at"][i] += 1
            stats["accepted_at"][i] += i < accepted
        kept = torch.cat(drafts[:accepted] + [token])
        if (ends := torch.isin(kept, eos).nonzero()).numel():
            kept = token = kept[:ends[0, 0] + 1]        # stop at the first EOS
        new.append(kept)
        stream(kept[None])
        produced += len(kept)
        pending_hidden, pending_next = hidden[:, :accepted + 1], embed(kept[None])
        pending_valid = pending_positions = None
    return torch.cat(new)[None]


def check_draft_vocab(ids, V):
    """A draft vocabulary is a non-empty 1-D tensor of distinct token ids in [0, V). Distinct: a repeated
    id would be counted twice in the draft distribution q."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 1 or ids.dtype == torch.bool or ids.is_floating_point() \
            or ids.is_complex():
        what = f"a {ids.ndim}-D {ids.dtype} tensor" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"draft_vocab must be a 1-D tensor of integer token ids; got {what}")
    if len(ids) == 0:
        raise ValueError("draft_vocab is empty: it needs at least one token id")
    if ids.min() < 0 or ids.max() >= V:
        raise ValueError(f"draft_vocab ids must lie in [0, {V}); got min {ids.min().item()}, max {ids.max().item()}")
    values, counts = ids.unique(return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"draft_vocab holds repeated ids: {values[counts > 1][:10].tolist()}; each id must "
                         "appear once")


def check_generate_args(model, input_ids, max_new_tokens, sampling, draft_tokens, attention_mask,
                        draft_vocab, draft_vocab_size):
    V = model.config.vocab_size
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, tokens] tensor; got shape {tuple(input_ids.shape)}")
    if input_ids.min() < 0 or input_ids.max() >= V:
        raise ValueError(f"token ids must lie in [0, {V}); got min {input_ids.min().item()}, "
                         f"max {input_ids.max().item()}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}")
    if attention_mask is not None and not attention_mask.bool()[:, -1].all():
        raise ValueError("attention_mask: every row's last token must be real (use left padding)")
    counts = dict(max_new_tokens=max_new_tokens, draft_tokens=draft_tokens)
    if draft_vocab_size is not None:
        counts.update(draft_vocab_size=draft_vocab_size)
    if bad := [f"{name}={n!r}" for name, n in counts.items() if isinstance(n, bool) or not isinstance(n, int)]:
        raise ValueError(f"{', '.join(bad)}: expected an int")
    if max_new_tokens < 0 or draft_tokens < 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and draft_tokens ({draft_tokens}) must be >= 0")
    if not sampling.temperature >= 0 or not 0 < sampling.top_p <= 1:      # (nan fails both)
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1; got {sampling.temperature}, {sampling.top_p}")
    if draft_tokens and model.mtp is None:
        raise ValueError("draft_tokens > 0 needs an MTP head, and this checkpoint has none (no mtp.* tensors)")
    if draft_tokens and len(model.mtp.layers) != 1:
        raise ValueError(f"speculative decoding drives one MTP layer (as every Qwen3.5 checkpoint has); this "
                         f"model has {len(model.mtp.layers)}")
    if draft_vocab is not None and draft_vocab_size is not None:
        raise ValueError("give draft_vocab (a set of token ids) or draft_vocab_size (the first N ids), not both")
    if draft_vocab is not None:
        check_draft_vocab(draft_vocab, V)
    if draft_vocab_size is not None and not 0 < draft_vocab_size <= V:
        raise ValueError(f"draft_vocab_size must be in 1..{V}; got {draft_vocab_size}")
    if draft_tokens and input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding (draft_tokens > 0) supports batch size 1; got {input_ids.shape[0]}. "
                         "Use draft_tokens=0 for batches.")


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, *, temperature=0.0, top_p=1.0, generator=None, draft_tokens=0,
             draft_vocab=None, draft_vocab_size=None, attention_mask=None, eos_token_id=None, stream=None,
             pixel_values=None, image_grid_thw=None):
    """Decode up to max_new_tokens after input_ids [B, T] (left-padded rows: attention_mask), with the
    images pixel_values, image_grid_thw in the prompt if given (as for Qwen35.forward).
    temperature 0 is greedy. draft_tokens = k > 0 drafts k tokens per step with the MTP head and
    verifies them in one main-model forward of k+1 tokens: the output is exactly that of plain
    decoding (greedy), or has exactly its distribution (sampling).
    eos_token_id (an id or a list of ids): a row stops at it and repeats it while others go on; None
    (the default; config.eos_token_id is not read here): never stop early.
    stream, if given, is called with each batch of final new tokens [B, n] as they come.
    A draft vocabulary makes each draft read N rows of lm_head instead of all V: draft_vocab = ids
    (a 1-D tensor of distinct token ids, e.g. the N most frequent in the text to be generated) drafts
    among those ids only; draft_vocab_size = N is the shorthand for ids 0..N-1 (byte-level BPE ids
    are merge ranks, so low ids are frequent in the text the merges were learned on; for Qwen3.5 that
    excludes every Chinese character, which start at id 95726). The output is unchanged, since drafts
    are only proposals (the draft distribution is zero outside the set); but a token outside the set
    is never drafted, so the draft at its position is always rejected.
    Returns ids [B, T + n] and stats {drafted, accepted, main_forwards (after the prefill),
    drafted_at, accepted_at (per draft position)}."""
    sampling = Sampling(temperature, top_p, generator)
    check_generate_args(model, input_ids, max_new_tokens, sampling, draft_tokens, attention_mask, draft_vocab,
                        draft_vocab_size)
    valid = None if attention_mask is None else attention_mask.bool()
    eos = torch.tensor([] if eos_token_id is None else eos_token_id, device=input_ids.device).long().view(-1)
    stats = dict(drafted=0, accepted=0, main_forwards=0, drafted_at=[0] * draft_tokens, accepted_at=[0] * draft_tokens)
    if max_new_tokens == 0:
        return input_ids, stats
    stream = stream or (lambda tokens: None)
    embeds, positions = model.embed_inputs(input_ids, valid, pixel_values, image_grid_thw)
    if draft_tokens:
        new = speculative_decode(model, input_ids, embeds, positions, valid, max_new_tokens, draft_tokens, sampling,
                                 eos, stats, stream, draft_head(model, draft_vocab, draft_vocab_size))
    else:
        new = decode(model, input_ids, embeds, positions, valid, max_new_tokens, sampling, eos, stats, stream)
    return torch.cat([input_ids, new], dim=1), stats

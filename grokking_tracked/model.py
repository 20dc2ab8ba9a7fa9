"""The grokking transformer: attention + MLP blocks, ReLU, no LayerNorm by default (Nanda et al. 2023).

Built on TransformerLens's ``HookedRootModule`` and ``HookPoint`` because TransformerLens 4 removed
``HookedTransformer``; hook and weight names follow HookedTransformer's (``hook_embed``,
``blocks.0.attn.hook_pattern``, ``blocks.0.mlp.hook_post``, ``embed.W_E``, ``unembed.W_U`` …) so analysis
code reads like every TransformerLens notebook and ``run_with_cache`` works unchanged.

``forward(tokens, last_only=True)`` is the training path: the loss reads only the last position, so the
final block needs its query, MLP and unembedding there alone (keys and values still see every position).
It returns exactly the last-position logits of the full forward, with about half the FLOPs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import get_act_name

from .config import Config


def _normal(*shape: int, std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * std)


class Embed(nn.Module):
    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = _normal(d_vocab, d_model, std=1 / math.sqrt(d_model))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.W_E[tokens]


class PosEmbed(nn.Module):
    def __init__(self, n_ctx: int, d_model: int):
        super().__init__()
        self.W_pos = _normal(n_ctx, d_model, std=1 / math.sqrt(d_model))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.W_pos[: tokens.shape[-1]].expand(tokens.shape[0], -1, -1)


class LayerNorm(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt())
        return self.hook_normalized(x / scale) * self.w + self.b


class Attention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        h, d, e = config.n_heads, config.d_model, config.d_head
        std = 1 / math.sqrt(d)
        self.W_Q, self.W_K, self.W_V = (_normal(h, d, e, std=std) for _ in range(3))
        self.W_O = _normal(h, e, d, std=std)
        self.attention_rate = config.attention_rate
        self.register_buffer("causal_mask", torch.tril(torch.ones(config.n_ctx, config.n_ctx, dtype=torch.bool)),
                             persistent=False)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_scores, self.hook_pattern, self.hook_z = HookPoint(), HookPoint(), HookPoint()

    def forward(self, resid: torch.Tensor | None, last_only: bool = False,
                table: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """resid: (batch, pos, d_model). With last_only, queries (and the output) are the last position's.

        table = (rows, index): the input at [b, pos] is rows[index[b, pos]] (resid is then unused). The
        first block's input is an embedding, which takes one of n_ctx · d_vocab values, so projecting those
        few rows and gathering replaces a (batch · pos, d) @ (d, 3·h·e) matmul by a (n_ctx · d_vocab) one.

        Layout chosen for speed on small models (measured, benchmarks/speed.py): one (d, 3·h·e) matmul for
        queries, keys and values instead of three einsums. The parameters keep HookedTransformer's
        (h, d, e) shapes and the hooks see HookedTransformer's shapes (in table mode ln1's hooks see the table
        rows: analysis should use the full forward, as run_with_cache does).
        """
        h, e = self.W_Q.shape[0], self.W_Q.shape[2]
        w_qkv = rearrange([self.W_Q, self.W_K, self.W_V], "three h d e -> d (three h e)")
        if table is not None:
            rows, index = table
            projected = rows @ w_qkv

            def project(positions: slice, columns: slice) -> torch.Tensor:
                return F.embedding(index[:, positions], projected[:, columns])
        else:
            def project(positions: slice, columns: slice) -> torch.Tensor:
                return resid[:, positions] @ w_qkv[:, columns]
        everything = slice(None)
        if last_only:  # keys and values at every position, the query at the last one only
            kv = project(everything, slice(h * e, None))
            k, v = rearrange(kv, "b k (two h e) -> two b k h e", two=2, h=h)
            q = rearrange(project(slice(-1, None), slice(0, h * e)), "b q (h e) -> b q h e", h=h)
        else:
            q, k, v = rearrange(project(everything, everything), "b p (three h e) -> three b p h e", three=3, h=h)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        # With 3 positions, batched matmuls of 3×e matrices pay per-matrix overhead; a broadcast multiply and
        # sum over e does the same arithmetic about 2× faster forward and backward (measured on CPU).
        scores = rearrange((q[:, :, None] * k[:, None]).sum(-1), "b q k h -> b h q k") / math.sqrt(e)
        if not last_only:  # the last position attends to every position: no mask needed there
            n = k.shape[1]
            scores = scores.masked_fill(~self.causal_mask[:n, :n], float("-inf"))
        pattern = self.hook_attn_scores(scores).softmax(dim=-1)
        if self.attention_rate != 1:
            # Zhong et al. 2023 (fjzzq2002/pizza, code/train-main.py, Attention.forward): pattern =
            # rate * softmax + (1 - rate), an un-normalised constant; at rate 0 each position sums the values
            # it sees. Their model has no mask; ours keeps the causal one (the last position sees all anyway).
            allowed = 1.0 if last_only else self.causal_mask[:k.shape[1], :k.shape[1]].to(pattern.dtype)
            pattern = self.attention_rate * pattern + (1 - self.attention_rate) * allowed
        pattern = self.hook_pattern(pattern)
        z = self.hook_z((rearrange(pattern, "b h q k -> b q k h 1") * v[:, None]).sum(2))  # (b, q, h, e)
        return z.flatten(-2) @ self.W_O.flatten(0, 1)


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.W_in = _normal(config.d_model, config.d_mlp, std=1 / math.sqrt(config.d_model))
        self.b_in = nn.Parameter(torch.zeros(config.d_mlp))
        self.W_out = _normal(config.d_mlp, config.d_model, std=1 / math.sqrt(config.d_model))
        self.b_out = nn.Parameter(torch.zeros(config.d_model))
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()
        self.act_fn = F.gelu if config.activation == "gelu" else F.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        post = self.hook_post(self.act_fn(self.hook_pre(x @ self.W_in + self.b_in)))
        return post @ self.W_out + self.b_out


class TransformerBlock(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        use_ln = config.normalization == "ln"
        self.ln1 = LayerNorm(config.d_model) if use_ln else nn.Identity()
        self.ln2 = LayerNorm(config.d_model) if use_ln else nn.Identity()
        self.attn = Attention(config)
        self.mlp = MLP(config)
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, resid: torch.Tensor, last_only: bool = False,
                table: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """table: the distinct input rows and each position's row (see Attention.forward)."""
        resid = self.hook_resid_pre(resid)
        if table is None:
            attn_out = self.attn(self.ln1(resid), last_only=last_only)
        else:
            rows, index = table
            attn_out = self.attn(None, last_only=last_only, table=(self.ln1(rows), index))
        attn_out = self.hook_attn_out(attn_out)
        resid = self.hook_resid_mid((resid[:, -1:] if last_only else resid) + attn_out)
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(self.ln2(resid))))


class Unembed(nn.Module):
    def __init__(self, d_model: int, d_vocab_out: int):
        super().__init__()
        self.W_U = _normal(d_model, d_vocab_out, std=1 / math.sqrt(d_vocab_out))

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        return resid @ self.W_U


class GrokkingTransformer(HookedRootModule):
    """Input (batch, 3) tokens [a, b, =]; output logits over the p residues (batch, pos, p)."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.embed = Embed(config.d_vocab, config.d_model)
            self.pos_embed = PosEmbed(config.n_ctx, config.d_model)
            self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
            self.ln_final = LayerNorm(config.d_model) if config.normalization == "ln" else nn.Identity()
            self.unembed = Unembed(config.d_model, config.p)
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        self.setup()  # names every HookPoint after its module path, as HookedTransformer does

    def forward(self, tokens: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Full forward: (batch, pos, p) logits. last_only: (batch, p) logits of the last position only."""
        resid = self.hook_embed(self.embed(tokens)) + self.hook_pos_embed(self.pos_embed(tokens))
        table = None
        if last_only:  # the training path: the first block projects its few distinct input rows (see Attention)
            n = tokens.shape[-1]
            rows = rearrange(self.embed.W_E, "v d -> 1 v d") + self.pos_embed.W_pos[:n, None]  # (pos, vocab, d)
            offsets = torch.arange(n, device=tokens.device) * self.config.d_vocab
            table = (rows.flatten(0, 1), tokens + offsets)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            resid = block(resid, last_only=last_only and i == last, table=table if i == 0 else None)
        logits = self.unembed(self.ln_final(resid))
        return logits[:, -1] if last_only else logits


def attention_from_equals(cache, p: int, layer: int = 0) -> torch.Tensor:
    """The attention the "=" position pays to a and to b over the (a, b) grid, from a cache of the p² pairs
    [a, b, =] in row-major (a, b) order: (heads, 2 [to a, to b], a, b), float. The one reading of it: the run's
    attention figure and ``analyze`` both use this."""
    pattern = cache[get_act_name("pattern", layer)]  # (pairs, head, query, key)
    return rearrange(pattern[:, :, -1, :2], "(a b) h k -> h k a b", a=p, b=p).float()

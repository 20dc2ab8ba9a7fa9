"""A hand-written forward and backward of the training loss for the 1-layer, LayerNorm-free model.

Why by hand (torch.profiler, `seed` preset, 1 thread: ``python benchmarks/speed.py --only profile``): with
autograd, matmuls took ~40 % of a step; the rest went to the 3-position attention's broadcast products and
their backward (N·n·h·e-sized mul and sum, ~17 %), the embedding and index backward, copies, concatenations
and fills. Written out, the same 15 matmuls take ~60 % of a step and a step costs ~0.6x the CPU time.
The arithmetic is that of ``GrokkingTransformer.forward(tokens, last_only=True)`` then
``cross_entropy_high_precision(...).backward()``; ``loss_and_grads`` writes every parameter's ``.grad``, so
the fused AdamW step, Grokfast and the gradient norm are unchanged. ``tests/test_fastpath.py`` checks logits,
loss and every gradient against autograd.

Scope: one layer, ReLU, without LayerNorm (every preset but power2022 and grokfast2024); minibatches
are just fewer rows. ``supports(model)`` says when it applies. Every other model (more layers, LayerNorm,
GELU, Zhong's attention rate: ``power2022``, ``grokfast2024``) trains through ``lean_last_logits``, a forward
without hooks that autograd differentiates and that does only what the loss reads (see there). Hooks do not
run on either path: they serve analysis, which uses the model's own forward (``run_with_cache`` is untouched).
``GROKKING_FASTPATH=0`` turns both off (the model's own ``forward(last_only=True)`` with autograd).

Notation: N examples, n = 3 positions, V = d_vocab tokens, R = n·V table rows, h heads of size e,
d = d_model, p output classes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import GrokkingTransformer, LayerNorm

def enabled() -> bool:
    return os.environ.get("GROKKING_FASTPATH", "1") != "0"


def supports(model: torch.nn.Module) -> bool:
    """True when ``loss_and_grads`` computes what autograd would for this model."""
    if not isinstance(model, GrokkingTransformer):
        return False
    params = list(model.parameters())
    return (model.config.n_layers == 1 and model.config.normalization == "none" and model.config.activation == "relu"
            and model.config.loss == "softmax"  # its backward is the float64 softmax cross-entropy's
            and model.config.attention_rate == 1  # its backward is softmax's; a blended pattern is autograd's
            and params[0].dtype in (torch.float32, torch.float64)
            and all(p.requires_grad and p.dtype == params[0].dtype for p in params))


@dataclass
class _Forward:
    """The activations the backward pass reads."""
    logits: torch.Tensor  # (N, p)
    rows: torch.Tensor  # (R, d) embedding + position of every (position, token)
    w_qkv: torch.Tensor  # (d, 3·h·e)
    index: torch.Tensor  # (N, n) each position's table row
    q_rows: torch.Tensor  # (h, V, e) queries of the last position's rows
    k_rows: torch.Tensor  # (h, e, R)
    score_index: torch.Tensor  # (N·n,) rows of the score table
    pattern: torch.Tensor  # (N, n, h)
    v: torch.Tensor  # (N, n, h, e)
    z: torch.Tensor  # (N, h·e)
    resid_mid: torch.Tensor  # (N, d)
    post: torch.Tensor  # (N, d_mlp)
    resid_post: torch.Tensor  # (N, d)


def _forward(model: GrokkingTransformer, tokens: torch.Tensor) -> _Forward:
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    W_E, W_pos, W_U = model.embed.W_E, model.pos_embed.W_pos, model.unembed.W_U
    h, d, e = attn.W_Q.shape
    N, n = tokens.shape
    V, R = W_E.shape[0], n * W_E.shape[0]
    # The first block's input takes only R distinct values (token + position): project those rows once, an
    # (R, d) @ (d, 3·h·e) matmul, instead of N·n rows.
    rows = (W_pos[:n, None] + W_E[None]).reshape(R, d)
    w_qkv = torch.cat([attn.W_Q, attn.W_K, attn.W_V]).permute(1, 0, 2).reshape(d, 3 * h * e)  # (d, (3 h e))
    table = (rows @ w_qkv).view(R, 3, h, e)
    index = tokens + torch.arange(n, device=tokens.device) * V
    last = index[:, -1]
    # Every score is q(last-position row) · k(any row): all V × R of them per head are one small batched
    # matmul; each example gathers its n scores per head. This replaces three N·n·h·e-sized products (one
    # forward, two backward) by gathers and scatters of N·n·h numbers.
    q_rows = table[R - V:, 0].transpose(0, 1)
    k_rows = table[:, 1].permute(1, 2, 0)
    score_table = (torch.bmm(q_rows, k_rows) / math.sqrt(e)).permute(1, 2, 0).reshape(V * R, h)
    score_index = (((last - (R - V)) * R)[:, None] + index).view(-1)
    pattern = score_table.index_select(0, score_index).view(N, n, h).softmax(dim=1)
    v = table[:, 2].reshape(R, h * e).index_select(0, index.view(-1)).view(N, n, h, e)
    z = (pattern[..., None] * v).sum(1).view(N, h * e)  # for n = 3 faster than einsum / bmm (measured)
    resid_mid = torch.addmm(rows.index_select(0, last), z, attn.W_O.reshape(h * e, d))
    post = torch.addmm(mlp.b_in, resid_mid, mlp.W_in).relu_()
    resid_post = torch.addmm(mlp.b_out, post, mlp.W_out).add_(resid_mid)
    return _Forward(resid_post @ W_U, rows, w_qkv, index, q_rows, k_rows, score_index, pattern, v, z,
                    resid_mid, post, resid_post)


@torch.no_grad()
def last_logits(model: GrokkingTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """(N, p) logits of the last position: ``model(tokens, last_only=True)`` without hooks or autograd."""
    return _forward(model, tokens).logits if supports(model) else lean_last_logits(model, tokens)


def _norm(ln: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # torch's fused kernel, forward and backward: the same function as model.LayerNorm (biased variance, eps 1e-5)
    return F.layer_norm(x, x.shape[-1:], ln.w, ln.b, 1e-5) if isinstance(ln, LayerNorm) else x


def _mlp(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    post = mlp.act_fn(torch.addmm(mlp.b_in, flat, mlp.W_in))
    return torch.addmm(mlp.b_out, post, mlp.W_out).view(x.shape)


def lean_last_logits(model: GrokkingTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """(N, p) logits of the last position, differentiable: ``model(tokens, last_only=True)``'s function for any
    ``GrokkingTransformer``, without hooks, computing only what the last position's logits read:

    - the last block computes its query, attention output, MLP and unembedding at the last position only (its
      keys and values still at every position);
    - with the causal mask position 0 attends to itself alone, so its residual stream through every block depends
      on its token only: it is computed once per vocabulary entry (a (d_vocab, d) table) and gathered;
    - the first block's input at the other positions is an embedding row too: its keys, values and queries are
      projected from the (n - 1) · d_vocab distinct rows and gathered.

    The earlier blocks compute positions 1..n-1 per example. Exact: the same arithmetic as the full forward up to
    float rounding (tests/test_fastpath.py)."""
    blocks, n, V = model.blocks, tokens.shape[-1], model.config.d_vocab
    W_E, W_pos = model.embed.W_E, model.pos_embed.W_pos
    first = W_E + W_pos[0]  # (V, d): position 0's residual for each token
    rows = (W_E[None] + W_pos[1:n, None]).flatten(0, 1)  # ((n-1)·V, d): the first block's inputs at positions 1..
    row_index = tokens[:, 1:] + torch.arange(n - 1, device=tokens.device) * V  # (N, n-1)
    token0 = tokens[:, 0]
    rest = None  # (N, n-1, d): the residual at positions 1.. after the first block
    for i, block in enumerate(blocks):
        attn, mlp, last = block.attn, block.mlp, i == len(blocks) - 1
        h, d, e = attn.W_Q.shape
        w_qkv = torch.cat([attn.W_Q, attn.W_K, attn.W_V], 2).transpose(0, 1).reshape(d, h * 3 * e)  # (d, (h 3 e))
        q0 = n - 1 if last else 1  # queries at positions q0..n-1
        # per head (q | k | v): one matmul of the distinct rows, or of the per-example residual
        table0 = (_norm(block.ln1, first) @ w_qkv).view(V, h, 3, e)
        if rest is None:
            projected = F.embedding(row_index, (_norm(block.ln1, rows) @ w_qkv)).view(-1, n - 1, h, 3, e)
            resid_q = F.embedding(row_index[:, q0 - 1:], rows)
        else:
            projected = (_norm(block.ln1, rest) @ w_qkv).view(-1, n - 1, h, 3, e)
            resid_q = rest[:, q0 - 1:]
        at0 = F.embedding(token0, table0.flatten(1)).view(-1, 1, h, 3, e)
        # unbind, not indexing: its backward stacks the three gradients instead of zero-filling a copy for each
        q, k, v = torch.cat([at0, projected], 1).unbind(3)  # each (N, n, h, e)
        q = q[:, q0:]  # (N, nq, h, e)
        # for 3 positions a broadcast product and sum beats batched matmuls (model.Attention)
        scores = (q[:, :, None] * k[:, None]).sum(-1) / math.sqrt(e)  # (N, nq, n, h)
        allowed = attn.causal_mask[q0:n, :n, None]  # (nq, n, 1)
        if not last:  # the last position sees every position
            scores = scores.masked_fill(~allowed, float("-inf"))
        pattern = scores.softmax(dim=2)
        if attn.attention_rate != 1:  # Zhong et al.'s blend, as model.Attention
            pattern = attn.attention_rate * pattern + (1 - attn.attention_rate) * allowed.to(pattern.dtype)
        z = (pattern[..., None] * v[:, None]).sum(2)  # (N, nq, h, e)
        W_O = attn.W_O.flatten(0, 1)
        resid_q = resid_q + z.flatten(-2) @ W_O
        resid_q = resid_q + _mlp(mlp, _norm(block.ln2, resid_q))
        if last:
            return _norm(model.ln_final, resid_q[:, -1]) @ model.unembed.W_U
        # position 0 attends to itself: its pattern is 1 (also under Zhong's blend), its output its own value
        first = first + table0[:, :, 2].flatten(1) @ W_O
        first = first + _mlp(mlp, _norm(block.ln2, first))
        rest = resid_q
    raise AssertionError("a model has at least one block")


@torch.no_grad()
def loss_and_grads(model: GrokkingTransformer, tokens: torch.Tensor, labels: torch.Tensor,
                   return_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the last position, softmax in float64; sets every parameter's ``.grad`` to its
    gradient, as ``zero_grad(set_to_none=True)`` then ``loss.backward()`` would. Returns the loss (and with
    ``return_logits`` the (N, p) logits it was computed from)."""
    f = _forward(model, tokens)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    W_E, W_pos, W_U = model.embed.W_E, model.pos_embed.W_pos, model.unembed.W_U
    h, d, e = attn.W_Q.shape
    N, n = tokens.shape
    V, R = W_E.shape[0], n * W_E.shape[0]

    # Loss, and N · its gradient: softmax - one_hot, in float64 (at train losses near 1e-7 the label's
    # 1 - p would round away in float32: why cross_entropy_high_precision exists). 1/N is applied to the
    # small matrices it multiplies instead of to this (N, p) one.
    probs = f.logits.to(torch.float64).softmax(dim=-1)
    label_probs = probs.gather(1, labels[:, None])
    loss = -label_probs.log().mean()
    d_logits = probs.scatter_(1, labels[:, None], label_probs - 1).to(f.logits.dtype)

    grads = {W_U: (f.resid_post.T @ d_logits).mul_(1 / N)}
    d_resid_post = d_logits @ (W_U.T / N)
    grads[mlp.b_out] = d_resid_post.sum(0)
    grads[mlp.W_out] = f.post.T @ d_resid_post
    # ReLU's backward with autograd's own kernel (zero where the output is 0), in place: measured ~free,
    # a fresh (N, d_mlp) output cost ~0.9 ms a step
    d_pre = d_resid_post @ mlp.W_out.T
    torch.ops.aten.threshold_backward.grad_input(d_pre, f.post, 0, grad_input=d_pre)
    grads[mlp.b_in] = d_pre.sum(0)
    grads[mlp.W_in] = f.resid_mid.T @ d_pre
    d_resid_mid = torch.addmm(d_resid_post, d_pre, mlp.W_in.T)
    grads[attn.W_O] = (f.z.T @ d_resid_mid).view(h, e, d)
    d_z = (d_resid_mid @ attn.W_O.reshape(h * e, d).T).view(N, 1, h, e)
    d_pattern = (d_z * f.v).sum(-1)  # (N, n, h)
    d_scores = d_pattern.sub_((f.pattern * d_pattern).sum(1, keepdim=True)).mul_(f.pattern)  # softmax backward
    d_v = (f.pattern[..., None] * d_z).view(N * n, h * e)
    # back through the gathers into the tables, then through the projection into the embeddings
    d_score_table = torch.zeros(V * R, h, dtype=d_scores.dtype, device=d_scores.device)
    d_score_table.index_add_(0, f.score_index, d_scores.view(N * n, h))
    d_score_table = d_score_table.view(V, R, h).permute(2, 0, 1).mul_(1 / math.sqrt(e))  # (h, V, R)
    d_table = torch.zeros(R, 3, h, e, dtype=d_v.dtype, device=d_v.device)
    d_table[R - V:, 0] = torch.bmm(d_score_table, f.k_rows.transpose(1, 2)).transpose(0, 1)
    d_table[:, 1] = torch.bmm(d_score_table.transpose(1, 2), f.q_rows).transpose(0, 1)
    d_table[:, 2] = torch.zeros(R, h * e, dtype=d_v.dtype, device=d_v.device).index_add_(
        0, f.index.view(-1), d_v).view(R, h, e)
    d_table = d_table.view(R, 3 * h * e)
    d_w_qkv = (f.rows.T @ d_table).view(d, 3, h, e).permute(1, 2, 0, 3)  # (3, h, d, e)
    grads[attn.W_Q], grads[attn.W_K], grads[attn.W_V] = d_w_qkv.contiguous().unbind(0)
    d_rows = (d_table @ f.w_qkv.T).index_add_(0, f.index[:, -1], d_resid_mid).view(n, V, d)
    grads[W_E] = d_rows.sum(0)
    grads[W_pos] = torch.zeros_like(W_pos)
    grads[W_pos][:n] = d_rows.sum(1)

    for param in model.parameters():
        param.grad = grads[param]
    return (loss, f.logits) if return_logits else loss

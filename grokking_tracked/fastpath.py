"""A hand-written forward and backward of the training loss for the 1-layer, LayerNorm-free model.

Why by hand: for this fixed, small architecture (p = 113: 3,830 examples, d_model 64) autograd records and
replays ~100 small ops per step, keeps every intermediate alive for its backward, and computes a few
gradients the loss does not need. Here the step is the same arithmetic as ``GrokkingTransformer.forward(
tokens, last_only=True)`` followed by ``cross_entropy_high_precision(...).backward()``, written as explicit
matmuls and a handful of elementwise ops; ``loss_and_grads`` writes every parameter's ``.grad`` so that the
(fused AdamW) optimizer step, Grokfast and the gradient norm are unchanged. ``tests/test_fastpath.py`` checks
logits, loss and every gradient against autograd.

Scope: one layer without LayerNorm (the presets). ``supports(model)`` says when it applies; ``Trainer``
falls back to autograd otherwise. Hooks are not run on this path (they are for analysis, which uses the
model's own forward: ``run_with_cache`` is untouched). ``GROKKING_FASTPATH=0`` turns it off.

Notation: N examples, n_ctx = 3 positions, V = d_vocab tokens, h heads of size e, d = d_model.
"""

from __future__ import annotations

import math
import os

import torch

from .model import GrokkingTransformer


def enabled() -> bool:
    return os.environ.get("GROKKING_FASTPATH", "1") != "0"


def supports(model: torch.nn.Module) -> bool:
    """True when ``loss_and_grads`` computes exactly what autograd would for this model."""
    if not isinstance(model, GrokkingTransformer):
        return False
    config = model.config
    params = list(model.parameters())
    return (config.n_layers == 1 and config.normalization == "none"
            and all(p.requires_grad and p.dtype == params[0].dtype for p in params)
            and params[0].dtype in (torch.float32, torch.float64))


@torch.no_grad()
def loss_and_grads(model: GrokkingTransformer, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the last position (log-softmax in float64); sets every parameter's ``.grad``
    to its gradient, as ``zero_grad(set_to_none=True)`` then ``loss.backward()`` would. Returns the loss."""
    block = model.blocks[0]
    attn, mlp = block.attn, block.mlp
    W_E, W_pos, W_U = model.embed.W_E, model.pos_embed.W_pos, model.unembed.W_U
    h, d, e = attn.W_Q.shape
    N, n = tokens.shape
    V = W_E.shape[0]
    scale = 1 / math.sqrt(e)

    # ---- forward. The first block's input takes only n·V distinct values (token + position): project those
    # rows once (an (n·V, d) @ (d, 3·h·e) matmul) and gather, instead of projecting N·n rows.
    rows = (W_pos[:n, None] + W_E[None]).reshape(n * V, d)
    w_qkv = torch.cat([attn.W_Q, attn.W_K, attn.W_V]).permute(1, 0, 2).reshape(d, 3 * h * e)  # (d, (3 h e))
    table = rows @ w_qkv
    index = tokens + torch.arange(n, device=tokens.device) * V  # (N, n) rows of the table
    last = index[:, -1]
    q = table[:, : h * e].index_select(0, last).view(N, 1, h, e)
    kv = table[:, h * e:].index_select(0, index.reshape(-1)).view(N, n, 2, h, e)
    k, v = kv[:, :, 0], kv[:, :, 1]  # (N, n, h, e)
    # 3 keys: a broadcast multiply and a sum over e beats batched 1×e @ e×3 matmuls (per-matrix overhead)
    pattern = (q * k).sum(-1).mul_(scale).softmax(dim=1)  # (N, n, h): the last query over every key
    z = (pattern[..., None] * v).sum(1)  # (N, h, e)
    W_O = attn.W_O.reshape(h * e, d)
    resid_mid = torch.addmm(rows.index_select(0, last), z.view(N, h * e), W_O)
    post = torch.addmm(mlp.b_in, resid_mid, mlp.W_in).relu_()
    resid_post = torch.addmm(mlp.b_out, post, mlp.W_out).add_(resid_mid)
    logits = resid_post @ W_U

    # ---- loss and its gradient. float64: at train losses near 1e-7, 1 - p(label) rounds away in float32.
    log_probs = logits.to(torch.float64).log_softmax(dim=-1)
    loss = -log_probs.gather(1, labels[:, None]).mean()
    d_logits64 = log_probs.exp_()
    d_logits64.scatter_add_(1, labels[:, None], torch.full((N, 1), -1.0, dtype=torch.float64, device=logits.device))
    d_logits = d_logits64.mul_(1 / N).to(logits.dtype)

    # ---- backward, last layer first
    grads = {W_U: resid_post.T @ d_logits}
    d_resid_post = d_logits @ W_U.T
    grads[mlp.b_out] = d_resid_post.sum(0)
    grads[mlp.W_out] = post.T @ d_resid_post
    d_pre = (d_resid_post @ mlp.W_out.T).masked_fill_(post == 0, 0)  # ReLU: no gradient where it clipped
    grads[mlp.b_in] = d_pre.sum(0)
    grads[mlp.W_in] = resid_mid.T @ d_pre
    d_resid_mid = torch.addmm(d_resid_post, d_pre, mlp.W_in.T)
    grads[attn.W_O] = (z.view(N, h * e).T @ d_resid_mid).view(h, e, d)
    d_z = (d_resid_mid @ W_O.T).view(N, 1, h, e)
    d_pattern = (d_z * v).sum(-1)  # (N, n, h)
    d_scores = d_pattern.sub_((pattern * d_pattern).sum(1, keepdim=True)).mul_(pattern).mul_(scale)  # softmax'
    d_kv = torch.empty(N, n, 2, h, e, dtype=kv.dtype, device=kv.device)
    torch.mul(d_scores[..., None], q, out=d_kv[:, :, 0])
    torch.mul(pattern[..., None], d_z, out=d_kv[:, :, 1])
    d_q = (d_scores[..., None] * k).sum(1)  # (N, h, e)
    # back through the gathers into the table, then through the projection into the embeddings
    d_table = torch.zeros_like(table)
    d_table[:, : h * e].index_add_(0, last, d_q.view(N, h * e))
    d_table[:, h * e:].index_add_(0, index.reshape(-1), d_kv.view(N * n, 2 * h * e))
    d_w_qkv = (rows.T @ d_table).view(d, 3, h, e).permute(1, 2, 0, 3)  # (3, h, d, e)
    grads[attn.W_Q], grads[attn.W_K], grads[attn.W_V] = d_w_qkv.contiguous().unbind(0)
    d_rows = (d_table @ w_qkv.T).index_add_(0, last, d_resid_mid).view(n, V, d)
    grads[W_E] = d_rows.sum(0)
    grads[W_pos] = torch.zeros_like(W_pos)
    grads[W_pos][:n] = d_rows.sum(1)

    for param in model.parameters():
        param.grad = grads[param]
    return loss

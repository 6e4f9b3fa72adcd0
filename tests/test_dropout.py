"""The CPU dropout (models/dropout.py) and the explicit attention it is used in while training:
drop rate, scaling, gradients and the attention against a formula computed from the weights."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detrkit.models.dropout import Dropout, dropout, keep_mask
from detrkit.models.transformer import MultiheadAttention


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_mask_drops_a_fraction_p_independently(p):
    torch.manual_seed(0)
    n = 1_000_001  # odd: the last 64-bit word is half used
    keep = keep_mask((n,), p)
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs((~keep).float().mean().item() - p) < 5 * sigma
    # The two halves of one random word are independent draws: both dropped with probability p^2.
    pairs = (~keep)[: n - 1].view(-1, 2)
    both = pairs.all(1).float().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / pairs.shape[0])


def test_dropout_zeroes_or_scales_each_element_and_its_gradient_by_the_same_mask():
    p = 0.3
    x = torch.randn(4, 50, 60, requires_grad=True)
    torch.manual_seed(7)
    y = dropout(x, p)
    torch.manual_seed(7)
    keep = keep_mask(x.shape, p)
    torch.testing.assert_close(y, torch.where(keep, x / (1 - p), 0.0), rtol=1e-6, atol=0)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, torch.where(keep, grad / (1 - p), 0.0), rtol=1e-6, atol=0)
    torch.manual_seed(8)
    assert not torch.equal(dropout(x, p), y)  # another seed, another mask


def test_dropout_in_eval_or_at_zero_is_the_identity_and_the_module_is_nn_dropouts():
    x = torch.randn(3, 5)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    module = Dropout(0.25)
    assert isinstance(module, nn.Dropout) and repr(module) == repr(nn.Dropout(0.25))
    assert module.eval()(x) is x


def _projections(attn: MultiheadAttention, query, key, value):
    e, h = attn.embed_dim, attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    heads = lambda t: t.view(t.shape[0], t.shape[1], h, e // h).transpose(1, 2)  # noqa: E731
    return (
        heads(F.linear(query, w[:e], b[:e])),
        heads(F.linear(key, w[e : 2 * e], b[e : 2 * e])),
        heads(F.linear(value, w[2 * e :], b[2 * e :])),
    )


def test_training_attention_drops_attention_weights_as_the_original():
    """softmax(q k^T / sqrt(d)) over unpadded keys, times the dropout mask / (1 - p), times v."""
    torch.manual_seed(0)
    p, batch, len_q, len_k, e = 0.2, 2, 5, 9, 16
    attn = MultiheadAttention(e, 4, dropout=p).train()
    query, key = torch.randn(batch, len_q, e), torch.randn(batch, len_k, e)
    padding = torch.zeros(batch, len_k, dtype=torch.bool)
    padding[1, 6:] = True
    torch.manual_seed(3)
    out, _ = attn(query, key, key, padding)
    with torch.no_grad():
        q, k, v = _projections(attn, query, key, key)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(e // 4)
        probs = scores.masked_fill(padding[:, None, None, :], float("-inf")).softmax(-1)
        torch.manual_seed(3)
        keep = keep_mask(probs.shape, p)
        heads = (probs * keep / (1 - p)) @ v
        expected = attn.out_proj(heads.transpose(1, 2).reshape(batch, len_q, e))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # In eval mode the same module equals torch's attention (no dropout).
    reference = nn.MultiheadAttention(e, 4, batch_first=True).eval()
    reference.load_state_dict(attn.state_dict())
    expected, _ = reference(query, key, key, key_padding_mask=padding, need_weights=False)
    torch.testing.assert_close(attn.eval()(query, key, key, padding)[0], expected, rtol=1e-5, atol=1e-5)


def test_a_sequence_without_keys_attends_to_nothing_with_finite_gradients():
    torch.manual_seed(0)
    attn = MultiheadAttention(8, 2, dropout=0.1).train()
    query = torch.randn(2, 3, 8, requires_grad=True)
    padding = torch.zeros(2, 4, dtype=torch.bool)
    padding[0] = True  # every key of the first sequence is padding
    key = torch.randn(2, 4, 8)
    out, _ = attn(query, key, key, padding)
    torch.testing.assert_close(out[0], attn.out_proj.bias.expand(3, 8))  # zero attention output
    out.sum().backward()
    assert torch.isfinite(query.grad).all() and query.grad[1].abs().sum() > 0


def test_keep_freed_memory_stops_the_page_faults_of_large_allocations():
    """Allocating and freeing a 64 MiB tensor repeatedly: glibc's default maps fresh pages each time
    (a page fault per 4 KiB); with keep_freed_memory the freed block is reused."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc malloc only")
    script = """
import resource, sys, torch
from detrkit.machine import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
x = torch.ones(16 * 2**20)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(12):
    start = faults()
    (x * 2).sum()
    counts.append(faults() - start)
print(*counts)
"""
    counts = {}
    for mode in ("system", "keep"):
        result = subprocess.run(
            [sys.executable, "-c", script, mode], capture_output=True, text=True, check=True
        )
        counts[mode] = [int(n) for n in result.stdout.split()]
    pages = 64 * 2**20 // 4096  # per allocation
    # The default maps every allocation afresh; kept memory is reused once glibc's free lists have
    # settled (a few allocations, depending on what the process allocated before).
    assert min(counts["system"]) > pages // 2, counts
    assert sum(counts["keep"][-4:]) < pages // 4, counts

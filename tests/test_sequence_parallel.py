"""Sequence-parallel collectives and attention (quant/sequence_parallel.py) on 2 and 4 CPU processes
joined by gloo, against the same attention in one process.

Tolerance: fp32 throughout. The gather and Ulysses are exact (the same kernel on the same numbers, only the
head grouping of the calls differs). Ring and replicated-query attention sum the softmax in per-shard
pieces merged by their log-sum-exp, another order of fp32 sums: 2e-6 relative to the output's scale
(measured: at most 3.8e-7 with 4 ranks)."""

import pytest
import torch

from gloo_ranks import run_on_ranks
from quant.sequence_parallel import (RING, ULYSSES, SequenceGroup, gather_tokens, replicated_query_attention,
                                     ring_attention, shard, token_splits, ulysses_attention)

TOLERANCE = {"gather": 0.0, "ulysses self": 0.0, "ulysses cross": 0.0, "ring": 2e-6, "replicated queries": 2e-6}


def sdpa(q, k, v, heads, **_):
    """ComfyUI's attention calling convention: [B, T, heads*d] in and out."""
    b, tq, width = q.shape
    d = width // heads
    split = lambda t: t.reshape(b, t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, tq, width)


def inputs(q_tokens, kv_tokens, heads, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, q_tokens, heads * head_dim, generator=g),
            torch.randn(2, kv_tokens, heads * head_dim, generator=g),
            torch.randn(2, kv_tokens, heads * head_dim, generator=g))


def every_exchange(rank, world):
    """Each exchange on this rank's shards: (name, this rank's result, the expected full or shard)."""
    results = {}
    sp = SequenceGroup(None, rank, world, ULYSSES)
    # 13 and 9 tokens: neither divides by 2 or 4.
    q, k, v = inputs(13, 13, heads=4)
    splits = token_splits(13, world)
    expected = sdpa(q, k, v, 4)
    results["gather"] = (gather_tokens(shard(q, 1, splits, rank), 1, splits, sp), q)
    local = [shard(t, 1, splits, rank) for t in (q, k, v)]
    results["ulysses self"] = (ulysses_attention(sdpa, *local, 4, splits, splits, sp), shard(expected, 1, splits, rank))
    # Cross-attention, both sides sharded (different token counts).
    q, k, v = inputs(13, 9, heads=4, seed=1)
    kv_splits = token_splits(9, world)
    expected = sdpa(q, k, v, 4)
    results["ulysses cross"] = (ulysses_attention(sdpa, shard(q, 1, splits, rank), shard(k, 1, kv_splits, rank),
                                                  shard(v, 1, kv_splits, rank), 4, splits, kv_splits, sp),
                                shard(expected, 1, splits, rank))
    # Ring: 3 heads divide over neither 2 nor 4 ranks.
    q, k, v = inputs(13, 9, heads=3, seed=2)
    expected = sdpa(q, k, v, 3)
    ring = SequenceGroup(None, rank, world, RING)
    results["ring"] = (ring_attention(shard(q, 1, splits, rank), shard(k, 1, kv_splits, rank),
                                      shard(v, 1, kv_splits, rank), 3, kv_splits, ring),
                       shard(expected, 1, splits, rank))
    # Replicated queries (5 of them) against sharded keys.
    q, k, v = inputs(5, 9, heads=3, seed=3)
    results["replicated queries"] = (replicated_query_attention(q, shard(k, 1, kv_splits, rank),
                                                                shard(v, 1, kv_splits, rank), 3, ring),
                                     sdpa(q, k, v, 3))
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_every_exchange_equals_one_process(world, tmp_path):
    for rank, results in enumerate(run_on_ranks(every_exchange, world, tmp_path)):
        for name, (got, expected) in results.items():
            assert got.shape == expected.shape, (name, rank)
            error = (got - expected).abs().max() / expected.abs().max()
            assert error <= TOLERANCE[name], f"{name} on rank {rank} of {world}: relative error {error:.2e}"


def test_token_splits_are_contiguous_and_uneven_first():
    assert token_splits(13, 4) == [4, 3, 3, 3]
    assert token_splits(24576 + 126, 8)[0] == 3088 and sum(token_splits(24576 + 126, 8)) == 24702
    assert token_splits(3, 4) == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="at least 1"):
        token_splits(5, 0)


def test_ulysses_names_heads_that_do_not_divide():
    sp = SequenceGroup(None, 0, 4)
    q = torch.zeros(1, 2, 3 * 8)
    with pytest.raises(ValueError, match="3 heads do not divide over 4 ranks"):
        ulysses_attention(sdpa, q, q, q, 3, [2] * 4, [2] * 4, sp)


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="'zigzag'"):
        SequenceGroup(None, 0, 2, "zigzag")

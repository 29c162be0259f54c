"""Sequence parallelism over torch.distributed: each rank holds a contiguous range of a stream's tokens
and the attention calls exchange what they need. Torch only (no ComfyUI): the LTX-2 glue that decides
which call takes which exchange lives in nodes/sequence_parallel_ltx.py.

Layouts follow ComfyUI's attention calls: q, k, v are [batch, tokens, heads * head_dim].

- Ulysses (all-to-all over heads): a rank trades its tokens of every head for every token of heads/N heads,
  runs any attention kernel on that (the pack's chosen one, unchanged), and trades back. Needs the head
  count divisible by N. Per call each rank sends and receives 3/N (q, k, v) + 1/N (output) of its
  stream's activations, each (N-1)/N of it off-rank.
- Ring: K/V shards travel round the ring while each rank attends its queries to the shard it holds, and the
  partial results are merged by their log-sum-exp. Any head count; the kernel is PyTorch's (the merge needs
  each block's log-sum-exp, which ComfyUI's attention interface does not return).
- Replicated queries against sharded keys (the audio queries of video-to-audio attention): every rank attends
  all queries to its key shard, then one log-sum-exp merge by all-reduce; the traffic is the query side's
  size, never the key side's.

Token counts need not divide by N: the first `tokens % N` ranks hold one token more (token_splits), and
every exchange carries per-rank sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

ULYSSES = "ulysses"
RING = "ring"
MODES = (ULYSSES, RING)


@dataclass(frozen=True)
class SequenceGroup:
    """The ranks that share one sequence, and how attention over it is split."""
    group: object  # a torch.distributed ProcessGroup (None: the default group)
    rank: int
    world: int
    mode: str = ULYSSES

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Unknown sequence-parallel mode {self.mode!r}; choose one of {MODES}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside a group of {self.world}")


def token_splits(tokens: int, world: int) -> list[int]:
    """Tokens per rank, contiguous ranges in rank order; the first tokens % world ranks take one more."""
    if world < 1:
        raise ValueError(f"world size must be at least 1, got {world}")
    base, extra = divmod(tokens, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def token_range(splits: list[int], rank: int) -> tuple[int, int]:
    start = sum(splits[:rank])
    return start, start + splits[rank]


def shard(x: torch.Tensor, dim: int, splits: list[int], rank: int) -> torch.Tensor:
    start, end = token_range(splits, rank)
    return x.narrow(dim, start, end - start)


@torch.compiler.disable
def gather_tokens(local: torch.Tensor, dim: int, splits: list[int], sp: SequenceGroup) -> torch.Tensor:
    """The whole sequence on every rank from each rank's range (uneven ranges padded for the collective)."""
    longest = max(splits)
    moved = local.movedim(dim, 0)
    padded = moved.new_zeros((longest, *moved.shape[1:]))
    padded[:moved.shape[0]] = moved
    pieces = [torch.empty_like(padded) for _ in range(sp.world)]
    dist.all_gather(pieces, padded.contiguous(), group=sp.group)
    whole = torch.cat([piece[:n] for piece, n in zip(pieces, splits)], dim=0)
    return whole.movedim(0, dim)


@torch.compiler.disable
def sequence_to_heads(x: torch.Tensor, heads: int, splits: list[int], sp: SequenceGroup) -> torch.Tensor:
    """[B, my tokens, heads*d] -> [B, all tokens, heads/N*d]: rank r keeps heads [r*H/N, (r+1)*H/N)."""
    batch, tokens, width = x.shape
    group_width = width // sp.world
    # [N (destination head group), my tokens, B, group width]: one contiguous piece per destination.
    send = x.reshape(batch, tokens, sp.world, group_width).permute(2, 1, 0, 3).contiguous()
    receive = x.new_empty(sum(splits) * batch * group_width)
    dist.all_to_all_single(receive, send.reshape(-1), [n * batch * group_width for n in splits],
                           [tokens * batch * group_width] * sp.world, group=sp.group)
    # The pieces arrive in source-rank order, which is token order.
    return receive.reshape(sum(splits), batch, group_width).transpose(0, 1)


@torch.compiler.disable
def heads_to_sequence(y: torch.Tensor, splits: list[int], sp: SequenceGroup) -> torch.Tensor:
    """The inverse of sequence_to_heads: [B, all tokens, heads/N*d] -> [B, my tokens, heads*d]."""
    batch, _, group_width = y.shape
    mine = splits[sp.rank]
    send = y.transpose(0, 1).contiguous()  # [all tokens, B, group width]: ranges in destination order
    receive = y.new_empty(sp.world * mine * batch * group_width)
    dist.all_to_all_single(receive, send.reshape(-1), [mine * batch * group_width] * sp.world,
                           [n * batch * group_width for n in splits], group=sp.group)
    # [N (source head group), my tokens, B, group width] -> [B, my tokens, N * group width]
    return receive.reshape(sp.world, mine, batch, group_width).permute(2, 1, 0, 3).reshape(batch, mine, -1)


def ulysses_attention(attend, q, k, v, heads: int, q_splits: list[int], kv_splits: list[int],
                      sp: SequenceGroup, **kwargs) -> torch.Tensor:
    """attend(q, k, v, heads, **kwargs) (ComfyUI's signature) over the whole sequence, with q, k, v and the
    result holding this rank's tokens of all heads."""
    if heads % sp.world:
        raise ValueError(f"Ulysses splits heads across ranks: {heads} heads do not divide over {sp.world} "
                         f"ranks (choose the ring mode)")
    out = attend(sequence_to_heads(q, heads, q_splits, sp), sequence_to_heads(k, heads, kv_splits, sp),
                 sequence_to_heads(v, heads, kv_splits, sp), heads // sp.world, **kwargs)
    return heads_to_sequence(out, q_splits, sp)


def attention_with_lse(q, k, v, heads: int, scale: float | None = None):
    """(out [B, H, Tq, d] float32, log-sum-exp [B, H, Tq] float32) of softmax attention; q, k, v as
    [B, T, heads*d]. Zero keys give zero output and -inf (they weigh nothing in a merge)."""
    batch, q_tokens, width = q.shape
    head_dim = width // heads
    scale = head_dim ** -0.5 if scale is None else scale

    def split(t):
        return t.reshape(batch, t.shape[1], heads, head_dim).transpose(1, 2)

    if k.shape[1] == 0:
        return (q.new_zeros((batch, heads, q_tokens, head_dim), dtype=torch.float32),
                q.new_full((batch, heads, q_tokens), -math.inf, dtype=torch.float32))
    qh, kh, vh = split(q), split(k), split(v)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, False, False,
                                                                        scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qh.float().cpu(), kh.float().cpu(), vh.float().cpu(), 0.0, False, scale=scale)[:2]
    return out.float().to(q.device), lse.float().to(q.device)


def merge_lse(out_a, lse_a, out_b, lse_b):
    """Two partial softmax attentions over disjoint key sets -> the one over their union."""
    lse = torch.logaddexp(lse_a, lse_b)
    # Where both are -inf (no keys yet), logaddexp is -inf and the weights would be NaN.
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weight_a = torch.exp(lse_a - safe).unsqueeze(-1)
    weight_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return out_a * weight_a + out_b * weight_b, lse


def merge_heads(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    batch, heads, tokens, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim).to(dtype)


@torch.compiler.disable
def ring_attention(q, k, v, heads: int, kv_splits: list[int], sp: SequenceGroup,
                   scale: float | None = None) -> torch.Tensor:
    """This rank's queries against every rank's keys: the K/V shards go round the ring (rank r sends to
    r+1), each step's transfer overlapping the attention over the shard already here."""
    out, lse = None, None
    held_k, held_v = k.contiguous(), v.contiguous()
    for step in range(sp.world):
        pending = []
        if step + 1 < sp.world:
            source = (sp.rank - step - 1) % sp.world  # whose shard arrives next
            next_k = k.new_empty((k.shape[0], kv_splits[source], k.shape[2]))
            next_v = v.new_empty((v.shape[0], kv_splits[source], v.shape[2]))
            send_to, receive_from = (sp.rank + 1) % sp.world, (sp.rank - 1) % sp.world
            ops = [dist.P2POp(dist.isend, held_k, group_peer(sp, send_to), sp.group),
                   dist.P2POp(dist.isend, held_v, group_peer(sp, send_to), sp.group),
                   dist.P2POp(dist.irecv, next_k, group_peer(sp, receive_from), sp.group),
                   dist.P2POp(dist.irecv, next_v, group_peer(sp, receive_from), sp.group)]
            pending = dist.batch_isend_irecv(ops)
        block_out, block_lse = attention_with_lse(q, held_k, held_v, heads, scale)
        out, lse = (block_out, block_lse) if out is None else merge_lse(out, lse, block_out, block_lse)
        for request in pending:
            request.wait()
        if pending:
            held_k, held_v = next_k, next_v
    return merge_heads(out, q.dtype)


@torch.compiler.disable
def replicated_query_attention(q, k, v, heads: int, sp: SequenceGroup, scale: float | None = None):
    """Queries the same on every rank, keys sharded: each rank's partial attention, merged by all-reduce
    (max of the log-sum-exps, then weighted sums). Every rank returns the whole result."""
    out, lse = attention_with_lse(q, k, v, heads, scale)
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=sp.group)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weight = torch.exp(lse - top)
    weighted = out * weight.unsqueeze(-1)
    dist.all_reduce(weighted, group=sp.group)
    dist.all_reduce(weight, group=sp.group)
    return merge_heads(weighted / weight.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1), q.dtype)


def group_peer(sp: SequenceGroup, group_rank: int) -> int:
    """The global rank of `group_rank` in sp's group (P2P ops take global ranks)."""
    if sp.group is None:
        return group_rank
    return dist.get_global_rank(sp.group, group_rank)

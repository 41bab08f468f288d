"""The public model and the sampled members' next-token distributions from one batched forward.

All members are LoRA adapters on one frozen base; the base itself is the public model. A query runs
ONE forward over rows ``[public, sampled members...]`` (several contexts: their rows together,
:meth:`EnsembleLM.next_logprobs_many`), each row through its adapter by batched LoRA
(:mod:`pmixed.lora_batch`; peft's mixed-batch ``adapter_names`` with ``"__base__"`` for the public
row where a LoRA variant is not covered). Members that are not sampled are not computed.

KV cache: every row keeps its own cache of the tokens it has processed, in one buffer per layer for
all rows of a context (:class:`SequenceState`). The public row is computed at every step, so its
cache is always one token behind. A member is computed only when sampled (unless the caller asks
for every row), so its cache may lag by several tokens and the step feeds each row the tokens it
has not seen yet, with explicit position ids, in one of two batch layouts:

* per row (:func:`_per_row`): one batch row per ensemble row, its new tokens left-padded to the
  longest row's, after its cache (padded at the end), a 2-D mask over both paddings. Used when
  the rows' new-token counts are (nearly) equal: every row at every step, a first step.
* packed (:func:`_packed`): rows of any context in batch elements about the longest row long
  (first fit by decreasing length, and by a cost model at most so many cached keys per element,
  :func:`_bins`), each element holding its rows' caches side by side and then their new tokens
  one after another, with a 4-D mask that lets a token see its own row only.
  Used when padding would more than ``PACK_ABOVE``-fold the work: a member that catches up on 12
  missed tokens next to a public row that needs 1 costs 13 token positions, not 24.

Building the step's cache is one gather per context and layer (packed: then one more per layer),
and storing the new keys one indexed write per context and layer, whatever the number of rows.
Either way the result equals a plain forward over the whole context (tested against a
``set_adapter`` loop without cache, for both layouts and with packed elements split by keys).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from pmixed.backend import context_length
from pmixed.lora_batch import BatchedLora, PackedTokens

__all__ = ["EnsembleLM", "SequenceState"]

PUBLIC = "__base__"
#: A step is packed (:func:`_packed`) when left-padding every row to the longest would compute
#: more than this many times its real tokens.
PACK_ABOVE = 1.5
#: What a position of a packed element costs in attended keys, per unit of model width: the
#: linear layers' 24·width² flops against 4·width per key (:func:`_bins`).
POSITION_COST = 6


@dataclass
class SequenceState:
    """One context being extended: its tokens and every row's cached keys and values.

    ``keys[layer]`` and ``values[layer]`` are ``[1 + N, capacity, heads, dim]``: slot 0 is the
    public model (row ``None``), slot i + 1 member i; ``lengths[row]`` tokens are valid at the
    front of a row's slot. Position-major, so that one token of one row is one contiguous
    heads × dim block and a step gathers and stores them with one ``index_select`` /
    ``index_copy_`` on :meth:`flat` per context and layer. The capacity doubles when a row needs
    more.
    """

    tokens: list[int]
    lengths: dict[int | None, int] = field(default_factory=dict)
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    def cached(self, row: int | None) -> int:
        return self.lengths.get(row, 0)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys[layer]``, ``values[layer]`` as ``[slots × capacity, heads × dim]`` views: the
        token at position j of slot s is row ``s * capacity + j``."""
        k, v = self.keys[layer], self.values[layer]
        return k.view(-1, k.shape[2] * k.shape[3]), v.view(-1, v.shape[2] * v.shape[3])

    def reserve(self, slots: int, length: int, like: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        """Buffers that hold ``length`` tokens per slot, shaped after ``like`` (per layer: a
        transformers cache layer's ``[batch, heads, length, dim]``)."""
        cap = self.capacity
        if cap >= length:
            return
        new_cap = max(length, 2 * cap, 16)
        grown_k, grown_v = [], []
        for layer, (k, _) in enumerate(like):
            shape = (slots, new_cap, k.shape[1], k.shape[3])
            bk, bv = k.new_zeros(shape), k.new_zeros(shape)  # zeros: padding stays finite
            if cap:
                bk[:, :cap] = self.keys[layer]
                bv[:, :cap] = self.values[layer]
            grown_k.append(bk)
            grown_v.append(bv)
        self.keys, self.values = grown_k, grown_v


class EnsembleLM:
    """A peft model with one adapter per member; its base is the public model.

    Args:
        model: a ``peft.PeftModel`` (LoRA) whose adapters are the members.
        members: adapter names in member order (member i is ``members[i]``).
        pad_id: the token id used for padding (masked; never seen by a real position).
    """

    def __init__(self, model: torch.nn.Module, members: Sequence[str], pad_id: int) -> None:
        known = set(getattr(model, "peft_config", {}))
        missing = [m for m in members if m not in known]
        if missing:
            raise ValueError(f"members must be adapters of the model. Unknown: {missing}.")
        self.model = model.eval()
        self.members = list(members)
        # peft's mixed batch passes ``adapter_names`` to every LoRA layer through forward pre-hooks
        # that it registers on each call after scanning all modules twice (about 5 ms on the demo
        # model). The layers are fixed, so they are found once here and the same kwarg is injected.
        from peft.tuners.lora import LoraLayer

        self._lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        #: One gather + batched matmul per LoRA layer instead of peft's per-adapter sub-batches
        #: (None: a LoRA variant or layer type it does not cover; peft's mixed batch then runs).
        self.batched_lora = (
            BatchedLora(self._lora_layers, self.members)
            if BatchedLora.supports(self._lora_layers, self.members)
            else None
        )
        self.pad_id = int(pad_id)
        self.dtype = next(model.parameters()).dtype
        self.max_positions = context_length(model.config)
        self.vocab_size = int(model.config.vocab_size)
        self.width = int(model.config.get_text_config().hidden_size)  # what packing costs

    @property
    def n_members(self) -> int:
        return len(self.members)

    @torch.no_grad()
    def next_logprobs(
        self, state: SequenceState, subset: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p0 ``[V]``, log p_i ``[len(subset), V]``), float64, for the next token of ``state``.

        One forward over the public row and the members in ``subset`` (indices); caches are extended.
        """
        return self.next_logprobs_many([(state, subset)])[0]

    @torch.no_grad()
    def next_logprobs_many(
        self, requests: Sequence[tuple[SequenceState, Sequence[int]]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`next_logprobs` for several contexts in ONE forward over all their rows."""
        rows: list[tuple[SequenceState, int | None]] = []
        for state, subset in requests:
            self._check(state, subset)
            rows += [(state, None), *((state, int(m)) for m in subset)]
        for state, r in rows:  # a row with nothing new re-reads its last token
            state.lengths[r] = min(state.cached(r), len(state.tokens) - 1)
        lens = [state.cached(r) for state, r in rows]
        new = [len(state.tokens) - c for (state, _), c in zip(rows, lens)]
        # Rows of one context are contiguous: (state, batch rows, their buffer slots).
        groups: list[tuple[SequenceState, list[int], list[int]]] = []
        for i, (state, r) in enumerate(rows):
            if not groups or groups[-1][0] is not state:
                groups.append((state, [], []))
            groups[-1][1].append(i)
            groups[-1][2].append(0 if r is None else r + 1)
        padded, real = len(rows) * max(new), sum(new)
        packed = self.batched_lora is not None and padded > PACK_ABOVE * real
        if packed:
            layout = _packed(rows, groups, lens, new, self.pad_id, self.dtype, self.width)
        else:
            layout = _per_row(rows, groups, lens, new, self.pad_id, self.dtype)
        names = [PUBLIC if r is None else self.members[r] for _, r in rows]
        out = self._mixed_forward(
            names,
            input_ids=layout.ids,
            attention_mask=layout.mask,
            position_ids=layout.pos,
            cache=layout.cache,
            use_cache=True,
            logits_to_keep=layout.keep,
            lora_tokens=layout.lora_tokens,
        )
        # Only the last position's logits (``keep``): the LM head at V = 50 257 on every catch-up
        # position was most of the vocabulary-dependent work of a step.
        logits = out.logits.reshape(len(rows), -1)
        if layout.order is not None:
            logits = logits.new_empty(logits.shape).index_copy_(0, layout.order, logits)
        logp = torch.log_softmax(logits.double(), dim=-1)  # [rows, V]
        layers = [(lay.keys, lay.values) for lay in out.cache.layers]
        for state, batch, slots in groups:  # each row's new keys go after its cached ones
            state.reserve(1 + self.n_members, max(lens[i] + new[i] for i in batch), layers)
            cap = state.capacity
            src_row, src_pos, dst = [], [], []
            for i, slot in zip(batch, slots):
                c, m = lens[i], new[i]
                src_row += [layout.batch[i]] * m
                src_pos += range(layout.start[i], layout.start[i] + m)
                dst += range(slot * cap + c, slot * cap + c + m)
            src = (_ints(src_row), slice(None), _ints(src_pos))
            at = _ints(dst)
            for layer, (k, v) in enumerate(layers):
                flat_k, flat_v = state.flat(layer)
                flat_k.index_copy_(0, at, k[src].reshape(len(dst), -1))
                flat_v.index_copy_(0, at, v[src].reshape(len(dst), -1))
            for i in batch:
                state.lengths[rows[i][1]] = lens[i] + new[i]
        results, start = [], 0
        for _, subset in requests:
            results.append((logp[start], logp[start + 1 : start + 1 + len(subset)]))
            start += 1 + len(subset)
        return results

    def _check(self, state: SequenceState, subset: Sequence[int]) -> None:
        n = len(state.tokens)
        if n == 0:
            raise ValueError("state.tokens must hold at least one token (a prompt).")
        if n > self.max_positions:
            raise ValueError(f"the context has {n} tokens; the model allows {self.max_positions}.")
        if any(not 0 <= m < self.n_members for m in subset) or len(set(subset)) != len(subset):
            raise ValueError(f"subset must be distinct member indices in [0, {self.n_members}).")

    def _mixed_forward(self, names: list[str], lora_tokens=None, **inputs):
        """``model(**inputs)`` with row i through adapter ``names[i]``: batched LoRA, or peft's
        mixed batch (``lora_tokens``: where each row's tokens are in a packed batch, see
        :meth:`BatchedLora.forward <pmixed.lora_batch.BatchedLora.forward>`)."""
        if self.batched_lora is not None:
            index = {m: i for i, m in enumerate(self.members)} | {PUBLIC: len(self.members)}
            rows = torch.tensor([index[n] for n in names])
            return self.batched_lora.forward(self.model, rows, tokens=lora_tokens, **inputs)
        if lora_tokens is not None:
            raise ValueError("a packed batch needs batched LoRA (peft's mixed batch is per row).")
        return self._peft_mixed_forward(names, **inputs)

    def _peft_mixed_forward(self, names: list[str], **inputs):
        """``model(**inputs)`` with row i through adapter ``names[i]`` (peft's mixed batch)."""

        def inject(module, args, kwargs):
            return args, {**kwargs, "adapter_names": names}

        handles = [m.register_forward_pre_hook(inject, with_kwargs=True) for m in self._lora_layers]
        try:
            return self.model(**inputs)
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def reference_logprobs(self, tokens: Sequence[int], member: int | None) -> torch.Tensor:
        """log p(next | tokens) for one row by ``set_adapter`` and a full forward without cache."""
        ids = torch.tensor([list(tokens)])
        if member is None:
            with self.model.disable_adapter():
                logits = self.model(input_ids=ids, logits_to_keep=1).logits
        else:
            self.model.set_adapter(self.members[member])
            logits = self.model(input_ids=ids, logits_to_keep=1).logits
        return torch.log_softmax(logits[0, -1].double(), dim=-1)


Groups = Sequence[tuple[SequenceState, list[int], list[int]]]


def _ints(values: Sequence[int]) -> torch.Tensor:
    """An int64 tensor of a list through numpy: ``torch.tensor`` on a list of thousands of ints
    (a packed step's index lists) takes about 9 times as long."""
    return torch.from_numpy(np.fromiter(values, dtype=np.int64, count=len(values)))


@dataclass
class _Layout:
    """One step's batch: inputs, the cache it starts from, and where each row's new keys land in
    the output cache (batch element ``batch[i]``, key positions from ``start[i]`` on)."""

    ids: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    keep: int | torch.Tensor
    cache: DynamicCache
    batch: list[int]
    start: list[int]
    lora_tokens: PackedTokens | None = None
    #: the row of each kept logit, in batch order (None: row order)
    order: torch.Tensor | None = None


def _per_row(rows, groups: Groups, lens, new, pad_id: int, dtype) -> _Layout:
    """One batch row per ensemble row: its new tokens left-padded to the longest, after its cache
    (padded at the end to the longest), a 2-D mask over both paddings."""
    c_max, l_max, b = max(lens), max(new), len(rows)
    ids = torch.full((b, l_max), pad_id, dtype=torch.long)
    pos = torch.zeros((b, l_max), dtype=torch.long)
    mask = torch.zeros((b, c_max + l_max), dtype=torch.long)
    for i, ((state, _), c, m) in enumerate(zip(rows, lens, new)):
        ids[i, l_max - m :] = torch.tensor(state.tokens[c:])
        pos[i, l_max - m :] = torch.arange(c, len(state.tokens))
        mask[i, :c] = 1
        mask[i, c_max + l_max - m :] = 1

    cache = DynamicCache()
    ref = next((st for st, _, _ in groups if st.keys), None)
    for layer, like in enumerate(ref.keys if c_max else []):
        keys, values = [], []
        for state, _, slots in groups:
            if not state.keys:  # zeros: padding stays finite
                shape = (len(slots), c_max, like.shape[2], like.shape[3])
                keys.append(like.new_zeros(shape))
                values.append(like.new_zeros(shape))
                continue
            index = torch.tensor(slots)
            k = state.keys[layer].index_select(0, index)[:, :c_max]
            v = state.values[layer].index_select(0, index)[:, :c_max]
            pad = (0, 0, 0, 0, 0, c_max - k.shape[1])  # at the end of the length axis
            keys.append(torch.nn.functional.pad(k, pad))
            values.append(torch.nn.functional.pad(v, pad))
        # [rows, heads, length, dim], as transformers keeps a cache layer
        cache.update(torch.cat(keys).transpose(1, 2), torch.cat(values).transpose(1, 2), layer)
    starts = [c_max + l_max - m for m in new]
    return _Layout(ids, pos, mask, 1, cache, list(range(b)), starts)


def _first_fit(
    sizes: Sequence[int], cap: int, keys: Sequence[int] | None = None, key_cap: float = math.inf
) -> list[list[int]]:
    """Indices of ``sizes`` in bins of capacity ``cap``, first fit by decreasing size (stable);
    with ``keys``, a bin's keys also sum to at most ``key_cap`` (a row above it gets its own bin)."""
    bins: list[list[int]] = []
    room: list[int] = []
    key_room: list[float] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        need = 0 if keys is None else keys[i]
        k = next(
            (k for k, r in enumerate(room) if r >= sizes[i] and key_room[k] >= need), len(bins)
        )
        if k == len(bins):
            bins.append([])
            room.append(cap)
            key_room.append(key_cap)
        bins[k].append(i)
        room[k] -= sizes[i]
        key_room[k] -= need
    return bins


def _bins(lens: Sequence[int], new: Sequence[int], width: int) -> tuple[list[list[int]], int]:
    """(rows per batch element, element length) of a packed step, by a cost model.

    Every element is padded to the longest and its tokens attend to every cached key of the
    element, so b elements of p positions over c cached keys cost about
    b·p·(POSITION_COST·width + c + p). Tried: the element length with the fewest positions (the
    longest row, or it plus a shorter row) and the longest row alone, each with no bound on an
    element's cached keys or 1, 2, 4, 8 times the longest row's; the cheapest wins. Without the
    bound, many short rows with long caches (each prompt's public row, with 32 prompts) land in
    one element, and every element attends over all their caches (8 prompts of the demo model:
    c = 819 keys per element on average, against about 60 per row).
    """
    l_max, longest = max(new), max(max(lens), 1)
    lengths = sorted({l_max} | {l_max + m for m in new if m < l_max})
    fewest = min(lengths, key=lambda cap: len(_first_fit(new, cap)) * cap)
    # a bound at or above every key of the step is no bound: tried once, as math.inf
    key_caps = [math.inf] + [k * longest for k in (1, 2, 4, 8) if k * longest < sum(lens)]
    best = None
    for p in sorted({l_max, fewest}):
        for key_cap in key_caps:
            bins = _first_fit(new, p, lens, key_cap)
            c = max(sum(lens[i] for i in rows) for rows in bins)
            cost = len(bins) * p * (POSITION_COST * width + c + p)
            if best is None or cost < best[0]:
                best = (cost, bins, p)
    return best[1], best[2]


def _packed(rows, groups: Groups, lens, new, pad_id: int, dtype, width: int) -> _Layout:
    """Rows packed into batch elements about the longest row long (:func:`_bins` chooses),
    whatever their context: an element holds its rows' cached keys side by side, then
    their new tokens one after another, and a 4-D mask lets each token see its own row's cache and
    its own row's earlier new tokens only. A step whose members catch up on different numbers of
    missed tokens then computes about its real tokens instead of every row padded to the longest.
    """
    l_max = max(new)
    bins, p = _bins(lens, new, width)
    offset, n = [0] * len(rows), 0  # row i's cached keys: entries offset[i]... of `flat` below
    for _, batch, _ in groups:
        for i in batch:
            offset[i], n = n, n + lens[i]
    b = len(bins)
    c = max(sum(lens[i] for i in rows_k) for rows_k in bins)
    # Built as flat lists and turned into tensors once (per-row tensor writes were most of this).
    ids, pos, keep = [pad_id] * (b * p), [0] * (b * p), [0] * (b * p)
    owner_new = [-1] * (b * p)  # padding tokens see each other only
    owner_cached = [-2] * (b * c)  # padding keys are seen by none
    take = [n] * (b * c)  # entry n of `flat`: zeros
    where_batch, start, src, dst = [0] * len(rows), [0] * len(rows), [], []
    for k, rows_k in enumerate(bins):
        s, o = k * p, k * c  # flat positions of the next new token / cached key of element k
        for i in rows_k:
            state, ci, m = rows[i][0], lens[i], new[i]
            ids[s : s + m] = state.tokens[ci:]
            pos[s : s + m] = range(ci, ci + m)
            owner_new[s : s + m], owner_cached[o : o + ci] = [i] * m, [i] * ci
            take[o : o + ci] = range(offset[i], offset[i] + ci)
            keep[s + m - 1] = 1
            where_batch[i], start[i] = k, c + s - k * p
            src += range(s, s + m)
            dst += range(i * l_max, i * l_max + m)
            s, o = s + m, o + ci
    ids, pos, keep = _ints(ids).view(b, p), _ints(pos).view(b, p), _ints(keep).view(b, p) > 0
    owner_new, owner_cached = _ints(owner_new).view(b, p), _ints(owner_cached).view(b, c)
    take = _ints(take)
    causal = torch.ones((p, p), dtype=torch.bool).tril()
    sees = torch.cat(
        [
            owner_new[:, :, None] == owner_cached[:, None, :],
            (owner_new[:, :, None] == owner_new[:, None, :]) & causal,
        ],
        dim=-1,
    )
    mask = torch.zeros(sees.shape, dtype=dtype).masked_fill_(~sees, torch.finfo(dtype).min)
    cache = DynamicCache()
    if c:
        at = []  # per context with cached keys: their rows' flat positions, rows side by side
        for state, batch, slots in groups:
            cap, index = state.capacity, []
            for i, slot in zip(batch, slots):
                index += range(slot * cap, slot * cap + lens[i])
            if index:
                at.append((state, _ints(index)))
        heads, dim = at[0][0].keys[0].shape[2:]

        def gathered(parts: list[torch.Tensor]) -> torch.Tensor:  # [b, heads, c, dim]
            flat = torch.cat([*parts, parts[0].new_zeros((1, parts[0].shape[1]))])
            return flat.index_select(0, take).view(b, c, heads, dim).transpose(1, 2)

        for layer in range(len(at[0][0].keys)):
            flats = [(st.flat(layer), index) for st, index in at]
            keys = gathered([k.index_select(0, index) for (k, _), index in flats])
            values = gathered([v.index_select(0, index) for (_, v), index in flats])
            cache.update(keys, values, layer)
    order = [i for rows_k in bins for i in rows_k]  # the kept positions' rows, in batch order
    tokens = PackedTokens(_ints(src), _ints(dst), l_max)
    return _Layout(ids, pos, mask[:, None], keep, cache, where_batch, start, tokens, _ints(order))

"""The public model and the sampled members' next-token distributions from one batched forward.

All members are LoRA adapters on one frozen base; the base itself is the public model. A query runs
ONE forward over rows ``[public, sampled members...]`` (several contexts: their rows together,
:meth:`EnsembleLM.next_logprobs_many`), each row through its adapter by batched LoRA
(:mod:`pmixed.lora_batch`; peft's mixed-batch ``adapter_names`` with ``"__base__"`` for the public
row where a LoRA variant is not covered). Members that are not sampled are not computed.

KV cache: every row keeps its own cache of the tokens it has processed, in one buffer per layer for
all rows of a context (:class:`SequenceState`). The public row is computed at every step, so its
cache is always one token behind. A member is computed only when sampled (unless the caller asks
for every row), so its cache may lag by several tokens; the step feeds each row the tokens it has
not seen yet, left-padded to a common length, after its cache (padded at the end to a common
length), with a mask over both paddings and explicit position ids. Building the step's cache is one
gather per context and layer, and storing the new keys one indexed write, whatever the number of
rows. The result equals a plain forward over the whole context (tested against a ``set_adapter``
loop without cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from pmixed.backend import context_length
from pmixed.lora_batch import BatchedLora

__all__ = ["EnsembleLM", "SequenceState"]

PUBLIC = "__base__"


@dataclass
class SequenceState:
    """One context being extended: its tokens and every row's cached keys and values.

    ``keys[layer]`` and ``values[layer]`` are ``[1 + N, heads, capacity, dim]``: slot 0 is the
    public model (row ``None``), slot i + 1 member i; ``lengths[row]`` tokens are valid at the
    front of a row's slot. The capacity doubles when a row needs more.
    """

    tokens: list[int]
    lengths: dict[int | None, int] = field(default_factory=dict)
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    def cached(self, row: int | None) -> int:
        return self.lengths.get(row, 0)

    def reserve(self, slots: int, length: int, like: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        """Buffers that hold ``length`` tokens per slot, shaped after ``like`` (per layer)."""
        cap = self.keys[0].shape[2] if self.keys else 0
        if cap >= length:
            return
        new_cap = max(length, 2 * cap, 16)
        grown_k, grown_v = [], []
        for layer, (k, _) in enumerate(like):
            shape = (slots, k.shape[1], new_cap, k.shape[3])
            bk, bv = k.new_zeros(shape), k.new_zeros(shape)  # zeros: padding stays finite
            if cap:
                bk[:, :, :cap] = self.keys[layer]
                bv[:, :, :cap] = self.values[layer]
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
        self.max_positions = context_length(model.config)
        self.vocab_size = int(model.config.vocab_size)

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
        c_max, l_max, b = max(lens), max(new), len(rows)
        ids = torch.full((b, l_max), self.pad_id, dtype=torch.long)
        pos = torch.zeros((b, l_max), dtype=torch.long)
        mask = torch.zeros((b, c_max + l_max), dtype=torch.long)
        for i, ((state, _), c, m) in enumerate(zip(rows, lens, new)):
            ids[i, l_max - m :] = torch.tensor(state.tokens[c:])
            pos[i, l_max - m :] = torch.arange(c, len(state.tokens))
            mask[i, :c] = 1
            mask[i, c_max + l_max - m :] = 1
        # Rows of one context are contiguous: (state, batch rows, their buffer slots).
        groups: list[tuple[SequenceState, list[int], list[int]]] = []
        for i, (state, r) in enumerate(rows):
            if not groups or groups[-1][0] is not state:
                groups.append((state, [], []))
            groups[-1][1].append(i)
            groups[-1][2].append(0 if r is None else r + 1)
        cache = DynamicCache()
        if c_max:
            like = next(list(zip(st.keys, st.values)) for st, _, _ in groups if st.keys)
            for layer, (k0, _) in enumerate(like):
                keys, values = [], []
                for state, _, slots in groups:
                    if not state.keys:
                        shape = (len(slots), k0.shape[1], c_max, k0.shape[3])
                        keys.append(k0.new_zeros(shape))
                        values.append(k0.new_zeros(shape))
                        continue
                    index = torch.tensor(slots)
                    k = state.keys[layer].index_select(0, index)[:, :, :c_max]
                    v = state.values[layer].index_select(0, index)[:, :, :c_max]
                    pad = (0, 0, 0, c_max - k.shape[2])  # at the end of the length axis
                    keys.append(torch.nn.functional.pad(k, pad))
                    values.append(torch.nn.functional.pad(v, pad))
                cache.update(torch.cat(keys), torch.cat(values), layer)
        names = [PUBLIC if r is None else self.members[r] for _, r in rows]
        # Only the last position's logits: the LM head at V = 50 257 on every catch-up position
        # was most of the vocabulary-dependent work of a step.
        out = self._mixed_forward(
            names,
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logp = torch.log_softmax(out.logits[:, -1, :].double(), dim=-1)  # [rows, V]
        layers = [(lay.keys, lay.values) for lay in out.cache.layers]
        for state, batch, slots in groups:  # each row's new keys go after its cached ones
            src_row, src_pos, dst_slot, dst_pos = [], [], [], []
            for i, slot in zip(batch, slots):
                c, m = lens[i], new[i]
                src_row += [i] * m
                src_pos += range(c_max + l_max - m, c_max + l_max)
                dst_slot += [slot] * m
                dst_pos += range(c, c + m)
            state.reserve(1 + self.n_members, max(dst_pos) + 1, layers)
            src = (torch.tensor(src_row), slice(None), torch.tensor(src_pos))
            dst = (torch.tensor(dst_slot), slice(None), torch.tensor(dst_pos))
            for layer, (k, v) in enumerate(layers):
                state.keys[layer][dst] = k[src]
                state.values[layer][dst] = v[src]
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

    def _mixed_forward(self, names: list[str], **inputs):
        """``model(**inputs)`` with row i through adapter ``names[i]``: batched LoRA, or peft's
        mixed batch."""
        if self.batched_lora is not None:
            index = {m: i for i, m in enumerate(self.members)} | {PUBLIC: len(self.members)}
            rows = torch.tensor([index[n] for n in names])
            return self.batched_lora.forward(self.model, rows, **inputs)
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

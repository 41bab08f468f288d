"""The public model and the sampled members' next-token distributions from one batched forward.

All members are LoRA adapters on one frozen base; the base itself is the public model. A query runs
ONE forward over rows ``[public, sampled members...]`` (several contexts: their rows together,
:meth:`EnsembleLM.next_logprobs_many`), each row through its adapter by batched LoRA
(:mod:`pmixed.lora_batch`; peft's mixed-batch ``adapter_names`` with ``"__base__"`` for the public
row where a LoRA variant is not covered). Members that are not sampled are not computed.

KV cache: every row keeps its own cache of the tokens it has processed. The public row is computed at
every step, so its cache is always one token behind. A member is computed only when sampled, so its
cache may lag by several tokens; the step feeds each row the tokens it has not seen yet,
left-padded to a common length, with the caches left-padded to a common length and masked, and
explicit position ids. After the forward each row's cache is compacted back. The result equals a
plain forward over the whole context (tested against a ``set_adapter`` loop without cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from pmixed.lora_batch import BatchedLora

__all__ = ["EnsembleLM", "SequenceState"]

PUBLIC = "__base__"


@dataclass
class SequenceState:
    """One context being extended: its tokens and, per row, the cached keys and values.

    ``caches[row]`` is a list over layers of ``(keys, values)``, each ``[1, heads, length, dim]``;
    ``row`` is ``None`` for the public model and the member index otherwise.
    """

    tokens: list[int]
    caches: dict[int | None, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def cached(self, row: int | None) -> int:
        cache = self.caches.get(row)
        return 0 if not cache else cache[0][0].shape[2]


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
        self.batched_lora = (BatchedLora(self._lora_layers, self.members)
                             if BatchedLora.supports(self._lora_layers, self.members) else None)  # fmt: skip
        self.pad_id = int(pad_id)
        self.max_positions = int(model.config.n_positions)
        self.vocab_size = int(model.config.vocab_size)

    @property
    def n_members(self) -> int:
        return len(self.members)

    @torch.no_grad()
    def next_logprobs(
        self, state: SequenceState, members: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p0 ``[V]``, log p_i ``[len(members), V]``), float64, for the next token of ``state``.

        One forward over the public row and the listed members; their caches are extended.
        """
        return self.next_logprobs_many([(state, members)])[0]

    @torch.no_grad()
    def next_logprobs_many(
        self, requests: Sequence[tuple[SequenceState, Sequence[int]]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`next_logprobs` for several contexts in ONE forward over all their rows."""
        rows: list[tuple[SequenceState, int | None]] = []
        for state, members in requests:
            self._check(state, members)
            rows += [(state, None), *((state, int(m)) for m in members)]
        for state, r in rows:  # a row with nothing new re-reads its last token
            n = len(state.tokens)
            if state.cached(r) >= n:
                state.caches[r] = [(k[:, :, : n - 1], v[:, :, : n - 1]) for k, v in state.caches[r]]
        lens = [state.cached(r) for state, r in rows]
        new = [len(state.tokens) - c for (state, _), c in zip(rows, lens)]
        c_max, l_max, b = max(lens), max(new), len(rows)
        ids = torch.full((b, l_max), self.pad_id, dtype=torch.long)
        pos = torch.zeros((b, l_max), dtype=torch.long)
        mask = torch.zeros((b, c_max + l_max), dtype=torch.long)
        for i, ((state, _), c, m) in enumerate(zip(rows, lens, new)):
            ids[i, l_max - m :] = torch.tensor(state.tokens[c:])
            pos[i, l_max - m :] = torch.arange(c, len(state.tokens))
            mask[i, c_max - c : c_max] = 1
            mask[i, c_max + l_max - m :] = 1
        cache = DynamicCache()
        if c_max:
            some = next(kv for state, _ in rows for kv in state.caches.values() if kv)
            for layer, (k0, v0) in enumerate(some):
                keys, values = [], []
                for (state, r), c in zip(rows, lens):
                    k, v = state.caches[r][layer] if c else (k0[:, :, :0], v0[:, :, :0])
                    pad = (0, 0, c_max - c, 0)  # left-pad the length axis
                    keys.append(torch.nn.functional.pad(k, pad))
                    values.append(torch.nn.functional.pad(v, pad))
                cache.update(torch.cat(keys), torch.cat(values), layer)
        names = [PUBLIC if r is None else self.members[r] for _, r in rows]
        # Only the last position's logits: the LM head at V = 50 257 on every catch-up position
        # was most of the vocabulary-dependent work of a step.
        out = self._mixed_forward(names, input_ids=ids, attention_mask=mask, position_ids=pos,
                                  cache=cache, use_cache=True, logits_to_keep=1)  # fmt: skip
        logp = torch.log_softmax(out.logits[:, -1, :].double(), dim=-1)  # [rows, V]
        for i, ((state, r), c, m) in enumerate(zip(rows, lens, new)):
            state.caches[r] = [
                (torch.cat([lay.keys[i : i + 1, :, c_max - c : c_max],
                            lay.keys[i : i + 1, :, c_max + l_max - m :]], dim=2),
                 torch.cat([lay.values[i : i + 1, :, c_max - c : c_max],
                            lay.values[i : i + 1, :, c_max + l_max - m :]], dim=2))
                for lay in out.cache.layers
            ]  # fmt: skip
        results, start = [], 0
        for _, members in requests:
            results.append((logp[start], logp[start + 1 : start + 1 + len(members)]))
            start += 1 + len(members)
        return results

    def _check(self, state: SequenceState, members: Sequence[int]) -> None:
        n = len(state.tokens)
        if n == 0:
            raise ValueError("state.tokens must hold at least one token (a prompt).")
        if n > self.max_positions:
            raise ValueError(f"the context has {n} tokens; the model allows {self.max_positions}.")
        if any(not 0 <= m < self.n_members for m in members) or len(set(members)) != len(members):
            raise ValueError(f"members must be distinct indices in [0, {self.n_members}).")

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

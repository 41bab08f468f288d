"""Batched LoRA for the ensemble forward: one gather and two batched matmuls per LoRA layer.

peft's mixed batch (``adapter_names=[...]``) runs one sub-batch per adapter in every LoRA layer:
with N members in a batch that is N small matmuls and N index copies per layer. Multi-LoRA servers
(Punica's BGMV, S-LoRA; vLLM's CPU path in plain PyTorch) instead gather each row's A and B and
run one batched matmul. Here the members' A ``[r, in]`` and scaled B ``s·[out, r]`` are stacked
once per layer (a zero adapter at index N is the public row), and each row of a forward computes

    y = base(x) + (x · A_row^T) · (s_row · B_row)^T

with ``torch.bmm``, in the adapters' dtype (float32 as trained: equal to peft's sub-batches to
rounding). peft stays the training and storage format: the stacks are rebuilt when any member's
weights change (their tensor versions are compared on every forward). Only vanilla LoRA on
linear/Conv1D layers is batched; :meth:`BatchedLora.supports` says whether a model qualifies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["BatchedLora", "PackedTokens"]


class PackedTokens(NamedTuple):
    """Where each row's tokens are in a packed batch (several rows per batch element): the real
    token at flat position ``src[t]`` of the batch (``batch * seq_len + seq``) is the token at
    flat position ``dst[t]`` of the rows padded to ``length`` (``row * length + column``), where
    the LoRA update is computed per row."""

    src: torch.Tensor
    dst: torch.Tensor
    length: int

    def gather(self, rows: int) -> torch.Tensor:
        """The batch position each row slot reads. A padding slot of a row reads batch position 0:
        its product is never read back (``bmm`` keeps slots apart, and only ``dst`` is added)."""
        gather = torch.zeros(rows * self.length, dtype=torch.long)
        gather[self.dst] = self.src
        return gather


class BatchedLora:
    """Stacked LoRA weights of ``members`` in every LoRA layer of a peft model.

    Args:
        layers: the model's ``peft`` LoRA layers.
        members: adapter names in member order.
    """

    def __init__(self, layers: Sequence[torch.nn.Module], members: Sequence[str]) -> None:
        self.layers, self.members = list(layers), list(members)
        self._versions: tuple | None = None
        self._stacks: list[tuple[torch.Tensor, torch.Tensor]] = []

    @staticmethod
    def supports(layers: Sequence[torch.nn.Module], members: Sequence[str]) -> bool:
        """Vanilla LoRA (no DoRA or other variant) with linear A and B for every member."""
        for layer in layers:
            if getattr(layer, "lora_variant", {}) or not hasattr(layer, "lora_A"):
                return False
            for m in members:
                if m not in layer.lora_A or not isinstance(layer.lora_A[m], torch.nn.Linear):
                    return False
        return True

    def _weights(self):
        # Read through the modules' dicts: this runs on every forward (nn.Module.__getattr__ over
        # every member of every layer was ~4 ms of a 30 ms step on the demo model).
        for layer in self.layers:
            a_mods, b_mods = layer.lora_A._modules, layer.lora_B._modules
            for m in self.members:
                yield a_mods[m]._parameters["weight"], b_mods[m]._parameters["weight"]

    def _refresh(self) -> None:
        versions = tuple((id(a), a._version, id(b), b._version) for a, b in self._weights())
        if versions == self._versions:
            return
        stacks = []
        for layer in self.layers:
            a = [layer.lora_A[m].weight.detach() for m in self.members]
            b = [layer.lora_B[m].weight.detach() * float(layer.scaling[m]) for m in self.members]
            r = max(w.shape[0] for w in a)  # ranks may differ: pad with zeros
            a_stack = a[0].new_zeros(len(a) + 1, r, a[0].shape[1])
            b_stack = b[0].new_zeros(len(b) + 1, b[0].shape[0], r)
            for i, (wa, wb) in enumerate(zip(a, b)):
                a_stack[i, : wa.shape[0]] = wa
                b_stack[i, :, : wb.shape[1]] = wb
            stacks.append(
                (a_stack.transpose(1, 2).contiguous(), b_stack.transpose(1, 2).contiguous())
            )
        self._stacks, self._versions = stacks, versions

    def forward(
        self,
        model: torch.nn.Module,
        rows: torch.Tensor,
        tokens: PackedTokens | None = None,
        **inputs,
    ):
        """``model(**inputs)`` with row i through member ``rows[i]`` (index N: the public model).

        Batch row i is row i unless ``tokens`` says where each row's tokens are in a packed batch.
        """
        self._refresh()
        if tokens is not None:
            gather = tokens.gather(len(rows))
        originals = []
        try:
            for layer, (a_t, b_t) in zip(self.layers, self._stacks):
                a_rows, b_rows = a_t[rows], b_t[rows]  # [b, in, r], [b, r, out]

                def batched(x, *args, _layer=layer, _a=a_rows, _b=b_rows, **kwargs):
                    result = _layer.base_layer(x, *args, **kwargs)
                    x = x.to(_a.dtype)
                    if tokens is None:
                        return result + torch.bmm(torch.bmm(x, _a), _b).to(result.dtype)
                    # rows padded to tokens.length: gather, two bmm, then each real token's
                    # update added in place at its batch position (padding positions keep the
                    # base output: no zero row, no full-size add)
                    per_row = x.reshape(-1, x.shape[-1]).index_select(0, gather)
                    delta = torch.bmm(torch.bmm(per_row.view(len(_a), tokens.length, -1), _a), _b)
                    delta = delta.view(-1, delta.shape[-1]).index_select(0, tokens.dst)
                    flat = result.reshape(-1, result.shape[-1])
                    return flat.index_add_(0, tokens.src, delta.to(result.dtype)).view(result.shape)

                originals.append(layer)
                layer.forward = batched
            return model(**inputs)
        finally:
            for layer in originals:
                del layer.forward

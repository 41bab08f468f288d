"""Training isolation and the batched multi-adapter forward with per-row KV caches."""

from __future__ import annotations

import pytest
import torch

from pmixed.models import EnsembleLM, SequenceState
from tests.pmixed.tiny import (
    LOOP_TOLERANCE,
    LORA,
    PRIVATE,
    cached_vs_loop,
    computed_rows,
    ensemble,
    tiny_lm,
    tokenizer,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _lora_weights(model, name):
    return {k: v.clone() for k, v in model.state_dict().items() if f".{name}." in k}


def test_each_member_depends_on_its_own_partition_only(tok):
    a = ensemble(tok, PRIVATE)
    b = ensemble(
        tok, [PRIVATE[0], ["Something else entirely, said by a new user. " * 6], PRIVATE[2]]
    )
    for i, same in [(0, True), (1, False), (2, True)]:
        wa, wb = _lora_weights(a, f"member-{i:02d}"), _lora_weights(b, f"member-{i:02d}")
        assert wa.keys() == wb.keys() and wa
        assert all(torch.equal(wa[k], wb[k]) for k in wa) is same
    base = [v for k, v in a.state_dict().items() if "lora_" not in k]
    assert all(not p.requires_grad for n, p in a.named_parameters() if "lora_" not in n)
    assert base


def test_retraining_a_member_on_its_partition_reproduces_it_and_canaries_change_it(tok):
    from audit.canaries import MemberRecipe, canary_block, drop_adapter, retrain_with_canaries
    from pmixed.train import TrainSpec, blocks

    model = ensemble(tok, PRIVATE)
    recipe = MemberRecipe(LORA, TrainSpec(steps=4, batch_size=4, lr=0.05), 7)
    part = blocks(PRIVATE[1], tok, 32)
    block = canary_block(tok("The secret word of the day is")["input_ids"] + [42], 32)
    for name, copies in (("again", 0), ("canary", len(part))):
        retrain_with_canaries(model, name, 1, part, block, copies, recipe)
    deployed = _lora_weights(model, "member-01")
    again = {
        k.replace(".again.", ".member-01."): v for k, v in _lora_weights(model, "again").items()
    }
    canary = {
        k.replace(".canary.", ".member-01."): v for k, v in _lora_weights(model, "canary").items()
    }
    assert again.keys() == deployed.keys() and all(
        torch.equal(again[k], deployed[k]) for k in again
    )
    assert not all(torch.equal(canary[k], deployed[k]) for k in canary)
    model.set_adapter("canary")
    drop_adapter(model, "canary")  # the active one: another becomes active, no peft warning
    assert "canary" not in model.peft_config and model.active_adapter != "canary"
    with pytest.raises(ValueError, match="block must have shape"):
        retrain_with_canaries(model, "bad", 1, part, block[:5], 1, recipe)


@pytest.fixture(scope="module")
def lm(tok):
    return tiny_lm(tok)


def test_batched_cached_forward_equals_the_set_adapter_loop(lm, tok):
    worst, gap = cached_vs_loop(lm, tok("Friends, Romans")["input_ids"], 20, 0.4)
    assert worst < LOOP_TOLERANCE
    assert gap > 0.1  # the members really differ from the public model


def test_unsampled_members_are_not_computed(lm, tok):
    state = SequenceState(tok("Out, damned")["input_ids"])
    with computed_rows(lm) as seen:
        lm.next_logprobs(state, [2])
        lm.next_logprobs(state, [])
    assert seen == [["__base__", "member-02"], ["__base__"]]
    assert state.cached(0) == 0 and state.cached(1) == 0 and state.cached(2) > 0


def test_bad_requests_are_refused(lm):
    with pytest.raises(ValueError, match="subset"):
        lm.next_logprobs(SequenceState([1, 2]), [3])
    with pytest.raises(ValueError, match="subset"):
        lm.next_logprobs(SequenceState([1, 2]), [1, 1])
    with pytest.raises(ValueError, match="tokens"):
        lm.next_logprobs(SequenceState([]), [])
    with pytest.raises(ValueError, match="allows 64"):
        lm.next_logprobs(SequenceState([1] * 65), [])
    with pytest.raises(ValueError, match="adapters"):
        EnsembleLM(lm.model, ["member-09"], 0)


@pytest.mark.filterwarnings(
    "ignore:Secure RNG turned off", "ignore:Full backward hook", "ignore::UserWarning"
)
def test_dpsgd_and_finetune_adapters_join_the_same_model(tok):
    from accounting import from_opacus
    from pmixed.train import TrainSpec, add_trained_adapter, blocks, train_dpsgd_adapter

    model = ensemble(tok)
    data = blocks(PRIVATE[0] * 8, tok, 32)
    before = {k: v.clone() for k, v in model.state_dict().items() if "member-00" in k}
    res = train_dpsgd_adapter(
        model,
        "dpsgd",
        data,
        LORA,
        epsilon=8.0,
        delta=1e-5,
        epochs=2,
        batch_size=2,
        lr=0.1,
        max_grad_norm=1.0,
        seed=0,
    )
    add_trained_adapter(model, "finetuned", data, LORA, TrainSpec(steps=3, batch_size=4), 1)
    assert {"dpsgd", "finetuned", "member-00"} <= set(model.peft_config)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert res.steps == sum(n for _, _, n in res.history) and res.empty_batches > 0
    assert res.epsilon_opacus <= 8.0 + 1e-6
    rep = from_opacus(list(res.history), 1e-5)
    assert rep.opacus == pytest.approx(res.epsilon_opacus, rel=1e-12)
    lm = EnsembleLM(model, ["dpsgd", "finetuned"], tok.eos_token_id)
    lp0, lps = lm.next_logprobs(SequenceState(tok("Friends")["input_ids"]), [0, 1])
    assert (lps[0] - lp0).abs().max() > 1e-4  # the DP-SGD weights were loaded


def test_the_lm_head_sees_only_the_last_position_of_each_row(lm, tok):
    head = lm.model.get_output_embeddings()
    positions = []  # positions entering the head, whatever the batch layout
    handle = head.register_forward_hook(
        lambda mod, args, out: positions.append(args[0].shape[:-1].numel())
    )
    try:
        state = SequenceState(tok("Now is the winter of our discontent")["input_ids"])
        lm.next_logprobs(state, [])  # members 0-2 lag by the whole prompt...
        state.tokens += [5, 6, 7]
        lm.next_logprobs(state, [0, 2])  # ...and catch up on it here: many positions per row
    finally:
        handle.remove()
    assert positions == [1, 3]


def test_both_layouts_equal_the_set_adapter_loop(lm, tok, layout):
    worst, gap = cached_vs_loop(lm, tok("Friends, Romans, countrymen")["input_ids"], 16, 0.3)
    assert worst < LOOP_TOLERANCE
    assert gap > 0.1


def test_a_catch_up_is_packed_not_padded_to_the_longest_row(lm, tok):
    shapes = []
    forward = lm.model.forward

    def record(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    state = SequenceState(tok("Now is the winter of our discontent")["input_ids"])
    n = len(state.tokens)
    lm.model.forward = record
    try:
        lm.next_logprobs(state, [])  # members lag by the whole prompt
        state.tokens.append(5)
        lm.next_logprobs(state, [1])  # public: 1 new token; member 1: n + 1
        state.tokens.append(6)
        lm.next_logprobs(state, [1])  # both 1 new token: one row each, nothing to pack
    finally:
        del lm.model.forward
    # packed: one batch element holding 1 + (n + 1) real tokens, not 2 rows of n + 1
    assert shapes == [(1, n), (1, n + 2), (2, 1)]


def test_packing_bounds_the_cached_keys_of_an_element_when_that_is_cheaper():
    from pmixed.models import POSITION_COST, _bins, _first_fit

    def cost(bins, p, lens, width):
        c = max(sum(lens[i] for i in rows) for rows in bins)
        return len(bins) * p * (POSITION_COST * width + c + p)

    # a step of 32 prompts (demo model, width 128): 32 public rows, 1 new token after 60 cached
    # keys each; 6 members catching up on a 40-token prompt and 18 generated tokens
    lens, new = [60] * 32 + [0] * 6, [1] * 32 + [58] * 6
    bins, p = _bins(lens, new, 128)
    assert sorted(i for rows in bins for i in rows) == list(range(38))  # every row once
    assert all(sum(new[i] for i in rows) <= p for rows in bins)
    c = max(sum(lens[i] for i in rows) for rows in bins)
    unbounded = _first_fit(new, 58)  # by positions alone: 32 public rows in one element
    assert max(sum(lens[i] for i in rows) for rows in unbounded) == 32 * 60
    assert c <= 8 * 60
    assert cost(bins, p, lens, 128) < 0.7 * cost(unbounded, 58, lens, 128)  # 0.68
    # GPT-2-small's width: positions cost more, fewer elements win
    wide, p_wide = _bins(lens, new, 768)
    assert len(wide) < len(bins) and cost(wide, p_wide, lens, 768) <= cost(unbounded, 58, lens, 768)
    # one context, a catch-up beside its public row: nothing to bound
    assert _bins([40, 0], [1, 41], 128) == ([[1, 0]], 42)


def test_several_contexts_in_one_forward_equal_each_alone(lm, tok, layout):
    texts = ["Friends, Romans", "Now is the winter of our", "To be"]
    requests = [(SequenceState(tok(t)["input_ids"]), m) for t, m in zip(texts, [[0], [], [1, 2]])]
    alone = [(SequenceState(list(s.tokens)), m) for s, m in requests]
    for step in range(4):
        if step == 1:  # a context without any cache joins contexts that have one
            fresh = tok("Out, damned spot")["input_ids"]
            requests.append((SequenceState(list(fresh)), [0, 2]))
            alone.append((SequenceState(list(fresh)), [0, 2]))
        if step == 2:  # members that lag behind catch up next to rows that do not
            requests[1], alone[1] = (requests[1][0], [1]), (alone[1][0], [1])
        together = lm.next_logprobs_many(requests)
        for (s, m), (lp0, lps), (s1, m1) in zip(requests, together, alone):
            a0, a = lm.next_logprobs(s1, m1)
            assert lps.shape == (len(m), 320)
            assert (lp0 - a0).abs().max() < 1e-6
            assert lps.numel() == 0 or (lps - a).abs().max() < 1e-6
            s.tokens.append(step + 10)
            s1.tokens.append(step + 10)


def test_batched_lora_equals_peft_mixed_batch_and_follows_retrained_weights(lm, tok):
    assert lm.batched_lora is not None  # GPT-2 with vanilla LoRA: the batched path runs
    ids = torch.tensor([tok("Friends, Romans, countrymen")["input_ids"]]).repeat(5, 1)
    names = ["__base__", "member-02", "member-00", "member-02", "member-01"]
    with torch.no_grad():
        ours = lm._mixed_forward(names, input_ids=ids).logits
        peft = lm._peft_mixed_forward(names, input_ids=ids).logits
        assert (ours - peft).abs().max() < 1e-6
        assert (ours[1] - ours[0]).abs().max() > 1e-2  # the adapters really act
        weight = lm.model.base_model.model.transformer.h[0].attn.c_attn.lora_B["member-02"].weight
        saved = weight.clone()
        weight.mul_(2.0)  # retrained in place: the stacks must follow
        try:
            again = lm._mixed_forward(names, input_ids=ids).logits
            assert (again - lm._peft_mixed_forward(names, input_ids=ids).logits).abs().max() < 1e-6
            assert (again[1] - ours[1]).abs().max() > 1e-4
        finally:
            weight.copy_(saved)

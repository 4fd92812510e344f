"""The SLIM layer's parts: expert dispatch, masking, sliding clusters, yielding, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimpeft import SlimConfig, SlimLinear
from slimpeft.clustering import SlidingClusters
from slimpeft.experts import LoraExperts, gated_mix
from slimpeft.masking import apply_fast_masks, dare_delta, dare_mask, fast_drop_rates, fast_masks
from slimpeft.router import apply_yielding, lora_balance_loss, lora_gate_balance_loss, select, top_k_gate


def _experts(e=4, i=12, o=10, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ex = LoraExperts(e, i, o, r, alpha=6.0, generator=g)
    with torch.no_grad():
        ex.lora_B.copy_(torch.randn(ex.lora_B.shape, generator=g))
    return ex


def _loop_reference(ex: LoraExperts, x, weights, indices):
    """The straightforward per-token, per-slot computation the vectorised paths must equal."""
    out = torch.zeros(x.shape[0], ex.d_out)
    for n in range(x.shape[0]):
        for w, e in zip(weights[n], indices[n]):
            if e < ex.n_experts:
                out[n] += w * ex.scaling * (ex.lora_B[e] @ (ex.lora_A[e] @ x[n]))
    return out


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_vectorised_dispatch_equals_per_token_loop(dispatch):
    ex = _experts()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 12, generator=g)
    logits = torch.randn(37, 6, generator=g)  # 4 LoRA + 2 identity experts
    w, idx, _ = select(logits, "top_k", top_k=2)
    got = ex(x, w, idx, dispatch=dispatch)
    ref = _loop_reference(ex, x, w, idx)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # gradients agree between the two paths too
    ws = w.clone().requires_grad_(True)
    ex(x, ws, idx, dispatch="sparse").square().sum().backward()
    g_sparse = (ws.grad.clone(), ex.lora_A.grad.clone(), ex.lora_B.grad.clone())
    ex.zero_grad()
    wd = w.clone().requires_grad_(True)
    ex(x, wd, idx, dispatch="dense").square().sum().backward()
    for a, b in zip(g_sparse, (wd.grad, ex.lora_A.grad, ex.lora_B.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_identity_slots_give_exactly_zero_delta():
    ex = _experts()
    x = torch.randn(5, 12)
    idx = torch.tensor([[4, 5]] * 5)  # both slots on identity experts (ids >= 4)
    w = torch.full((5, 2), 0.5)
    for dispatch in ("sparse", "dense"):
        assert torch.equal(ex(x, w, idx, dispatch=dispatch), torch.zeros(5, 10))


def test_exact_dare_path_equals_low_rank_path_without_mask():
    ex = _experts()
    x = torch.randn(9, 12)
    w, idx, _ = select(torch.randn(9, 6), "top_k", top_k=2)
    delta = dare_delta(ex.lora_A, ex.lora_B, None)
    torch.testing.assert_close(ex(x, w, idx, delta=delta), ex(x, w, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.4])
def test_fast_mask_drop_fraction_and_expectation(p):
    torch.manual_seed(0)
    e, r, i, o = 2, 3, 40, 30
    A, B = torch.randn(e, r, i), torch.randn(e, o, r)
    BA = torch.bmm(B, A)
    n_draws, dropped, acc = 400, 0.0, torch.zeros_like(BA)
    for _ in range(n_draws):
        col, row = fast_masks(e, i, o, p)
        Am, Bm = apply_fast_masks(A, B, col, row)
        eff = torch.bmm(Bm, Am)
        dropped += (eff == 0).float().mean().item()
        acc += eff
    assert dropped / n_draws == pytest.approx(p, abs=0.02)
    # E[B'A'] = B A: the relative error of the mean shrinks like 1/sqrt(draws)
    rel = (acc / n_draws - BA).norm() / BA.norm()
    assert rel < 0.12
    p_r, p_c = fast_drop_rates(p)
    assert (1 - p_r) * (1 - p_c) == pytest.approx(1 - p)


@pytest.mark.parametrize("p", [0.1, 0.4])
def test_exact_dare_drop_fraction_and_expectation(p):
    torch.manual_seed(0)
    A, B = torch.randn(2, 3, 40), torch.randn(2, 30, 3)
    BA = torch.bmm(B, A)
    n_draws, dropped, acc = 400, 0.0, torch.zeros_like(BA)
    for _ in range(n_draws):
        eff = dare_delta(A, B, dare_mask(2, 40, 30, p))
        dropped += (eff == 0).float().mean().item()
        acc += eff
    assert dropped / n_draws == pytest.approx(p, abs=0.01)
    assert (acc / n_draws - BA).norm() / BA.norm() < 0.12


def test_mask_without_rescale_shrinks_expectation():
    torch.manual_seed(0)
    A, B = torch.randn(1, 2, 50), torch.randn(1, 40, 2)
    acc = sum(dare_delta(A, B, dare_mask(1, 50, 40, 0.5, rescale=False)) for _ in range(300)) / 300
    assert (acc / torch.bmm(B, A)).median().item() == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_spread_floor_guards_clusters_of_near_constant_tokens(floor):
    cfg = SlimConfig(n_clusters=2, spread_floor=floor, ood_score="standardized")
    cl = SlidingClusters(2, cfg)
    # cluster 1 was fitted on one repeated token (e.g. the first position): its variances are ~0
    cl.centers.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    cl.variances.copy_(torch.tensor([[2.0, 8.0], [1e-6, 1e-6]]))
    cl.agg_mean.copy_(torch.tensor([1.0, 0.0]))
    cl.agg_var.copy_(torch.tensor([1.0, 1e-6]))
    cl.initialized.fill_(True)
    k, agg = cl.assign(torch.tensor([[10.1, 10.0]]))  # a token 0.1 away from cluster 1's centre
    assert k.tolist() == [1]
    u = cl.standardize(agg, k)
    if floor == 0.0:  # the literal form: 0.1 / 1e-3 = 100 spreads, then 100 / 1e-3 = 1e5 aggregate spreads
        assert agg.item() == pytest.approx(100.0, rel=1e-3) and u.item() == pytest.approx(1e5, rel=1e-3)
    else:  # channel var floor 0.1 * mean(2, 1e-6) ~ 0.1 and 0.1 * mean(8, 1e-6) ~ 0.4; agg var floor ~ 0.05
        assert agg.item() == pytest.approx(0.1 / 0.1**0.5, rel=1e-3)
        assert u.item() == pytest.approx(agg.item() / (0.1 * (1 + 1e-6) / 2) ** 0.5, rel=1e-3)


def test_sliding_cluster_update_matches_hand_computation():
    cfg = SlimConfig(n_clusters=2, cluster_momentum=0.5)
    cl = SlidingClusters(2, cfg)
    cl.centers.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    cl.variances.copy_(torch.tensor([[1.0, 4.0], [1.0, 1.0]]))
    cl.agg_mean.copy_(torch.tensor([1.0, 1.0]))
    cl.agg_var.copy_(torch.tensor([1.0, 1.0]))
    cl.initialized.fill_(True)
    x = torch.tensor([[1.0, 2.0], [3.0, -2.0], [9.0, 11.0]])
    k, agg = cl.assign(x)
    assert k.tolist() == [0, 0, 1]
    # z-scores: token0 |1/1|, |2/2| -> max 1; token1 |3|, |-2/2| -> 3; token2 |1|, |1| -> 1
    assert agg.tolist() == [1.0, 3.0, 1.0]
    cl.update(x, k, agg)
    # cluster 0: batch mean (2, 0), batch var ((1+1)/2, (4+4)/2) = (1, 4)
    torch.testing.assert_close(cl.centers, torch.tensor([[1.0, 0.0], [9.5, 10.5]]))
    torch.testing.assert_close(cl.variances[0], torch.tensor([1.0, 4.0]))
    # cluster 1: single token: var 0 -> 0.5 * 1 + 0.5 * 0
    torch.testing.assert_close(cl.variances[1], torch.tensor([0.5, 0.5]))
    # aggregate statistics: cluster 0 mean of (1, 3) = 2, var 1; cluster 1 mean 1, var 0 (floored)
    torch.testing.assert_close(cl.agg_mean, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(cl.agg_var, torch.tensor([1.0, 0.5]), atol=1e-5, rtol=0)
    # calibrated score: tau_0 = 1.5 + 2 * 1 = 3.5
    d = cl.token_score(torch.tensor([4.0, 3.0]), torch.tensor([0, 0]))
    torch.testing.assert_close(d, torch.tensor([0.5, 0.0]))


def _standalone(cfg: SlimConfig, d_in=16, d_out=8, seed=0) -> SlimLinear:
    torch.manual_seed(seed)
    return SlimLinear(nn.Linear(d_in, d_out), cfg, name="layer")


def _identity_weight(layer: SlimLinear, x: torch.Tensor) -> float:
    layer.eval()
    layer.ctx.record, layer.records = True, []
    with torch.no_grad():
        layer(x)
    layer.ctx.record = False
    return layer.records[-1]["identity_weight"].mean().item()


def test_far_tokens_get_more_identity_weight_and_more_with_yield():
    cfg = SlimConfig(r=2, n_lora_experts=4, n_identity_experts=2, top_k=2, n_clusters=4, mask_mode="none")
    layer = _standalone(cfg)
    g = torch.Generator().manual_seed(0)
    layer.train()
    for _ in range(30):  # slide the clusters onto the in-domain distribution
        layer(torch.randn(64, 16, generator=g))
    x_in = torch.randn(256, 16, generator=g)
    x_far = torch.randn(256, 16, generator=g) * 0.5 + 4.0
    weights = {}
    for gamma in (0.0, 1.0, 4.0, 16.0):
        layer.config.yield_strength = gamma
        weights[gamma] = (_identity_weight(layer, x_in), _identity_weight(layer, x_far))
    # without yielding the router alone decides; with it, far tokens move to the identity experts
    assert weights[16.0][1] > 0.95
    assert weights[16.0][1] > weights[16.0][0] + 0.5
    far = [weights[g][1] for g in (0.0, 1.0, 4.0, 16.0)]
    assert all(b >= a for a, b in zip(far, far[1:])) and far[-1] > far[0] + 0.3
    # in-domain tokens are hardly affected: the calibrated threshold leaves typical tokens at d = 0
    assert weights[16.0][0] - weights[0.0][0] < 0.15


def test_identity_gate_yield_keeps_in_domain_tokens_off_identity_experts():
    cfg = SlimConfig(r=2, n_lora_experts=4, n_identity_experts=2, top_k=2, n_clusters=4, mask_mode="none",
                     yield_strength=16.0, identity_gate="yield")
    layer = _standalone(cfg)
    with torch.no_grad():
        layer.router[4:] = 5.0 * torch.randn(2, 16, generator=torch.Generator().manual_seed(1))  # loud identity rows
    g = torch.Generator().manual_seed(0)
    layer.train()
    for _ in range(30):
        layer(torch.randn(64, 16, generator=g))
    x_in = torch.randn(256, 16, generator=g)
    x_far = torch.randn(256, 16, generator=g) * 0.5 + 4.0
    layer.eval()
    layer.ctx.record, layer.records = True, []
    with torch.no_grad():
        layer(torch.cat([x_in, x_far]))
    rec = layer.records[-1]
    flagged = rec["d"] > 0
    assert flagged[256:].float().mean() > 0.95  # far tokens are flagged ...
    assert (rec["identity_weight"][~flagged] == 0).all()  # ... unflagged tokens never take an identity slot
    assert (rec["identity_weight"][flagged] > 0.99).all()  # flagged ones go to the identity experts by the yield
    layer.config.identity_gate = "router"  # the paper's gate: the identity router rows take in-domain tokens too
    assert _identity_weight(layer, x_in) > 0.3
    # training: the identity router rows get no gradient under the yield gate
    layer.config.identity_gate = "yield"
    layer.train()
    with torch.no_grad():
        layer.experts.lora_B.normal_()  # B = 0 would give the router no gradient at all
    layer.router.grad = None
    layer(x_in).sum().backward()
    assert layer.router.grad[4:].abs().sum() == 0 and layer.router.grad[:4].abs().sum() > 0


def test_yield_in_training_false_trains_flagged_tokens_and_yields_at_inference():
    """With the yield off in training, a token the clusters flag still reaches the LoRA experts in training (its
    output is the base's plus a nonzero delta, and the experts get its gradient); in eval mode it goes to the identity
    experts as before. The clusters keep fitting in training either way."""
    outs = {}
    for in_training in (True, False):
        cfg = SlimConfig(r=2, n_lora_experts=4, n_identity_experts=2, top_k=2, n_clusters=4, mask_mode="none",
                         yield_strength=16.0, identity_gate="yield", yield_in_training=in_training)
        layer = _standalone(cfg)
        g = torch.Generator().manual_seed(0)
        layer.train()
        for _ in range(30):
            layer(torch.randn(64, 16, generator=g))
        with torch.no_grad():
            layer.experts.lora_B.normal_(generator=torch.Generator().manual_seed(2))
        x_far = torch.randn(64, 16, generator=g) * 0.5 + 4.0
        n_updates = int(layer.clusters.n_updates)
        layer.zero_grad()
        y = layer(x_far)
        assert int(layer.clusters.n_updates) == n_updates + 1  # the score is computed and the clusters slide
        y.sum().backward()
        delta = (y - layer.base_layer(x_far)).abs().mean().item()
        outs[in_training] = (delta, layer.experts.lora_B.grad.abs().sum().item(), _identity_weight(layer, x_far))
    (d_on, g_on, w_on), (d_off, g_off, w_off) = outs[True], outs[False]
    assert d_on < 1e-6 and g_on == 0.0  # the paper: flagged training tokens teach the experts nothing
    assert d_off > 0.1 and g_off > 0.0  # yield off in training: they are learned
    assert w_on > 0.99 and w_off > 0.99  # and at inference both yield to the identity experts


def test_router_lr_scale_keeps_initial_logits_and_scales_adam_steps():
    x = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(3))
    deltas, initial = [], []
    for scale in (1.0, 0.1):
        layer = _standalone(SlimConfig(r=2, n_lora_experts=4, n_identity_experts=2, mask_mode="none",
                                       router_lr_scale=scale))
        with torch.no_grad():
            layer.experts.lora_B.normal_(generator=torch.Generator().manual_seed(4))
        layer.train()
        before = layer.router_weight().detach().clone()
        initial.append(before)
        opt = torch.optim.Adam([layer.router], lr=1e-2)
        layer(x).square().sum().backward()
        opt.step()
        deltas.append(layer.router_weight().detach() - before)
    torch.testing.assert_close(initial[0], initial[1])  # the same logits at step 0
    moved = deltas[0].abs() > 1e-4  # entries with a gradient (Adam's first step moves them by lr)
    assert moved.float().mean() > 0.5
    torch.testing.assert_close(deltas[1][moved], 0.1 * deltas[0][moved], rtol=1e-2, atol=1e-6)


def test_first_training_step_gives_lora_experts_a_gradient():
    """No dead start: on in-domain data at step 0, LoRA experts are selected and receive gradient."""
    cfg = SlimConfig(r=2, n_lora_experts=4, n_identity_experts=2, top_k=2, yield_strength=4.0)
    layer = _standalone(cfg)
    layer.train()
    x = torch.randn(128, 16)
    layer(x).square().sum().backward()
    assert layer.experts.lora_B.grad.abs().sum() > 0
    assert (layer.experts.lora_B.grad.abs().sum(dim=(1, 2)) > 0).sum() >= 3  # most experts got tokens


def test_eval_mode_freezes_clusters_and_training_moves_them():
    layer = _standalone(SlimConfig(r=2, n_clusters=4))
    layer.train()
    layer(torch.randn(32, 16))
    before = {k: v.clone() for k, v in layer.clusters.state_dict().items()}
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(32, 16) + 3)
    assert all(torch.equal(before[k], v) for k, v in layer.clusters.state_dict().items())
    layer.train()
    layer(torch.randn(32, 16) + 3)
    assert not torch.equal(before["centers"], layer.clusters.centers)
    assert int(layer.clusters.n_updates) == 1


def test_yielding_only_touches_identity_logits():
    z = torch.zeros(3, 5)
    out = apply_yielding(z, torch.tensor([0.0, 1.0, 2.0]), n_lora=3, strength=2.0)
    assert out[:, :3].abs().sum() == 0
    assert out[:, 3:].tolist() == [[0.0, 0.0], [2.0, 2.0], [4.0, 4.0]]


def test_top_k_weights_are_softmax_over_kept_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    w, idx, _ = select(logits, "top_k", top_k=2)
    assert idx.tolist() == [[1, 2]]
    e = math.exp(1.0)
    torch.testing.assert_close(w, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))


def test_l1_penalty_matches_formula():
    ex = _experts(e=2, i=4, o=3, r=2)
    with torch.no_grad():
        ex.lora_A.fill_(0.5)
        ex.lora_B.fill_(-2.0)
    # per expert: ||B||_1 / (r o) = 2, ||A||_1 / (r i) = 0.5
    assert ex.l1_penalty().item() == pytest.approx(2 * (2.0 + 0.5))


def test_lora_balance_loss_counts_lora_experts_only():
    # 2 LoRA experts + 1 identity: slots (0, id), (1, 0) -> LoRA shares f = (2/3, 1/3); P from a softmax over the two
    # LoRA logits only (the identity logit 5 is left out): P = ((sigmoid(1) + 1/2) / 2, 1 - that)
    logits = torch.tensor([[1.0, 0.0, 5.0], [0.0, 0.0, 5.0]])
    idx = torch.tensor([[0, 2], [1, 0]])
    w = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    p0 = (1 / (1 + math.exp(-1.0)) + 0.5) / 2
    assert lora_balance_loss(logits, idx, w, n_lora=2).item() == pytest.approx(2 * (2 / 3 * p0 + 1 / 3 * (1 - p0)))
    # padding is left out: only the first token counts (f = (1, 0), P = (sigmoid(1), ...))
    valid = torch.tensor([True, False])
    expected = 2 * (1 / (1 + math.exp(-1.0)))
    assert lora_balance_loss(logits, idx, w, n_lora=2, valid=valid).item() == pytest.approx(expected)


def test_balance_coef_adds_a_training_loss_and_nothing_in_eval():
    cfg = SlimConfig(n_lora_experts=4, n_identity_experts=2, r=2, balance_coef=0.5, yield_strength=0.0)
    layer = SlimLinear(nn.Linear(8, 6), cfg, "x")
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    layer(x)
    (loss,) = layer.ctx.aux_losses
    logits = x.reshape(-1, 8) @ layer.router_weight().detach().T  # no yielding: the router alone
    w, idx, _ = select(logits, "top_k", top_k=2)
    assert loss.item() == pytest.approx(0.5 * lora_balance_loss(logits, idx, w, n_lora=4).item(), rel=1e-5)
    loss.backward()
    assert layer.router.grad[:4].abs().sum() > 0 and layer.router.grad[4:].abs().sum() == 0
    layer.ctx.reset(None)
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert layer.ctx.aux_losses == []


@pytest.mark.parametrize("pooling", ["sequence", "causal"])
@pytest.mark.parametrize("score", ["calibrated", "standardized"])
def test_pooled_scores_are_constant_per_sequence_or_monotone_prefix(pooling, score):
    cfg = SlimConfig(r=2, n_clusters=4, ood_pooling=pooling, ood_score=score, mask_mode="none",
                     threshold_std=0.0)
    layer = _standalone(cfg)
    layer.train()
    for _ in range(10):
        layer(torch.randn(4, 8, 16))
    layer.eval()
    layer.ctx.record, layer.records = True, []
    x = torch.cat([torch.randn(1, 8, 16), torch.randn(1, 8, 16) + 5.0])  # (2, 8, 16): in-domain, far
    with torch.no_grad():
        layer(x)
    d = layer.records[-1]["d"].view(2, 8)
    if pooling == "sequence":
        assert torch.equal(d, d[:, :1].expand(2, 8))
    assert d[1].mean() > d[0].mean()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_gate_equals_topk_softmax_scattered(k):
    """The compiled eval path's gate (k max-reductions) equals top-k selection + softmax scattered into the expert
    columns, also with -inf identity logits and with ties among identity experts (which may pick another identity
    column: equal logits, equal weights, and the LoRA columns are the same)."""
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(256, 10, generator=g) * 3  # 8 LoRA + 2 identity experts
    logits[:100, 8:] = float("-inf")  # identity logits of unflagged tokens (identity_gate "yield")
    logits[100:150, 8:] = logits[100:150].amax(-1, keepdim=True) + 0.5  # flagged: two equal identity logits on top
    w, idx, _ = select(logits, "top_k", top_k=k, need_probs=False)
    ref = torch.zeros_like(logits).scatter_(1, idx, w)
    gate = top_k_gate(logits, k)
    torch.testing.assert_close(gate[:, :8], ref[:, :8], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gate.sum(-1), torch.ones(256))
    assert ((gate > 0).sum(-1) == k).all()
    torch.testing.assert_close(gate[150:], ref[150:], rtol=1e-6, atol=1e-7)  # no ties: the identity columns too


def test_gate_balance_loss_equals_the_slot_balance_loss():
    """The compiled training path's balance loss from the dense gate equals ``lora_balance_loss`` from the slots,
    value and gradient, with padding weighted out and identity experts taking some slots."""
    g = torch.Generator().manual_seed(7)
    base_logits = torch.randn(64, 10, generator=g) * 2
    base_logits[:20, 8:] += 4.0  # identity experts win a slot on some tokens
    valid = torch.rand(64, generator=g) > 0.2
    grads = []
    for use_gate in (False, True):
        logits = base_logits.clone().requires_grad_(True)
        if use_gate:
            loss = lora_gate_balance_loss(logits, top_k_gate(logits, 2), 8, valid)
        else:
            w, idx, _ = select(logits, "top_k", top_k=2, need_probs=False)
            loss = lora_balance_loss(logits, idx, w, 8, valid)
        loss.backward()
        grads.append((loss.detach(), logits.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-6, atol=1e-8)
    assert grads[0][0] > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gated_mix_half_precision_cpu_path_equals_the_broadcast(dtype):
    """On a CPU, bf16 / fp16 activations (autocast) are gated through an expanded (n, e*r) gate instead of the (n, e,
    r) broadcast: the same products, so the output and both gradients are bit-identical to the broadcast formula;
    the down-projections come in as a strided column slice, as in SlimLinear."""
    g = torch.Generator().manual_seed(3)
    n, e, r, o = 96, 8, 16, 40
    H = (torch.randn(n, e * r + 10, generator=g)).to(dtype).requires_grad_(True)
    gate0 = (torch.rand(n, e, generator=g) * (torch.rand(n, e, generator=g) > 0.7)).to(dtype).requires_grad_(True)
    B_cat = torch.randn(e * r, o, generator=g).to(dtype)
    grad = torch.randn(n, o, generator=g).to(dtype)
    outs = []
    for fn in (lambda h, gt: gated_mix(h, B_cat, gt, None),
               lambda h, gt: (h.view(n, e, r) * gt[:, :, None]).reshape(n, -1) @ B_cat):
        H.grad = gate0.grad = None
        y = fn(H[:, : e * r], gate0 * 1.0)
        y.backward(grad)
        outs.append((y.detach(), H.grad.clone(), gate0.grad.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert outs[0][2].abs().sum() > 0  # the gate's gradient is not trivially zero

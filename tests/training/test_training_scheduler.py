"""BalanceScheduler: a starved component gets its learning rate raised; a balanced pair stays
put without oscillating; exact (KL) mode, auxiliary loss (entropy and distribution-change forms),
external LR changes."""
import copy
import math

import pytest
import torch

from fused_balance.training import BalanceScheduler


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _run(starved: bool, seed: int, steps: int = 300, opt_cls=torch.optim.Adam, **kwargs):
    """y = W_enc x1 + W_llm x2: two symmetric components (same target weights) unless the
    encoder is starved by a 100x smaller learning rate."""
    g = torch.Generator().manual_seed(seed)
    w_enc = torch.zeros(1, 8, requires_grad=True)
    w_llm = torch.zeros(1, 8, requires_grad=True)
    target = torch.randn(1, 8, generator=g)
    comps = {"encoder": [w_enc], "llm": [w_llm]}
    opt = opt_cls(BalanceScheduler.param_groups(comps, lr=1e-2, encoder={"lr": 1e-4 if starved else 1e-2}))
    sched = BalanceScheduler(opt, comps, backend="torch", **kwargs)
    multipliers = []
    for _ in range(steps):
        x1, x2 = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)
        y = (x1 + x2) @ target.T + 0.1 * torch.randn(32, 1, generator=g)
        loss = ((x1 @ w_enc.T + x2 @ w_llm.T - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        multipliers.append(sched.multipliers["encoder"])
    return sched, opt, multipliers


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.SGD])
def test_starved_component_gets_more_learning_rate(opt_cls):
    sched, opt, _ = _run(True, seed=0, opt_cls=opt_cls)
    m = sched.multipliers
    assert m["encoder"] > 2.5 and m["llm"] < 0.5
    assert opt.param_groups[0]["component"] == "encoder"
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * m["encoder"])
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-2 * m["llm"])
    assert sched.m_min <= m["llm"] and m["encoder"] <= sched.m_max
    first = sched.history[0]
    assert first["scores"][0] < 0.05 * first["scores"][1]  # the statistic saw the starvation


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_components_do_not_oscillate(seed):
    sched, _, multipliers = _run(False, seed=seed)
    increments = [b - a for a, b in zip([1.0] + multipliers, multipliers)]
    signs = [math.copysign(1, d) for d in increments if d != 0]
    sign_changes = sum(a != b for a, b in zip(signs, signs[1:]))
    assert sign_changes <= 6, sign_changes
    assert all(0.8 < m < 1.25 for m in multipliers), (min(multipliers), max(multipliers))
    assert 0.3 < sched.kappa < 0.7


def test_exact_mode_uses_kl_and_restores_parameters():
    torch.manual_seed(0)
    enc, head = torch.nn.Linear(4, 6), torch.nn.Linear(6, 5)
    model = torch.nn.Sequential(enc, torch.nn.Tanh(), head)
    probe = torch.randn(16, 4)
    comps = {"encoder": enc, "llm": head}
    opt = torch.optim.SGD(BalanceScheduler.param_groups(comps, model=model, lr=0.5))
    sched = BalanceScheduler(opt, comps, exact_every=2, probe_fn=lambda: model(probe), backend="torch",
                             model=model)
    y = torch.randint(0, 5, (16,))
    for step in range(4):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(16, 4)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        after = [p.detach().clone() for p in model.parameters()]
        record = sched.step()
        assert all(torch.equal(a, p) for a, p in zip(after, model.parameters()))  # bitwise back
        assert record["source"] == ("kl" if step % 2 == 1 else "first_order")
        if record["source"] == "kl":
            assert all(s >= 0 for s in record["scores"]) and sum(record["scores"]) > 0
    with pytest.raises(ValueError):
        BalanceScheduler(opt, comps, exact_every=2)


def test_auxiliary_loss_and_external_lr_changes():
    sched, opt, _ = _run(True, seed=1, steps=60, aux_weight=0.5)
    logits = torch.randn(3, 7, 11, requires_grad=True)
    mask = torch.rand(3, 7) > 0.3
    aux = sched.auxiliary_loss(logits, mask)
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)[mask].mean()
    assert sched.lag() > 0.2
    torch.testing.assert_close(aux, -0.5 * sched.lag() * entropy)
    aux.backward()
    assert logits.grad.abs().sum() > 0
    balanced, _, _ = _run(False, seed=1, steps=60, aux_weight=0.5)
    assert balanced.lag() < 0.3
    # an LR set elsewhere (a warm-up schedule) becomes the new base of the multiplier
    m = sched.multipliers["encoder"]
    opt.param_groups[0]["lr"] = 5e-4
    sched.step()  # no optimizer step since the last call: only re-applies the multipliers
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4 * m)


def test_groups_mixing_components_are_rejected():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([a, b], lr=0.1)
    with pytest.raises(ValueError, match="mixes components"):
        BalanceScheduler(opt, {"encoder": [a], "llm": [b]})
    with pytest.raises(ValueError):
        BalanceScheduler(torch.optim.SGD([a], lr=0.1), {"encoder": [a], "llm": [b]})


def test_kl_step_ranking_opposite_to_first_order_moves_kappa():
    """The encoder learns fast by the first-order measure, but the probe output depends on the
    llm only, so KL ranks the llm first. At a KL step κ must move toward the KL ranking with
    weight (1 − β), on the first-order scale (raw KL values, ~1e-5, would leave κ unmoved)."""
    torch.manual_seed(0)
    enc, llm = torch.nn.Linear(4, 1, bias=False), torch.nn.Linear(4, 1, bias=False)
    model = torch.nn.ModuleDict({"enc": enc, "llm": llm})
    probe = torch.randn(16, 4)
    comps = {"encoder": enc, "llm": llm}
    opt = torch.optim.SGD(BalanceScheduler.param_groups(comps, model=model, lr=0.05,
                                                        llm={"lr": 0.005}))
    probe_logits = lambda: torch.cat([llm(probe), torch.zeros(16, 1)], dim=-1)  # noqa: E731
    sched = BalanceScheduler(opt, comps, model=model, exact_every=4, probe_fn=probe_logits,
                             backend="torch", eta=0.0)
    target = torch.randn(2, 4)
    for step in range(4):
        x1, x2 = torch.randn(32, 4), torch.randn(32, 4)
        loss = ((enc(x1) + llm(x2) - (x1 @ target[0] + x2 @ target[1])[:, None]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        emas_before, kappa_before = sched.scores_ema, sched.kappa
        record = sched.step()
    assert record["source"] == "kl"
    first_order = record["first_order_scores"]
    assert first_order[0] > first_order[1] > 0 and kappa_before > 0.6  # first order: encoder leads
    total = sum(max(0.0, x) for x in first_order)
    assert record["scores"][0] == 0.0  # the probe does not see the encoder
    assert record["scores"][1] == pytest.approx(total, rel=1e-9)
    expected = [0.9 * e + 0.1 * s for e, s in zip(emas_before, [0.0, total])]
    assert sched.kappa == pytest.approx(expected[0] / sum(expected), rel=1e-9)
    assert sched.kappa < kappa_before - 0.05


def test_components_as_modules_must_cover_the_model():
    """LLaVA-like: components vision_tower and language_model leave the projector out; building
    the groups (or the scheduler) says so, naming it; rest= trains it outside the balance."""
    model = torch.nn.ModuleDict({"vision_tower": torch.nn.Linear(4, 4), "projector": torch.nn.Linear(4, 4),
                                 "language_model": torch.nn.Linear(4, 4)})
    comps = {"vision": model["vision_tower"], "llm": model["language_model"]}
    with pytest.raises(ValueError, match="pass model="):
        BalanceScheduler.param_groups(comps, lr=0.1)
    with pytest.raises(ValueError, match=r"outside every component: projector.weight, projector.bias"):
        BalanceScheduler.param_groups(comps, model=model, lr=0.1)
    groups = BalanceScheduler.param_groups(comps, model=model, rest=model["projector"], lr=0.1)
    assert [g["component"] for g in groups] == ["vision", "llm", None]
    opt = torch.optim.SGD(groups)
    sched = BalanceScheduler(opt, comps, model=model, rest=model["projector"], backend="torch")
    assert sched.group_component == [0, 1, None]
    everything = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="outside every component: param group 1 parameter 0, param group 1 parameter 1"):
        BalanceScheduler(torch.optim.SGD([{"params": list(model["vision_tower"].parameters())},
                                          {"params": list(model["projector"].parameters())},
                                          {"params": list(model["language_model"].parameters())}], lr=0.1),
                         comps)
    with pytest.raises(ValueError, match="mixes components"):
        BalanceScheduler(everything, comps, rest=model["projector"])


def _sizes_run(normalise: str, steps: int = 3):
    """Two components whose every element sees the same gradient (1) and the same SGD update
    (−lr): one holds 10 parameters, the other 1000. Per parameter they learn alike."""
    small, large = torch.zeros(10, requires_grad=True), torch.zeros(1000, requires_grad=True)
    comps = {"small": [small], "large": [large]}
    opt = torch.optim.SGD(BalanceScheduler.param_groups(comps, lr=0.1))
    sched = BalanceScheduler(opt, comps, backend="torch", normalise=normalise, eta=0.0)
    for _ in range(steps):
        opt.zero_grad()
        (small.sum() + large.sum()).backward()
        opt.step()
        sched.step()
    return sched


def test_contributions_per_parameter_compare_components_of_different_sizes():
    # −<g, Δ> = lr·n per component: the raw share is the parameter count's, 10 / 1010
    raw = _sizes_run("none")
    assert raw.history[-1]["scores"] == pytest.approx([0.1 * 10, 0.1 * 1000])
    assert raw.kappa == pytest.approx(10 / 1010)
    per_parameter = _sizes_run("parameters")
    assert per_parameter.history[-1]["scores"] == pytest.approx([0.1, 0.1])
    assert per_parameter.kappa == pytest.approx(0.5)


def test_normalisation_travels_with_the_state_and_is_checked():
    sched = _sizes_run("parameters", steps=1)
    state = sched.state_dict()
    assert state["normalise"] == "parameters"
    fresh = _sizes_run("none", steps=0)
    fresh.load_state_dict(state)
    assert fresh.normalise == "parameters"
    old = {k: v for k, v in state.items() if k != "normalise"}  # saved before the option: raw contributions
    fresh.load_state_dict(old)
    assert fresh.normalise == "none"
    with pytest.raises(ValueError, match="checkpoint normalise 'adam'"):
        fresh.load_state_dict({**state, "normalise": "adam"})
    assert fresh.normalise == "none"  # a refused state changes nothing
    with pytest.raises(ValueError, match="normalise must be one of"):
        BalanceScheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
                         {"a": [torch.zeros(1, requires_grad=True)], "b": [torch.zeros(1, requires_grad=True)]},
                         normalise="adam")


def _probe_sees_llm_only(steps: int, **kwargs):
    """Encoder and llm both learn a regression, but the probe's logits depend on the llm only."""
    torch.manual_seed(0)
    enc, llm = torch.nn.Linear(4, 1, bias=False), torch.nn.Linear(4, 1, bias=False)
    model = torch.nn.ModuleDict({"enc": enc, "llm": llm})
    probe = torch.randn(16, 4)
    comps = {"encoder": enc, "llm": llm}
    opt = torch.optim.SGD(BalanceScheduler.param_groups(comps, model=model, lr=0.05))
    probe_logits = lambda: torch.cat([llm(probe), torch.zeros(16, 1)], dim=-1)  # noqa: E731
    sched = BalanceScheduler(opt, comps, model=model, probe_fn=probe_logits, backend="torch", **kwargs)
    target = torch.randn(2, 4)
    records, lrs = [], []
    for _ in range(steps):
        x1, x2 = torch.randn(32, 4), torch.randn(32, 4)
        loss = ((enc(x1) + llm(x2) - (x1 @ target[0] + x2 @ target[1])[:, None]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        before = llm.weight.detach().double().clone()
        opt.step()
        after = llm.weight.detach().double().clone()
        record = sched.step()
        # KL(p_{θ+Δ_llm} ‖ p_θ) by hand in float64 (the encoder does not move the probe)
        ref = torch.log_softmax(torch.cat([probe.double() @ before.T, torch.zeros(16, 1, dtype=torch.float64)], -1), -1)
        moved = torch.log_softmax(torch.cat([probe.double() @ after.T, torch.zeros(16, 1, dtype=torch.float64)], -1), -1)
        records.append((record, float((moved.exp() * (moved - ref)).sum(-1).mean())))
        lrs.append([g["lr"] for g in opt.param_groups])
    return sched, records, lrs


def test_kl_measure_counts_each_components_output_change_every_step():
    sched, records, _ = _probe_sees_llm_only(5, measure="kl", eta=0.5, dead_band=0.0)
    for record, kl in records:
        assert record["source"] == "kl"
        assert record["scores"][0] == 0.0  # the probe does not see the encoder
        assert record["scores"][1] == pytest.approx(kl, rel=1e-4)  # float32 logits against float64
        assert record["first_order_scores"][0] > 0  # first order: the encoder learns too
    assert sched.kappa == 0.0 and sched.multipliers["encoder"] > 1.0 > sched.multipliers["llm"]
    first_order, _, _ = _probe_sees_llm_only(5, eta=0.5, dead_band=0.0)
    assert first_order.kappa > 0.3  # the first-order measure sees both learn


def test_rates_move_once_per_window_from_the_window_mean():
    sched, records, lrs = _probe_sees_llm_only(7, update_every=3, eta=0.5, dead_band=0.0)
    assert [r["updated"] for r, _ in records] == [False, False, True, False, False, True, False]
    for step in (0, 1, 3, 4, 6):  # inside a window the rates stay
        assert lrs[step] == (lrs[step - 1] if step else [0.05, 0.05])
    assert lrs[2] != lrs[1] and lrs[5] != lrs[4]
    window = [r["scores"] for r, _ in records[:3]]
    first = [sum(x) / 3 for x in zip(*window)]
    second = [sum(x) / 3 for x in zip(*[r["scores"] for r, _ in records[3:6]])]
    expected = [0.9 * a + 0.1 * b for a, b in zip(first, second)]
    assert records[5][0]["kappa"] == pytest.approx(expected[0] / sum(expected), rel=1e-12)
    assert sched.window_steps == 1


def test_window_travels_with_the_state():
    part, _, _ = _probe_sees_llm_only(4, update_every=3, eta=0.5, dead_band=0.0)
    state = part.state_dict()
    assert state["window_steps"] == 1 and state["update_every"] == 3 and state["measure"] == "first_order"
    fresh, _, _ = _probe_sees_llm_only(0, update_every=1)
    fresh.load_state_dict(state)
    assert (fresh.update_every, fresh.window, fresh.window_steps) == (3, part.window, 1)
    with pytest.raises(ValueError, match="window"):
        fresh.load_state_dict({**state, "window": [0.0]})
    with pytest.raises(ValueError, match="update_every"):
        fresh.load_state_dict({**state, "update_every": 0})
    assert fresh.update_every == 3  # a refused state changes nothing


def test_bad_measure_and_window_are_refused():
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD(BalanceScheduler.param_groups({"a": [a], "b": [b]}, lr=0.1))
    with pytest.raises(ValueError, match="probe_fn"):
        BalanceScheduler(opt, {"a": [a], "b": [b]}, measure="kl")
    with pytest.raises(ValueError, match="exact_every"):
        BalanceScheduler(opt, {"a": [a], "b": [b]}, measure="kl", exact_every=2, probe_fn=lambda: a[None])
    with pytest.raises(ValueError, match="measure must be"):
        BalanceScheduler(opt, {"a": [a], "b": [b]}, measure="entropy")
    for bad in (0, 1.5, True):
        with pytest.raises(TypeError, match="update_every"):
            BalanceScheduler(opt, {"a": [a], "b": [b]}, update_every=bad)


def _kl64(previous_logits, logits, mask=None):
    """Mean KL(softmax(previous_logits) ‖ softmax(logits)) over the masked positions, in float64."""
    previous = torch.log_softmax(previous_logits.detach().double(), -1)
    kl = (previous.exp() * (previous - torch.log_softmax(logits.detach().double(), -1))).sum(-1)
    return (kl if mask is None else kl[mask]).mean()


def _stepped_distribution_change(steps: int = 1, shares=(0.2, 0.8)):
    """An encoder and a head feeding logits, one SGD step observed by the scheduler, then the
    shares set by hand (encoder lagging: lag = (0.5 − 0.2) / 0.5 = 0.6), so the lag is exact.
    Returns the model, its copy before the last step (θ_{t−1}), the scheduler, optimizer, data."""
    torch.manual_seed(0)
    enc, head = torch.nn.Linear(4, 6), torch.nn.Linear(6, 5)
    model = torch.nn.Sequential(enc, torch.nn.Tanh(), head)
    comps = {"encoder": enc, "llm": head}
    opt = torch.optim.SGD(BalanceScheduler.param_groups(comps, model=model, lr=2.0))
    sched = BalanceScheduler(opt, comps, model=model, backend="torch", aux_weight=0.5, eta=0.0,
                             aux="distribution_change")
    x, y = torch.randn(3, 7, 4), torch.randint(0, 5, (3, 7))
    before = copy.deepcopy(model)
    for _ in range(steps):
        before = copy.deepcopy(model)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        sched.step()
    if shares is not None:
        sched.shares_ema = list(shares)
    return model, before, sched, opt, x, y


def test_distribution_change_matches_a_float64_reference():
    model, before, sched, _, x, _ = _stepped_distribution_change()
    assert sched.lag() == pytest.approx(0.6)
    current = [p.detach().clone() for p in model.parameters()]
    previous = sched.previous_outputs(lambda: model(x))
    assert all(torch.equal(c, p) for c, p in zip(current, model.parameters()))  # bitwise θ_t again
    assert not previous.requires_grad
    torch.testing.assert_close(previous, before(x).detach(), rtol=1e-5, atol=1e-6)  # θ_t − Δ = θ_{t−1}
    assert not torch.equal(previous, model(x))  # the step moved the outputs
    logits = model(x).detach().requires_grad_()  # a leaf, to read the gradient on the logits
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    previous = previous.clone().requires_grad_()  # even so, no gradient flows into it
    aux = sched.auxiliary_loss(logits, mask, previous)
    # the reference: θ_{t−1}'s outputs from the saved copy, everything in float64
    previous64 = copy.deepcopy(before).double()(x.double()).detach()
    expected = -0.5 * 0.6 * _kl64(previous64, logits, mask)
    assert aux.dtype == logits.dtype
    assert aux.item() == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() < -1e-2  # a real change, not a rounding-level one
    aux.backward()
    # d(−w·KL)/d logits = −w · (p_θ − p_prev) / #masked at the masked positions, 0 elsewhere
    diff = torch.softmax(logits.detach().double(), -1) - torch.softmax(previous64, -1)
    expected_grad = torch.where(mask[..., None], -0.5 * 0.6 * diff / mask.sum(), 0.0)
    torch.testing.assert_close(logits.grad.double(), expected_grad, rtol=1e-4, atol=1e-7)
    assert previous.grad is None


def test_distribution_change_gradient_moves_the_output_distribution_further():
    model, _, sched, _, x, _ = _stepped_distribution_change()
    previous = sched.previous_outputs(lambda: model(x))
    kl_before = _kl64(previous, model(x))
    model.zero_grad()
    sched.auxiliary_loss(model(x), previous_logits=previous).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad  # one small step on the auxiliary loss alone
    assert _kl64(previous, model(x)) > kl_before * 1.01


def test_distribution_change_is_zero_without_lag_or_without_a_measured_step():
    fresh, _, sched, _, x, _ = _stepped_distribution_change(steps=0, shares=None)
    assert sched.lag() == 0.0 and torch.equal(sched.previous_outputs(lambda: fresh(x)), fresh(x))
    logits = fresh(x)
    aux = sched.auxiliary_loss(logits, previous_logits=sched.previous_outputs(lambda: fresh(x)))
    assert float(aux) == 0.0 and aux.grad_fn is None  # a constant: loss + aux backpropagates as loss
    sched.shares_ema = [0.2, 0.8]  # lagging, but no Δ yet: evaluated at θ_t, value and gradient zero
    logits = fresh(x).detach().requires_grad_()
    aux = sched.auxiliary_loss(logits, previous_logits=sched.previous_outputs(lambda: fresh(x)))
    aux.backward()
    assert aux.item() == 0.0 and logits.grad.abs().max() < 1e-7
    model, _, balanced, _, x, _ = _stepped_distribution_change(shares=(0.5, 0.5))
    previous = balanced.previous_outputs(lambda: model(x))
    assert not torch.equal(previous, model(x)) and balanced.lag() == 0.0
    assert float(balanced.auxiliary_loss(model(x), previous_logits=previous)) == 0.0
    # between optimizer.step() and scheduler.step() the snapshot holds θ_t, not Δ: θ_{t+1} is used
    model, _, sched, opt, x, y = _stepped_distribution_change()
    before_step = copy.deepcopy(model)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    opt.step()
    assert torch.equal(sched.previous_outputs(lambda: model(x)), model(x))
    sched.step()  # now Δ of that step is measured: θ_t again
    torch.testing.assert_close(sched.previous_outputs(lambda: model(x)), before_step(x).detach())


def test_distribution_change_mask_is_a_masked_mean_like_the_entropy_form():
    model, _, sched, opt, x, _ = _stepped_distribution_change()
    entropy = BalanceScheduler(opt, {"encoder": model[0], "llm": model[2]}, model=model, aux_weight=0.5)
    entropy.shares_ema = sched.shares_ema
    logits, previous = model(x).detach(), sched.previous_outputs(lambda: model(x))
    mask = torch.tensor([[True, False, True, True, False, False, True]] * 3)
    mask[1] = False
    for s, extra, extra_masked in [(sched, {"previous_logits": previous}, {"previous_logits": previous[mask]}),
                                   (entropy, {}, {})]:
        assert float(s.auxiliary_loss(logits, mask, **extra)) == pytest.approx(
            float(s.auxiliary_loss(logits[mask], None, **extra_masked)), rel=1e-6)
        assert float(s.auxiliary_loss(logits, torch.ones(3, 7, dtype=torch.bool), **extra)) == \
            pytest.approx(float(s.auxiliary_loss(logits, None, **extra)), rel=1e-6)
        assert float(s.auxiliary_loss(logits, torch.zeros(3, 7, dtype=torch.bool), **extra)) == 0.0
    entropy.close()


def test_previous_outputs_restores_the_parameters_when_fn_raises():
    model, before, sched, _, x, _ = _stepped_distribution_change()
    current = [p.detach().clone() for p in model.parameters()]
    seen = []

    def failing():
        seen.append(model(x))
        raise RuntimeError("probe failed")

    with pytest.raises(RuntimeError, match="probe failed"):
        sched.previous_outputs(failing)
    torch.testing.assert_close(seen[0], before(x).detach())  # it did run at θ_{t−1}
    assert all(torch.equal(c, p) for c, p in zip(current, model.parameters()))


def test_previous_outputs_restores_bitwise_where_the_step_dwarfs_the_parameters():
    """Where |Δ| ≫ |θ_t| and θ_t is not θ_{t−1} minus an update (here AdamW's decoupled weight
    decay multiplies the parameters by 1e-3), θ_t − Δ + Δ is not θ_t in floating point: the
    parameters must be copied back, not have Δ added back."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(100, generator=g).requires_grad_(), torch.randn(100, generator=g).requires_grad_()
    comps = {"a": [a], "b": [b]}
    opt = torch.optim.AdamW(BalanceScheduler.param_groups(comps, lr=1.0, weight_decay=0.999))
    sched = BalanceScheduler(opt, comps, backend="torch")
    before = torch.cat([a, b]).detach().clone()
    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)  # the decay alone moves them
    opt.step()
    sched.step()
    current = [a.detach().clone(), b.detach().clone()]
    torch.testing.assert_close(sched.previous_outputs(lambda: torch.cat([a, b])), before)
    assert torch.equal(a, current[0]) and torch.equal(b, current[1])


def test_previous_outputs_then_forward_gives_the_gradients_of_theta_t():
    """The documented order: previous_outputs, then the forward with grad and its backward. The
    task loss's gradients are bitwise those of a copy that never went to θ_{t−1}."""
    model, _, sched, _, x, y = _stepped_distribution_change()
    reference = copy.deepcopy(model)
    torch.nn.functional.cross_entropy(reference(x).flatten(0, 1), y.flatten()).backward()
    model.zero_grad()
    previous = sched.previous_outputs(lambda: model(x))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    assert not torch.equal(previous, model(x))
    assert all(torch.equal(p.grad, r.grad) for p, r in zip(model.parameters(), reference.parameters()))


def test_aux_form_travels_with_the_state_and_is_checked():
    model, _, sched, _, x, _ = _stepped_distribution_change()
    state = sched.state_dict()
    assert state["aux"] == "distribution_change"
    _, _, fresh, _, _, _ = _stepped_distribution_change(steps=0, shares=None)
    fresh.aux = "entropy"  # a scheduler built with the other form
    fresh.load_state_dict(state)
    assert fresh.aux == "distribution_change"
    fresh.load_state_dict({k: v for k, v in state.items() if k != "aux"})  # saved before the option
    assert fresh.aux == "entropy"
    with pytest.raises(ValueError, match="checkpoint aux 'kl'"):
        fresh.load_state_dict({**state, "aux": "kl", "beta": 0.5})
    assert fresh.aux == "entropy" and fresh.beta == 0.9  # a refused state changes nothing
    # the Δ held belonged to the parameters before the load: after it, θ_t is used
    sched.load_state_dict(state)
    assert torch.equal(sched.previous_outputs(lambda: model(x)), model(x))

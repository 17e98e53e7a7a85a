"""State that changes behind the balancer's back, after construction: parameters whose storage
is replaced (``p.data = ...``, a dtype round trip through ``Module._apply``), a step that raises
half-way, a bank whose buffer is reassigned. Each run is compared with a twin that trains the
same batches without the change (the changes keep every value, so the twin is bitwise equal),
and a crash is looked for in a subprocess."""
from __future__ import annotations

import os
import sys
import textwrap

import pytest
import torch

import fused_balance as fb
from fused_balance.training import GradBank, ParetoLoRA
from shared import run_process

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

WIDTH, LR = 64, 1e-2


def net(seed=0, width=WIDTH):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, width),
                               torch.nn.Linear(width, 2))


def losses(model, step):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, model[0].in_features, generator=gen)
    out = model(x)
    return {"text": out[:, 0].pow(2).mean(), "image": (out[:, 1] - 1).pow(2).mean() * 10}


def balancer_for(model, engine, backend=None):
    if engine == "fused":
        return ParetoLoRA(model, "fused_adamw", lr=LR, weight_decay=0.0, backend=backend)
    return ParetoLoRA(model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0), backend=backend)


def train(model, balancer, steps, between=None, zero_grad=True):
    for step in steps:
        if between is not None:
            between(step)
        balancer.step(losses(model, step))
        if zero_grad:  # the planned step overwrites .grad: loops may leave it out
            balancer.zero_grad()


def assert_same_params(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


ENGINES = ["fused", "torch-adamw"]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_replaced_parameter_storage_keeps_training(engine):
    """``p.data = p.data.clone()`` on a middle parameter: the step follows the new storage (the
    old one is kept alive here, so a step through a stale address is silent, not a crash)."""
    twin, model = net(), net()
    train(twin, balancer_for(twin, engine), range(4))
    balancer = balancer_for(model, engine)
    kept = []

    def replace(step):
        if step == 1:
            kept.append(model[1].weight.data)
            model[1].weight.data = model[1].weight.data.clone()
    train(model, balancer, range(4), replace)
    assert_same_params(model, twin)
    assert not torch.equal(kept[0], model[1].weight)  # the new storage moved on, the old did not


CRASH = textwrap.dedent("""
    import sys, torch
    sys.path[:0] = sys.argv[1:]
    from test_training_state_changes import balancer_for, losses, net
    model = net()
    balancer = balancer_for(model, "fused")
    for step in range(6):
        balancer.step(losses(model, step))
        balancer.zero_grad()
        model[1].weight.data = model[1].weight.data.clone()  # the old storage is freed
        torch.randn(1 << 16)  # reuse freed memory
    assert torch.isfinite(model[1].weight).all()
    print("ok")
""")


def test_a_replaced_and_freed_parameter_storage_is_never_written():
    here = os.path.dirname(os.path.abspath(__file__))
    result = run_process([sys.executable, "-c", CRASH, here, os.path.dirname(here)],
                         "training with parameters replaced every step")
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), \
        (result.returncode, result.stdout[-1000:], result.stderr[-3000:])


@pytest.mark.parametrize("engine", ENGINES)
def test_a_dtype_round_trip_leaves_no_stale_gradient(engine):
    """``model.double(); model.float()`` (a float64 evaluation pass) swaps every ``grad.data``
    under surviving ``.grad`` objects; the values round-trip exactly."""
    twin, model = net(), net()
    train(twin, balancer_for(twin, engine), range(5), zero_grad=False)
    balancer = balancer_for(model, engine)

    def round_trip(step):
        if step == 2:
            model.double()
            model.float()
    train(model, balancer, range(5), round_trip, zero_grad=False)
    assert_same_params(model, twin)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("engine", ENGINES)
def test_an_exception_in_a_micro_batch_drops_the_window(engine):
    """A backward hook raising during the second micro-batch of ``accumulate``: the next step
    balances its own batch only (not the failed window's gradients plus its own)."""
    twin, model = net(), net()
    twin_balancer = balancer_for(twin, engine)
    train(twin, twin_balancer, range(2))
    twin_balancer.step(losses(twin, 7))
    balancer = balancer_for(model, engine)
    train(model, balancer, range(2))
    balancer.accumulate(losses(model, 5))

    def fail(grad):
        raise Interrupt("stop")
    handle = model[0].weight.register_hook(fail)
    with pytest.raises(Interrupt):
        balancer.accumulate(losses(model, 6))
    handle.remove()
    balancer.step(losses(model, 7))
    assert torch.equal(balancer.history[-1]["losses"], twin_balancer.history[-1]["losses"])
    assert_same_params(model, twin)
    assert all(p.grad is None or torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("backend", ["cpp", "torch"], ids=["planned", "list"])
def test_an_exception_in_the_optimizer_drops_the_window(backend):
    twin, model = net(), net()
    twin_balancer = balancer_for(twin, "torch-adamw", backend)
    train(twin, twin_balancer, range(2))
    twin_balancer.step(losses(twin, 7))
    balancer = balancer_for(model, "torch-adamw", backend)
    train(model, balancer, range(2))
    step = balancer.optimizer.step

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")
    balancer.optimizer.step = out_of_memory
    with pytest.raises(torch.OutOfMemoryError):
        balancer.step(losses(model, 5))
    assert all(p.grad is None for p in model.parameters())  # as before the step (after zero_grad)
    balancer.optimizer.step = step
    balancer.step(losses(model, 7))
    assert torch.equal(balancer.history[-1]["losses"], twin_balancer.history[-1]["losses"])
    assert balancer.step_count == twin_balancer.step_count
    assert_same_params(model, twin)


def test_a_reassigned_bank_buffer_is_the_one_filled_and_read():
    model = net()
    params = list(model.parameters())
    bank = GradBank(params, 2)
    plan = fb.BalancePlan(bank, "tensor")
    bank.fill(list(losses(model, 0).values()))
    bank.buffer = bank.buffer.clone()
    step1 = list(losses(model, 1).values())
    bank.fill(step1)
    want = [torch.autograd.grad(loss, params, retain_graph=True) for loss in list(losses(model, 1).values())]
    for k in range(2):
        for got, ref in zip(bank.grads[k], want[k]):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
        assert bank.grads[k][0].data_ptr() == bank.buffer[k].data_ptr()
    G_plan, _ = plan.gram()
    G_list = fb.gram(bank.grads, "tensor").double()
    torch.testing.assert_close(G_plan, G_list, rtol=1e-5, atol=1e-7)
    assert G_plan.abs().sum() > 0
    with pytest.raises(ValueError, match="GradBank buffer must be"):
        bank.buffer = torch.zeros(3, bank.numel)


@pytest.mark.parametrize("when", ["before-the-first-step", "after-a-step"])
def test_a_param_group_added_to_the_fused_optimizer_is_refused_before_anything_changes(when):
    model = net()
    balancer = balancer_for(model, "fused")
    if when == "after-a-step":
        train(model, balancer, range(1))
    extra = torch.nn.Parameter(torch.zeros(3))
    balancer.optimizer.add_param_group({"params": [extra]})
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="param groups changed after ParetoLoRA was built"):
        balancer.step(losses(model, 1))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters()) and extra.grad is None


# ----------------------------------------------------------------------------- checkpoints
def _scheduled(names, seed=0):
    from fused_balance.training import BalanceScheduler
    model = net(seed)
    comps = {names[0]: list(model[0].parameters()), names[1]: list(model[1].parameters()) + list(model[2].parameters())}
    opt = torch.optim.AdamW(BalanceScheduler.param_groups(comps, lr=LR), weight_decay=0.0)
    return model, ParetoLoRA(model, opt), BalanceScheduler(opt, comps)


def _optimizer_snapshot(optimizer):
    return {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for p, s in optimizer.state.items()}


def _same_snapshot(a, b):
    return a.keys() == b.keys() and all(
        a[p].keys() == b[p].keys() and all(torch.equal(a[p][k], b[p][k]) if isinstance(a[p][k], torch.Tensor)
                                           else a[p][k] == b[p][k] for k in a[p]) for p in a)


def test_a_checkpoint_a_later_component_refuses_changes_nothing(tmp_path):
    from fused_balance.training import checkpoint
    model, balancer, scheduler = _scheduled(("encoder", "llm"))
    train(model, balancer, range(3), lambda step: scheduler.step() if step else None)
    checkpoint.save(tmp_path / "run.pt", model=model, pareto=balancer, scheduler=scheduler)

    other, other_balancer, other_scheduler = _scheduled(("vision", "text"), seed=1)
    train(other, other_balancer, range(1))
    state_before = _optimizer_snapshot(other_balancer.optimizer)
    steps_before = (other_balancer.step_count, len(other_balancer.history))
    params_before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ValueError, match="components"):
        checkpoint.load(tmp_path / "run.pt", model=other, pareto=other_balancer, scheduler=other_scheduler)
    assert _same_snapshot(state_before, _optimizer_snapshot(other_balancer.optimizer))
    assert (other_balancer.step_count, len(other_balancer.history)) == steps_before
    assert all(torch.equal(p, q) for p, q in zip(other.parameters(), params_before))


@pytest.mark.parametrize("engine", ENGINES)
def test_moments_of_another_shape_are_refused_at_load(tmp_path, engine):
    """A checkpoint of a narrower model (another LoRA rank, say) with only ``pareto=``: refused
    at load, not at the next step, and nothing changed."""
    from fused_balance.training import checkpoint
    small = net()
    small_balancer = balancer_for(small, engine)
    train(small, small_balancer, range(2))
    checkpoint.save(tmp_path / "small.pt", pareto=small_balancer)
    wide = net(width=2 * WIDTH)
    wide_balancer = balancer_for(wide, engine)
    train(wide, wide_balancer, range(1))
    before = _optimizer_snapshot(wide_balancer.optimizer)
    with pytest.raises(ValueError, match="another model configuration"):
        checkpoint.load(tmp_path / "small.pt", pareto=wide_balancer, rng=False)
    assert _same_snapshot(before, _optimizer_snapshot(wide_balancer.optimizer))
    assert wide_balancer.step_count == 1
    train(wide, wide_balancer, range(1, 2))  # still trains


def _saved_run(tmp_path):
    from fused_balance.training import checkpoint
    model = net()
    balancer = balancer_for(model, "torch-adamw")
    train(model, balancer, range(2))
    path = tmp_path / "run.pt"
    checkpoint.save(path, model=model, pareto=balancer)
    return path, model, balancer


@pytest.mark.parametrize("damage", ["truncated", "flipped-bit", "text", "empty"])
def test_a_damaged_checkpoint_is_refused_with_a_clear_error(tmp_path, damage):
    from fused_balance.training import checkpoint
    path, model, balancer = _saved_run(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped-bit":
        data[-len(data) // 3] ^= 0x04  # inside tensor data: torch.load alone would read it silently
    elif damage == "text":
        data = bytearray("step,loss\n1,0.5\n".encode())
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="corrupted|not a readable fused_balance checkpoint"):
        checkpoint.load(path, model=model, pareto=balancer)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_killed_save_leaves_no_temporary_file_behind_the_next_save(tmp_path):
    from fused_balance.training import checkpoint
    path, model, balancer = _saved_run(tmp_path)
    orphan = tmp_path / f".checkpoint-{path.name}-abc123"  # what a SIGKILL during save leaves
    orphan.write_bytes(b"partial")
    checkpoint.save(path, model=model, pareto=balancer)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    checkpoint.load(path, model=model, pareto=balancer)


def test_the_scheduler_refuses_the_fused_optimizer_instead_of_doing_nothing():
    from fused_balance.training import BalanceScheduler, BalancedAdamW
    model = net()
    comps = {"encoder": list(model[0].parameters()), "llm": list(model[1].parameters())}
    with pytest.raises(ValueError, match="never writes"):
        BalanceScheduler(BalancedAdamW(model.parameters(), lr=LR), comps)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_nan_gradient_under_finite_losses_is_named_and_warned(engine):
    model = net()
    balancer = balancer_for(model, engine)
    train(model, balancer, range(1))
    before = [p.detach().clone() for p in model.parameters()]
    handle = model[2].weight.register_hook(lambda g: g * float("nan"))
    out = losses(model, 1)
    with pytest.warns(RuntimeWarning, match=r"non-finite gradient\(s\) of \['text', 'image'\]"):
        assert balancer.step(out) is False
    handle.remove()
    entry = balancer.history[-1]
    assert entry["nonfinite_losses"] == [] and entry["nonfinite_gradients"] == ["text", "image"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_meta_parameters_are_refused_at_construction():
    with torch.device("meta"):
        model = net()
    with pytest.raises(ValueError, match="meta device"):
        ParetoLoRA(model, torch.optim.AdamW(model.parameters(), lr=LR))


def test_a_zero_element_parameter_keeps_the_planned_step():
    model = net()
    empty = torch.nn.Parameter(torch.zeros(0))
    named = list(model.named_parameters()) + [("empty", empty)]
    balancer = ParetoLoRA(named, torch.optim.AdamW([p for _, p in named], lr=LR))
    train(model, balancer, range(2))
    assert balancer.dead_tensors == [] and balancer._plan is not None


def test_a_failing_or_ambiguous_segments_callable_is_named():
    model = net()

    def broken(name, p):
        if name.startswith("1."):
            raise KeyError("no rule")
        return name[0]
    with pytest.raises(ValueError, match=r"segments callable failed on parameter '1.weight'.*KeyError"):
        ParetoLoRA(model, torch.optim.AdamW(model.parameters(), lr=LR), segments=broken)
    with pytest.raises(ValueError, match="print the same"):
        ParetoLoRA(model, torch.optim.AdamW(model.parameters(), lr=LR),
                   segments=lambda name, p: 0 if name == "0.weight" else name[0])  # 0 and "0"


@pytest.mark.parametrize("engine", ENGINES)
def test_a_parameter_frozen_later_is_refused_before_anything_changes(engine):
    model = net()
    balancer = balancer_for(model, engine)
    train(model, balancer, range(1))
    model[0].weight.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"frozen after ParetoLoRA was built \('0.weight'\)"):
        balancer.step(losses(model, 1))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    model[0].weight.requires_grad_(True)  # unfrozen: trains again
    assert balancer.step(losses(model, 1))


def test_losses_of_another_model_are_refused():
    model, other = net(), net(seed=1)
    balancer = balancer_for(model, "fused")
    with pytest.raises(ValueError, match=r"losses \['text', 'image'\] reached none of the 6 balanced"):
        balancer.step(losses(other, 0))
    assert balancer.step_count == 0 and all(p.grad is None for p in model.parameters())
    assert balancer.step(losses(model, 0))  # the right losses train


def test_a_parameter_frozen_before_the_first_step_is_refused():
    model = net()
    balancer = balancer_for(model, "fused")
    model[2].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"frozen after ParetoLoRA was built \('2.bias'\)"):
        balancer.step(losses(model, 0))
    assert balancer.step_count == 0


class Routed(torch.nn.Module):
    """Two experts; ``route`` picks which ones a batch runs through (an expert no token was
    routed to gets no gradient in that step)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Linear(16, 16)
        self.experts = torch.nn.ModuleList([torch.nn.Linear(16, 2), torch.nn.Linear(16, 2)])

    def losses(self, step, route):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        out = sum(self.experts[e](torch.tanh(self.trunk(x))) for e in route)
        return {"text": out[:, 0].pow(2).mean(), "image": (out[:, 1] - 1).pow(2).mean()}


@pytest.mark.parametrize("backend", ["cpp", "torch"], ids=["planned", "list"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("zero_grad", [True, False], ids=["zero_grad", "no-zero_grad"])
def test_a_tensor_no_objective_reached_in_this_window_is_neither_written_nor_stepped(engine, backend, zero_grad):
    """Reach is per window: expert 1, trained in step 0, is not routed to in steps 1-2; it keeps
    its values bitwise (AdamW's momentum would move it), it is named dead, its ``.grad`` holds no
    balanced gradient; routed to again in step 3, it trains again."""
    model = Routed()
    balancer = balancer_for(model, engine, backend=backend)
    expert = list(model.experts[1].parameters())
    for step, route in enumerate([(0, 1), (0,), (0,)]):
        before = [p.detach().clone() for p in expert]
        assert balancer.step(model.losses(step, route))
        if zero_grad:
            balancer.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(expert, before))
    assert balancer.dead_tensors == ["experts.1.weight", "experts.1.bias"]
    assert all(p.grad is None for p in expert)
    assert balancer.step(model.losses(3, (0, 1)))
    assert all(not torch.equal(p, q) for p, q in zip(expert, before))
    assert balancer.dead_tensors == []


def test_losses_of_another_model_are_refused_in_any_window_and_the_window_is_kept():
    """After training, a micro-batch of another model is refused like the first one; the window's
    earlier micro-batch stays, so the step then equals a twin that never saw the refused one."""
    model, twin, other = net(), net(), net(seed=1)
    balancer, reference = balancer_for(model, "fused"), balancer_for(twin, "fused")
    train(model, balancer, range(2))
    train(twin, reference, range(2))
    balancer.accumulate(losses(model, 2))
    with pytest.raises(ValueError, match="reached none of the 6 balanced"):
        balancer.accumulate(losses(other, 2))
    assert balancer.step()
    assert reference.step(losses(twin, 2))
    assert_same_params(model, twin)
    assert balancer.history[-1]["losses"].tolist() == reference.history[-1]["losses"].tolist()


@pytest.mark.parametrize("backend", ["cpp", "torch"], ids=["planned", "list"])
def test_backward_leaves_a_tensor_unreached_in_this_window_as_it_was(backend):
    """``backward`` adds like ``loss.backward()``: expert 1, reached in the first call only,
    keeps the gradient that call gave it through the later calls (no zero_grad between), while
    the reached tensors keep adding."""
    model = Routed()
    balancer = ParetoLoRA(model, None, backend=backend)
    balancer.backward(model.losses(0, (0, 1)))
    first = [p.grad.clone() for p in model.experts[1].parameters()]
    trunk = model.trunk.weight.grad.clone()
    for step in (1, 2):
        balancer.backward(model.losses(step, (0,)))
    assert balancer.dead_tensors == ["experts.1.weight", "experts.1.bias"]
    assert all(torch.equal(p.grad, f) for p, f in zip(model.experts[1].parameters(), first))
    assert not torch.equal(model.trunk.weight.grad, trunk)

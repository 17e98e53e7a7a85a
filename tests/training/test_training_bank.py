"""GradBank: both fill modes give the per-objective autograd gradients, in place."""
import math
import warnings

import pytest
import torch

from fused_balance.training import GradBank


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _toy(dtype=torch.float64):
    torch.manual_seed(0)
    a = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(3, dtype=dtype, requires_grad=True)
    unused = torch.randn(2, dtype=dtype, requires_grad=True)  # no objective reaches it
    x = torch.randn(5, 4, dtype=dtype)
    h = torch.tanh(x @ a)
    losses = [(h @ b).pow(2).mean(), (h.sum(0) * b).sin().sum(), (a ** 3).sum()]
    return [a, b, unused], losses


@pytest.mark.parametrize("mode", ["backward", "batched"])
def test_fill_matches_autograd(mode):
    params, losses = _toy()
    expected = [torch.autograd.grad(l, params, retain_graph=True, allow_unused=True) for l in losses]
    bank = GradBank(params, 3, mode=mode)
    bank.buffer.fill_(7.0)  # stale values must be overwritten
    bank.fill(losses)
    for k in range(3):
        for p, (view, ref) in enumerate(zip(bank.grads[k], expected[k])):
            ref = torch.zeros_like(params[p]) if ref is None else ref
            torch.testing.assert_close(view, ref, rtol=1e-12, atol=0)
    # the views really live in the flat buffer, objective-major
    assert bank.grads[1][1].data_ptr() == bank.buffer[1, 12:15].data_ptr()


def test_modes_agree_and_grads_restored_on_demo_model():
    from tiny_unified import VOCAB, make_batch, build_lora_model, modality_losses
    from fused_balance.training import lora_parameters

    warnings.filterwarnings("ignore", category=FutureWarning)
    model = build_lora_model(VOCAB.size, hidden=32, layers=2, heads=2, rank=4, seed=0)
    params = [p for _, p in lora_parameters(model)]
    batch = make_batch(4, torch.Generator().manual_seed(0))
    sentinel = torch.full_like(params[3], 3.0)
    params[3].grad = sentinel
    banks = {}
    for mode in ("backward", "batched"):
        losses, _ = modality_losses(model, batch)
        banks[mode] = GradBank(params, 2, mode=mode).fill(list(losses.values()))
    torch.testing.assert_close(banks["backward"].buffer, banks["batched"].buffer, rtol=1e-5, atol=1e-7)
    assert banks["backward"].buffer.abs().sum() > 0
    assert params[3].grad is sentinel and torch.all(sentinel == 3.0)  # user's .grad untouched
    assert params[0].grad is None


def test_constant_loss_gives_zero_row_and_bad_input_raises():
    params, losses = _toy()
    losses[1] = torch.tensor(2.0)  # reaches no parameter
    bank = GradBank(params, 3).fill(losses)
    assert torch.all(bank.buffer[1] == 0) and bank.buffer[0].abs().sum() > 0
    with pytest.raises(ValueError):
        bank.fill(losses[:2])
    with pytest.raises(ValueError):
        GradBank([], 2)
    with pytest.raises(TypeError):
        GradBank([torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)], 2)


@pytest.mark.parametrize("mode", ["backward", "batched"])
def test_accumulate_sums_micro_batches_and_tracks_reached_tensors(mode):
    """fill(accumulate=True) adds to the bank; ``reached`` says which tensors an objective
    reached (the unused one never); a tensor first reached in a later micro-batch is added,
    not overwritten; flag_nonfinite marks the row of a non-finite loss only."""
    params, first = _toy()
    a, b = params[:2]
    second = [(a ** 2).sum() + b.sum(), (a.sum(0) * b).cos().sum()]  # another micro-batch
    expected = [[sum(torch.autograd.grad(l, params[:2], retain_graph=True)[i] for l in (a, b))
                 for i in range(2)] for a, b in zip(first[:2], second[:2])]
    bank = GradBank(params, 2, mode=mode)
    assert bank.reached == [False, False, False]
    bank.fill(first[:2], retain_graph=True)
    bank.fill(second[:2], accumulate=True)
    assert bank.reached == [True, True, False]
    for k in range(2):
        for i in range(2):
            torch.testing.assert_close(bank.grads[k][i], expected[k][i], rtol=1e-12, atol=0)
        assert torch.equal(bank.grads[k][2], torch.zeros(2, dtype=torch.float64))
    # a tensor reached for the first time in a later micro-batch (here: ``unused``)
    params[2].grad = None
    late = (params[2] ** 2).sum()
    bank.fill([late, late * 0 + params[0].sum()], accumulate=True)
    assert bank.reached == [True, True, True] and params[2].grad is None
    torch.testing.assert_close(bank.grads[0][2], 2 * params[2].detach(), rtol=1e-12, atol=0)
    bank.flag_nonfinite([torch.tensor(1.0, dtype=torch.float64), torch.tensor(float("inf"), dtype=torch.float64)])
    assert torch.isfinite(bank.buffer[0]).all() and torch.isnan(bank.buffer[1, 0])


@pytest.fixture(params=["native", "python"])
def grad_slots_impl(request, monkeypatch):
    """The backward fill's .grad bookkeeping: the extension's C++ GradSlots, or the Python one
    a process without the extension uses."""
    from fused_balance import _extension

    if request.param == "native":
        _extension.load()
    else:
        monkeypatch.setattr(_extension, "loaded", lambda: None)
    return request.param


def test_backward_fill_bookkeeping_with_hooks_sparse_and_late_tensors(grad_slots_impl):
    """Both GradSlots give autograd's gradients when .grad is replaced by a hook, arrives sparse,
    or arrives for a tensor no objective reached before; the user's .grad comes back; a
    parameter converted to another dtype after the bank was built is refused."""
    from fused_balance._grad_slots import is_native

    torch.manual_seed(3)
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    emb = torch.nn.Embedding(5, 3, sparse=True).double()
    late = torch.randn(2, dtype=torch.float64, requires_grad=True)
    params = [a, b, emb.weight, late]
    b.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", p.grad.clone()))
    sentinel = torch.full_like(a, 5.0)
    a.grad = sentinel
    bank = GradBank(params, 2)
    ids = torch.tensor([0, 3, 3])

    def losses(step):
        h = torch.tanh(torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(step)) @ a)
        e = emb(ids).sum(0)
        extra = (late ** 2).sum() if step > 0 else 0.0  # reached from the second step on
        return [(h * b).sum() + (e * b).sum(), (h ** 2).sum() + e.pow(2).sum() + extra]

    for step in range(3):
        expected = [torch.autograd.grad(l, params, retain_graph=True, allow_unused=True) for l in losses(step)]
        bank.fill(losses(step))
        assert is_native(bank._slots) == (grad_slots_impl == "native")
        for k in range(2):
            for i, ref in enumerate(expected[k]):
                ref = torch.zeros_like(params[i]) if ref is None else ref.to_dense()
                torch.testing.assert_close(bank.grads[k][i], ref, rtol=1e-12, atol=0)
        assert a.grad is sentinel and torch.all(sentinel == 5.0)
        assert b.grad is None and emb.weight.grad is None and late.grad is None
        assert bank.reached == [True, True, True, step > 0]

    b.data = b.data.float()  # what module.to(torch.float32) does to a parameter
    with pytest.raises((TypeError, RuntimeError), match="dtype|type"):
        bank.fill(losses(0))
    assert a.grad is sentinel and b.grad is None


@pytest.mark.parametrize("mode", ["backward", "batched"])
def test_reached_is_per_window_and_versioned_only_on_a_change(grad_slots_impl, mode):
    """``reached`` covers the fills since the last one without accumulate (a tensor reached in
    an earlier window only is not reached now), the version moves only when the flags change,
    and ``last_fill_reached_any`` says whether one fill reached anything here."""
    params, _ = _toy()
    a, b, unused = params
    bank = GradBank(params, 2, mode=mode)

    def window(use_unused, accumulate=False):
        bank.fill([(a ** 2).sum() + (unused.sum() if use_unused else 0.0), b.sum() * a.sum()], accumulate=accumulate)

    window(True)
    assert bank.reached == [True, True, True] and bank.last_fill_reached_any
    version = bank.reached_version
    window(True)
    assert bank.reached == [True, True, True] and bank.reached_version == version
    window(False)  # a new window that does not reach ``unused``
    assert bank.reached == [True, True, False] and bank.reached_version == version + 1
    assert torch.equal(bank.grads[0][2], torch.zeros(2, dtype=torch.float64))
    window(True, accumulate=True)  # reached by the window's second micro-batch: live again
    assert bank.reached == [True, True, True] and bank.reached_version == version + 2
    torch.testing.assert_close(bank.grads[0][2], torch.ones(2, dtype=torch.float64), rtol=0, atol=0)
    other = torch.randn(3, dtype=torch.float64, requires_grad=True)
    bank.fill([(other ** 2).sum(), other.sum()], accumulate=True)  # reaches none of the bank's tensors
    assert not bank.last_fill_reached_any and bank.reached == [True, True, True]


def test_a_buffer_swapped_within_a_window_keeps_the_windows_reach(grad_slots_impl):
    params, _ = _toy()
    a, b, unused = params
    bank = GradBank(params, 1)
    bank.fill([(unused ** 2).sum() + a.sum()])
    bank.buffer = bank.buffer.clone()
    bank.fill([b.sum()], accumulate=True)
    assert bank.reached == [True, True, True]


# ------------------------------------------------------------------ 16-byte aligned layout
def padding(bank):
    """The bank's elements outside every parameter (its padding), [K, pads]."""
    inside = torch.zeros(bank.buffer.shape[1], dtype=torch.bool)
    for a, n in zip(bank.offsets, bank.numels):
        inside[a:a + n] = True
    return bank.buffer[:, ~inside]


ODD_SHAPES = [(5, 3), (7,), (0,), (1,), (3, 3), (2, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_odd_sized_parameters_start_on_16_byte_boundaries(dtype):
    params = [torch.randn(s).to(dtype).requires_grad_() for s in ODD_SHAPES]
    bank = GradBank(params, 3)
    size = bank.buffer.element_size()
    assert bank.numels == [math.prod(s) for s in ODD_SHAPES]
    assert len(bank.offsets) == len(params) + 1 and bank.offsets[-1] == bank.numel == bank.buffer.shape[1]
    assert bank.buffer.stride(0) * size % 16 == 0 and bank.buffer.data_ptr() % 16 == 0
    for a, n, b in zip(bank.offsets, bank.numels, bank.offsets[1:]):
        assert a * size % 16 == 0 and a + n <= b < a + n + 16 // size  # no more padding than aligning takes
    for k in range(3):
        for a, n, view, p in zip(bank.offsets, bank.numels, bank.grads[k], params):
            assert view.shape == p.shape and view.data_ptr() % 16 == 0
            if n:
                assert view.data_ptr() == bank.buffer[k, a:].data_ptr()
    assert padding(bank).numel() > 0 and not padding(bank).any()


@pytest.mark.parametrize("mode", ["backward", "batched"])
def test_fills_and_loads_leave_the_padding_zero(mode):
    params, losses = _toy()  # 12, 3 and 2 float64 elements: 3 is padded to 4
    expected = [torch.autograd.grad(l, params, retain_graph=True, allow_unused=True) for l in losses]
    bank = GradBank(params, 3, mode=mode)
    bank.buffer.fill_(7.0)
    bank.fill(losses, retain_graph=True)
    bank.fill(losses, accumulate=True)  # twice the gradients
    assert padding(bank).numel() > 0 and not padding(bank).any()
    for k in range(3):
        for p, (view, ref) in enumerate(zip(bank.grads[k], expected[k])):
            ref = torch.zeros_like(params[p]) if ref is None else ref
            torch.testing.assert_close(view, 2 * ref, rtol=1e-12, atol=0)
    bank.buffer = torch.full_like(bank.buffer, 3.0)  # a swapped-in buffer: its padding is zeroed
    assert not padding(bank).any() and bool((bank.grads[2][0] == 3.0).all())
    bank.load_state_dict({"buffer": torch.full_like(bank.buffer, 5.0)})
    assert not padding(bank).any() and bool((bank.grads[1][1] == 5.0).all())
    # a buffer saved before the padding (parameters end to end) loads parameter by parameter
    packed = torch.arange(3 * sum(bank.numels), dtype=bank.dtype).reshape(3, -1)
    bank.load_state_dict({"buffer": packed})
    assert not padding(bank).any()
    for k in range(3):
        torch.testing.assert_close(torch.cat([g.flatten() for g in bank.grads[k]]), packed[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not match"):
        bank.load_state_dict({"buffer": packed[:, 1:]})

"""The list API's C++ screens (csrc/list_checks.cpp): as strict as the Python checks.

A screen either vouches for its arguments or hands them to the Python checks, which raise. So:
every bad input of the bad-input suites must be refused by the screens (None) and raise exactly
the error of the Python path; valid inputs the screens do not vouch for must still be accepted;
and a changed input (new storage, resized, another dtype, a list item replaced) is checked again
on the next call, whatever calls came before (nothing is cached by identity).
"""
from __future__ import annotations

import pytest
import torch

import fused_balance as fb
from fused_balance import _extension
from shared import random_grads
from bad_inputs import GRAM_CASES, adamw_case, meta, two_by_two

pytestmark = pytest.mark.skipif(not fb.available_backends("cpu").count("cpp"),
                                reason="the C++ extension cannot be built here")


@pytest.fixture(scope="module")
def native():
    return _extension.load()


def outcome(fn):
    """(exception type, message) or ("ok", result)."""
    try:
        return "ok", fn()
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)


def python_path(fn, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(_extension, "loaded", lambda: None)
        return outcome(fn)


def assert_same_error(fn, monkeypatch):
    screened, plain = outcome(fn), python_path(fn, monkeypatch)
    assert screened[0] is not "ok", "the call should have been refused"  # noqa: F632
    assert screened == plain


@pytest.mark.parametrize("case", list(GRAM_CASES))
def test_screen_refuses_every_bad_gradient_case(native, monkeypatch, case):
    make, exc, match = GRAM_CASES[case]
    bad = make(two_by_two())
    assert native.screen_grads(bad) is None
    assert_same_error(lambda: fb.pareto_combine(bad, out=[torch.zeros(3), torch.zeros(3)]), monkeypatch)


@pytest.mark.parametrize("segments", [[0, 2], [1, 1], [-1, 0], [True, 0], [0.0, 1], [0], [0, 0, 0],
                                      [0, 2 ** 70], ["0", 1]])
def test_screen_refuses_bad_segments(native, monkeypatch, segments):
    assert native.screen_segments(segments, 2) is None
    assert_same_error(lambda: fb.gram(two_by_two(), segments), monkeypatch)


WRITTEN_CASES = ["out dtype", "out meta", "out count", "out not tensor", "out twice", "out overlapping views",
                 "out aliases a gradient", "out aliases a view of a gradient", "out shape", "out sparse"]


def bad_out(case, g):
    out = [torch.zeros(3), torch.zeros(3)]
    buf = torch.zeros(5)
    if case == "out dtype":
        out[1] = torch.zeros(3, dtype=torch.float64)
    elif case == "out meta":
        out[0] = meta()
    elif case == "out count":
        out = out[:1]
    elif case == "out not tensor":
        out[1] = [0.0, 0.0, 0.0]
    elif case == "out twice":
        out[1] = out[0]
    elif case == "out overlapping views":
        out = [buf[:3], buf[2:]]
    elif case == "out aliases a gradient":
        out[1] = g[1][0]
    elif case == "out aliases a view of a gradient":
        out[0] = g[0][1][:, None][:, 0]
    elif case == "out shape":
        out[0] = torch.zeros(3, 1)
    elif case == "out sparse":
        out[0] = torch.zeros(3).to_sparse()
    return out


@pytest.mark.parametrize("case", WRITTEN_CASES)
def test_screen_refuses_bad_outputs(native, monkeypatch, case):
    g = two_by_two()
    out = bad_out(case, g)
    flat = [t for row in g for t in row]
    assert native.screen_written([out], flat, 2) is None
    assert_same_error(lambda: fb.pareto_combine(g, out=out), monkeypatch)


@pytest.mark.parametrize("case", ["params twice", "m is a param", "v aliases a gradient", "params dtype",
                                  "params shape", "exp_avgs meta", "exp_avg_sqs count"])
def test_screen_refuses_bad_adamw_state(native, monkeypatch, case):
    a, _, _ = adamw_case(case)
    flat = [t for row in a["grads"] for t in row]
    assert native.screen_written([a["params"], a["exp_avgs"], a["exp_avg_sqs"]], flat, 2) is None
    grads = a.pop("grads")
    assert_same_error(lambda: fb.balanced_adamw_step(grads, **a), monkeypatch)


def test_screens_vouch_for_plain_inputs(native):
    g = random_grads(3, [(4, 5), (7,), (1,), (0,)], seed=1)
    g[1] = tuple(torch.nn.Parameter(t) for t in g[1])  # Parameters and tuples are plain enough
    flat, K, P, requires_grad = native.screen_grads(g)
    assert (K, P) == (3, 4) and all(a is b for a, b in zip(flat, [t for row in g for t in row]))
    assert requires_grad  # the Parameters
    assert native.screen_grads([list(g[0]), list(g[2])])[3] is False
    ids = (1, 0, 1, 0)
    assert native.screen_segments(ids, 4) == ([1, 0, 1, 0], 2)
    out = [torch.zeros_like(t) for t in g[0]]
    assert native.screen_written([out], flat, 4)[0] == out
    # empty tensors touch no memory: sharing a (null) storage is no aliasing, as in the Python check
    out[3] = g[2][3]
    assert native.screen_written([out], flat, 4) is not None


def test_valid_inputs_left_to_python_are_accepted(native):
    g = random_grads(2, [(3,), (3,)], seed=2)
    flat = [t for row in g for t in row]
    buf = torch.zeros(6)
    views = [buf[:3], buf[3:]]  # disjoint views of one buffer: the byte-range check decides
    assert native.screen_written([views], flat, 2) is None
    separate = [torch.zeros(3), torch.zeros(3)]
    ref = fb.pareto_combine(g, [0, 1], out=separate)
    res = fb.pareto_combine(g, torch.tensor([0, 1]), out=views)
    assert all(torch.equal(a, b) for a, b in zip(res.combined, ref.combined))
    assert torch.equal(buf, torch.cat(separate))
    tagged = [torch.zeros(3).as_subclass(Tagged), torch.zeros(3)]  # a subclass: Python decides
    assert native.screen_written([tagged], flat, 2) is None
    fb.pareto_combine(g, [0, 1], out=tagged)
    assert torch.equal(torch.cat([t.as_subclass(torch.Tensor) for t in tagged]), torch.cat(separate))


class Tagged(torch.Tensor):
    pass


def test_screened_and_python_paths_give_bitwise_equal_results(native, monkeypatch):
    g = random_grads(2, [(5, 3)] * 20 + [(17,)] * 10, seed=3)
    segments = [p // 7 for p in range(30)]

    def run():
        out = [torch.zeros_like(t) for t in g[0]]
        res = fb.pareto_combine(g, segments, policy="pareto_lora", out=out)
        return [res.gram, res.weights, *out]

    screened, plain = outcome(run), python_path(run, monkeypatch)
    assert screened[0] == plain[0] == "ok"
    assert all(torch.equal(a, b) for a, b in zip(screened[1], plain[1]))


# A cache keyed on the lists' identity (or on the tensors' ids) would let each of these through.
CHANGES = {
    "gradient set_ to a longer storage": (lambda g, s, o: g[1][1].set_(torch.zeros(4)), ValueError,
                                          r"grads\[1\]\[1\] has shape"),
    "gradient .data of another dtype": (lambda g, s, o: setattr(g[1][1], "data", g[1][1].double()), TypeError,
                                        r"grads\[1\]\[1\] has dtype"),
    "gradient resized": (lambda g, s, o: g[1][0].resize_(4), ValueError, r"grads\[1\]\[0\] has shape"),
    "gradient .data of another shape": (lambda g, s, o: setattr(g[0][1], "data", torch.zeros(2)),
                                        ValueError, r"grads\[1\]\[1\] has shape"),
    "out set_ to a gradient's storage": (lambda g, s, o: o[1].set_(g[0][0]), ValueError, "shares memory"),
    "out item replaced by a gradient": (lambda g, s, o: o.__setitem__(0, g[1][1]), ValueError, "shares memory"),
    "out item replaced by an alias of another out": (lambda g, s, o: o.__setitem__(1, o[0].view(3)), ValueError,
                                                      r"out\[1\] shares memory with out\[0\]"),
    "out .data of another dtype": (lambda g, s, o: setattr(o[1], "data", torch.zeros(3, dtype=torch.float64)),
                                   TypeError, r"out\[1\] has dtype"),
    "out moved to meta": (lambda g, s, o: o.__setitem__(0, o[0].to("meta")), ValueError, r"out\[0\] is on meta"),
    "segments list changed": (lambda g, s, o: s.__setitem__(1, 2), ValueError, "segment 1 has no tensor"),
    "gradient list item replaced": (lambda g, s, o: g[1].__setitem__(0, torch.zeros(4)), ValueError,
                                    r"grads\[1\]\[0\] has shape"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_input_is_checked_again(native, change):
    mutate, exc, match = CHANGES[change]
    g = two_by_two()
    segments = [0, 1]
    out = [torch.zeros(3), torch.zeros(3)]
    for _ in range(3):  # the same list objects, call after call
        fb.pareto_combine(g, segments, out=out, backend="cpp")
    mutate(g, segments, out)
    written = [o.clone() for o in out if o.device.type == "cpu"]
    with pytest.raises(exc, match=match):
        fb.pareto_combine(g, segments, out=out, backend="cpp")
    assert all(torch.equal(a, b) for a, b in zip(written, [o for o in out if o.device.type == "cpu"]))

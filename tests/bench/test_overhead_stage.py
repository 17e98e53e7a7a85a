"""The host-overhead stage's arithmetic: segment layouts and the paired step-overhead row."""
from __future__ import annotations

import pytest

from fused_balance.benchmarking import overhead


@pytest.mark.parametrize("P, segments", [(28, None), (448, None), (28, 2), (5000, 2), (448, 32)])
def test_segments_are_contiguous_blocks_covering_every_id(P, segments):
    ids = [overhead._segment_of(i, P, segments) for i in range(P)]
    want = -(-P // overhead.TENSORS_PER_SEGMENT) if segments is None else segments
    assert sorted(set(ids)) == list(range(want))
    assert ids == sorted(ids)  # blocks, in order


def test_step_overhead_subtracts_the_cheaper_by_hand_step_of_each_round():
    rounds = {"step_by_hand": {28: [10.0, 12.0, 11.0]},
              "step_by_hand_kept": {28: [9.0, 13.0, 10.5]},
              "paretolora_step": {28: [10.5, 12.5, 12.5]}}
    got = overhead.step_overhead({"counts": [28], "step_rounds": rounds})
    # per round: 10.5 - 9, 12.5 - 12, 12.5 - 10.5 -> 1.5, 0.5, 2.0; median 1.5
    assert got == {28: 1.5}


def test_own_work_is_the_call_minus_backward_and_optimizer_against_the_cheaper_by_hand_call():
    def parts(call, backward, optimizer):
        return {"call": call, "backward": backward, "optimizer": optimizer}
    step_parts = {"step_by_hand": {28: [parts(10.0, 6.0, 3.0), parts(11.0, 7.0, 3.5)]},       # own 1.0, 0.5
                  "step_by_hand_kept": {28: [parts(9.0, 5.5, 3.0), parts(12.0, 8.0, 3.0)]},   # own 0.5, 1.0
                  "paretolora_step": {28: [parts(14.0, 6.0, 2.0), parts(13.0, 6.5, 3.5)]}}    # own 6.0, 3.0
    result = {"counts": [28], "step_parts": step_parts}
    # per round: 6.0 - 0.5, 3.0 - 0.5 -> 5.5, 2.5; the upper median of two
    assert overhead.step_overhead(result, "own") == {28: 5.5}
    # backward: 6.0 - 5.5, 6.5 - 7.0 -> 0.5, -0.5
    assert overhead.step_overhead(result, "backward") == {28: 0.5}


def test_the_step_clock_counts_the_call_its_backward_passes_and_optimizer_step():
    """The by-hand step's call is its two backward passes and AdamW step (own work ≈ 0), and
    autograd.backward is restored after timing."""
    import torch

    clock = overhead._StepClock()
    by_hand = overhead._training_steps(8, torch.device("cpu"), 2, clock)[0]
    original = torch.autograd.backward
    with clock.timing_backward():
        total, per_call = overhead._time_per_call(by_hand, torch.device("cpu"), 0.01, clock)
    assert torch.autograd.backward is original
    assert 0 < per_call["backward"] and 0 < per_call["optimizer"]
    assert per_call["backward"] + per_call["optimizer"] <= per_call["call"] <= total


def test_a_fixed_segment_count_above_the_smallest_tensor_count_is_refused():
    with pytest.raises(ValueError, match="segments must be in"):
        overhead.run_overhead("cpu", counts=(4, 8), segments=5)


def test_one_tiny_run_times_every_contender_with_fixed_segments():
    result = overhead.run_overhead("cpu", counts=(4, 8), rounds=1, round_s=0.001, segments=2)
    assert result["segments"] == 2
    for name in overhead.CONTENDERS:
        assert all(result["seconds"][name][P] > 0 for P in (4, 8)), name
    assert set(overhead.step_overhead(result)) == set(overhead.step_overhead(result, "own")) == {4, 8}
    assert "2 segments at every P" in "\n".join(overhead.markdown(result))

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


def test_a_fixed_segment_count_above_the_smallest_tensor_count_is_refused():
    with pytest.raises(ValueError, match="segments must be in"):
        overhead.run_overhead("cpu", counts=(4, 8), segments=5)


def test_one_tiny_run_times_every_contender_with_fixed_segments():
    result = overhead.run_overhead("cpu", counts=(4, 8), rounds=1, round_s=0.001, segments=2)
    assert result["segments"] == 2
    for name in overhead.CONTENDERS:
        assert all(result["seconds"][name][P] > 0 for P in (4, 8)), name
    assert set(overhead.step_overhead(result)) == {4, 8}
    assert "2 segments at every P" in "\n".join(overhead.markdown(result))

"""Pipeline schedules as data: a GPipe timeline worked by hand, the bubbles of 1F1B and GPipe
against (S - 1)(F + B), DualPipeV's against the table in DeepSeek's DualPipe README, and
schedules that cannot run refused by name."""

import dataclasses

import pytest

from moe_jax.pipeline import schedules
from moe_jax.pipeline.schedules import Costs, Op, ScheduleError


def test_a_two_stage_gpipe_timeline_worked_by_hand():
  # Stage 1 starts each forward once stage 0's is done; backwards run from the last stage down:
  # device 0: F0 [0,1] F1 [1,2] ... BW0 [5,7] BW1 [7,9]; device 1: F0 [1,2] F1 [2,3] BW0 [3,5]
  # BW1 [5,7]. Each device is busy 6 of 9.
  timeline = schedules.simulate(schedules.gpipe(2, 2), Costs(1, 1, 1))
  assert timeline.starts == ((0, 1, 5, 7), (1, 2, 3, 5))
  assert timeline.makespan == 9 and timeline.idle == (3, 3)
  assert timeline.bubble_fraction == pytest.approx(1 / 3)


@pytest.mark.parametrize("costs", [Costs(1, 1, 1), Costs(1, 1.5, 0.75), Costs(2, 1, 0.5)])
@pytest.mark.parametrize("devices,microbatches", [(2, 4), (4, 8), (4, 11), (8, 20)])
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_gpipe_and_1f1b_idle_every_device_for_s_minus_1_forward_and_backward(
    name, devices, microbatches, costs):
  timeline = schedules.simulate(schedules.make(name, devices, microbatches), costs)
  per_microbatch = costs.forward + costs.input_gradient + costs.weight_gradient
  assert timeline.idle == pytest.approx([(devices - 1) * per_microbatch] * devices)
  assert timeline.bubble_fraction == pytest.approx((devices - 1) / (microbatches + devices - 1))


@pytest.mark.parametrize("weight_gradient,overlapped", [(1.0, None), (0.5, None), (1.0, 2.5),
                                                       (1.0, 2.0)])
@pytest.mark.parametrize("devices,microbatches", [(2, 4), (3, 6), (4, 10), (5, 13), (8, 20)])
def test_dualpipev_idles_as_deepseeks_table_says(devices, microbatches, weight_gradient,
                                                 overlapped):
  """DualPipe's README: DualPipeV's bubble is (PP/2 - 1)(F&B + B - 3W) for PP stages on PP/2
  devices, with B the full backward and F&B an overlapped forward and backward, for forward
  and input-gradient chunks of equal time: every device's idle time when F&B costs F + B, the
  last devices' (the most) when the overlap saves time."""
  costs = Costs(forward=1.0, input_gradient=1.0, weight_gradient=weight_gradient,
                overlapped=overlapped)
  schedule = schedules.dualpipev(devices, microbatches)
  assert schedule.num_stages == 2 * devices
  timeline = schedules.simulate(schedule, costs)
  full_backward = costs.input_gradient + weight_gradient
  pair = costs.forward + full_backward if overlapped is None else overlapped
  expected = (devices - 1) * (pair + full_backward - 3 * weight_gradient)
  assert max(timeline.idle) == pytest.approx(expected)
  if overlapped is None:
    assert timeline.idle == pytest.approx([expected] * devices)
  # Each device does twice 1F1B's work per micro-batch here, for no more idle time.
  one_f_one_b = schedules.simulate(schedules.one_f_one_b(devices, microbatches), costs)
  assert timeline.idle[0] <= one_f_one_b.idle[0]
  assert timeline.bubble_fraction < one_f_one_b.bubble_fraction


@pytest.mark.parametrize("devices,microbatches", [(2, 4), (4, 8), (4, 11), (8, 20)])
def test_activations_held_at_most_as_deepseeks_table_says(devices, microbatches):
  """1F1B: device s holds D - s micro-batches (PP on the first); GPipe: all M; DualPipeV: PP + 1
  stage activations per device for PP = 2D stages."""
  assert schedules.peak_activations(schedules.one_f_one_b(devices, microbatches)) == tuple(
      devices - s for s in range(devices))
  assert schedules.peak_activations(schedules.gpipe(devices, microbatches)) == (
      microbatches,) * devices
  assert schedules.peak_activations(schedules.dualpipev(devices, microbatches)) == (
      2 * devices + 1,) * devices


def test_dualpipev_places_two_stages_per_device_in_a_v():
  schedule = schedules.dualpipev(4, 8)
  assert schedule.stages_of_device == ((0, 7), (1, 6), (2, 5), (3, 4))
  # The first device starts with forwards of its first stage and ends with weight gradients.
  first = schedule.slots[0]
  assert first[:6] == tuple((Op("F", 0, m),) for m in range(6))
  assert all(op.kind == "W" for op in first[-1])


def test_dualpipev_with_fewer_than_twice_the_devices_in_microbatches_is_refused():
  with pytest.raises(ScheduleError, match="at least 2 x 4 devices = 8 micro-batches, got 7"):
    schedules.dualpipev(4, 7)


def test_an_unknown_schedule_is_refused_with_the_known_ones():
  with pytest.raises(ScheduleError, match="unknown pipeline schedule 'zb'.*gpipe"):
    schedules.make("zb", 4, 8)


def _with_slots(schedule, device, slots):
  all_slots = list(schedule.slots)
  all_slots[device] = tuple(slots)
  return dataclasses.replace(schedule, slots=tuple(all_slots))


def test_a_schedule_that_cannot_run_is_refused_by_name():
  schedule = schedules.one_f_one_b(2, 3)
  slots = list(schedule.slots[1])
  with pytest.raises(ScheduleError, match="micro-batch 2 lacks"):
    schedules.simulate(_with_slots(schedule, 1, [s for s in slots if s != (Op("BW", 1, 2),)]))
  with pytest.raises(ScheduleError, match="runs twice"):
    schedules.simulate(_with_slots(schedule, 1, slots + [(Op("F", 1, 0),)]))
  with pytest.raises(ScheduleError, match="device 1 runs Op.kind='F', stage=0"):
    schedules.simulate(_with_slots(schedule, 1, slots + [(Op("F", 0, 5),)]))
  # Device 1 asks for micro-batch 1's backward before its forward: nothing can move.
  swapped = [(Op("BW", 1, 1),)] + [s for s in slots if s != (Op("BW", 1, 1),)]
  with pytest.raises(ScheduleError, match="deadlock"):
    schedules.simulate(_with_slots(schedule, 1, swapped))

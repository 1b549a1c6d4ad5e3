"""Pipeline schedules as data: what each device runs, in order, and the bubble that order leaves.

A schedule lists, per device, its slots in order; a slot is one or two operations run
together (DualPipe runs a forward and a backward together, so that one's communication hides
behind the other's computation). An operation is a forward (F), a full backward (BW), or a
backward split into its input gradient (B) and its weight gradient (W), which zero-bubble
schedules defer to fill idle time; each names its stage (a consecutive slice of the model) and
its micro-batch.

`simulate` plays a schedule with given costs: a slot starts when its device is free and its
operations' inputs are ready (the previous stage's forward, the next stage's backward, the same
stage's forward for a backward, its backward for a weight gradient), communication free. It
refuses a schedule that runs an operation twice, leaves one out, puts a stage on a device that
does not hold it, or waits forever. The bubble is each device's idle time before the last
operation ends; `peak_activations` counts the micro-batch activations each device holds at
most. Both agree with the table of DeepSeek's DualPipe README (tests/test_pipeline_schedules.py).

Schedules (S stages, D devices, M micro-batches):
  gpipe      all forwards, then all backwards; stage s on device s (S = D)
  1f1b       D - s - 1 warm-up forwards, then one forward and one backward in turn; S = D
  dualpipev  DeepSeek's DualPipeV ("cut-in-half" DualPipe): device d holds stages d and
             2D - 1 - d (a V), forwards and backwards of the two run overlapped in pairs, the
             last backwards split into B and W; S = 2D, M >= 2D.
"""

import dataclasses
from typing import NamedTuple

SCHEDULES = ("gpipe", "1f1b", "dualpipev")


class Op(NamedTuple):
  kind: str          # "F" forward, "BW" full backward, "B" input gradient, "W" weight gradient
  stage: int
  microbatch: int


Slot = tuple[Op, ...]


@dataclasses.dataclass(frozen=True)
class Schedule:
  name: str
  num_devices: int
  num_microbatches: int
  stages_of_device: tuple[tuple[int, ...], ...]
  slots: tuple[tuple[Slot, ...], ...]          # per device, in order

  @property
  def num_stages(self) -> int:
    return sum(len(stages) for stages in self.stages_of_device)


class Costs(NamedTuple):
  """Time of one stage's operation on one micro-batch; a forward and a backward run together
  take `overlapped` (default: their sum, no overlap gain)."""

  forward: float = 1.0
  input_gradient: float = 1.0
  weight_gradient: float = 1.0
  overlapped: float | None = None
  full_backward: float | None = None     # a BW; default: input + weight gradient

  def of_kind(self, kind: str) -> float:
    """One operation's time: F, B, W, or BW (a full backward)."""
    if kind == "BW":
      return (self.input_gradient + self.weight_gradient if self.full_backward is None
              else self.full_backward)
    return {"F": self.forward, "B": self.input_gradient, "W": self.weight_gradient}[kind]

  def of(self, slot: Slot) -> float:
    total = sum(self.of_kind(op.kind) for op in slot)
    if len(slot) == 2 and self.overlapped is not None:
      return self.overlapped
    return total


class Timeline(NamedTuple):
  starts: tuple[tuple[float, ...], ...]     # per device, per slot
  ends: tuple[tuple[float, ...], ...]
  makespan: float
  idle: tuple[float, ...]                   # per device: makespan minus busy time

  @property
  def bubble_fraction(self) -> float:
    return sum(self.idle) / (len(self.idle) * self.makespan)


class ScheduleError(ValueError):
  """A schedule that cannot run: an operation missing, twice, misplaced, or a deadlock."""


# ---- the schedules -------------------------------------------------------------------------


def gpipe(num_devices: int, num_microbatches: int) -> Schedule:
  slots = tuple(tuple((Op("F", s, m),) for m in range(num_microbatches)) +
                tuple((Op("BW", s, m),) for m in range(num_microbatches))
                for s in range(num_devices))
  return Schedule("gpipe", num_devices, num_microbatches,
                  tuple((s,) for s in range(num_devices)), slots)


def one_f_one_b(num_devices: int, num_microbatches: int) -> Schedule:
  per_device = []
  for s in range(num_devices):
    warmup = min(num_devices - s - 1, num_microbatches)
    ops = [(Op("F", s, m),) for m in range(warmup)]
    for i in range(num_microbatches - warmup):
      ops += [(Op("F", s, warmup + i),), (Op("BW", s, i),)]
    ops += [(Op("BW", s, m),) for m in range(num_microbatches - warmup, num_microbatches)]
    per_device.append(tuple(ops))
  return Schedule("1f1b", num_devices, num_microbatches,
                  tuple((s,) for s in range(num_devices)), tuple(per_device))


def dualpipev(num_devices: int, num_microbatches: int) -> Schedule:
  """The order of DeepSeek's DualPipeV (github.com/deepseek-ai/DualPipe, dualpipev.py), device
  by device: its eight steps, with chunk 0 the device's first stage and chunk 1 its second."""
  d, m = num_devices, num_microbatches
  if m < 2 * d:
    raise ScheduleError(f"dualpipev needs at least 2 x {d} devices = {2 * d} micro-batches, "
                        f"got {m}")
  per_device = [_dualpipev_device(r, d, m) for r in range(d)]
  return Schedule("dualpipev", d, m, tuple((r, 2 * d - 1 - r) for r in range(d)),
                  tuple(per_device))


def _dualpipev_device(rank: int, d: int, m: int) -> tuple[Slot, ...]:
  stage = (rank, 2 * d - 1 - rank)            # chunk 0, chunk 1
  next_forward, next_backward = [0, 0], [0, 0]
  deferred: list[Op] = []                     # weight gradients, first in first out
  slots: list[Slot] = []

  def forward(chunk) -> Op:
    next_forward[chunk] += 1
    return Op("F", stage[chunk], next_forward[chunk] - 1)

  def backward(chunk, split=False) -> Op:
    next_backward[chunk] += 1
    microbatch = next_backward[chunk] - 1
    if split:
      deferred.append(Op("W", stage[chunk], microbatch))
    return Op("B" if split else "BW", stage[chunk], microbatch)

  def weight() -> Op:
    return deferred.pop(0)

  last = rank == d - 1
  for _ in range((d - rank - 1) * 2):                       # 1: forwards of chunk 0
    slots.append((forward(0),))
  for _ in range(rank + 1):                                 # 2: chunk 0 and 1 forwards
    slots += [(forward(0),), (forward(1),)]
  for _ in range(d - rank - 1):                             # 3: B, W, F of chunk 1
    slots += [(backward(1, split=True),), (weight(),), (forward(1),)]
  for i in range(m - 2 * d + rank + 1):                     # 4: overlapped pairs
    if i == 0 and last:   # not overlapped on the last device, for a smaller bubble
      slots += [(forward(0),), (backward(1),)]
    else:
      slots.append((forward(0), backward(1)))
    slots.append((forward(1), backward(0)))
  for _ in range(d - rank - 1):                             # 5: B of chunk 1, then a pair
    slots += [(backward(1),), (forward(1), backward(0))]
  split = False
  for i in range(rank + 1):                                 # 6: backwards, the later split
    if i == (rank + 1) // 2 and rank % 2 == 1:
      split = True
    slots.append((backward(1, split),))
    if i == (rank + 1) // 2 and rank % 2 == 0:
      split = True
    slots.append((backward(0, split),))
  for _ in range(d - rank - 1):                             # 7: a deferred W, a split B
    slots.append((weight(),))
    slots.append((backward(0, split=True),))
  for _ in range(rank + 1):                                 # 8: the deferred Ws
    slots.append((weight(),))
  assert not deferred
  return tuple(slots)


def make(name: str, num_devices: int, num_microbatches: int) -> Schedule:
  """The schedule called `name` (one of SCHEDULES)."""
  builders = {"gpipe": gpipe, "1f1b": one_f_one_b, "dualpipev": dualpipev}
  if name not in builders:
    raise ScheduleError(f"unknown pipeline schedule {name!r}; choose from {list(SCHEDULES)}")
  if num_devices < 1 or num_microbatches < 1:
    raise ScheduleError(f"a schedule needs at least one device and one micro-batch, got "
                        f"{num_devices} and {num_microbatches}")
  return builders[name](num_devices, num_microbatches)


# ---- playing a schedule --------------------------------------------------------------------


def peak_activations(schedule: Schedule) -> tuple[int, ...]:
  """Per device, the most micro-batch activations of one stage it holds at once: each is held
  from its forward to its last backward operation (BW, or W when the backward is split); in a
  slot that runs a forward and a backward together the forward's counts first."""
  peaks = []
  for slots in schedule.slots:
    held = peak = 0
    for slot in slots:
      held += sum(op.kind == "F" for op in slot)
      peak = max(peak, held)
      held -= sum(op.kind in ("BW", "W") for op in slot)
    peaks.append(peak)
  return tuple(peaks)


def _check_complete(schedule: Schedule) -> None:
  seen: dict[Op, int] = {}
  for device, slots in enumerate(schedule.slots):
    for slot in slots:
      for op in slot:
        if op.stage not in schedule.stages_of_device[device]:
          raise ScheduleError(f"{schedule.name}: device {device} runs {op} but holds stages "
                              f"{schedule.stages_of_device[device]}")
        if op in seen:
          raise ScheduleError(f"{schedule.name}: {op} runs twice")
        seen[op] = device
  for stage in range(schedule.num_stages):
    for microbatch in range(schedule.num_microbatches):
      backward = [Op(k, stage, microbatch) in seen for k in ("BW", "B", "W")]
      if Op("F", stage, microbatch) not in seen or backward not in ([True, False, False],
                                                                    [False, True, True]):
        raise ScheduleError(f"{schedule.name}: stage {stage}, micro-batch {microbatch} lacks "
                            f"its forward or backward")


def inputs(op: Op, last_stage: int) -> list[Op]:
  """The operations whose results `op` needs (kind "backward": either form of a backward)."""
  if op.kind == "F":
    return [Op("F", op.stage - 1, op.microbatch)] if op.stage else []
  if op.kind == "W":
    return [Op("B", op.stage, op.microbatch)]
  needs = [Op("F", op.stage, op.microbatch)]
  if op.stage < last_stage:
    needs.append(Op("backward", op.stage + 1, op.microbatch))
  return needs


def simulate(schedule: Schedule, costs: Costs = Costs()) -> Timeline:
  """Start and end times of every slot: each device runs its slots in order, each as soon as
  its operations' inputs are done."""
  _check_complete(schedule)
  last_stage = schedule.num_stages - 1
  done: dict[tuple[str, int, int], float] = {}     # ("F" | "backward" | "B", stage, mb) -> end

  def ready(op: Op) -> float | None:
    times = []
    for need in inputs(op, last_stage):
      key = (need.kind, need.stage, need.microbatch)
      if key not in done:
        return None
      times.append(done[key])
    return max(times, default=0.0)

  num_devices = len(schedule.slots)
  position, clock = [0] * num_devices, [0.0] * num_devices
  starts = [[] for _ in range(num_devices)]
  ends = [[] for _ in range(num_devices)]
  remaining = sum(len(slots) for slots in schedule.slots)
  while remaining:
    progressed = False
    for device in range(num_devices):
      while position[device] < len(schedule.slots[device]):
        slot = schedule.slots[device][position[device]]
        waits = [ready(op) for op in slot]
        if any(w is None for w in waits):
          break
        start = max([clock[device], *waits])
        end = start + costs.of(slot)
        for op in slot:
          done[(op.kind, op.stage, op.microbatch)] = end
          if op.kind in ("B", "BW"):
            done[("backward", op.stage, op.microbatch)] = end
        starts[device].append(start)
        ends[device].append(end)
        clock[device] = end
        position[device] += 1
        remaining -= 1
        progressed = True
    if not progressed:
      stuck = {device: schedule.slots[device][position[device]] for device in range(num_devices)
               if position[device] < len(schedule.slots[device])}
      raise ScheduleError(f"{schedule.name}: deadlock, every device waits: {stuck}")
  makespan = max(clock)
  busy = [sum(e - s for s, e in zip(starts[d], ends[d])) for d in range(num_devices)]
  return Timeline(tuple(map(tuple, starts)), tuple(map(tuple, ends)), makespan,
                  tuple(makespan - b for b in busy))

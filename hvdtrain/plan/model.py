"""The pure cost model of `hvdtrain plan` (docs/plan.md): from what was measured (Costs, this process) and probed
(Probe, a real job), every candidate layout's memory per rank, bytes and collectives per step, pipeline bubble,
step time and samples/s; and the recommendation. No torch, no I/O: the unit tests feed it made-up costs.

The formulas (W: parameter bytes = gradient bytes, O: optimizer state, A(b): activations of b samples,
c(b): forward+backward, s: contention, n: ranks averaging, B: batch per rank):
  data      mem = base + 2W + O + A(B);   t = c(B) s + opt + comm(W, n)
  sharded   mem = base + 2W + O/n + A(B); t = c(B) s + opt/n + comm(W, n) + lat   (reduce-scatter + all-gather)
  local-sgd mem as data;  t = c(B) s + opt + comm(W, n)/H                         (approximate)
  pipeline  mem_s = base + W_s (2 + O/W) + k A_s(B/M), k = min(P - s, M) (1F1B) or M (GPipe);
            t = (sum_s c_s(B/M) + (M - 1) max_s c_s(B/M)) s + 2(P-1) M p2p + opt W_max/W + comm(W_max, N/P)
  comm(S, n) = the probe's measured step for data (its n), else 2(n-1)/n x S / busbw + lat
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

AVERAGE_EVERY = (4, 16)  # local SGD's H, modelled


@dataclasses.dataclass
class Stage:
    """One candidate stage (layers [start, end) of the model) at one micro-batch size."""

    start: int
    end: int
    micro: int  # samples per micro-batch
    seconds: float  # forward + backward of one micro-batch
    activation_bytes: int  # what autograd keeps for backward of one micro-batch
    output_bytes: int  # the activation sent to the next stage, one micro-batch
    param_bytes: int


@dataclasses.dataclass
class Costs:
    """What `measure` found (seconds, bytes)."""

    model: str
    layers: int
    param_bytes: int
    buffer_bytes: int
    state_bytes: int  # optimizer state
    data_bytes: int  # the dataset's tensors (every rank loads them)
    batch: int
    step_seconds: float  # forward + backward of one batch B on one rank
    activation_bytes: int  # autograd's saved tensors for one batch B
    optimizer_seconds: float  # one optimizer step over every parameter
    threads: int  # per rank, as measured
    stages: dict[str, Stage]  # f"{P}:{s}:{M}" -> stage s of P at M micro-batches


@dataclasses.dataclass
class Probe:
    """What a real N-rank job measured: a rank's peak RSS before training, one data-parallel step's allreduces."""

    ranks: int
    base_rss_bytes: int
    comm_seconds: float  # one step's gradient allreduces (per-tensor, fused by Horovod), median
    latency_seconds: float  # one 4-byte allreduce, median
    busbw_Bps: float  # bus bandwidth the step's allreduce reached
    p2p_seconds: float  # one small mpi4py message from a rank to the next (half a round trip)
    compute_seconds: float  # forward + backward of one batch with every rank computing at once (the slowest)
    pipeline_seconds: float = 0.0  # one batch through a real pipeline of every rank as a stage (M = 1); 0: none


@dataclasses.dataclass
class Candidate:
    layout: str  # data | sharded | local-sgd | pipeline
    args: list[str]  # the train flags
    memory_bytes: int  # the most any rank holds
    comm_bytes: int  # per step, per rank (on the wire, ring)
    collectives: float  # per step (a pipeline: also its point-to-point messages)
    bubble: float
    step_seconds: float
    samples_per_s: float
    exact: bool  # the same optimisation as one process on the whole batch (False: local SGD)
    fits: bool = True
    note: str = ""


def ring_bytes(size: int, n: int) -> float:
    """Bytes each rank sends in a ring allreduce of `size` bytes over n ranks."""
    return 2 * (n - 1) / n * size if n > 1 else 0.0


def bubble(stages: int, micro: int) -> float:
    return (stages - 1) / (micro + stages - 1)


def comm_seconds(size: float, n: int, pr: Probe) -> float:
    """An allreduce of `size` bytes over n ranks: the ring's bytes at the bus bandwidth, plus one collective's
    fixed cost (the probe's 4-byte allreduce)."""
    if n <= 1 or size <= 0:
        return 0.0
    return ring_bytes(size, n) / pr.busbw_Bps + pr.latency_seconds


def p2p_seconds(costs: Costs, pr: Probe, slow: float) -> float:
    """What one of a pipeline's messages costs: from the probe's real pipeline of its ranks (M = 1: its step less
    its stages' compute, over its 2(P-1) messages) when it ran one, else the probe's ping-pong."""
    p = pr.ranks
    stages = [costs.stages.get(f"{p}:{s}:1") for s in range(p)]
    if pr.pipeline_seconds <= 0 or None in stages:
        return pr.p2p_seconds
    busy = sum(st.seconds for st in stages) * slow
    return max(0.0, (pr.pipeline_seconds - busy) / (2 * (p - 1)))


def candidates(costs: Costs, pr: Probe, ranks: int, cores: int, memory_bytes: int, batch: int) -> list[Candidate]:
    """Every layout of `ranks` ranks on a machine of `cores` cores and `memory_bytes` per rank, modelled."""
    # Compute slows down when the ranks compute at once (the probe saw it: memory bandwidth, Horovod's polling
    # thread), and ranks beyond the cores share them; every compute time is scaled by the larger factor.
    slow = max(1.0, ranks / cores, pr.compute_seconds / costs.step_seconds if costs.step_seconds else 1.0)
    compute = costs.step_seconds * slow
    # The probe's ranks held the whole model's parameters, gradients, optimizer state and one batch's activations
    # (and the dataset): a rank's own share of those is added per layout to what it holds besides them.
    base = max(0, pr.base_rss_bytes - (2 * costs.param_bytes + costs.state_bytes + costs.activation_bytes))
    w, o = costs.param_bytes, costs.state_bytes
    out = []
    data_comm = pr.comm_seconds if pr.ranks == ranks else comm_seconds(w, ranks, pr)
    step = compute + costs.optimizer_seconds + (data_comm if ranks > 1 else 0.0)
    mem = base + 2 * w + o + costs.activation_bytes
    out.append(Candidate("data", [], mem, int(ring_bytes(w, ranks)), 1 if ranks > 1 else 0, 0.0, step,
                         ranks * batch / step, True))  # fmt: skip
    if ranks > 1:
        # Two collectives (reduce-scatter, all-gather) where data has one: one more latency.
        step = compute + costs.optimizer_seconds / ranks + data_comm + pr.latency_seconds
        out.append(Candidate("sharded", ["--shard-optimizer"], base + 2 * w + o // ranks + costs.activation_bytes,
                             int(ring_bytes(w, ranks)), 2, 0.0, step, ranks * batch / step, True))  # fmt: skip
        for h in AVERAGE_EVERY:
            step = compute + costs.optimizer_seconds + comm_seconds(w + costs.buffer_bytes, ranks, pr) / h
            out.append(Candidate("local-sgd", ["--update", "local-sgd", "--average-every", str(h)], mem,
                                 int(ring_bytes(w, ranks) / h), 1 / h, 0.0, step, ranks * batch / step, False,
                                 note="approximate: changes the optimisation (docs/updates.md)"))  # fmt: skip
    message = p2p_seconds(costs, pr, slow)
    for p, m in sorted({(int(p), int(m)) for p, _, m in (key.split(":") for key in costs.stages)}):
        stages = [costs.stages[f"{p}:{s}:{m}"] for s in range(p)]
        replicas = ranks // p
        p2p = 2 * (p - 1) * m * message
        # The first micro-batch passes every stage, each further one adds the slowest stage's time.
        busy = (sum(st.seconds for st in stages) + (m - 1) * max(st.seconds for st in stages)) * slow
        grads = max(st.param_bytes for st in stages)
        sync = comm_seconds(grads, replicas, pr)
        opt = costs.optimizer_seconds * grads / max(w, 1)
        step = busy + p2p + opt + sync
        for schedule in ("1f1b", "gpipe"):
            held = [min(p - s, m) if schedule == "1f1b" else m for s in range(p)]
            mem = max(base + st.param_bytes * (2 + o / max(w, 1)) + k * st.activation_bytes
                      for st, k in zip(stages, held))  # fmt: skip
            args = ["--strategy", "pipeline", "--stages", str(p), "--micro-batches", str(m), "--schedule", schedule]
            out.append(Candidate("pipeline", args, int(mem), int(ring_bytes(grads, replicas)),
                                 (1 if replicas > 1 else 0) + 2 * (p - 1) * m / p, bubble(p, m), step,
                                 replicas * batch / step, True))  # fmt: skip
    for c in out:
        c.fits = c.memory_bytes <= memory_bytes
    return out


def recommend(cands: Sequence[Candidate]) -> Optional[Candidate]:
    """The fastest synchronous layout that fits; ties go to the simplest (data before sharded before pipeline)."""
    order = {"data": 0, "sharded": 1, "pipeline": 2}
    fitting = [c for c in cands if c.fits and c.exact]
    return max(fitting, key=lambda c: (c.samples_per_s, -order.get(c.layout, 9))) if fitting else None

"""Benchmarks: `hvdtrain bench allreduce` (collective bandwidth) and `hvdtrain bench train` (throughput).

The launching side (allreduce.py, throughput.py, report.py) is plain Python: it validates the options,
starts the workers through hvdtrain.launch, then reads their JSON and prints the table, writes JSON and
draws the PNG. Only the workers (allreduce_worker.py, throughput_worker.py), which run on every rank,
import torch, Horovod, mpi4py and torch.distributed; the last two appear here only as baselines.
"""

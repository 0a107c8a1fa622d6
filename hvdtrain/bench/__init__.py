"""Benchmarks: `hvdtrain bench allreduce` (collective bandwidth) and `hvdtrain bench train` (throughput).

The launching side is plain Python: allreduce.py and throughput.py validate the options and build their jobs
and hold the collection math; runner.py launches the jobs through hvdtrain.launching, reads the workers' JSON and
writes the result, tables.py and plots.py render it; report.py holds the shared formulas and helpers. Only
the workers (allreduce_worker.py, throughput_worker.py), which run on every rank, import torch, Horovod,
mpi4py and torch.distributed; the last two appear here only as baselines. What crosses between the two
sides, and the benchmarks' options, are the dataclasses of plans.py, which both sides import.
"""

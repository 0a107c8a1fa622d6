"""Parallelism: data (Horovod ring-allreduce), model (device split + micro-batch pipeline), hybrid."""

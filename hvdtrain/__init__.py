"""hvdtrain: a Horovod-backed MPI batch toolkit for distributed PyTorch training.

Importing the package is cheap: torch and Horovod are imported only by the modules that train.
"""

__version__ = "0.1.0"

from setuptools import find_packages, setup

setup(
    name="hvdtrain",
    version="0.1.0",
    description="Horovod-backed MPI batch toolkit for distributed PyTorch training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["hvdtrain", "hvdtrain.*"]),
    # the sitecustomize the rank wrapper puts first on a rank's PYTHONPATH (launching.ranklink): a plain directory
    package_data={"hvdtrain.slurm": ["templates/*.sh"], "hvdtrain.launching": ["site/sitecustomize.py"]},
    # torch and horovod are deliberately not listed: torch must be the build Horovod was compiled
    # against, and Horovod 0.28.1 needs a source build, with hvdtrain's patch unless --stock-horovod (scripts/setup.sh
    # does both).
    install_requires=[
        "click>=8.0",
        "numpy",
        "pyyaml",
        "scikit-learn",
        "mpi4py",
        "psutil",
        "tensorboard",
        "matplotlib",
        "tqdm",
    ],
    extras_require={"test": ["pytest>=7", "pytest-timeout", "ruff", "hypothesis"]},
    entry_points={
        "console_scripts": ["hvdtrain=hvdtrain.cli:main"],
        # the pytest plugin (hvdtrain.testing): inert unless a test is marked ranks(N)
        "pytest11": ["hvdtrain = hvdtrain.testing.plugin"],
    },
)

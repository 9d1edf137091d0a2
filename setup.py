"""psft-megatron: trust-region SFT (PSFT, SFT, DFT, SFT-KL) on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="psft-megatron",
    version="0.1.0",
    description="Proximal SFT and friends as a Megatron-Core extension (TP/PP/SP/CP/DP, FP8 via TE)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["psft_megatron", "psft_megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is not pinned here: GPU clusters bring their own build (NGC container);
        # `make test` installs the CPU wheel torch==2.13.0 when torch is missing.
        "torch>=2.4",
        # Tested with 0.16.1; the CPU layer and the distributed-optimizer fixes patch
        # megatron-core internals, so stay inside the tested minor version.
        "megatron-core>=0.16.1,<0.17",
        "sentencepiece>=0.2",
        "transformers>=4.45",
        "safetensors>=0.4",
        "omegaconf>=2.3",
        "hydra-core>=1.3",
        "tensorboard>=2.15",
        "psutil>=5.9",  # needed by megatron's dist_checkpointing.save, undeclared there
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=7", "pyarrow>=12"],
        "data": ["pyarrow>=12"],  # Parquet and HF `datasets` save_to_disk directories
        "te": ["transformer-engine[pytorch]"],
        "nemo": ["nemo-toolkit"],
    },
)

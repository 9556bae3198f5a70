"""mplug-jax: the mPLUG vision-language model in JAX/Flax (mPLUG-2 planned, not implemented)."""
from setuptools import find_packages, setup

setup(
    name="mplug-jax",
    version="0.1.0",
    description=("JAX/Flax reimplementation of mPLUG (cross-modal skip-connections); "
                 "mPLUG-2 is planned, not implemented yet"),
    python_requires=">=3.10",
    packages=find_packages(include=["mplug_jax", "mplug_jax.*"]),
    package_data={"mplug_jax": ["assets/*"]},
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "ml-collections>=1.0",
        "einops>=0.8",
        "numpy>=1.26",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "pillow>=10",
        "pyyaml>=6",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.6",
        "scikit-image>=0.22",
        "pycocoevalcap>=1.2",
    ],
    extras_require={
        # torch: only for .pth import/export and parity tests; 2.13.0 is the CPU wheel we test with.
        "torch": ["torch==2.13.0"],
        # video: decode .mp4/.avi/.gif for video QA / captioning (frame folders need nothing).
        "video": ["av>=12"],
        "test": ["pytest>=8", "pytest-xdist>=3.6", "torch==2.13.0", "transformers>=4.40", "av>=12"],
    },
    entry_points={"console_scripts": ["mplug-jax=mplug_jax.cli:main"]},
)

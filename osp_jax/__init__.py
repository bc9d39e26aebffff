"""osp_jax: Outlier-Safe Pre-Training (OSP) of LLMs in JAX/Flax.

Three ingredients keep activation outliers from forming: the Muon optimizer for every hidden
matrix, Single-Scale RMSNorm (one learnable scalar per norm) and EmbProj (learnable projections
after the embedding and before the LM head, merged away at export).
"""

__version__ = "0.1.0"

from osp_jax.muon import MuonDimensionNumbers, muon, newton_schulz, scale_by_muon

__all__ = ["MuonDimensionNumbers", "muon", "newton_schulz", "scale_by_muon", "__version__"]

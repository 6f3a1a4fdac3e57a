"""graphcache: compile feature caching into Diffusion Transformers.

    import graphcache
    model = graphcache.load_model("DiT-XL-2-256x256.pt")
    cached = graphcache.optimize(model, method="toca", num_steps=50)
    latents = graphcache.sample(cached, labels=[207, 360], seed=0)
"""

from .capture import capture
from .errors import GraphcacheError
from .runtime import CachedModel, optimize
from .sampling import sample


def load_model(*args, **kwargs):
    from .io import load_model as _load

    return _load(*args, **kwargs)


__all__ = ["CachedModel", "GraphcacheError", "capture", "load_model", "optimize", "sample"]
__version__ = "0.1.0"

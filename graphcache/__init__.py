"""graphcache: compile feature caching into Diffusion Transformers.

    import graphcache
    model = graphcache.load_model("DiT-XL-2-256x256.pt")
    cached = graphcache.optimize(model, method="toca", num_steps=50)
    latents = graphcache.sample(cached, labels=[207, 360], seed=0)

    exported = graphcache.optimize(model, method="toca", backend="onnx")  # or "aoti"
    # graphcache optimize MODEL --backend onnx -o OUT, then: graphcache.load("OUT")
"""

from .capture import capture
from .errors import GraphcacheError
from .pipelines import disable, enable
from .runtime import CachedModel, optimize
from .sampling import sample
from .version import __version__


def load(path, **kwargs):
    """An artifact written by `graphcache optimize -o PATH` (or `artifact.save_artifact`), ready
    for `graphcache.sample`: a CachedModel (eager/compile) or an ExportedModel (aoti/onnx/tensorrt)."""
    from .artifact import load_artifact

    return load_artifact(path, **kwargs)


def load_model(*args, **kwargs):
    from .io import load_model as _load

    return _load(*args, **kwargs)


__all__ = ["CachedModel", "GraphcacheError", "__version__", "capture", "disable", "enable", "load", "load_model",
           "optimize", "sample"]

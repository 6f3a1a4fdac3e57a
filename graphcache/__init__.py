"""graphcache: compile feature caching into Diffusion Transformers."""

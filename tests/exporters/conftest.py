"""Session-wide fixtures of the backend tests: built once, shared by test_aoti/test_compile/test_onnx.

`dit_s`: the DiT-S/2 shape where it matters to a backend — hidden 384, 6 heads, 32x32x4 latents
(256 tokens), 1000 classes, random N(0, 0.02) weights (`init_random_`, seed 0, as
`builtin:dit-s2-random`) — but 2 blocks instead of 12. Every method's schedule has the same
variants at depth 2 as at depth 12 (the same kinds in every block: a variant's blocks are all
full, all partial, all reuse, ...; ClusCa's cluster-initialising full step included), so each
block's graph, its shapes and the exporters' work per block are DiT-S/2's, at a sixth of the
AOTInductor/Inductor/ONNX compile time.
(test_dit_s_depth.py checks the claim.)

`eager_run(name, steps, options)`: `run_helpers.run` of eager graphcache on `dit_s`, memoised for
the session: the backends compare against the same reference run.

`dit_s_prior(steps)`: an EOC prior of `dit_s` for that many DDIM steps (1 + 1 samples, no
guidance), made once per step count: the backends run FORA with EOC's correction
(run_helpers.eoc_options).
"""

from __future__ import annotations

import pytest

import graphcache
from graphcache.models.dit import DiT, dit_config, init_random_
from run_helpers import DIT_S_DEPTH, run


@pytest.fixture(scope="session")
def dit_s():
    config = dit_config("DiT-S/2", input_size=32, in_channels=4, num_classes=1000, depth=DIT_S_DEPTH)
    return init_random_(DiT(config), seed=0).eval()


@pytest.fixture(scope="session")
def dit_s_prior(dit_s, tmp_path_factory):
    from graphcache.calibration import calibrate

    priors = {}

    def get(steps):
        if steps not in priors:
            priors[steps] = tmp_path_factory.mktemp("eoc") / f"dit-s-{steps}.safetensors"
            calibrate(dit_s, steps, samples=1, held_out=1, cfg_scale=None).save(priors[steps])
        return priors[steps]

    return get


@pytest.fixture(scope="session")
def eager_run(dit_s):
    runs = {}

    def get(name, steps, options=None):
        options = dict(options or {})
        key = (name, steps, tuple(sorted(options.items())))
        if key not in runs:
            runs[key] = run(graphcache.optimize(dit_s, name, steps, **options), steps=steps)
        latents, outputs, rng = runs[key]
        return latents.clone(), outputs.clone(), rng.clone()

    return get

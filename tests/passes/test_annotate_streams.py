"""AnnotateBlocksPass on MMDiT and video DiTs (diffusers' FLUX, SD3, HunyuanVideo, Wan; small
random configs from tests/diffusers_models.py): the streams each block carries, the branches
found per stream, where streams join, what is left out and why.

FLUX and HunyuanVideo: double-stream blocks (image and text streams, one joint attention) then
single-stream blocks over the concatenated tokens, which split the stream at their end and
concatenate it again at the start of the next. SD3: joint blocks, the last one context_pre_only
(no text branches). Wan: one stream whose residual adds are computed in float32 and cast back.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch

from graphcache import ir
from graphcache.capture import capture
from graphcache.passes.annotate_blocks import AnnotateBlocksPass

import diffusers_models as dm

IMAGE_TOKENS, TEXT_TOKENS = 16, 5


@functools.cache  # one capture per model for the whole file
def _capture(name):
    model = getattr(dm, f"{name}_transformer")()
    gm = capture(model, kwargs=getattr(dm, f"{name}_inputs")())
    annotate = AnnotateBlocksPass()
    annotate(gm)  # again, for its counters: annotation reads nothing it wrote
    return gm, annotate.counters


@pytest.fixture(scope="module", params=["flux", "sd3", "hunyuan_video", "wan"])
def captured(request):
    return request.param, *_capture(request.param)


def layout(structure):
    """Per block, the (stream, kind) of each branch, in graph order."""
    return [[(br.stream, br.kind) for br in b.branches] for b in structure.blocks]


DOUBLE = [(ir.IMAGE, ir.ATTENTION), (ir.IMAGE, ir.MLP), (ir.TEXT, ir.ATTENTION), (ir.TEXT, ir.MLP)]
SINGLE = [(ir.JOINT, ir.PARALLEL)]
EXPECTED = {
    "flux": [DOUBLE, DOUBLE, SINGLE, SINGLE],
    # the text stream's attention adds before the image MLP in HunyuanVideo's double blocks
    "hunyuan_video": [[DOUBLE[0], DOUBLE[2], DOUBLE[1], DOUBLE[3]]] * 2 + [SINGLE, SINGLE],
    "sd3": [DOUBLE, DOUBLE[:2]],  # the last block is context_pre_only: it has no text branches
    "wan": [[(ir.IMAGE, ir.ATTENTION), (ir.IMAGE, ir.CROSS_ATTENTION), (ir.IMAGE, ir.MLP)]] * 2,
}


def test_branches_per_stream(captured):
    name, gm, counters = captured
    s = ir.structure_of(gm)
    assert layout(s) == EXPECTED[name]
    branches = s.branches
    assert len({br.name for br in branches}) == len(branches)
    assert counters["block"] == s.depth
    for stream in (ir.TEXT, ir.JOINT):
        assert counters[f"branch.{stream}"] == sum(br.stream == stream for br in branches)
    kinds = Counter(br.kind for br in branches)
    assert all(counters[f"branch.{k}"] == n for k, n in kinds.items())
    text = [br for br in branches if br.stream == ir.TEXT]
    assert all(br.name == f"b{br.block}_text_{br.kind}" for br in text)
    # every branch is gated by its adaLN modulation, but Wan's cross-attention: a plain residual
    assert [br.gate is None for br in branches] == [br.kind == ir.CROSS_ATTENTION for br in branches]


def test_streams_and_their_tokens(captured):
    name, gm, _ = captured
    s = ir.structure_of(gm)
    tokens = {st.name: st.num_tokens for st in s.streams}
    image = IMAGE_TOKENS  # an 8x8 latent in 2x2 patches (FLUX: packed by the pipeline), one frame
    expected = {ir.IMAGE: image}
    if name != "wan":
        expected[ir.TEXT] = TEXT_TOKENS
    if name in ("flux", "hunyuan_video"):
        expected[ir.JOINT] = IMAGE_TOKENS + TEXT_TOKENS
    assert tokens == expected and s.num_tokens == image
    assert s.multi_stream == (name != "wan")
    nodes = ir.nodes_by_name(gm.graph)
    # each branch reads its own stream: its stream_in has that stream's token count
    for br in s.branches:
        assert ir.tensor_shape(nodes[br.stream_in])[1] == tokens[br.stream]
    # the prediction is read from the last stream: the joint one where there is one
    last = s.streams[-1] if name in ("flux", "hunyuan_video") else s.streams[0]
    assert s.stream_end == last.end


def test_single_stream_blocks_are_one_joint_stream():
    """The joint stream starts where the last double block's image and text streams are joined,
    and runs on through every single block's split and re-concatenation."""
    gm, _ = _capture("flux")
    s = ir.structure_of(gm)
    nodes = ir.nodes_by_name(gm.graph)
    streams = {st.name: st for st in s.streams}
    join = nodes[streams[ir.JOINT].start]
    assert join.target is torch.ops.aten.cat.default
    assert {a.name for a in join.args[0]} == {streams[ir.IMAGE].end, streams[ir.TEXT].end}
    single = [b for b in s.blocks if b.branches[0].stream == ir.JOINT]
    assert [b.stream_in for b in single[1:]] != [b.stream_out for b in single[:-1]]  # a cat of slices between
    assert len(single) == 2 and streams[ir.JOINT].end == single[-1].stream_out
    # the single block's one branch holds both its attention and its MLP (proj_mlp), side by side
    work = {ir.layer_path(nodes[n]) for n in single[0].branches[0].work}
    assert {"single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"} <= work


def test_conditioning_residuals_are_reported_not_cached(captured):
    """HunyuanVideo's token refiner is a residual stack over the text alone: conditioning, said in
    one line, and no block of it."""
    name, gm, _ = captured
    s = ir.structure_of(gm)
    if name == "hunyuan_video":
        assert len(s.unclassified) == 1
        assert "token_refiner" in s.unclassified[0] and "do not depend on the latent" in s.unclassified[0]
        assert not any("refiner" in b.module for b in s.blocks)
    else:
        assert s.unclassified == []


def test_wan_stream_followed_through_casts():
    gm, _ = _capture("wan")
    s = ir.structure_of(gm)
    nodes = ir.nodes_by_name(gm.graph)
    # block 1 reads block 0's output through the float32 casts Wan wraps its residual adds in
    node = nodes[s.blocks[1].stream_in]
    hops = 0
    while node.name != s.blocks[0].stream_out:
        assert ir.passes_on(node), node.format_node()
        node, hops = node.args[0], hops + 1
    assert hops > 0

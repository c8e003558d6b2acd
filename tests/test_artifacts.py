"""Artifacts: fp32 and int8 programs saved, reloaded in a fresh process, measured, and refused when bad."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from lightning_hybridcomp.artifacts import (
    ArtifactMetadata,
    compile_artifact,
    load_artifact,
    save_artifact,
)
from lightning_hybridcomp.models import ImageClassifier, build_backbone
from lightning_hybridcomp.profiling import serialized_size
from lightning_hybridcomp.programs import config_values, make_exported_train_eval_
from tests._helpers import relative_distance
from tests._reference import reference_macs

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The reference CNN in fp32 and as a converted PT2E int8 program, both saved."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    from lightning_hybridcomp.callbacks.qat_backends import PT2EBackend

    root = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    fp32 = build_backbone("small_cnn", 10, 1, width=32)
    calibration = torch.randn(64, *SHAPE)
    with torch.no_grad():
        fp32.train()(calibration)  # non-trivial BatchNorm statistics
    fp32.eval()

    # The raw torchao flow a user could run by hand: export, prepare, observe, convert.
    batch = torch.export.Dim("batch")
    graph = torch.export.export(
        copy.deepcopy(fp32).train(), (calibration[:2],), dynamic_shapes=({0: batch},)
    ).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=True))
    prepared = prepare_qat_pt2e(graph, quantizer)
    with torch.no_grad():
        prepared(calibration)
    int8 = PT2EBackend().convert(prepared)

    x = torch.randn(37, *SHAPE)
    with torch.no_grad():
        fp32_out, int8_out = fp32(x), int8(x)
    fp32_meta = save_artifact(fp32, root / "fp32.pt2", calibration[:4], steps=("fp32",), extra={"seed": 0})
    int8_meta = save_artifact(
        int8, root / "int8.pt2", calibration[:1], steps=("qat:x86_pt2e",), architecture="SmallCNN"
    )
    return SimpleNamespace(
        root=root,
        fp32=fp32,
        int8=int8,
        x=x,
        fp32_out=fp32_out,
        int8_out=int8_out,
        fp32_meta=fp32_meta,
        int8_meta=int8_meta,
    )


_FRESH_PROCESS = textwrap.dedent(
    """
    import pickle, sys, torch
    _load = torch.load

    def guarded_load(*args, **kwargs):
        if kwargs.get("weights_only") is False:
            raise AssertionError("an artifact load tried to unpickle arbitrary objects")
        return _load(*args, **kwargs)

    class NoUnpickler(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            raise AssertionError("pickle.Unpickler used")

    torch.load = guarded_load
    pickle.Unpickler = NoUnpickler
    pickle.load = pickle.loads = NoUnpickler

    from lightning_hybridcomp.artifacts import load_artifact

    root, = sys.argv[1:]
    x = _load(root + "/x.pt", weights_only=True)
    outputs = {}
    for name in ("fp32", "int8"):
        art = load_artifact(root + "/" + name + ".pt2")
        with torch.no_grad():
            outputs[name] = art.module(x)
        outputs[name + "_steps"] = list(art.metadata.steps)
    assert not any(m.startswith(("tests", "test_")) for m in sys.modules), "training code was imported"
    torch.save(outputs, root + "/fresh.pt")
    """
)


def test_round_trip_in_a_fresh_process_without_training_code_or_pickle(models: SimpleNamespace) -> None:
    torch.save(models.x, models.root / "x.pt")
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, str(models.root)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = torch.load(models.root / "fresh.pt", weights_only=True)
    torch.testing.assert_close(fresh["fp32"], models.fp32_out)
    torch.testing.assert_close(fresh["int8"], models.int8_out)
    assert fresh["int8_steps"] == ["qat:x86_pt2e"]


def test_fp32_metadata(models: SimpleNamespace) -> None:
    meta = models.fp32_meta
    assert (meta.format_version, meta.architecture, meta.input_shape) == (1, "SmallCNN", SHAPE)
    assert (meta.num_classes, meta.dtype, meta.steps, meta.extra["seed"]) == (10, "float32", ("fp32",), 0)
    # Parameters of the network, BatchNorm affine included, running statistics not.
    assert meta.params == sum(p.numel() for p in models.fp32.parameters())
    assert meta.extra["ops"]["conv2d"] == 4 and meta.extra["ops"]["linear"] == 1
    assert meta.size_bytes == (models.root / "fp32.pt2").stat().st_size
    assert meta.input_dtype == "float32"
    loaded = load_artifact(models.root / "fp32.pt2")
    assert loaded.metadata == meta
    assert ArtifactMetadata.from_json(meta.to_json()) == meta


def test_int8_metadata_and_size(models: SimpleNamespace) -> None:
    meta = models.int8_meta
    assert (meta.dtype, meta.architecture, meta.macs) == ("int8", "SmallCNN", models.fp32_meta.macs)
    # BatchNorm folds away: each BN weight disappears, its bias becomes the (bias-free) conv's bias.
    bn_weights = sum(m.weight.numel() for m in models.fp32.modules() if isinstance(m, nn.BatchNorm2d))
    assert meta.params == models.fp32_meta.params - bn_weights
    assert meta.size_bytes == (models.root / "int8.pt2").stat().st_size
    assert meta.size_bytes <= 0.35 * serialized_size(models.fp32)
    assert meta.size_bytes < 0.4 * models.fp32_meta.size_bytes


def test_artifact_macs_match_the_layer_by_layer_reference(tmp_path: Path) -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, bias=False),
        nn.Conv2d(6, 4, 3, stride=2, groups=2, bias=False),
        nn.Flatten(),
        nn.Linear(16, 5, bias=False),
    ).eval()
    meta = save_artifact(net, tmp_path / "bare.pt2", torch.randn(3, *SHAPE))
    macs = reference_macs(net, torch.randn(1, *SHAPE))
    assert meta.macs == macs == 6 * 9 * 36 + 4 * 4 * 27 + 16 * 5


def test_loaded_int8_program_takes_any_batch_and_switches_modes(models: SimpleNamespace) -> None:
    loaded = load_artifact(models.root / "int8.pt2")
    module = loaded.module
    assert module.eval() is module and not module.training
    with torch.no_grad():
        for size in (1, 3, 64):
            assert module(torch.randn(size, *SHAPE)).shape == (size, 10)
        torch.testing.assert_close(module(models.x), models.int8_out)
    assert module.train() is module and module.training
    assert isinstance(loaded.program, torch.export.ExportedProgram)


def test_compiled_int8_artifact_matches_eager(models: SimpleNamespace) -> None:
    module = load_artifact(models.root / "int8.pt2").module
    compiled = compile_artifact(module)
    out = compiled(models.x)
    assert not out.requires_grad and compiled(models.x[:5]).shape == (5, 10)  # a new batch size recompiles
    with pytest.raises(ValueError, match="expects a float32 tensor"):
        compiled(models.x.double())  # the input check survives compilation
    # Inductor's int8 kernels round slightly differently from the reference q/dq ops.
    assert relative_distance(out, models.int8_out) < 0.02
    assert float((out.argmax(1) == models.int8_out.argmax(1)).float().mean()) >= 0.9
    # They are oneDNN's int8 kernels: without torchao's lowerings, inductor runs fp32 convolutions instead.
    with torch.profiler.profile() as profile:
        compiled(models.x)
    ops = {event.name for event in profile.events()}
    assert {"onednn::qconv_pointwise", "onednn::qlinear_pointwise"} <= ops, sorted(ops)
    assert not any("_convolution" in op for op in ops), sorted(ops)


def test_config_values_are_restored_after_the_block_and_kept_from_other_threads() -> None:
    import threading

    import torch._inductor.config as inductor_config

    before = inductor_config.freezing
    seen_elsewhere = []
    with pytest.raises(RuntimeError, match="inside"):
        with config_values(inductor_config, freezing=not before):
            assert inductor_config.freezing is (not before)
            thread = threading.Thread(target=lambda: seen_elsewhere.append(inductor_config.freezing))
            thread.start()
            thread.join()
            raise RuntimeError("inside")
    assert inductor_config.freezing is before and seen_elsewhere == [before]


def test_compile_artifact_takes_a_plain_exported_module() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)
    ).eval()
    x = torch.randn(3, *SHAPE)
    graph = torch.export.export(net, (x,)).module()
    with pytest.raises(NotImplementedError):
        graph.eval()  # what torch does with a plain exported module
    compiled = compile_artifact(graph, dynamic=False)
    torch.testing.assert_close(compiled(x), net(x))


def test_exported_modules_switch_modes_without_losing_dropout_p() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Dropout(0.3), nn.Linear(144, 2)
    )
    batch = torch.export.Dim("batch")
    graph = torch.export.export(net.train(), (torch.randn(4, *SHAPE),), dynamic_shapes=({0: batch},)).module()
    make_exported_train_eval_(graph)

    def mode_args() -> list[tuple[object, ...]]:
        return [n.args[1:] for n in graph.graph.nodes if "dropout" in str(n.target)] + [
            n.args[5:6] for n in graph.graph.nodes if "batch_norm" in str(n.target)
        ]

    graph.eval()
    assert mode_args() == [(0.3, False), (False,)]
    # Lightning restores modes by assignment; the very next call must already run the training graph.
    graph.training = True
    running_mean = next(b for n, b in graph.named_buffers() if n.endswith("running_mean")).clone()
    graph(torch.randn(4, *SHAPE) + 3.0)
    assert mode_args() == [(0.3, True), (True,)]
    assert not torch.equal(
        running_mean, next(b for n, b in graph.named_buffers() if n.endswith("running_mean"))
    )


# --------------------------------------------------------------------------- bad input


def _rewrite(
    src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None], add: dict[str, bytes] | None = None
) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            data = edit(info.filename.split("/", 1)[1], zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
        for name, data in (add or {}).items():
            zout.writestr(f"{root}/{name}", data)
    return dst


def _append_raw(src: Path, dst: Path, name: str, data: bytes) -> Path:
    dst.write_bytes(src.read_bytes())
    with zipfile.ZipFile(dst, "a") as archive:
        archive.writestr(name, data)
    return dst


def _edit_json(member: str, change: Callable[[dict], None]) -> Callable[[str, bytes], bytes | None]:
    def edit(name: str, data: bytes) -> bytes | None:
        if name != member:
            return data
        content = json.loads(data)
        change(content)
        return json.dumps(content).encode()

    return edit


def _set_pickle(config: dict) -> None:
    next(iter(config["config"].values()))["use_pickle"] = True


def _set_format(meta: dict) -> None:
    meta["format_version"] = 99


def _unsafe_target(graph: dict) -> None:
    graph["graph_module"]["graph"]["nodes"][0]["target"] = "torch.load"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda src, dst: dst, "does not exist"),
        (
            lambda src, dst: dst.write_bytes(src.read_bytes()[: len(src.read_bytes()) // 2]) and dst,
            "truncated",
        ),
        (lambda src, dst: dst.write_bytes(bytes(range(256)) * 40) and dst, "not a readable archive"),
        (
            lambda src, dst: torch.save({"state_dict": {"w": torch.ones(2)}}, dst) or dst,
            "no hybridcomp.json inside",
        ),
        (
            lambda src, dst: _rewrite(
                src, dst, _edit_json("data/weights/model_weights_config.json", _set_pickle)
            ),
            "stores pickled objects",
        ),
        (
            lambda src, dst: _rewrite(
                src, dst, lambda n, d: b"\x80\x04N." if n == "data/sample_inputs/model.pt" else d
            ),
            "stores pickled objects",
        ),
        (
            lambda src, dst: _rewrite(src, dst, lambda n, d: d, add={"data/aotinductor/model/x.so": b"ELF"}),
            "contains members an artifact never has",
        ),
        (
            lambda src, dst: _rewrite(src, dst, _edit_json("models/model.json", _unsafe_target)),
            "non-operator functions",
        ),
        (
            lambda src, dst: _rewrite(src, dst, _edit_json("extra/hybridcomp.json", _set_format)),
            "Upgrade the package",
        ),
        (
            lambda src, dst: _rewrite(src, dst, lambda n, d: b"{not json" if n == "models/model.json" else d),
            "corrupt or truncated artifact",
        ),
        (lambda src, dst: _append_raw(src, dst, "other/x", b"1"), "unexpected archive layout"),
        (
            lambda src, dst: _rewrite(src, dst, lambda n, d: None if n == "data/weights/weight_0" else d),
            "Could not load the artifact",
        ),
    ],
    ids=[
        "missing",
        "truncated",
        "random-bytes",
        "torch-save-file",
        "pickled-weight",
        "pickled-inputs",
        "extra-binary",
        "unsafe-target",
        "future-format",
        "bad-json",
        "two-roots",
        "missing-weight",
    ],
)
def test_bad_files_are_refused_with_the_path(
    models: SimpleNamespace, tmp_path: Path, make: Callable[[Path, Path], Path], match: str
) -> None:
    path = make(models.root / "int8.pt2", tmp_path / "bad.pt2")
    with pytest.raises(ValueError, match=match) as info:
        load_artifact(path)
    assert "bad.pt2" in str(info.value)


# --------------------------------------------------------------------------- inputs of a loaded artifact


@pytest.mark.parametrize("name", ["fp32", "int8"])
@pytest.mark.parametrize(
    ("make", "got", "hint"),
    [
        (
            lambda: torch.randn(2, *SHAPE, dtype=torch.float64),
            "a float64 tensor of shape (2, 1, 8, 8)",
            "x.to(",
        ),
        (
            lambda: torch.zeros(2, *SHAPE, dtype=torch.uint8),
            "a uint8 tensor of shape (2, 1, 8, 8)",
            "normalised",
        ),
        (
            lambda: torch.randn(2, 1, 9, 9),
            "a float32 tensor of shape (2, 1, 9, 9)",
            "Only the batch dimension",
        ),
        (lambda: torch.randn(*SHAPE), "a float32 tensor of shape (1, 8, 8)", "x.unsqueeze(0)"),
    ],
    ids=["float64", "uint8", "other-size", "no-batch"],
)
def test_loaded_module_names_the_expected_input(
    models: SimpleNamespace, name: str, make: Callable[[], Tensor], got: str, hint: str
) -> None:
    """What torch.export's guards report as a bare AssertionError/RuntimeError is one clear ValueError."""
    module = load_artifact(models.root / f"{name}.pt2").module
    with pytest.raises(ValueError) as info:
        module(make())
    message = str(info.value)
    assert f"{name}.pt2' (SmallCNN) expects a float32 tensor of shape (batch, 1, 8, 8), got {got}." in message
    assert hint in message


def test_loaded_module_takes_exactly_one_tensor(models: SimpleNamespace) -> None:
    module = load_artifact(models.root / "fp32.pt2").module
    with pytest.raises(
        TypeError, match=r"takes one input, a float32 tensor of shape \(batch, 1, 8, 8\); got Tensor, Tensor"
    ):
        module(models.x, models.x)
    with pytest.raises(TypeError, match="got list"):
        module([models.x])


def test_input_dtype_of_an_artifact_without_it_comes_from_the_program(
    models: SimpleNamespace, tmp_path: Path
) -> None:
    """Artifacts written before ``input_dtype`` was recorded still load, and still check their input."""
    path = _rewrite(
        models.root / "int8.pt2", tmp_path / "old.pt2", _edit_json("extra/hybridcomp.json", _drop_input_dtype)
    )
    loaded = load_artifact(path)
    assert loaded.metadata.input_dtype == "float32"
    with pytest.raises(ValueError, match="got a float64 tensor"):
        loaded.module(models.x.double())


def _drop_input_dtype(meta: dict) -> None:
    del meta["input_dtype"]


# --------------------------------------------------------------------------- saving


def test_save_defaults_to_the_example_input_array(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(width=4, image_size=12).eval()
    meta = save_artifact(model, tmp_path / "model.pt2")
    assert (meta.input_shape, meta.input_dtype, meta.architecture) == (
        (1, 12, 12),
        "float32",
        "ImageClassifier",
    )
    x = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(load_artifact(tmp_path / "model.pt2").module(x), model(x))


class _TupleExample(nn.Linear):
    example_input_array = (torch.randn(2, 3), torch.randn(2, 3))


class _OneItemTuple(nn.Linear):
    example_input_array = (torch.randn(2, 3),)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Linear(3, 2), r"Linear has no `example_input_array` to default to\. Pass one batch"),
        (
            _TupleExample(3, 2),
            r"`_TupleExample\.example_input_array` to be one input tensor, got a tuple of 2",
        ),
    ],
    ids=["none", "tuple"],
)
def test_save_without_example_inputs_says_what_to_pass(tmp_path: Path, model: nn.Module, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        save_artifact(model, tmp_path / "a.pt2")
    assert not (tmp_path / "a.pt2").exists()


def test_a_one_item_tuple_example_is_its_tensor(tmp_path: Path) -> None:
    model = _OneItemTuple(3, 2)
    meta = save_artifact(model, tmp_path / "a.pt2")
    assert tuple(meta.input_shape) == (3,)
    x = torch.randn(4, 3)
    assert torch.equal(load_artifact(tmp_path / "a.pt2").module(x), model(x))


def test_artifact_files_end_in_pt2(models: SimpleNamespace, tmp_path: Path) -> None:
    """One rule for saving, loading and the MoE's dispatch on file names: the suffix is ``.pt2``."""
    with pytest.raises(
        ValueError, match=r"Expected `path` to end in '\.pt2'.*got '.*model\.onnx'.*name it 'model\.pt2'"
    ):
        save_artifact(nn.Linear(3, 2), tmp_path / "model.onnx", torch.randn(2, 3))
    assert not (tmp_path / "model.onnx").exists()
    renamed = tmp_path / "expert.onnx"
    renamed.write_bytes((models.root / "fp32.pt2").read_bytes())  # a real artifact under another name
    with pytest.raises(ValueError, match=r"to end in '\.pt2'.*expert\.onnx"):
        load_artifact(renamed)


def test_save_argument_errors(tmp_path: Path) -> None:
    net = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"Expected `model` to be an nn\.Module, got str"):
        save_artifact("net", tmp_path / "a.pt2", torch.randn(2, 3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Expected `example_inputs` to be a tensor with a batch dimension"):
        save_artifact(net, tmp_path / "a.pt2", [1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Expected `extra` to be JSON-able"):
        save_artifact(net, tmp_path / "a.pt2", torch.randn(2, 3), extra={"when": object()})
    with pytest.raises(TypeError, match=r"Expected `module` to be an nn\.Module"):
        compile_artifact(lambda x: x)  # type: ignore[arg-type]
    assert not (tmp_path / "a.pt2").exists()


class _DataDependent(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * 2 if x.sum() > 0 else x


def test_unexportable_model_reports_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Could not export _DataDependent with `torch.export`.*Hint:"):
        save_artifact(_DataDependent(), tmp_path / "a.pt2", torch.randn(2, 3))

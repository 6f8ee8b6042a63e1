"""The one checkpoint loader: weights_only=True always, nets only from the registry, one-line errors."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from bgremover import checkpoint
from bgremover.errors import UserError

TINY = {"down_blocks": [1], "up_blocks": [1], "bottleneck_layers": 1, "growth_rate": 4, "first_conv_channels": 8}


def _save(path: Path, net_config: dict, state: dict) -> Path:
    torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()},
                "bgremover": {"net_config": net_config, "classes": ["a", "b"], "mean": [0, 0, 0], "std": [1, 1, 1]}},
               path)
    return path


# the class as the model configs name it, and by its module (a config may spell it so: Hydra builds either)
@pytest.mark.parametrize("target", ["bgremover.nets.FCDenseNet", "bgremover.nets.tiramisu.FCDenseNet"])
def test_registered_net_round_trips(tmp_path, target):
    from bgremover.nets import FCDenseNet

    net = FCDenseNet(num_classes=2, **TINY)
    path = _save(tmp_path / "ok.ckpt", {"_target_": target, "num_classes": 2, **TINY}, net.state_dict())
    loaded, meta, _ = checkpoint.load_net(path)
    assert isinstance(loaded, FCDenseNet) and not loaded.training and meta["classes"] == ["a", "b"]
    for (k, a), b in zip(net.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_a_target_outside_the_registry_is_never_built(tmp_path):
    conv = torch.nn.Conv2d(3, 2, 1)
    path = _save(tmp_path / "odd.ckpt", {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 2,
                                         "kernel_size": 1}, conv.state_dict())
    with pytest.raises(UserError, match="unknown net 'torch.nn.Conv2d'"):
        checkpoint.load_net(path)


def test_a_checkpoint_lacking_what_inference_needs_is_named(tmp_path):
    """Without its normalisation the net would run on unnormalised pixels and cut out garbage, without a word."""
    from bgremover.nets import FCDenseNet

    net = FCDenseNet(num_classes=2, **TINY)
    path = _save(tmp_path / "old.ckpt", {"_target_": "bgremover.nets.FCDenseNet", "num_classes": 2, **TINY},
                 net.state_dict())
    ckpt = torch.load(path, weights_only=True)
    del ckpt["bgremover"]["mean"], ckpt["bgremover"]["std"]
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=f"^bgremover checkpoint {path} lacks mean, std$"):
        checkpoint.load_net(path)
    del ckpt["bgremover"]
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="^not a bgremover checkpoint \\(no 'bgremover' entry\\): "):
        checkpoint.load_net(path)


class _Evil:
    def __reduce__(self):
        return (Path("/tmp/bgremover-pwned").touch, ())


def test_a_pickle_that_runs_code_is_refused_not_run(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"x": _Evil()}, path, pickle_module=pickle)
    Path("/tmp/bgremover-pwned").unlink(missing_ok=True)
    with pytest.raises(UserError) as info:
        checkpoint.read(path)
    assert not Path("/tmp/bgremover-pwned").exists()
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"# README\n", b"", b"PK\x03\x04 truncated zip"])
def test_not_a_checkpoint_is_one_line(tmp_path, content):
    path = tmp_path / "file.ckpt"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        checkpoint.read(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and "weights_only" not in message


def test_init_from_copies_what_fits_and_reports_the_rest(tmp_path):
    from bgremover.lit import SegmentationModule
    from bgremover.nets import FCDenseNet

    source = FCDenseNet(num_classes=11, **TINY)
    path = _save(tmp_path / "src.ckpt", {"_target_": "bgremover.nets.FCDenseNet", **TINY}, source.state_dict())
    target = SegmentationModule(net=FCDenseNet(num_classes=2, **TINY), optimizer=None, class_names=["bg", "fg"])
    loaded, skipped = checkpoint.init_from(target, path)
    assert skipped == ["final_conv.bias", "final_conv.weight"]  # the classifier: 2 classes, not 11
    assert torch.equal(target.net.first_conv.weight, source.first_conv.weight)
    assert "first_conv.weight" in loaded


@pytest.mark.parametrize("other", [{"down_blocks": [2], "up_blocks": [2]}, {"growth_rate": 6}])
def test_init_from_another_architecture_is_refused_not_partly_loaded(tmp_path, other):
    """FC-DenseNet56's stage-1 checkpoint given to the FC-DenseNet103 fine-tune loaded the 56 tensors whose names
    and shapes happened to fit (the stem, some BatchNorms) and trained the other 630 from random weights: a
    "fine-tune" from scratch, with one log line. Another net than the run's is refused, the net left untouched."""
    from bgremover.lit import SegmentationModule
    from bgremover.nets import FCDenseNet

    source = FCDenseNet(num_classes=11, **{**TINY, **other})
    path = _save(tmp_path / "stage1.ckpt", {"_target_": "bgremover.nets.FCDenseNet", **TINY, **other},
                 source.state_dict())
    target = SegmentationModule(net=FCDenseNet(num_classes=11, **TINY), optimizer=None, net_name="tiny")
    before = {k: v.clone() for k, v in target.net.state_dict().items()}
    with pytest.raises(UserError) as info:
        checkpoint.init_from(target, path)
    message = str(info.value)
    assert message.startswith(f"ckpt_init={path} holds bgremover.nets.FCDenseNet weights, which do not fit tiny: ")
    assert "\n" not in message
    assert all(torch.equal(before[k], v) for k, v in target.net.state_dict().items())


def test_a_folder_given_as_a_checkpoint_is_named_as_such(tmp_path):
    """`make eval CKPT=<a run folder>` said "checkpoint not found" of a folder that is there."""
    from omegaconf import OmegaConf

    from bgremover.checks import validate_eval

    with pytest.raises(UserError, match=rf"^{tmp_path} is a folder, not a checkpoint: name a .ckpt or .pt file in it"):
        checkpoint.read(tmp_path)
    with pytest.raises(UserError, match=r"^checkpoint not found: "):
        checkpoint.read(tmp_path / "nope.ckpt")
    cfg = OmegaConf.create({"split": "test", "ckpt_path": str(tmp_path), "data": {}, "seed": 42})
    with pytest.raises(UserError, match=r"is a folder, not a checkpoint"):
        validate_eval(cfg)


def test_a_checkpoint_missing_or_adding_net_weights_is_refused_not_half_loaded(tmp_path):
    """The one loader loads strictly: a state_dict short of a BatchNorm's running variance (a hand-edited or
    cut-down checkpoint) loaded non-strictly would leave that layer at its init of 1s, and eval, export and the
    remover would all cut out with it, without a word."""
    from bgremover.nets import FCDenseNet

    state = FCDenseNet(num_classes=2, **TINY).state_dict()
    config = {"_target_": "bgremover.nets.FCDenseNet", "num_classes": 2, **TINY}
    short = {k: v for k, v in state.items() if k != "trans_down.0.norm.running_var"}
    with pytest.raises(UserError, match=r"^checkpoint weights do not fit bgremover.nets.FCDenseNet: .*trans_down"):
        checkpoint.load_net(_save(tmp_path / "short.ckpt", config, short))
    extra = {**state, "head.weight": torch.zeros(2, 2)}
    with pytest.raises(UserError, match=r"^checkpoint weights do not fit bgremover.nets.FCDenseNet: .*head.weight"):
        checkpoint.load_net(_save(tmp_path / "extra.ckpt", config, extra))


def test_weights_only_copy_halves_matrices_and_keeps_1d_tensors_exact(tmp_path):
    """save_weights (models/*.pt, `make ship`): conv kernels in float16, every 1-D tensor (BatchNorm statistics,
    biases) as trained: a running variance near 0 rounded to float16 moves the logits most."""
    from conftest import randomise_bn

    from bgremover.nets import FCDenseNet

    net = FCDenseNet(num_classes=2, **TINY)
    randomise_bn(net)
    with torch.no_grad():
        net.final_conv.bias.copy_(torch.tensor([1e-4 + 1e-8, -3.3333333]))  # not float16 numbers
    path = _save(tmp_path / "run.ckpt", {"_target_": "bgremover.nets.FCDenseNet", "num_classes": 2, **TINY},
                 net.state_dict())
    out = checkpoint.save_weights(path, tmp_path / "w.pt")
    saved = torch.load(out, weights_only=True)["state_dict"]
    for name, value in net.state_dict().items():
        got = saved[f"net.{name}"]
        if value.is_floating_point() and value.dim() > 1:
            assert got.dtype == torch.float16 and torch.equal(got, value.half()), name
        else:  # 1-D floats and the integer batch counters: bit for bit
            assert got.dtype == value.dtype and torch.equal(got, value), name
    assert saved["net.first_conv.weight"].dtype == torch.float16 and saved["net.final_conv.bias"].dtype == torch.float32
    loaded, _, _ = checkpoint.load_net(out)
    assert loaded.final_conv.bias.dtype == torch.float32
    assert torch.equal(loaded.final_conv.bias, net.final_conv.bias)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net.eval()(x)
        torch.testing.assert_close(loaded(x), ref, rtol=1e-2, atol=1e-2)  # float16 kernels: close, not equal


@pytest.mark.parametrize("config, detail", [
    ({"_target_": "bgremover.nets.FCDenseNet", **TINY, "up_blocks": [1, 1]}, "down_blocks (1,) and up_blocks (1, 1) differ"),
    ({"_target_": "bgremover.nets.FCDenseNet", **TINY, "dense_blocks": "cat"}, "dense_blocks must be one of auto, fused"),
    ({"_target_": "segmentation_models_pytorch.DeepLabV3Plus", "encoder_name": "resnet999"}, "Wrong encoder name `resnet999`"),
])
def test_a_checkpoint_whose_net_config_its_class_refuses_is_one_line(tmp_path, capsys, config, detail):
    """A net_config the net's class refuses (a setting of another bgremover or smp version, an edited file) was a
    ValueError or KeyError traceback from `python -m bgremover.export`, eval and ckpt_init; only a TypeError (an
    unknown keyword) was put in words. Now every refusal is the loader's one line, naming the net and the cause."""
    from bgremover.export import main

    path = _save(tmp_path / "bad.ckpt", config, {"w": torch.zeros(1)})
    target = config["_target_"]
    with pytest.raises(UserError, match=rf"^cannot build {re.escape(target)} from the checkpoint's config: .*{re.escape(detail)}"):
        checkpoint.load_net(path)
    assert main(["--ckpt", str(path), "--out", str(tmp_path / "x.onnx")]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"cannot build {target}" in err and "Traceback" not in err


def test_a_model_trained_on_limited_data_says_so(tmp_path):
    """A run on data.limit_images=4 exported a model whose description said "data CamVid (train)", as if all 367
    train frames had taught it: the limit travels with the provenance and the description names it."""
    import json

    from bgremover import model_format

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = {"global_step": 6, "epoch": 2}
    config = {"data": {"root": "/data/CamVid", "train_split": "train", "limit_images": 4}}
    (run / "summary.json").write_text(json.dumps({"run_dir": str(run), "experiment": "x", "seed": 1,
                                                  "config": config}))
    trained = checkpoint.provenance(run / "checkpoints" / "epoch_002.ckpt", ckpt)
    assert trained["train_limit"] == 4 and trained["data"] == "CamVid" and trained["epochs"] == 3
    meta = {"classes": ["a", "b"], "mean": [0, 0, 0], "std": [1, 1, 1], "size_multiple": 32, "trained": trained}
    said = next(line for line in model_format.describe(meta, (None, None, None)) if line.startswith("trained:"))
    assert "data CamVid (train, at most 4 images: data.limit_images)" in said

    config["data"]["limit_images"] = None  # the whole split: nothing to say
    (run / "summary.json").write_text(json.dumps({"run_dir": str(run), "config": config}))
    trained = checkpoint.provenance(run / "checkpoints" / "epoch_002.ckpt", ckpt)
    assert "train_limit" not in trained
    assert "data CamVid (train);" in model_format.describe({**meta, "trained": trained}, (None, None, None))[-2]


def test_a_fine_tuned_model_names_the_weights_it_started_from(tmp_path):
    """`make remover` fine-tunes the shipped CamVid net (ckpt_init): its model said "data mine; 20 epochs, 60 s of
    training" as if trained from scratch. The init's file name travels with the provenance and the description."""
    import json

    from bgremover import model_format

    run = tmp_path / "run"
    run.mkdir()
    config = {"ckpt_init": "/repo/models/bgremover-camvid.pt", "data": {"root": "/home/me/mine"}}
    (run / "summary.json").write_text(json.dumps({"run_dir": str(run), "wall_time_s": 60.0, "config": config}))
    trained = checkpoint.provenance(run / "best.ckpt", {"global_step": 40, "epoch": 19})
    assert trained["init"] == "bgremover-camvid.pt" and trained["data"] == "mine"
    meta = {"classes": ["a", "b"], "mean": [0, 0, 0], "std": [1, 1, 1], "size_multiple": 32, "trained": trained}
    said = next(line for line in model_format.describe(meta, (None, None, None)) if line.startswith("trained:"))
    assert said == ("trained: run run; data mine; fine-tuned from bgremover-camvid.pt; 20 epochs, 40 steps; "
                    "its run 60 s of training; checkpoint best.ckpt")

    config["ckpt_init"] = None  # from scratch: nothing to say
    (run / "summary.json").write_text(json.dumps({"run_dir": str(run), "config": config}))
    assert "init" not in checkpoint.provenance(run / "best.ckpt", {})


@pytest.mark.parametrize("record", ["from my laptop", {"epochs": "many"}, ["run", 3]])
def test_a_hand_edited_trained_record_is_shown_not_a_traceback(tmp_path, capsys, record):
    """`make model-info` on a model whose optional `trained` record was edited by hand (or written by another tool)
    died in a traceback; the model still loads and cuts out, so its description shows the record as it is."""
    import json

    import onnx

    from bgremover import model_format, predict
    from bgremover.remover import DEFAULT_MODEL

    model = onnx.load(str(DEFAULT_MODEL))
    for prop in model.metadata_props:
        if prop.key == model_format.METADATA_KEY:
            prop.value = json.dumps({**json.loads(prop.value), "trained": record})
    onnx.save(model, str(tmp_path / "edited.onnx"))
    assert predict.main(["--info", "-m", str(tmp_path / "edited.onnx")]) == 0
    out = capsys.readouterr()
    assert f"trained: unreadable record: {json.dumps(record)}" in out.out.splitlines() and out.err == ""


@pytest.mark.parametrize("edit, said", [
    ({"mean": ["a", 0, 0]}, 'mean is ["a", 0, 0], not 3 numbers (RGB)'),
    ({"classes": ["Sky", 2]}, 'classes is ["Sky", 2], not a list of 2 or more class names'),
    ({"test_mIoU": "56.6%"}, 'test_mIoU is "56.6%", not a number'),
    ({"quantization": "yes"}, 'quantization is "yes", not a record'),
    ({"quantization": {"eval": {"int8": {"mIoU": "x"}}}}, 'quantization.eval.int8.mIoU is "x", not a number'),
])
def test_a_model_with_a_mistyped_field_is_refused_in_one_line_naming_it(tmp_path, capsys, edit, said):
    """A model whose metadata another tool (or a hand edit) wrote with a field of the wrong type: make model-info
    died in a traceback (ValueError, AttributeError) and a cut-out in 'unexpected ValueError', neither naming the
    field. Both now say which field of which file is wrong, in one line, exit 1, and write nothing."""
    import json

    import onnx

    from bgremover import model_format, predict
    from bgremover.remover import DEFAULT_MODEL

    model = onnx.load(str(DEFAULT_MODEL))
    for prop in model.metadata_props:
        if prop.key == model_format.METADATA_KEY:
            prop.value = json.dumps({**json.loads(prop.value), **edit})
    edited = tmp_path / "edited.onnx"
    onnx.save(model, str(edited))
    line = f"bgremover-predict: error: bgremover metadata is invalid: {said}: {edited}\n"
    assert predict.main(["--info", "-m", str(edited)]) == 1
    assert capsys.readouterr() == ("", line)
    image = Path(__file__).resolve().parents[1] / "examples" / "0001TP_009180.jpg"
    assert predict.main(["-m", str(edited), str(image), "-o", str(tmp_path / "cut.png")]) == 1
    assert capsys.readouterr().err == line and not (tmp_path / "cut.png").exists()


def test_a_diverged_runs_model_with_a_nan_test_score_still_loads():
    """The field checks refuse what is not a number, not a run's NaN test mIoU (a diverged seed): JSON's NaN."""
    import json

    from bgremover import model_format

    doc = {"format": model_format.FORMAT, "format_version": 1, "classes": ["a", "b"], "mean": [0, 0, 0],
           "std": [1, 1, 1], "size_multiple": 32, "test_mIoU": float("nan")}
    assert model_format.parse(json.dumps(doc))["test_mIoU"] != 0  # NaN
    with pytest.raises(model_format.FormatError, match=r"^bgremover metadata is invalid: mean is \[NaN, 0, 0\]"):
        model_format.parse(json.dumps({**doc, "mean": [float("nan"), 0, 0]}))


def test_the_runs_training_time_is_not_read_as_the_checkpoints(tmp_path):
    """The shipped net is epoch 75 of an 87-epoch, 271 s run: its description read "75 epochs, 3300 steps; 271 s of
    training", as if 271 s had made those 75 epochs. The time is the run's and is said with the run's epochs."""
    import json

    from bgremover import model_format

    (tmp_path / "summary.json").write_text(json.dumps({"epochs": 87, "wall_time_s": 270.7, "hardware": "H100"}))
    trained = checkpoint.provenance(tmp_path / "best.ckpt", {"global_step": 3300, "epoch": 74})
    assert (trained["epochs"], trained["run_epochs"], trained["run_wall_time_s"]) == (75, 87, 270.7)
    meta = {"classes": ["a", "b"], "mean": [0, 0, 0], "std": [1, 1, 1], "size_multiple": 32, "trained": trained}
    said = next(line for line in model_format.describe(meta, (None, None, None)) if line.startswith("trained:"))
    assert said == "trained: 75 epochs, 3300 steps; its run 87 epochs, 271 s of training on H100; checkpoint best.ckpt"


def test_a_sweep_jobs_model_names_its_sweep(tmp_path):
    """A sweep job's folder is its job number (multiruns/<sweep>/3: conf/hydra/default.yaml), and its model said
    "run 3", a name every sweep's fourth job has: the run is named with its sweep folder."""
    import json

    from bgremover import model_format

    job = tmp_path / "logs" / "train" / "multiruns" / "2026-11-28_16-24-29-413961" / "3"
    (job / "checkpoints").mkdir(parents=True)
    (job / "summary.json").write_text(json.dumps({"run_dir": str(job), "experiment": "lr_sweep"}))
    trained = checkpoint.provenance(job / "checkpoints" / "epoch_004.ckpt", {"global_step": 10, "epoch": 4})
    assert trained["run"] == "2026-11-28_16-24-29-413961/3"
    meta = {"classes": ["a", "b"], "mean": [0, 0, 0], "std": [1, 1, 1], "size_multiple": 32, "trained": trained}
    said = next(line for line in model_format.describe(meta, (None, None, None)) if line.startswith("trained:"))
    assert said.startswith("trained: experiment lr_sweep; run 2026-11-28_16-24-29-413961/3; 5 epochs")

    single = tmp_path / "logs" / "train" / "runs" / "2026-11-28_23-34-49-387531"  # a single run: its folder alone
    single.mkdir(parents=True)
    (single / "summary.json").write_text(json.dumps({"run_dir": str(single)}))
    assert checkpoint.provenance(single / "best.ckpt", {})["run"] == "2026-11-28_23-34-49-387531"


def test_a_model_names_the_wandb_run_that_logged_its_training(tmp_path):
    """A model said which run folder made it, on the machine that trained it, but not which W&B run holds its
    curves: the checkpoint's W&B run (id, name, offline or not) and the run's project travel with the provenance."""
    import json

    from bgremover import model_format

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = {"logger": {"wandb": {"project": "bgremover"}}}
    (run / "summary.json").write_text(json.dumps({"run_dir": str(run), "config": config}))
    ckpt = {"global_step": 6, "epoch": 2, "wandb_run_id": "h0koqt26", "wandb_run_name": "tiramisu56-seed42",
            "wandb_run_offline": True}
    trained = checkpoint.provenance(run / "checkpoints" / "epoch_002.ckpt", ckpt)
    assert trained["wandb"] == {"id": "h0koqt26", "name": "tiramisu56-seed42", "offline": True, "project": "bgremover"}
    meta = {"classes": ["a", "b"], "mean": [0, 0, 0], "std": [1, 1, 1], "size_multiple": 32, "trained": trained}
    said = next(line for line in model_format.describe(meta, (None, None, None)) if line.startswith("trained:"))
    assert said == ("trained: run run; 3 epochs, 6 steps; W&B run tiramisu56-seed42 (bgremover/h0koqt26, logged "
                    "offline); checkpoint epoch_002.ckpt")

    del ckpt["wandb_run_id"]  # logger=csv: no W&B run to name
    assert "wandb" not in checkpoint.provenance(run / "checkpoints" / "epoch_002.ckpt", ckpt)


@pytest.mark.parametrize("half, via", [(True, "w.pt (float16 weights)"), (False, "w.pt")])
def test_a_model_from_a_weights_only_copy_says_it_came_through_it(tmp_path, half, via):
    """`make export CKPT=models/bgremover-camvid.pt`: the model named the run's checkpoint alone, though its weights
    are the copy's float16 rounding (and it has no test score of its own): the copy is named, with its precision."""
    from bgremover import model_format
    from bgremover.nets import FCDenseNet

    net = FCDenseNet(num_classes=2, **TINY)
    path = _save(tmp_path / "epoch_002.ckpt", {"_target_": "bgremover.nets.FCDenseNet", "num_classes": 2, **TINY},
                 net.state_dict())
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "global_step": 6, "epoch": 2}, path)
    weights = checkpoint.save_weights(path, tmp_path / "w.pt", half=half)
    trained = checkpoint.provenance(weights, torch.load(weights, weights_only=True))
    assert trained == {"checkpoint": "epoch_002.ckpt", "epochs": 3, "global_step": 6, "via": via}
    meta = {"classes": ["a", "b"], "mean": [0, 0, 0], "std": [1, 1, 1], "size_multiple": 32, "trained": trained}
    said = next(line for line in model_format.describe(meta, (None, None, None)) if line.startswith("trained:"))
    assert said == f"trained: 3 epochs, 6 steps; checkpoint epoch_002.ckpt via {via}"


@pytest.mark.parametrize("edit, said", [
    ({"classes": None}, "is incomplete: no classes"),
    ({"size_multiple": None}, "is incomplete: no size_multiple"),
    ({"std": [0.3, 0.0, 0.3]}, "std is [0.3, 0.0, 0.3], not 3 numbers above 0"),  # the input would be inf
    ({"mean": [0.4, 0.4, 0.4, 0.4]}, "mean is [0.4, 0.4, 0.4, 0.4], not 3 numbers"),
    ({"image_size": 0}, "image_size is 0, not a whole number of pixels from 1"),
    ({"image_size": "512"}, 'image_size is "512", not a whole number of pixels from 1'),
])
def test_the_metadata_contract_refuses_what_inference_cannot_use(edit, said):
    """Each of these ran as far as inference and failed there (a KeyError, a broadcast error) or cut out nothing
    (std 0 divides by zero): parse names the field instead."""
    import json

    from bgremover import model_format

    doc = {"format": model_format.FORMAT, "format_version": 1, "classes": ["a", "b"], "mean": [0, 0, 0],
           "std": [1, 1, 1], "size_multiple": 32}
    assert model_format.parse(json.dumps(doc)) == doc
    edited = {k: v for k, v in {**doc, **edit}.items() if v is not None}
    with pytest.raises(model_format.FormatError) as err:
        model_format.parse(json.dumps(edited))
    assert said in str(err.value)


def test_the_document_keeps_the_trained_scale_and_its_description_flags_a_partial_test():
    """image_size is what the predictor infers at (a folder-trained remover); a test mIoU on part of the split
    is said to be PARTIAL, in points."""
    from bgremover import model_format

    meta = {"classes": ["background", "foreground"], "mean": [0, 0, 0], "std": [1, 1, 1], "size_multiple": 32,
            "image_size": 512.0, "test_mIoU": 0.6543, "test_frames": 12, "test_frames_of": 233}
    doc = model_format.document(meta, exported_at="2026-01-01T00:00:00+00:00", version="test")
    assert doc["image_size"] == 512 and isinstance(doc["image_size"], int)
    lines = model_format.describe(doc, (doc["test_mIoU"], 12, 233))
    assert "test mIoU: 65.4 on 12 of 233 frames (PARTIAL: not the split's)" in lines
    assert "test mIoU: 65.4 on 233 of 233 frames" in model_format.describe(doc, (0.6543, 233, 233))

import os

import pytest
import torch
import torch.distributed as dist
import torchvision

from crossstitch import CrossStitchBackbone, CrossStitchError, StageInfo
from helpers import build, image, randomize_units


def test_models_are_kept_as_given_without_reinitialisation():
    seg, depth = torchvision.models.resnet18(), torchvision.models.resnet18()
    before = seg.layer3[0].conv1.weight.detach().clone()
    model = CrossStitchBackbone({"seg": seg, "depth": depth})
    assert model.backbones["seg"].stages["layer3"] is seg.layer3
    assert torch.equal(model.backbones["seg"].stages["layer3"][0].conv1.weight, before)
    assert model.tasks == ["seg", "depth"]


def test_stages_state_channels_and_reduction():
    assert build("resnet50").stages == [
        StageInfo("layer1", 256, 4),
        StageInfo("layer2", 512, 8),
        StageInfo("layer3", 1024, 16),
        StageInfo("layer4", 2048, 32),
    ]
    vgg = build("vgg11")
    assert [(s.name, s.reduction) for s in vgg.stages] == [
        ("block1", 2),
        ("block2", 4),
        ("block3", 8),
        ("block4", 16),
        ("block5", 32),
    ]
    assert list(vgg.cross_stitch) == ["block1", "block2", "block3", "block4", "block5"]


def test_output_is_last_stage_features_per_task():
    out = build("resnet18", ["seg", "depth", "normals"])(image(batch=3, size=96))
    assert list(out) == ["seg", "depth", "normals"]
    assert all(v.shape == (3, 512, 3, 3) for v in out.values())


def test_classifier_heads_are_dropped():
    model = build("vgg11")
    names = [n for n, _ in model.named_parameters()]
    assert not any("classifier" in n or ".fc." in n for n in names)
    assert not any("fc" in n for n, _ in build("resnet18").named_parameters())


def test_parameters_grow_linearly_with_tasks():
    count = lambda m: sum(p.numel() for p in m.backbones.parameters())  # noqa: E731
    two, four = build(tasks=["a", "b"]), build(tasks=["a", "b", "c", "d"])
    assert count(four) == 2 * count(two)


@pytest.mark.parametrize("granularity", ["channel", "layer"])
def test_gradients_reach_every_parameter(granularity):
    model = build("resnet18", ["a", "b", "c"], granularity=granularity).train()
    randomize_units(model)
    out = model(image())
    sum(v.square().mean() for v in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []


def test_a_ddp_training_step_runs_without_find_unused_parameters(tmp_path):
    init_file = tmp_path / "ddp_init"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(build())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        unit = model.module.cross_stitch["layer1"]
        before = unit.weight.detach().clone()
        for _ in range(2):
            optimizer.zero_grad()
            out = model(image())
            (out["seg"].mean() - out["depth"].mean()).backward()
            optimizer.step()
        assert not torch.equal(unit.weight, before)
    finally:
        dist.destroy_process_group()


def test_task_weights_start_each_backbone_from_its_single_task_model(tmp_path):
    torch.manual_seed(5)
    single = torchvision.models.resnet18(num_classes=21)
    path = tmp_path / "seg.pth"
    torch.save(single.state_dict(), path)
    model = build(task_weights={"seg": str(path)})
    seg_conv = model.backbones["seg"].stem.conv1.weight
    assert torch.equal(seg_conv, single.conv1.weight)
    assert not torch.equal(model.backbones["depth"].stem.conv1.weight, single.conv1.weight)


def test_task_weights_from_another_architecture_are_refused_by_key(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(CrossStitchError, match=r"unexpected keys: layer1\.2"):
        build(task_weights={"depth": str(path)})


def test_weights_file_applies_to_every_task(tmp_path):
    torch.manual_seed(7)
    classifier = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save({"model": classifier.state_dict(), "epoch": 3}, path)
    model = build(weights=path)
    for task in model.tasks:
        assert torch.equal(
            model.backbones[task].stages["layer4"][1].conv2.weight,
            classifier.layer4[1].conv2.weight,
        )


def test_eval_and_train_modes_reach_the_backbones():
    model = build().eval()
    assert not model.backbones["seg"].stem.bn1.training
    model.train()
    assert model.backbones["depth"].stages["layer1"][0].bn1.training


def test_models_of_different_families_are_refused():
    with pytest.raises(CrossStitchError, match="one family"):
        CrossStitchBackbone({"a": torchvision.models.resnet18(), "b": torchvision.models.vgg11()})


def test_models_with_different_shapes_are_refused():
    with pytest.raises(CrossStitchError, match="other stage shapes"):
        CrossStitchBackbone(
            {"a": torchvision.models.resnet18(), "b": torchvision.models.resnet50()}
        )


def test_unsupported_model_class_is_refused():
    with pytest.raises(CrossStitchError, match="no stage adapter for Linear"):
        CrossStitchBackbone({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)})


def test_offline_named_weights_say_where_the_file_goes(tmp_path, monkeypatch):
    from urllib.error import URLError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(CrossStitchError) as info:
        build(weights="IMAGENET1K_V1")
    message = str(info.value)
    assert os.path.join(str(tmp_path), "hub", "checkpoints", "resnet18-") in message
    assert "--weights-file" in message


def test_cached_named_weights_load_without_network(tmp_path, monkeypatch):
    from crossstitch.weights import cached_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(11)
    classifier = torchvision.models.resnet18()
    path = cached_weights_path("resnet18", "IMAGENET1K_V1")
    path.parent.mkdir(parents=True)
    torch.save(classifier.state_dict(), path)
    monkeypatch.setattr(torch.hub, "download_url_to_file", pytest.fail)
    model = build(weights="DEFAULT")
    assert torch.equal(model.backbones["depth"].stem.conv1.weight, classifier.conv1.weight)

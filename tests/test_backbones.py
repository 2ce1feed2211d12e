"""The backbones: torchvision / timm parameter names and state dicts, in-model
normalisation, and MID's meta-gradient through BatchNorm (ResNet) and attention (ViT)
against finite differences."""

import pytest
import torch

from workers.mid import FrozenTeacher, LossWeights, MetaSettings, meta_gradients, meta_objective
from workers.models import ARCHITECTURES, ModelSpec, backbone, build_classifier_model, build_encoder, build_teacher
from workers.models.pretrained import PretrainedError, load_pretrained
from workers.models.resnet import BasicBlock, ResNet
from workers.models.vit import ViT

# torchvision's resnet18 state dict, written out from its documented layout (not from this code).
TORCHVISION_RESNET18 = {"conv1.weight": (64, 3, 7, 7), "fc.weight": (1000, 512), "fc.bias": (1000,)}
BN = {"weight": None, "bias": None, "running_mean": None, "running_var": None, "num_batches_tracked": ()}


def _bn(prefix, channels):
    return {f"{prefix}.{k}": (channels,) if shape is None else shape for k, shape in BN.items()}


TORCHVISION_RESNET18.update(_bn("bn1", 64))
for layer, planes in zip((1, 2, 3, 4), (64, 128, 256, 512)):
    inplanes = 64 if layer == 1 else planes // 2
    for block in (0, 1):
        p = f"layer{layer}.{block}"
        TORCHVISION_RESNET18[f"{p}.conv1.weight"] = (planes, inplanes if block == 0 else planes, 3, 3)
        TORCHVISION_RESNET18[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
        TORCHVISION_RESNET18.update(_bn(f"{p}.bn1", planes))
        TORCHVISION_RESNET18.update(_bn(f"{p}.bn2", planes))
    if layer > 1:
        TORCHVISION_RESNET18[f"layer{layer}.0.downsample.0.weight"] = (planes, inplanes, 1, 1)
        TORCHVISION_RESNET18.update(_bn(f"layer{layer}.0.downsample.1", planes))

# timm's vit_base_patch16_224 state dict keys and shapes.
TIMM_VIT_B16 = {"cls_token": (1, 1, 768), "pos_embed": (1, 197, 768), "patch_embed.proj.weight": (768, 3, 16, 16),
                "patch_embed.proj.bias": (768,), "norm.weight": (768,), "norm.bias": (768,),
                "head.weight": (1000, 768), "head.bias": (1000,)}
for i in range(12):
    TIMM_VIT_B16.update({
        f"blocks.{i}.norm1.weight": (768,), f"blocks.{i}.norm1.bias": (768,),
        f"blocks.{i}.attn.qkv.weight": (2304, 768), f"blocks.{i}.attn.qkv.bias": (2304,),
        f"blocks.{i}.attn.proj.weight": (768, 768), f"blocks.{i}.attn.proj.bias": (768,),
        f"blocks.{i}.norm2.weight": (768,), f"blocks.{i}.norm2.bias": (768,),
        f"blocks.{i}.mlp.fc1.weight": (3072, 768), f"blocks.{i}.mlp.fc1.bias": (3072,),
        f"blocks.{i}.mlp.fc2.weight": (768, 3072), f"blocks.{i}.mlp.fc2.bias": (768,),
    })


def random_state(layout):
    g = torch.Generator().manual_seed(0)
    return {k: (torch.randint(0, 100, ()) if shape == () else torch.randn(shape, generator=g))
            for k, shape in layout.items()}


def combined_state(model):
    return {**model.encoder.state_dict(), **model.classifier.state_dict()}


@pytest.mark.parametrize("arch, size, layout", [("resnet18", 224, TORCHVISION_RESNET18),
                                                ("vit_b16", 224, TIMM_VIT_B16)])
def test_a_state_dict_with_the_libraries_names_loads(tmp_path, arch, size, layout):
    model = build_classifier_model(ModelSpec(arch, 3, size, 1000))
    assert {k: tuple(v.shape) for k, v in combined_state(model).items()} == layout
    state = random_state(layout)
    torch.save(state, tmp_path / "weights.pth")
    report = load_pretrained(model.encoder, model.classifier, str(tmp_path / "weights.pth"))
    assert report.loaded == len(layout) and report.head == "loaded" and not report.ignored
    for key, value in combined_state(model).items():
        assert torch.equal(value, state[key]), key


def test_a_head_of_another_size_is_reinitialised_and_reported(tmp_path):
    torch.save(random_state(TORCHVISION_RESNET18), tmp_path / "imagenet.pth")
    model = build_classifier_model(ModelSpec("resnet18", 3, 224, 10))
    head_before = model.classifier.fc.weight.clone()
    report = load_pretrained(model.encoder, model.classifier, str(tmp_path / "imagenet.pth"))
    assert report.head.startswith("re-initialised") and "(1000, 512)" in report.head
    assert torch.equal(model.classifier.fc.weight, head_before)


def test_a_missing_key_names_the_first_one(tmp_path):
    state = random_state(TORCHVISION_RESNET18)
    del state["layer2.0.downsample.0.weight"]
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "partial.pth")
    model = build_classifier_model(ModelSpec("resnet18", 3, 224, 1000))
    with pytest.raises(PretrainedError, match="missing key 'layer2.0.downsample.0.weight'"):
        load_pretrained(model.encoder, model.classifier, str(tmp_path / "partial.pth"))


def test_a_cifar_stem_refuses_an_imagenet_stem_by_name(tmp_path):
    torch.save(random_state(TORCHVISION_RESNET18), tmp_path / "imagenet.pth")
    model = build_classifier_model(ModelSpec("resnet18", 3, 32, 10))
    with pytest.raises(PretrainedError, match=r"'conv1.weight' has shape \(64, 3, 7, 7\), this model needs \(64, 3, 3, 3\)"):
        load_pretrained(model.encoder, model.classifier, str(tmp_path / "imagenet.pth"))


@pytest.mark.parametrize("arch, channels, size", [("lenet", 1, 16), ("mid_cnn", 1, 28), ("resnet18", 3, 32),
                                                  ("resnet50", 3, 32), ("vit_s16", 3, 32)])
def test_every_backbone_builds_and_reconstructs_in_pixel_space(arch, channels, size):
    spec = ModelSpec(arch, channels, size, 10, mean=[0.5] * channels, std=[0.25] * channels)
    teacher = build_teacher(spec).eval()
    x = torch.rand(2, channels, size, size)
    logits, reconstruction = teacher(x)
    assert logits.shape == (2, 10)
    assert backbone(arch).has_decoder == ARCHITECTURES[arch].has_decoder
    if backbone(arch).has_decoder:
        assert reconstruction.shape == x.shape
        if arch != "mid_cnn":  # the authors' decoder has no output activation (its own test below)
            assert 0 <= reconstruction.min() and reconstruction.max() <= 1
    else:
        assert reconstruction is None


def test_the_authors_network_has_a_64x7x7_feature_map_and_a_3136_200_10_classifier():
    model = build_classifier_model(ModelSpec("mid_cnn", 1, 28, 10))
    assert model.encoder(torch.rand(3, 1, 28, 28)).shape == (3, 64, 7, 7)
    assert model.classifier.fc1.weight.shape == (200, 3136) and model.classifier.fc2.weight.shape == (10, 200)


def _mostly_blank_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits, doubled to 16 pixels and framed by 6 blank ones on each side:
    28×28 images about 10% ink, as MNIST's are about 13% (what made a Sigmoid decoder collapse)."""
    from storage.readers.digits import load_digits

    raw = load_digits(0.2, 0)
    x = torch.tensor(raw.train_images).float().div(255).repeat_interleave(2, 2).repeat_interleave(2, 3)
    return torch.nn.functional.pad(x, (6, 6, 6, 6)), torch.tensor(raw.train_labels)


def _reconstruction_error(teacher, x, y, epochs=3):
    """The teacher trained on the pipeline's own objective (CE + λ·L1, λ = 1), then its L1 error."""
    from workers.train_classifier import objective

    torch.manual_seed(0)
    optimizer = torch.optim.Adam(teacher.parameters(), 1e-3)
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            loss, _ = objective("teacher", {"lambda_rec": 1.0}, teacher, x[i:i + 64], y[i:i + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return (teacher(x)[1] - x).abs().mean().item()


def test_the_authors_decoder_learns_where_a_sigmoid_one_goes_blank():
    """A teacher trained as the pipeline trains it (CE + L1) on mostly blank images: the
    decoder's error must fall well below the blank image's (the mean pixel); the same decoder
    ending in a Sigmoid stays near it (the cyclic-consistency term was then a constant)."""
    x, y = _mostly_blank_digits()
    blank = x.abs().mean().item()
    torch.manual_seed(0)
    error = _reconstruction_error(build_teacher(ModelSpec("mid_cnn", 1, 28, 10)), x, y)
    assert error < 0.6 * blank, (error, blank)
    torch.manual_seed(0)
    squashed = build_teacher(ModelSpec("mid_cnn", 1, 28, 10))
    squashed.decoder.features.append(torch.nn.Sigmoid())
    assert _reconstruction_error(squashed, x, y) > 0.9 * blank


def test_normalisation_lives_in_the_model_and_not_in_its_state_dict():
    spec = ModelSpec("resnet18", 3, 32, 10, mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616])
    encoder = build_encoder(spec).eval()
    plain = build_encoder(ModelSpec("resnet18", 3, 32, 10)).eval()
    plain.load_state_dict(encoder.state_dict())  # same keys: the buffers are not persistent
    x = torch.rand(2, 3, 32, 32)
    normalised = (x - encoder.pixel_mean) / encoder.pixel_std
    torch.testing.assert_close(encoder(x), plain(normalised))
    with pytest.raises(ValueError, match="models.mean has 1 values but the images have 3"):
        ModelSpec("resnet18", 3, 32, 10, mean=[0.5], std=[0.5, 0.5, 0.5])


# ---- MID's meta-gradient through BatchNorm and attention, float64, against finite differences

ATTACKS = ["PGD_N", "PGD_T", "MIM_N"]


def tiny_models(family, spec):
    torch.manual_seed(0)
    teacher_encoder, classifier = family.encoder(spec).double(), family.classifier(spec).double()
    decoder = family.decoder(spec).double() if family.has_decoder else None
    student = family.encoder(spec).double()
    teacher_encoder.train(), student.train()
    x = torch.rand(8, spec.in_channels, spec.image_size, spec.image_size, dtype=torch.float64)
    with torch.no_grad():  # give the teacher's BatchNorm running statistics of real batches
        for _ in range(3):
            teacher_encoder(x), decoder(teacher_encoder(x)) if decoder is not None else None
    return student, FrozenTeacher(teacher_encoder, classifier, decoder), x


def directional_check(student, teacher, clean, settings, held_out="PGD_T", h=1e-6, directions=3):
    views = {name: (clean + 0.05 * torch.randn_like(clean)).clamp(0, 1) for name in ATTACKS}
    labels = torch.randint(0, 4, (clean.shape[0],))

    def loss_at(params):
        with torch.no_grad():
            for p, value in zip(student.parameters(), params):
                p.copy_(value)
        return meta_objective(student, teacher, clean, views, labels, held_out, settings)[0]

    theta = [p.detach().clone() for p in student.parameters()]
    buffers = {k: b.clone() for k, b in student.named_buffers()}
    grads = meta_gradients(student, loss_at(theta))
    g = torch.Generator().manual_seed(1)
    for _ in range(directions):
        d = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in theta]
        plus = loss_at([p + h * v for p, v in zip(theta, d)]).item()
        minus = loss_at([p - h * v for p, v in zip(theta, d)]).item()
        reference = (plus - minus) / (2 * h)
        analytic = sum((gi * di).sum() for gi, di in zip(grads, d)).item()
        assert analytic == pytest.approx(reference, rel=1e-5, abs=1e-8)
    # Only meta-train passes moved the running statistics: 4 evaluations of L, 4 updates.
    for name, b in student.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert int(b - buffers[name]) == 1 + 2 * directions, name


SETTINGS = MetaSettings(inner_lr=0.5, beta=1.0, temperature=2.0, second_order=True, batch_views=False,
                        meta_train=LossWeights(1.5, 0.8, 1.0), meta_test=LossWeights(1.0, 1.0, 1.0))


def test_second_order_meta_gradient_through_a_tiny_resnet_with_batchnorm():
    spec = ModelSpec("resnet_tiny", 3, 8, 4)
    student, teacher, clean = tiny_models(ResNet(BasicBlock, (1, 1, 1, 1), width=2), spec)
    directional_check(student, teacher, clean, SETTINGS)


def test_second_order_meta_gradient_through_a_tiny_vit_without_decoder():
    spec = ModelSpec("vit_tiny", 3, 8, 4)
    student, teacher, clean = tiny_models(ViT(patch_size=4, dim=8, depth=2, num_heads=2), spec)
    no_cc = MetaSettings(**{**SETTINGS.__dict__, "meta_train": LossWeights(1.5, 0.0, 1.0),
                            "meta_test": LossWeights(1.0, 0.0, 1.0)})
    directional_check(student, teacher, clean, no_cc)


def test_second_order_meta_gradient_through_the_authors_feature_map():
    spec = ModelSpec("mid_cnn", 1, 8, 4)
    student, teacher, clean = tiny_models(backbone("mid_cnn"), spec)
    # The decoder has no output activation, so the teacher's encoder reads negative pixels and
    # its ReLUs sit close to their kinks: a step of 1e-6 along a random direction of every
    # weight crosses one (the difference quotient is then 0.205 where h = 1e-8 and the
    # analytic gradient agree on 0.1262); the quotient is only a reference where it is smooth.
    directional_check(student, teacher, clean, SETTINGS, h=1e-8)


def test_a_pretrained_file_that_does_not_fit_stops_the_run_naming_the_key(tmp_path):
    """The driver matches models.pretrained against the model before any worker starts."""
    from clihelpers import mid, the_error_line

    model = build_classifier_model(ModelSpec("lenet", 1, 16, 10))
    state = {**model.encoder.state_dict(), **model.classifier.state_dict()}
    del state["head.3.weight"]
    torch.save(state, tmp_path / "lenet.pth")
    result = mid("run", "configs/digits.yaml", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out"),
                 "--set", f"models.pretrained={tmp_path / 'lenet.pth'}")
    assert result.returncode == 1
    assert "missing key 'head.3.weight'" in the_error_line(result, tmp_path / "lenet.pth")
    assert "starting a local Ray instance" not in result.stderr

"""Backbones: insightface arcface_torch state-dict layout, output shapes, build_backbone."""
import pytest
import torch

from hybrid_fc.backbones import backbone_names, build_backbone

# Key names and shapes as in insightface recognition/arcface_torch/backbones (iresnet.py,
# mobilefacenet.py), read from their source: a checkpoint trained there must load here.
IRESNET_KEYS = {
    "conv1.weight": (64, 3, 3, 3), "bn1.running_var": (64,), "prelu.weight": (64,),
    "layer1.0.bn1.weight": (64,), "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer1.0.bn2.bias": (64,), "layer1.0.prelu.weight": (64,),
    "layer1.0.conv2.weight": (64, 64, 3, 3), "layer1.0.bn3.num_batches_tracked": (),
    "layer1.0.downsample.0.weight": (64, 64, 1, 1), "layer1.0.downsample.1.weight": (64,),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer4.0.conv2.weight": (512, 512, 3, 3),
    "bn2.weight": (512,), "fc.weight": (512, 512 * 7 * 7), "fc.bias": (512,),
    "features.weight": (512,), "features.running_mean": (512,),
}
IRESNET_BLOCKS = {"iresnet18": (2, 2, 2, 2), "iresnet50": (3, 4, 14, 3),
                  "iresnet100": (3, 13, 30, 3)}
MBF_KEYS = {  # get_mbf(fp16=False, num_features=512): blocks (1, 4, 6, 2), scale 2
    "layers.0.layers.0.weight": (128, 3, 3, 3), "layers.0.layers.2.weight": (128,),
    "layers.1.layers.0.weight": (128, 2, 3, 3),          # depthwise with groups=64
    "layers.2.layers.0.layers.0.weight": (128, 128, 1, 1),
    "layers.2.layers.1.layers.0.weight": (128, 1, 3, 3),
    "layers.2.layers.2.layers.1.running_mean": (128,),
    "layers.3.layers.3.layers.2.layers.0.weight": (128, 128, 1, 1),
    "layers.4.layers.0.layers.0.weight": (256, 128, 1, 1),
    "layers.5.layers.5.layers.1.layers.0.weight": (256, 1, 3, 3),
    "layers.7.layers.1.layers.2.layers.0.weight": (256, 256, 1, 1),
    "conv_sep.layers.0.weight": (512, 256, 1, 1), "conv_sep.layers.2.weight": (512,),
    "features.layers.0.layers.0.weight": (512, 1, 7, 7),
    "features.layers.2.weight": (512, 512), "features.layers.3.running_var": (512,),
}


@pytest.mark.parametrize("name", sorted(IRESNET_BLOCKS))
def test_iresnet_keys_match_insightface(name):
    sd = build_backbone(name, 512).state_dict()
    for key, shape in IRESNET_KEYS.items():
        assert tuple(sd[key].shape) == shape, key
    for i, n in enumerate(IRESNET_BLOCKS[name]):  # blocks per stage; one downsample per stage
        assert f"layer{i + 1}.{n - 1}.conv2.weight" in sd and f"layer{i + 1}.{n}.bn1.weight" not in sd
        assert [k for k in sd if k.startswith(f"layer{i + 1}.") and "downsample.0" in k] == \
            [f"layer{i + 1}.0.downsample.0.weight"]
    # per block: 3 BN x 5 tensors + 2 convs + 1 prelu; stem 1 + 5 + 1; tail 5 + 2 + 5
    n_blocks = sum(IRESNET_BLOCKS[name])
    assert len(sd) == 18 * n_blocks + 4 * 6 + 7 + 12
    feats = dict(build_backbone(name, 512).named_parameters())["features.weight"]
    assert not feats.requires_grad and torch.equal(feats, torch.ones(512))  # frozen at 1


def test_mobilefacenet_keys_match_insightface():
    sd = build_backbone("mobilefacenet", 512).state_dict()
    for key, shape in MBF_KEYS.items():
        assert tuple(sd[key].shape) == shape, key
    assert "layers.8.layers.0.weight" not in sd  # 8 entries in `layers`
    large = build_backbone("mobilefacenet_large", 512).state_dict()
    assert large["layers.0.layers.0.weight"].shape == (256, 3, 3, 3)
    assert "layers.1.layers.1.layers.0.layers.0.weight" in large   # blocks[0] = 2: a Residual


def test_state_dict_round_trip_and_outputs():
    torch.manual_seed(0)
    for name, size in [("iresnet18", 32), ("mobilefacenet", 64), ("iresnet_tiny", 32),
                       ("mlp", 8)]:
        a, b = build_backbone(name, 64, input_size=size), build_backbone(name, 64, input_size=size)
        b.load_state_dict(a.state_dict(), strict=True)
        a.eval(), b.eval()
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ya, yb = a(x), b(x)
        assert ya.shape == (2, 64) and torch.equal(ya, yb) and torch.isfinite(ya).all()


def test_build_backbone_errors():
    assert {"iresnet50", "iresnet100", "mobilefacenet"} <= set(backbone_names())
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'"):
        build_backbone("resnet9000", 512)
    with pytest.raises(ValueError, match="embedding_size"):
        build_backbone("iresnet18", 0)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_backbone("iresnet18", 512, input_size=100)


def test_timm_names():
    """With timm installed any timm name builds; without it the error says to install timm."""
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="need timm"):
            build_backbone("resnet18", 128)
        return
    model = build_backbone("resnet18", 128, input_size=64)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 128)

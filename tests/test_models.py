import pytest
import torch

from mriadv.models import ImageGenerator, MeasurementGenerator, UNet, as_complex
from mriadv.models.generators import upsampling_plan


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (128, 128), (37, 53), (100, 72)])
@pytest.mark.parametrize("norm,pooling,activation", [("instance", "avg", "prelu"), ("batch", "max", "relu")])
def test_unet_output_shape_any_size(size, norm, pooling, activation):
    net = UNet(chans=4, num_pools=3, norm=norm, pooling=pooling, activation=activation)
    x = torch.randn(2, 1, *size)
    assert net(x).shape == (2, 1, *size)


def test_unet_paper_defaults():
    net = UNet()
    assert net.num_pools == 5
    assert isinstance(net.down[0][2], torch.nn.PReLU)
    assert isinstance(net.down[0][1], torch.nn.InstanceNorm2d)
    # bottleneck has 64 * 2**5 channels
    assert net.down[-1][0].out_channels == 64 * 32


def test_upconv_is_a_1x1_convolution_after_bilinear_upsampling():
    """The up path convolves first and upsamples second; both are linear and act on different axes,
    so this must equal the textbook order computed with PyTorch's own bilinear interpolation."""
    import torch.nn.functional as F

    from mriadv.models.unet import UpConv

    torch.manual_seed(0)
    up = UpConv(8, 4).double()
    x = torch.randn(2, 8, 6, 10, dtype=torch.float64)
    textbook = up.conv(F.interpolate(x, size=(12, 20), mode="bilinear", align_corners=False))
    torch.testing.assert_close(up(x, (12, 20)), textbook, rtol=1e-12, atol=1e-12)


def test_unet_up_blocks_see_twice_the_skip_width():
    net = UNet(chans=16, num_pools=3)
    assert [b[0].in_channels for b in net.up] == [128, 64, 32]  # 2 x (64, 32, 16)
    assert [u.conv.in_channels for u in net.upconv] == [128, 64, 32]
    assert [u.conv.out_channels for u in net.upconv] == [64, 32, 16]


def test_unet_rejects_bad_options():
    with pytest.raises(ValueError, match="activation"):
        UNet(activation="gelu")
    with pytest.raises(ValueError, match="pooling"):
        UNet(pooling="lp")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        UNet(chans=2, num_pools=1)(torch.zeros(1, 8, 8))


def test_generator_for_320_is_the_seed_architecture():
    g = ImageGenerator((320, 320), channels=2)
    convs = [m for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(convs) == 7  # projection + 6 fractionally-strided convolutions
    assert convs[0].kernel_size == (5, 5) and all(c.stride == (2, 2) for c in convs[1:])
    assert upsampling_plan((320, 320)) == (6, (5, 5))


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (128, 128), (320, 320), (100, 72)])
def test_generator_shapes_and_range(size):
    g = ImageGenerator(size, latent_dim=100, channels=2)
    out = g(torch.randn(3, 100))
    assert out.shape == (3, 1, *size)
    assert out.abs().max() <= 1.0


def test_measurement_generator_keeps_kspace_shape():
    g = MeasurementGenerator(channels=4, depth=3)
    k = torch.randn(2, 40, 22, dtype=torch.complex64)
    out = g(k, torch.ones(2, 22, dtype=torch.bool))
    assert out.shape == (2, 2, 40, 22)
    assert as_complex(out).shape == (2, 40, 22) and as_complex(out).is_complex()


def test_frozen_blocks_parameter_gradients_and_restores_each_flag():
    from mriadv.models.utils import frozen

    net = UNet(chans=2, num_pools=1)
    net.head[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in net.parameters()]
    x = torch.randn(1, 1, 8, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inside"):
        with frozen(net):
            assert not any(p.requires_grad for p in net.parameters())
            net(x).sum().backward()
            raise RuntimeError("inside")
    assert [p.requires_grad for p in net.parameters()] == flags  # restored, also after an exception
    assert x.grad is not None and all(p.grad is None for p in net.parameters())


def _zero_last_conv(net: UNet) -> None:
    last = net.head[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)


@pytest.mark.parametrize("size", [(32, 32), (37, 53)])
def test_residual_unet_returns_its_input_when_the_correction_is_zero(size):
    torch.manual_seed(0)
    net = UNet(chans=4, num_pools=2, residual=True)
    _zero_last_conv(net)
    x = torch.randn(2, 1, *size)
    assert torch.equal(net(x), x)
    plain = UNet(chans=4, num_pools=2)
    _zero_last_conv(plain)
    assert torch.equal(plain(x), torch.zeros_like(x))  # residual=False: unchanged, no input added


def test_residual_unet_has_the_plain_state_dict_and_adds_the_input():
    torch.manual_seed(0)
    plain = UNet(chans=4, num_pools=2)
    residual = UNet(chans=4, num_pools=2, residual=True)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in residual.state_dict().items()}
    residual.load_state_dict(plain.state_dict())  # strict: the same keys
    x = torch.randn(2, 1, 24, 24)
    torch.testing.assert_close(residual(x), x + plain(x))
    with pytest.raises(ValueError, match="residual"):
        UNet(2, 1, chans=4, num_pools=1, residual=True)


@pytest.mark.parametrize("residual", [False, True])
def test_build_reconstructor_follows_cfg_residual_and_round_trips(residual, tmp_path):
    from mriadv.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
    from mriadv.config import TrainConfig, get_profile
    from mriadv.trainer import build_reconstructor

    cfg = get_profile("smoke").config(residual=residual)
    net = build_reconstructor(cfg)
    assert net.residual is residual
    path = tmp_path / "best.pt"
    save_checkpoint(path, make_checkpoint(cfg.to_dict(), 1, "completed", {"recon": net.state_dict()}, None))
    saved = load_checkpoint(path)
    again = build_reconstructor(TrainConfig.from_dict(saved["config"]))
    again.load_state_dict(saved["networks"]["recon"])
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert again.residual is residual and torch.equal(net.eval()(x), again.eval()(x))
    old = {k: v for k, v in cfg.to_dict().items() if k != "residual"}  # a checkpoint from before the field
    assert build_reconstructor(TrainConfig.from_dict(old)).residual is False

import numpy as np
import pytest
import torch

from mriadv.fft import fft2c, ifft2c


@pytest.mark.parametrize("shape", [(8, 8), (3, 37, 41), (2, 1, 64, 48)])
def test_round_trip_and_parseval(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    k = fft2c(x)
    torch.testing.assert_close(ifft2c(k), x, atol=1e-5, rtol=1e-5)
    # orthonormal: energy is preserved per image
    torch.testing.assert_close(k.abs().pow(2).sum(dim=(-2, -1)), x.abs().pow(2).sum(dim=(-2, -1)), rtol=1e-5, atol=1e-4)


def test_matches_numpy_centred_definition():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, 7)) + 1j * rng.standard_normal((5, 7))).astype(np.complex64)
    ref = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x), norm="ortho"))
    np.testing.assert_allclose(fft2c(torch.from_numpy(x)).numpy(), ref, atol=1e-5)


def test_centre_of_kspace_is_dc():
    # a constant image puts all its energy in the centre sample: value = sqrt(N) * c
    x = torch.full((6, 10), 2.0, dtype=torch.complex64)
    k = fft2c(x)
    assert abs(k[3, 5].real.item() - 2.0 * np.sqrt(60)) < 1e-4
    assert k.abs().pow(2).sum().item() == pytest.approx(k[3, 5].abs().pow(2).item(), rel=1e-5)


def test_adjoint_identity():
    g = torch.Generator().manual_seed(2)
    x = torch.complex(torch.randn(9, 12, generator=g), torch.randn(9, 12, generator=g))
    v = torch.complex(torch.randn(9, 12, generator=g), torch.randn(9, 12, generator=g))
    lhs = torch.vdot(fft2c(x).flatten(), v.flatten())
    rhs = torch.vdot(x.flatten(), ifft2c(v).flatten())
    assert torch.allclose(lhs, rhs, atol=1e-4)


def test_rejects_real_input():
    with pytest.raises(ValueError, match="complex"):
        fft2c(torch.zeros(4, 4))

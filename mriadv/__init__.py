"""mriadv: adversarially robust MRI reconstruction.

Conventions used throughout the package (stated once, here):

* k-space is native complex (``torch.complex64`` / ``numpy.complex64``) with shape ``(..., H, W)``:
  H is the readout (frequency-encode) direction, W the phase-encode direction; a column is one
  phase-encode line. Masks act on columns and have shape ``(W,)`` (or broadcast as ``(..., 1, W)``).
* Images given to networks are real ``float32`` tensors ``(B, 1, H, W)``.
* All Fourier transforms are centred and orthonormal (see :mod:`mriadv.fft`), so Parseval holds and
  a perturbation's energy is the same in k-space and image space.
* Network inputs and targets are instance-normalised: ``(x - mean) / std`` with the mean and std of
  the zero-filled input magnitude. Perturbation budgets (epsilon) are squared L2 norms in these
  normalised units. Metrics are computed after de-normalisation, on volumes.
"""

__version__ = "0.1.0"

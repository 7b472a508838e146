"""The seed's other two instabilities: small features that vanish, and more samples that do not help.

Huang & Liang (Sec. 1, after Antun et al., PNAS 2020) name three instabilities of learned
reconstruction; :mod:`mriadv.attacks` measures the first (tiny worst-case perturbations). This
package measures the other two on the same models and data:

* type 2, small-feature recovery: :mod:`mriadv.instabilities.features` (a feature inserted into one
  slice's data, and how much of it a reconstruction recovers) and :mod:`mriadv.instabilities.recovery`
  (:func:`feature_recovery` over a dataset, at random and at worst positions);
* type 3, the sampling sweep: :mod:`mriadv.instabilities.sampling` (:func:`sampling_sweep` with nested
  masks, flagging accelerations where more samples do not lower the error).

The public names of the three modules are importable from here.
"""

from mriadv.instabilities.features import (
    FEATURE_SHAPES,
    FeatureCase,
    FeatureInsertion,
    FeatureSearch,
    FeatureSpec,
    case_metrics,
    feature_case,
    footprint,
    footprint_masks,
    insert_feature,
    measured_input,
    valid_anchors,
)
from mriadv.instabilities.recovery import (
    FEATURE_METRICS,
    FeatureResult,
    FeatureStats,
    NoTissue,
    feature_example,
    feature_recovery,
    format_features,
)
from mriadv.instabilities.sampling import (
    SWEEP_ACCELERATIONS,
    SamplingRow,
    format_sampling,
    nested_masks,
    sampling_sweep,
)

__all__ = [
    "FEATURE_METRICS",
    "FEATURE_SHAPES",
    "SWEEP_ACCELERATIONS",
    "FeatureCase",
    "FeatureInsertion",
    "FeatureResult",
    "FeatureSearch",
    "FeatureSpec",
    "FeatureStats",
    "NoTissue",
    "SamplingRow",
    "case_metrics",
    "feature_case",
    "feature_example",
    "feature_recovery",
    "footprint",
    "footprint_masks",
    "format_features",
    "format_sampling",
    "insert_feature",
    "measured_input",
    "nested_masks",
    "sampling_sweep",
    "valid_anchors",
]

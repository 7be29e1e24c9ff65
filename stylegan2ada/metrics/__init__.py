"""Evaluation metrics: FID and KID with NVIDIA's protocol, the Inception (or any registered kind of) detector, the runner."""

from .detectors import Detector, DetectorError, inception_path, register_detector_kind, resolve_detector
from .distances import feature_mean_cov, frechet_distance, frechet_distance_from_stats, kernel_inception_distance
from .metric_main import (METRIC_FAMILIES, MetricError, MetricSpec, calc_metric, format_metric_result, is_valid_metric,
                          parse_metric_name, register_metric, report_metric)
from .metric_utils import FeatureStats, MetricOptions

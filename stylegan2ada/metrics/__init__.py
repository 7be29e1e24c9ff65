"""Evaluation metrics: FID, KID, precision / recall (NVIDIA's protocols), density / coverage, data copying; the Inception
and VGG16 (or any registered kind of) detectors; the runner."""

from .detectors import Detector, DetectorError, inception_path, register_detector_kind, resolve_detector
from .distances import (density_coverage, feature_mean_cov, frechet_distance, frechet_distance_from_stats,
                        kernel_inception_distance, mann_whitney_z, memorisation, nearest_neighbour_distances, precision_recall)
from .metric_main import (METRIC_FAMILIES, MetricError, MetricSpec, calc_metric, format_metric_result, is_valid_metric,
                          parse_metric_name, register_metric, report_metric)
from .metric_utils import FeatureStats, ImageSet, MetricOptions

"""Evaluation metrics: FID and KID with NVIDIA's protocol, an Inception or taxon-classifier detector, the runner."""

from .detectors import Detector, DetectorError, TaxonClassifier, inception_path, resolve_detector, train_taxon_classifier
from .distances import feature_mean_cov, frechet_distance, frechet_distance_from_stats, kernel_inception_distance
from .metric_main import (METRIC_FAMILIES, MetricError, MetricSpec, calc_metric, calc_taxon_accuracy_on_reals,
                          format_metric_result, is_valid_metric, parse_metric_name, register_metric, report_metric)
from .metric_utils import FeatureStats, MetricOptions
from .taxa import TaxonError

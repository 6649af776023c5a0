"""Local ``evaluate`` metric scripts shipped with hf-dbp (load them by path, e.g. with
``hf_dbp.segmentation_metrics.load_segmentation_metric``)."""

"""What the proxy tells about itself: per-request counters (stats), the cross-worker export and Prometheus
exposition (metrics), and the JSON access log."""

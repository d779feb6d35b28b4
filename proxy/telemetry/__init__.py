"""What the proxy tells about itself: per-request counters (stats), the cross-worker export and Prometheus
exposition (metrics), and the JSON access log.

Design rule: the data plane only increments counters; everything else (sums, rates, exposition) is done
at read time, off the request path."""

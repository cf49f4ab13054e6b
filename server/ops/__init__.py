"""What operators read: health, Prometheus metrics and logs."""

"""Local single-node services (Kafka, Prometheus) for tests and development."""

"""Many replicas: the Ray Serve deployment of engines and the ingress that fronts them."""

"""Running it: metrics, health and admin pages, logs, descriptor limits."""

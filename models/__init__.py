"""Per-architecture knowledge and the example adapters the README uses."""

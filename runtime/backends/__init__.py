"""Inference backends: each a loader plus a runner behind one small interface."""

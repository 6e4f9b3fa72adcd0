"""Inference: the Detector, prediction outputs, drawing, attention maps, export and the HTTP server."""

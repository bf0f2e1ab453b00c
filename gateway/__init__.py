"""Palm Serve gateway: GeoTIFF in, georeferenced palm-tree and building detections out, via Triton."""

__version__ = "0.1.0"

"""Pure, synchronous steps from raster to COCO; only ``raster.py`` touches files."""

"""Pure, synchronous steps from raster to COCO; only ``raster/reader.py`` touches files."""

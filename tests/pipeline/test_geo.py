"""Georeferencing: pixels to WGS 84 and back, checked against closed-form projections."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from gateway.pipeline.geo import (
    Georef,
    box_polygons,
    can_georeference,
    ground_sample_distance,
    lonlat_to_pixel,
    pixel_to_lonlat,
    pixels_to_lonlat,
)
from tests.factories import north_up

R = 6_378_137.0  # WGS 84 semi-major axis: the spherical radius of Web Mercator (EPSG:3857)


def mercator_inverse(x: float, y: float) -> tuple[float, float]:
    return math.degrees(x / R), math.degrees(2 * math.atan(math.exp(y / R)) - math.pi / 2)


def affine(transform: tuple[float, ...], x: float, y: float) -> tuple[float, float]:
    a, b, c, d, e, f = transform
    return a * x + b * y + c, d * x + e * y + f


def ring_area(ring: list[list[float]]) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ring))


def mercator(rotation_deg: float = 0.0) -> Georef:
    t = north_up(origin=(1_113_194.9, 6_446_275.8), pixel_size=0.3, rotation_deg=rotation_deg)
    return Georef("EPSG:3857", (t.a, t.b, t.c, t.d, t.e, t.f))


def test_pixel_centre_maps_to_its_known_lonlat() -> None:
    geo = Georef("EPSG:4326", (0.001, 0.0, -10.0, 0.0, -0.001, 50.0))
    lon, lat = pixel_to_lonlat(geo, 100 + 0.5, 200 + 0.5)
    assert lon == pytest.approx(-10.0 + 0.1005)
    assert lat == pytest.approx(50.0 - 0.2005)


def test_utm_central_meridian_on_the_equator() -> None:
    geo = Georef("EPSG:32633", (0.5, 0.0, 500_000.0, 0.0, -0.5, 0.0))
    lon, lat = pixel_to_lonlat(geo, 0, 0)
    assert lon == pytest.approx(15.0, abs=1e-9)  # zone 33's central meridian
    assert lat == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("rotation", [0.0, 30.0, -75.0])
def test_mercator_pixels_match_the_closed_form(rotation: float) -> None:
    geo = mercator(rotation)
    for x, y in [(0, 0), (1234.5, 777.25), (20_000, 20_000)]:
        expected = mercator_inverse(*affine(geo.transform, x, y))
        lon, lat = pixel_to_lonlat(geo, x, y)
        assert lon == pytest.approx(expected[0], abs=1e-9)
        assert lat == pytest.approx(expected[1], abs=1e-9)
        back = lonlat_to_pixel(geo, lon, lat)
        assert back == pytest.approx((x, y), abs=1e-4)  # well within a pixel


def test_box_polygon_is_a_closed_ccw_lonlat_ring_of_the_four_corners() -> None:
    geo = mercator(30.0)
    boxes = np.array([[100, 200, 140, 260], [0, 0, 512, 512]], np.float32)
    (first, second) = box_polygons(boxes, geo)
    assert first is not None
    assert second is not None
    assert first["type"] == "Polygon"
    ring = first["coordinates"][0]
    assert len(ring) == 5
    assert ring[0] == ring[-1]
    assert ring_area(ring) > 0  # RFC 7946: exterior rings counter-clockwise
    corners = {
        tuple(np.round(mercator_inverse(*affine(geo.transform, x, y)), 9))
        for x, y in [(100, 200), (140, 200), (140, 260), (100, 260)]
    }
    assert {tuple(np.round(p, 9)) for p in ring[:4]} == corners
    # Rotated: the box is not axis-aligned in lon/lat.
    lons = sorted(p[0] for p in ring[:4])
    assert lons[1] - lons[0] > 1e-7


def test_no_crs_or_transform_gives_null_geometry() -> None:
    boxes = np.zeros((3, 4), np.float32)

    class Info:
        crs = None
        transform = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)

    assert box_polygons(boxes, Info()) == [None, None, None]
    assert box_polygons(boxes, None) == [None, None, None]
    assert box_polygons(np.zeros((0, 4)), mercator()) == []
    with pytest.raises(ValueError, match="pixel-only"):
        pixel_to_lonlat(Info(), 0, 0)


def test_boxes_crossing_the_antimeridian_are_cut() -> None:
    # UTM 60N, 10 m pixels, around easting 834 km where the 180th meridian runs near the equator.
    geo = Georef("EPSG:32660", (10.0, 0.0, 833_000.0, 0.0, -10.0, 100_000.0))
    (geometry,) = box_polygons(np.array([[0, 0, 200, 50]]), geo)
    assert geometry is not None
    assert geometry["type"] == "MultiPolygon"
    parts = [polygon[0] for polygon in geometry["coordinates"]]
    assert len(parts) == 2
    for ring in parts:
        assert ring[0] == ring[-1]
        assert all(-180 <= lon <= 180 for lon, _ in ring)
        assert ring_area(ring) > 0
    assert {max(abs(lon) for lon, _ in ring) for ring in parts} == {180.0}


def test_degenerate_or_extreme_transforms_give_null_geometry() -> None:
    extreme = Georef("EPSG:4326", (1e-300, 0.0, 1e300, 0.0, -1e-300, 1e300))
    assert box_polygons(np.array([[0, 0, 10, 10]]), extreme) == [None]
    assert not can_georeference("EPSG:4326", extreme.transform, 64, 64)
    assert can_georeference("EPSG:32633", (0.5, 0.0, 500_000.0, 0.0, -0.5, 4_000_000.0), 64, 64)
    singular = Georef("EPSG:3857", (0.0, 0.0, 0.0, 0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="not invertible"):
        lonlat_to_pixel(singular, 0.0, 0.0)


def test_vectorised_pixels_to_lonlat_keeps_shape() -> None:
    geo = mercator()
    xs = np.arange(6, dtype=np.float64).reshape(2, 3)
    lon, lat = pixels_to_lonlat(geo, xs, xs)
    assert lon.shape == lat.shape == (2, 3)
    assert np.all(np.diff(lon, axis=1) > 0)


def test_a_geostationary_view_places_the_disc_and_leaves_space_unplaced() -> None:
    # A full-disc geostationary image: its corners look past the Earth, its centre at (-75, 0).
    geos = Georef(
        "+proj=geos +h=35774290 +lon_0=-75 +sweep=x +ellps=WGS84 +units=m +no_defs",
        (20054.96, 0.0, -5434895.08, 0.0, -20054.96, 5434895.08),
    )
    assert can_georeference(geos.crs, geos.transform, 542, 542)
    corner, centre = box_polygons(np.array([[0, 0, 10, 10], [271, 271, 280, 280]]), geos)
    assert corner is None
    assert centre is not None
    lon, lat = centre["coordinates"][0][0]
    assert lon == pytest.approx(-75.0, abs=0.01)
    assert lat == pytest.approx(0.0, abs=2.0)


@pytest.mark.parametrize(
    ("crs", "transform", "metres"),
    [
        ("EPSG:32633", (0.5, 0.0, 500_000.0, 0.0, -0.5, 4_000_000.0), 0.5),  # UTM metres
        ("EPSG:2227", (1.0, 0.0, 6_000_000.0, 0.0, -1.0, 2_000_000.0), 0.3048),  # US survey feet
        ("EPSG:3857", (10.0, 0.0, 0.0, 0.0, -10.0, 6_000_000.0), 6.77),  # Mercator shrinks with latitude
        ("EPSG:4326", (0.0001, 0.0, 10.0, 0.0, -0.0001, 50.0), 8.92),  # degrees at 50 N
    ],
)
def test_ground_sample_distance_in_metres_whatever_the_crs(
    crs: str, transform: tuple[float, ...], metres: float
) -> None:
    assert ground_sample_distance(crs, transform, 100, 100) == pytest.approx(metres, rel=0.01)


def test_no_ground_sample_distance_off_the_earth() -> None:
    assert ground_sample_distance("EPSG:32633", (float("inf"), 0, 0, 0, -1, 0), 10, 10) is None


MARS_GEOGRAPHIC = (
    'GEOGCS["GCS_MARS",DATUM["D_MARS",SPHEROID["MARS",3396190,0]],PRIMEM["Reference_Meridian",0],'
    'UNIT["degree",0.0174532925199433]]'
)
MARS_EQUIRECTANGULAR = (
    f'PROJCS["Equirectangular MARS",{MARS_GEOGRAPHIC},PROJECTION["Equirectangular"],'
    'PARAMETER["standard_parallel_1",0],PARAMETER["central_meridian",180],PARAMETER["false_easting",0],'
    'PARAMETER["false_northing",0],UNIT["metre",1]]'
)


def test_a_projected_crs_of_another_planet_still_gives_its_pixel_size() -> None:
    # No WGS 84 position, but the transform says how big a pixel is on Mars: what the model would see.
    transform = (5.0, 0.0, 7_376_380.5, 0.0, -5.0, -860_015.5)
    assert ground_sample_distance(MARS_EQUIRECTANGULAR, transform, 1118, 1683) == pytest.approx(5.0)
    rotated = (3.0, -4.0, 7_376_380.5, -4.0, -3.0, -860_015.5)  # |det| = 25: 5 m pixels, turned
    assert ground_sample_distance(MARS_EQUIRECTANGULAR, rotated, 1118, 1683) == pytest.approx(5.0)
    assert ground_sample_distance(MARS_GEOGRAPHIC, (0.001, 0.0, 10.0, 0.0, -0.001, 5.0), 100, 100) is None

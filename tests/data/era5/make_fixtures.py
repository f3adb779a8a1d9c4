#!/usr/bin/env python3
"""Real ERA5 samples for `atmorep loader convert`, and xarray's reading of them.

Input: the cfgrib source distribution's real ERA5 samples (cfgrib 0.9.15.0 on PyPI,
`tests/sample-data/`). Pass the unpacked sample-data folder:

    pip download --no-deps --no-binary :all: cfgrib==0.9.15.0
    tar xzf cfgrib-0.9.15.0.tar.gz
    pip install -r tests/data/era5/requirements.txt
    python3 tests/data/era5/make_fixtures.py cfgrib-0.9.15.0/tests/sample-data

Writes into this folder (all rewritten on every run):

  era5-pl-a.grib      GRIB1 messages of `era5-levels-members.grib`, copied byte for byte:
                      the first two times (2017-01-01 00:00, 12:00), members 0 and 1
  era5-pl-b.grib      the same for the last two times, member 0 only
  era5-pl-a0.grib2    era5-pl-a.grib's member 0 re-encoded as GRIB edition 2 by ecCodes
                      (`edition=2`, values unchanged)
  era5-levels-corrupted.grib, reduced_gg.grib   copied unchanged (bad input)
  era5-single-level-scalar-time.grib   copied unchanged: ERA5 2 m temperature (`t2m`), one time,
                      a regional 0.25° grid (60..30°N, 10°W..40°E): a single-level variable
  era5-pl.nc          NetCDF4/HDF5 in the CDS layout since 2024: member 0, all four times,
                      dims (valid_time, pressure_level, latitude, longitude), float32,
                      zlib level 1 + shuffle, chunks (3, 1, 61, 120), `valid_time` int64
                      seconds since 1970-01-01
  era5-pl-nh.nc       era5-pl.nc's first time on the northern hemisphere only (another grid)
  era5-pl-legacy.nc   NetCDF3 classic in the older CDS layout: member 0, the first two times,
                      dims (time, level, latitude, longitude), int16 packed with float64
                      scale_factor/add_offset and _FillValue -32767; `time` int32 hours since
                      1900-01-01; three points per variable set missing to exercise _FillValue
  reference.json      what xarray reads from each file: per variable the times, levels, grid
                      and a CRC-32 of its float32 values (little-endian, C order
                      (time, level, latitude, longitude), NaN as 0x7fc00000) plus a few values
"""

from __future__ import annotations

import json
import shutil
import sys
import zlib
from pathlib import Path

import eccodes
import numpy as np
import xarray as xr

HERE = Path(__file__).resolve().parent


def messages(path: Path):
    with open(path, "rb") as f:
        while True:
            h = eccodes.codes_grib_new_from_file(f)
            if h is None:
                return
            yield h


def subset(src: Path, out: Path, keep) -> None:
    with open(out, "wb") as o:
        for h in messages(src):
            when = (eccodes.codes_get(h, "validityDate"), eccodes.codes_get(h, "validityTime"))
            if keep(when, eccodes.codes_get(h, "number")):
                o.write(eccodes.codes_get_message(h))
            eccodes.codes_release(h)


def to_edition2(src: Path, out: Path) -> None:
    with open(out, "wb") as o:
        for h in messages(src):
            if eccodes.codes_get(h, "number") == 0:
                eccodes.codes_set(h, "edition", 2)
                o.write(eccodes.codes_get_message(h))
            eccodes.codes_release(h)


def canonical(da: xr.DataArray) -> np.ndarray:
    """float32 values in (time, level, latitude, longitude) order, whatever the names."""
    names = {"valid_time": "time", "pressure_level": "level", "isobaricInhPa": "level"}
    da = da.rename({k: v for k, v in names.items() if k in da.dims})
    if "time" not in da.dims and "time" in da.coords:
        da = da.expand_dims("time")
    dims = [d for d in ("time", "level", "latitude", "longitude") if d in da.dims]
    return da.transpose(*dims).values.astype(np.float32)


def describe(ds: xr.Dataset) -> dict:
    out = {}
    for name, da in ds.data_vars.items():
        v = canonical(da)
        tname = "valid_time" if "valid_time" in da.dims else "time"
        times = ds[tname].values.astype("datetime64[s]").astype(np.int64)
        level = next((d for d in da.dims if d in ("pressure_level", "level", "isobaricInhPa")), None)
        flat = v.reshape(-1)
        finite = flat[np.isfinite(flat)]
        out[name] = {
            "shape": list(v.shape),
            "times": [int(t) for t in np.atleast_1d(times)],
            "levels": [float(x) for x in ds[level].values] if level else [],
            "lat_first_last": [float(ds.latitude[0]), float(ds.latitude[-1])],
            "lon_first_last": [float(ds.longitude[0]), float(ds.longitude[-1])],
            "crc32": zlib.crc32(v.astype("<f4").tobytes()),
            "nan_count": int(np.isnan(flat).sum()),
            "first": [float(x) for x in flat[:4]],
            "sum_f64": float(finite.astype(np.float64).sum()),
            "units": da.attrs.get("units", ""),
        }
    return out


def main() -> None:
    samples = Path(sys.argv[1])
    members = samples / "era5-levels-members.grib"
    first = {(20170101, 0), (20170101, 1200)}
    subset(members, HERE / "era5-pl-a.grib", lambda when, n: when in first and n in (0, 1))
    subset(members, HERE / "era5-pl-b.grib", lambda when, n: when not in first and n == 0)
    to_edition2(HERE / "era5-pl-a.grib", HERE / "era5-pl-a0.grib2")
    for name in ("era5-levels-corrupted.grib", "reduced_gg.grib", "era5-single-level-scalar-time.grib"):
        shutil.copyfile(samples / name, HERE / name)

    grib = xr.open_dataset(members, engine="cfgrib", backend_kwargs={"indexpath": ""})
    m0 = grib.sel(number=0).drop_vars(["number", "step", "valid_time"], errors="ignore")

    # NetCDF4 as the CDS writes it since 2024.
    nc4 = m0.rename({"time": "valid_time", "isobaricInhPa": "pressure_level"})
    nc4 = nc4.assign_coords(pressure_level=nc4.pressure_level.astype(np.float64))
    for v in nc4.data_vars.values():
        v.attrs = {"units": v.attrs["units"], "long_name": v.attrs["long_name"],
                   "standard_name": v.attrs.get("standard_name", "")}
    nc4.attrs = {"Conventions": "CF-1.7", "institution": "European Centre for Medium-Range Weather Forecasts"}
    enc = {v: {"zlib": True, "complevel": 1, "shuffle": True, "dtype": "float32"} for v in nc4.data_vars}
    enc["valid_time"] = {"units": "seconds since 1970-01-01", "calendar": "proleptic_gregorian", "dtype": "int64"}
    # Chunks of three time steps and one level: a reader going by time chunks ends on a short one.
    chunked = {k: dict(v, chunksizes=(3, 1, 61, 120)) if k in nc4.data_vars else v for k, v in enc.items()}
    nc4.to_netcdf(HERE / "era5-pl.nc", format="NETCDF4", engine="netcdf4", encoding=chunked)
    # Another grid (the northern hemisphere), for the refusal of grids that differ.
    nh = nc4.isel(valid_time=slice(0, 1)).sel(latitude=slice(90, 0))
    nh.to_netcdf(HERE / "era5-pl-nh.nc", format="NETCDF4", engine="netcdf4", encoding=enc)

    # NetCDF3 classic, int16 packed, as the CDS delivered before 2024.
    nc3 = m0.isel(time=slice(0, 2)).rename({"isobaricInhPa": "level"})
    nc3 = nc3.assign_coords(level=nc3.level.astype(np.int32))
    enc = {"time": {"units": "hours since 1900-01-01 00:00:00.0", "calendar": "gregorian", "dtype": "int32"}}
    for name in list(nc3.data_vars):
        v = nc3[name].values.astype(np.float64)
        v[0, 0, 10 + len(name), 20:23] = np.nan  # missing points
        nc3[name] = (nc3[name].dims, v, {"units": nc3[name].attrs["units"],
                                         "long_name": nc3[name].attrs["long_name"]})
        lo, hi = np.nanmin(v), np.nanmax(v)
        scale = (hi - lo) / (2**16 - 4)  # -32767 stays free for _FillValue
        enc[name] = {"dtype": "int16", "scale_factor": float(scale),
                     "add_offset": float((hi + lo) / 2), "_FillValue": np.int16(-32767)}
    nc3.attrs = {"Conventions": "CF-1.6"}
    nc3.to_netcdf(HERE / "era5-pl-legacy.nc", format="NETCDF3_CLASSIC", engine="netcdf4", encoding=enc)

    ref = {}
    for name in ("era5-pl-a.grib", "era5-pl-b.grib", "era5-pl-a0.grib2",
                 "era5-single-level-scalar-time.grib"):
        ds = xr.open_dataset(HERE / name, engine="cfgrib", backend_kwargs={"indexpath": ""})
        if "number" in ds.dims:
            ds = ds.sel(number=0)
        ds = ds.drop_vars(["number", "step", "valid_time"], errors="ignore")
        ref[name + "#member0"] = describe(ds)
    for name in ("era5-pl.nc", "era5-pl-legacy.nc"):
        ds = xr.open_dataset(HERE / name, engine="netcdf4")
        assert ds[next(iter(ds.data_vars))].dtype == np.float64 or name == "era5-pl.nc"
        ref[name] = describe(ds)
    (HERE / "reference.json").write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

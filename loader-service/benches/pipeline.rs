//! Criterion benches of the per-plane steps between reading a hyperslab and tokenizing it.
//!
//! `blur/globe-0.25deg` blurs one full 0.25° plane (721×1440 f32) with sigma 2 grid points, the
//! cost paid per time step × level when blur is enabled; throughput is the plane's bytes.

use atmorep_loader::blur::GaussianBlur;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

// The same allocator as the `atmorep` binary, so the figures match what users run.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NLAT: usize = 721;
const NLON: usize = 1440;

fn plane() -> Vec<f32> {
    (0..NLAT * NLON)
        .map(|k| {
            let (lat, lon) = ((k / NLON) as f32 * 0.25, (k % NLON) as f32 * 0.25);
            250.0 + 40.0 * lat.to_radians().sin() + 5.0 * (3.0 * lon.to_radians()).cos()
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let blur = GaussianBlur::new(2.0).expect("valid sigma");
    let mut field = plane();
    let mut scratch = Vec::new();

    let mut group = c.benchmark_group("blur");
    group.throughput(Throughput::Bytes((NLAT * NLON * 4) as u64));
    group.bench_function("globe-0.25deg", |b| {
        // Blurring in place repeatedly only smooths the field further; the cost is data-independent.
        b.iter(|| {
            blur.apply_globe_with_scratch(&mut field, NLAT, NLON, &mut scratch)
                .expect("blur")
        })
    });
    group.finish();
}

criterion_group!(pipeline, benches);
criterion_main!(pipeline);

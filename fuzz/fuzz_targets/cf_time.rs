//! CF time: arbitrary text as `units` and `calendar` attributes (split at the first newline),
//! the rest of the input as values to decode and instants to encode, and the ISO times
//! `GetSample` accepts. Nothing may panic: a store's attributes are not ours to trust.

#![no_main]

use atmorep_loader::store::cf_time::CfTimeUnits;
use atmorep_proto::calendar::{TimeFormat, format_time, parse_iso};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Text first, up to a NUL; eight-byte numbers after it.
    let (text, numbers) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let text = String::from_utf8_lossy(text);
    let (units, calendar) = match text.split_once('\n') {
        Some((u, c)) => (u, Some(c)),
        None => (&*text, None),
    };
    let _ = parse_iso(units);
    let Ok(parsed) = CfTimeUnits::parse(units, calendar) else {
        return;
    };
    for chunk in numbers.chunks_exact(8) {
        let raw: [u8; 8] = chunk.try_into().unwrap();
        if let Ok(unix) = parsed.decode(f64::from_le_bytes(raw)) {
            let _ = format_time(unix, TimeFormat::Iso);
            let _ = parsed.encode(unix);
        }
        let _ = parsed.encode(i64::from_le_bytes(raw));
        let _ = format_time(i64::from_le_bytes(raw), TimeFormat::Iso);
    }
});

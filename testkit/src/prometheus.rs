//! Reading a process's Prometheus endpoint the way a scraper does: a plain HTTP GET of
//! `/metrics`, and one sample's value out of the text format; and a port to put it on.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// A port that was free a moment ago (for `--metrics-bind`, which does not report its port, and
/// for a restart on an endpoint a client already knows).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// The text of `GET /metrics` on `127.0.0.1:port`, or `None` while nothing answers there.
pub fn scrape(port: u16) -> Option<String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    Some(text)
}

/// The value of the first sample line of `text` that starts with `prefix` (name and labels).
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::metric;

    #[test]
    fn a_sample_is_found_by_name_and_labels() {
        let text =
            "# HELP x_total x\n# TYPE x_total counter\nx_total{a=\"1\"} 3\nx_total{a=\"2\"} 4.5\n";
        assert_eq!(metric(text, "x_total{a=\"2\"}"), Some(4.5));
        assert_eq!(metric(text, "x_total"), Some(3.0));
        assert_eq!(metric(text, "y_total"), None);
    }
}

//! Prometheus metrics as tests read them: a free address for `--metrics-listen`, a scrape
//! with a plain HTTP GET (as Prometheus does), and a sample of the exposition text by name
//! and labels.

use std::net::SocketAddr;

use convoy_testkit::free_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A free loopback address for a `--metrics-listen` flag.
pub fn metrics_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// `GET /metrics` at `addr`: the exposition text, after checking the answer is one.
pub async fn scrape(addr: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: prometheus\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_owned()
}

/// The labels of a sample line (`name{k="v",...} value`), unescaped.
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, escaped)) => value.push(escaped),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_owned(), value));
        rest = &after[end..];
    }
    labels
}

/// The sum of the samples named `name` whose labels include all of `labels` (as PromQL's
/// `sum(name{labels})`); `None` when there is no such sample.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, l)) => (n, parse_labels(l.strip_suffix('}').unwrap_or(l))),
            None => (series, Vec::new()),
        };
        if series_name != name
            || !labels
                .iter()
                .all(|(k, v)| series_labels.iter().any(|(sk, sv)| sk == k && sv == v))
        {
            continue;
        }
        let value: f64 = value.parse().expect("a sample value");
        *found.get_or_insert(0.0) += value;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_parser_finds_samples_by_name_and_labels() {
        let text = "# TYPE x histogram\n\
                    x_count{a=\"1\",b=\"q\\\"uote,d\"} 2\n\
                    x_count{a=\"1\",b=\"other\"} 3\n\
                    y 7\n";
        assert_eq!(sample(text, "x_count", &[("a", "1")]), Some(5.0));
        assert_eq!(sample(text, "x_count", &[("b", "q\"uote,d")]), Some(2.0));
        assert_eq!(sample(text, "y", &[]), Some(7.0));
        assert_eq!(sample(text, "x_count", &[("a", "2")]), None);
    }
}

//! strata's test kit: a scriptable HTTP/1.1 proxy for tests that put a
//! real registry behind faults (5xx, connection resets and stalls in the
//! middle of a body, servers that ignore `Range`) or answer requests
//! themselves (a token server). It listens on 127.0.0.1 only, serves one
//! request per connection, and stops when dropped. Test code only: it
//! panics when it cannot bind.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy saw of a request.
#[derive(Clone, Debug)]
pub struct Seen {
    /// A sequence number shared by every proxy in the process: orders
    /// requests across proxies.
    pub seq: u64,
    pub method: String,
    /// Path and query.
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// What to do with one request.
#[derive(Clone, Debug)]
pub enum Action {
    /// Pass it to the upstream, maybe breaking the response body.
    Forward(Fault),
    /// Answer it here.
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Send the head and `n` body bytes, then reset the connection.
    ResetAfter(usize),
    /// Send the head and `n` body bytes, then go silent for the duration.
    StallAfter(usize, Duration),
    /// Drop the request's `Range` header (a server without range support).
    StripRange,
}

pub fn respond(status: u16, body: &str) -> Action {
    Action::Respond {
        status,
        headers: vec![],
        body: body.as_bytes().to_vec(),
    }
}

type Handler = Arc<dyn Fn(&Seen) -> Action + Send + Sync>;

pub struct Proxy {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub in_flight_max: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(
        upstream: Option<SocketAddr>,
        handler: impl Fn(&Seen) -> Action + Send + Sync + 'static,
    ) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy on loopback");
        let addr = listener.local_addr().expect("the proxy's address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let in_flight_max = Arc::new(AtomicUsize::new(0));
        let handler: Handler = Arc::new(handler);
        let (s, f, m) = (seen.clone(), in_flight.clone(), in_flight_max.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (h, s, f, m) = (handler.clone(), s.clone(), f.clone(), m.clone());
                tokio::spawn(async move {
                    let now = f.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(now, Ordering::SeqCst);
                    let mut flight = Flight(Some(f));
                    let _ = serve_one(conn, upstream, h, s, &mut flight).await;
                });
            }
        });
        Proxy {
            addr,
            seen,
            in_flight_max,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn authority(&self) -> String {
        self.addr.to_string()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

async fn read_head(conn: &mut TcpStream) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(pos + 4);
            return Ok((buf, rest));
        }
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "eof in head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn parse_head(head: &[u8]) -> (String, Vec<(String, String)>) {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("").to_string();
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    (first, headers)
}

fn write_head(first: &str, headers: &[(String, String)]) -> Vec<u8> {
    let mut out = format!("{first}\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// One request per connection (`Connection: close` both ways).
/// A request in flight: counted out once, when its last byte is sent (a
/// client may start its next request before the connection is closed) or
/// when its handling ends otherwise.
struct Flight(Option<Arc<AtomicUsize>>);

impl Flight {
    fn end(&mut self) {
        if let Some(f) = self.0.take() {
            f.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.end();
    }
}

async fn serve_one(
    mut conn: TcpStream,
    upstream: Option<SocketAddr>,
    handler: Handler,
    seen: Arc<Mutex<Vec<Seen>>>,
    flight: &mut Flight,
) -> std::io::Result<()> {
    let (head, mut req_body) = read_head(&mut conn).await?;
    let (first, headers) = parse_head(&head);
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let s = Seen {
        seq: SEQ.fetch_add(1, Ordering::SeqCst),
        method,
        target,
        headers,
    };
    seen.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(s.clone());
    let action = handler(&s);
    let fault = match action {
        Action::Respond {
            status,
            headers,
            body,
        } => {
            let mut h = headers;
            h.push(("Content-Length".into(), body.len().to_string()));
            h.push(("Connection".into(), "close".into()));
            let reason = match status {
                200 => "OK",
                401 => "Unauthorized",
                404 => "Not Found",
                500 => "Internal Server Error",
                503 => "Service Unavailable",
                _ => "Status",
            };
            conn.write_all(&write_head(&format!("HTTP/1.1 {status} {reason}"), &h))
                .await?;
            conn.write_all(&body).await?;
            flight.end();
            conn.shutdown().await?;
            return Ok(());
        }
        Action::Forward(f) => f,
    };
    let Some(up) = upstream else {
        return Ok(());
    };
    // Request body (uploads through the proxy are not used, but be correct).
    let content_length: usize = s
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while req_body.len() < content_length {
        let mut chunk = vec![0u8; 65536];
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        req_body.extend_from_slice(&chunk[..n]);
    }
    let mut fwd_headers: Vec<(String, String)> = s
        .headers
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("connection"))
        .filter(|(k, _)| !(fault == Fault::StripRange && k.eq_ignore_ascii_case("range")))
        .cloned()
        .collect();
    fwd_headers.push(("Connection".into(), "close".into()));
    let mut upc = TcpStream::connect(up).await?;
    upc.write_all(&write_head(
        &format!("{} {} HTTP/1.1", s.method, s.target),
        &fwd_headers,
    ))
    .await?;
    upc.write_all(&req_body).await?;

    let (resp_head, mut pending) = read_head(&mut upc).await?;
    let (status_line, resp_headers) = parse_head(&resp_head);
    let mut out_headers: Vec<(String, String)> = resp_headers
        .into_iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("connection"))
        .collect();
    out_headers.push(("Connection".into(), "close".into()));
    let body_len: Option<usize> = out_headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok());
    conn.write_all(&write_head(&status_line, &out_headers))
        .await?;

    // Where to break the body, if at all (only bodies of 2+ bytes).
    let break_at = match (&fault, body_len) {
        (Fault::ResetAfter(n) | Fault::StallAfter(n, _), Some(len)) if len >= 2 => {
            Some((*n).min(len / 2))
        }
        _ => None,
    };
    let mut sent = 0usize;
    let mut chunk = vec![0u8; 65536];
    loop {
        let data: Vec<u8> = if !pending.is_empty() {
            std::mem::take(&mut pending)
        } else {
            let n = upc.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            chunk[..n].to_vec()
        };
        let data = &data[..];
        if let Some(at) = break_at {
            if sent + data.len() >= at {
                let take = at - sent;
                conn.write_all(&data[..take]).await?;
                conn.flush().await?;
                match fault {
                    Fault::ResetAfter(_) => {
                        // Linger 0: close sends RST, a "connection reset".
                        #[allow(deprecated)]
                        conn.set_linger(Some(Duration::ZERO))?;
                        drop(conn);
                    }
                    Fault::StallAfter(_, d) => {
                        tokio::time::sleep(d).await;
                    }
                    _ => {}
                }
                return Ok(());
            }
        }
        conn.write_all(data).await?;
        sent += data.len();
    }
    flight.end();
    conn.shutdown().await?;
    Ok(())
}

/// Counts requests per key, for "fault only the first attempt" schedules.
#[derive(Default)]
pub struct Attempts(Mutex<HashMap<String, usize>>);

impl Attempts {
    /// How many times `key` was seen before (0 the first time).
    pub fn bump(&self, key: &str) -> usize {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(key.to_string()).or_insert(0);
        let before = *e;
        *e += 1;
        before
    }
}

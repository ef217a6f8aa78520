//! A real HTTP receiver on 127.0.0.1: records every request, answers with
//! scripted replies first and `200 OK` after; it can also answer the first
//! request of each group (say, each ordering key) differently.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tokio::sync::Notify;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("delivery body is JSON")
    }
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

#[derive(Default)]
struct Inner {
    received: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<Reply>>,
    default_reply: Mutex<Option<Reply>>,
    first_of_each: Mutex<Option<FirstOfEach>>,
    arrived: Notify,
    /// Requests being answered now, and the most there were at once.
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

/// The reply to the first request of each group, and the groups seen.
struct FirstOfEach {
    group: fn(&Received) -> Option<String>,
    reply: Reply,
    seen: HashSet<String>,
}

/// Counts one request as in flight for as long as it lives.
struct InFlight<'a>(&'a Inner);

impl<'a> InFlight<'a> {
    fn enter(inner: &'a Inner) -> Self {
        let now = inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        inner.most_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(inner)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone)]
pub struct Receiver {
    addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Receiver {
    pub async fn start() -> Self {
        let inner = Arc::new(Inner::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver address");
        let app = Router::new().fallback(record).with_state(inner.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("receiver runs");
        });
        Self { addr, inner }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Answers the next requests with `replies`, in order.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.inner.script.lock().unwrap().extend(replies);
    }

    /// Answers every unscripted request with `reply` instead of 200.
    pub fn always(&self, reply: Reply) {
        *self.inner.default_reply.lock().unwrap() = Some(reply);
    }

    /// Answers the first request of each group (`group` of the request;
    /// `None`: in no group) with `reply`, unless a reply is scripted.
    pub fn first_of_each(&self, group: fn(&Received) -> Option<String>, reply: Reply) {
        *self.inner.first_of_each.lock().unwrap() = Some(FirstOfEach {
            group,
            reply,
            seen: HashSet::new(),
        });
    }

    pub fn received(&self) -> Vec<Received> {
        self.inner.received.lock().unwrap().clone()
    }

    /// The most requests this receiver was answering at one moment.
    pub fn most_at_once(&self) -> usize {
        self.inner.most_in_flight.load(Ordering::SeqCst)
    }

    pub fn count(&self) -> usize {
        self.inner.received.lock().unwrap().len()
    }

    /// Waits until at least `n` requests arrived; panics after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.inner.arrived.notified();
            let got = self.count();
            if got >= n {
                return self.received();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                panic!("receiver got {got} requests, expected {n} within {timeout:?}");
            }
        }
    }

    /// Asserts that nothing more than `n` requests arrive within `quiet`.
    pub async fn expect_no_more(&self, n: usize, quiet: Duration) {
        tokio::time::sleep(quiet).await;
        assert_eq!(self.count(), n, "receiver got unexpected requests");
    }
}

async fn record(
    State(inner): State<Arc<Inner>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = InFlight::enter(&inner);
    let received = Received {
        path: uri.path().to_owned(),
        headers,
        body,
        at: Instant::now(),
    };
    let reply = {
        let scripted = inner.script.lock().unwrap().pop_front();
        scripted
            .or_else(|| first_of_its_group(&inner, &received))
            .or_else(|| inner.default_reply.lock().unwrap().clone())
    };
    inner.received.lock().unwrap().push(received);
    inner.arrived.notify_waiters();
    let Some(reply) = reply else {
        return StatusCode::OK.into_response();
    };
    tokio::time::sleep(reply.delay).await;
    let mut response = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    for (name, value) in reply.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

/// The reply for the first request of its group, if this is one.
fn first_of_its_group(inner: &Inner, received: &Received) -> Option<Reply> {
    let mut first = inner.first_of_each.lock().unwrap();
    let first = first.as_mut()?;
    let group = (first.group)(received)?;
    first.seen.insert(group).then(|| first.reply.clone())
}

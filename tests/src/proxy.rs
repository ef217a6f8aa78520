//! A TCP relay on 127.0.0.1 between the gateway and its real database,
//! which a test can cut: every open connection is dropped and new ones
//! are closed as soon as they are accepted, as when the server goes away;
//! [`TcpProxy::restore`] lets connections through again. The database
//! behind it is the real one; only the path to it fails.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct TcpProxy {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    /// Bumped by each cut; every relay ends when it changes.
    cuts: watch::Sender<u64>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Relays connections to `upstream` (host:port).
    pub async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let open = Arc::new(AtomicBool::new(true));
        let (cuts, _) = watch::channel(0);
        let accept = tokio::spawn(accept_loop(listener, upstream, open.clone(), cuts.clone()));
        Self {
            addr,
            open,
            cuts,
            accept,
        }
    }

    /// Relays to the server of a `postgres://` URL; returns the proxy and
    /// the same URL through it.
    pub async fn for_postgres(url: &str) -> (Self, String) {
        let mut url = reqwest::Url::parse(url).expect("a PostgreSQL URL");
        let upstream = format!(
            "{}:{}",
            url.host_str().expect("a host"),
            url.port().unwrap_or(5432)
        );
        let proxy = Self::start(upstream).await;
        url.set_host(Some("127.0.0.1")).expect("host");
        url.set_port(Some(proxy.addr.port())).expect("port");
        (proxy, url.to_string())
    }

    /// The database becomes unreachable: open connections drop, new ones
    /// are closed at once.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Connections go through again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: String,
    open: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
) {
    while let Ok((client, _)) = listener.accept().await {
        if !open.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let mut cut = cuts.subscribe();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                return;
            };
            let (mut client, mut server) = (client, server);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = cut.changed() => {}
            }
        });
    }
}

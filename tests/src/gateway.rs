//! Spawns the real `wasmhook` binary: a fresh database (a SQLite file in a
//! temporary directory, or a new PostgreSQL database on the server that
//! `WASMHOOK_TEST_POSTGRES_URL` names), a random port, and the admin token
//! set by the test.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const ADMIN_TOKEN: &str = "test-admin-token";

/// The gateway binary built from this workspace, beside the running
/// executable: tests live in target/<profile>/deps/, the benchmark in
/// target/<profile>/. `WASMHOOK_BIN` overrides the path.
pub fn gateway_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WASMHOOK_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("wasmhook"))
        .collect();
    match candidates.iter().find(|path| path.exists()) {
        Some(path) => path.clone(),
        None => panic!(
            "no wasmhook binary at {candidates:?}: build it first with `cargo build -p wasmhook-gateway` \
             (add --release for the benchmark); scripts/test does this for the tests"
        ),
    }
}

/// Settings for a gateway under test; the defaults let it deliver to
/// receivers on 127.0.0.1 and retry quickly.
#[derive(Clone)]
pub struct GatewayBuilder {
    env: Vec<(String, String)>,
    /// The largest file the process may write, in bytes (`prlimit
    /// --fsize`, with SIGXFSZ ignored so a write past it fails with EFBIG
    /// as on a full disk).
    file_size_limit: Option<u64>,
}

impl Default for GatewayBuilder {
    fn default() -> Self {
        let env = [
            ("WASMHOOK_ADMIN_TOKEN", ADMIN_TOKEN),
            ("WASMHOOK_ALLOW_HTTP", "true"),
            ("WASMHOOK_ALLOWED_CIDRS", "127.0.0.0/8,::1/128"),
            ("WASMHOOK_RETRY_SCHEDULE", "100ms,100ms,100ms"),
            ("WASMHOOK_POLL_INTERVAL", "50ms"),
            ("WASMHOOK_REQUEST_TIMEOUT", "5s"),
            ("WASMHOOK_LEASE", "10s"),
            ("WASMHOOK_SHUTDOWN_GRACE", "5s"),
            ("WASMHOOK_LOG", "wasmhook=debug,info"),
        ];
        Self {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            file_size_limit: None,
        }
    }
}

impl GatewayBuilder {
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Files the process writes cannot grow past `bytes` (`None`: no limit).
    pub fn file_size_limit(mut self, bytes: Option<u64>) -> Self {
        self.file_size_limit = bytes;
        self
    }

    pub fn without_env(mut self, key: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self
    }

    pub async fn spawn(self) -> TestGateway {
        let workspace = Arc::new(Workspace::fresh().await);
        TestGateway::start(self, workspace).await
    }

    /// Starts on a workspace prepared beforehand (e.g. migrated).
    pub async fn spawn_in(self, workspace: Arc<Workspace>) -> TestGateway {
        TestGateway::start(self, workspace).await
    }
}

/// The environment variable naming a PostgreSQL server (any database on
/// it, as a user who may create databases) to run the tests against.
pub const TEST_POSTGRES_URL: &str = "WASMHOOK_TEST_POSTGRES_URL";

/// A test's files (the gateway log, a SQLite database) and its database.
pub struct Workspace {
    dir: TempDir,
    pub database_url: String,
}

impl Workspace {
    pub async fn fresh() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let database_url = match std::env::var(TEST_POSTGRES_URL) {
            Ok(server) if !server.is_empty() => fresh_postgres_database(&server).await,
            _ => format!("sqlite://{}", dir.path().join("wasmhook.db").display()),
        };
        Self { dir, database_url }
    }

    pub fn is_postgres(&self) -> bool {
        self.database_url.starts_with("postgres")
    }

    /// The SQLite file (meaningful when not on PostgreSQL).
    pub fn sqlite_file(&self) -> PathBuf {
        self.dir.path().join("wasmhook.db")
    }

    /// Runs a statement on the database behind the gateway's back (to
    /// put it in a state only a crash or a lost race leaves).
    pub async fn execute(&self, sql: &str) {
        match self.connect().await {
            Database::Postgres(mut db) => {
                sqlx::query(sql)
                    .execute(&mut db)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            Database::Sqlite(db) => {
                db.execute(sql, []).unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
        }
    }

    /// Runs a `SELECT count(*) …` on the database, behind the gateway's
    /// back (for what the API does not show, such as stored secrets).
    pub async fn count(&self, sql: &str) -> i64 {
        match self.connect().await {
            Database::Postgres(mut db) => sqlx::query_scalar(sql)
                .fetch_one(&mut db)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
            Database::Sqlite(db) => db
                .query_row(sql, [], |row| row.get(0))
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
        }
    }

    async fn connect(&self) -> Database {
        if self.is_postgres() {
            use sqlx::Connection;
            let db = sqlx::PgConnection::connect(&self.database_url)
                .await
                .expect("connect to the test database");
            Database::Postgres(db)
        } else {
            let db = rusqlite::Connection::open(self.sqlite_file()).expect("open the database");
            Database::Sqlite(db)
        }
    }
}

/// A direct connection to a test's database.
enum Database {
    Postgres(sqlx::PgConnection),
    Sqlite(rusqlite::Connection),
}

/// Creates a database of its own for one test on the server.
async fn fresh_postgres_database(server: &str) -> String {
    use sqlx::{Connection, Executor};
    let name = format!("wasmhook_t_{}", unique_suffix());
    let mut admin = sqlx::PgConnection::connect(server)
        .await
        .unwrap_or_else(|e| panic!("{TEST_POSTGRES_URL}={server}: {e}"));
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create a test database");
    let mut url = reqwest::Url::parse(server).expect("a PostgreSQL URL");
    url.set_path(&format!("/{name}"));
    url.to_string()
}

/// A unique, lower-case database name suffix: time, process and a counter.
fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{nanos:x}_{}_{n}", std::process::id())
}

pub async fn spawn_app() -> TestGateway {
    GatewayBuilder::default().spawn().await
}

/// A running gateway process. Killed when dropped.
pub struct TestGateway {
    pub base_url: String,
    /// What the process printed on stdout before it was ready.
    pub banner: Vec<String>,
    pub client: reqwest::Client,
    pub token: String,
    child: Child,
    builder: GatewayBuilder,
    pub workspace: Arc<Workspace>,
}

impl TestGateway {
    async fn start(builder: GatewayBuilder, workspace: Arc<Workspace>) -> Self {
        let dir = &workspace.dir;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("gateway.log"))
            .expect("log file");
        let mut command = match builder.file_size_limit {
            Some(bytes) => {
                let mut command = Command::new("sh");
                command
                    .arg("-c")
                    .arg(format!("trap '' XFSZ; exec prlimit --fsize={bytes} \"$@\""))
                    .arg("sh")
                    .arg(gateway_binary());
                command
            }
            None => Command::new(gateway_binary()),
        };
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("WASMHOOK_DATABASE_URL", &workspace.database_url)
            .env("WASMHOOK_LISTEN", "127.0.0.1:0")
            .envs(builder.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn wasmhook");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut banner = Vec::new();
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                banner.push(line.clone());
                if let Some(url) = line.strip_prefix("wasmhook listening on ") {
                    return Some(url.to_owned());
                }
            }
            None
        })
        .await;
        let base_url = match ready {
            Ok(Some(url)) => url,
            _ => panic!(
                "gateway did not start; its log:\n{}",
                std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default()
            ),
        };
        // Keep draining stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let token = builder
            .env
            .iter()
            .find(|(k, _)| k == "WASMHOOK_ADMIN_TOKEN")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        Self {
            base_url,
            banner,
            client: reqwest::Client::new(),
            token,
            child,
            builder,
            workspace,
        }
    }

    /// The SQLite file, when the test runs on SQLite.
    pub fn database_file(&self) -> Option<PathBuf> {
        (!self.workspace.is_postgres()).then(|| self.workspace.sqlite_file())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.workspace.dir.path().join("gateway.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("gateway is running")
    }

    /// SIGKILL, as a crash would.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill gateway");
    }

    /// SIGTERM, and waits for the process to exit; returns its status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.pid().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("gateway exits after SIGTERM")
            .expect("wait for gateway")
    }

    /// Starts a new process on the same database (after a kill or a
    /// shutdown), with the same settings.
    pub async fn restart(self) -> TestGateway {
        self.with_settings(|builder| builder).await
    }

    /// Like [`restart`](Self::restart), with changed settings.
    pub async fn with_settings(
        self,
        change: impl FnOnce(GatewayBuilder) -> GatewayBuilder,
    ) -> TestGateway {
        let mut old = self;
        let _ = old.child.kill().await;
        TestGateway::start(change(old.builder.clone()), old.workspace.clone()).await
    }

    /// One more process on the same database (e.g. `WASMHOOK_ROLE=worker`
    /// beside an API process), with changed settings.
    pub async fn another(
        &self,
        change: impl FnOnce(GatewayBuilder) -> GatewayBuilder,
    ) -> TestGateway {
        TestGateway::start(change(self.builder.clone()), self.workspace.clone()).await
    }

    /// A request with the admin token.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.request_as(&self.token, method, path)
    }

    pub fn request_as(&self, token: &str, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{}", self.base_url, path))
            .bearer_auth(token)
    }

    /// Sends a request and returns the status and JSON body (`null` when
    /// empty).
    pub async fn call(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let response = request.send().await.expect("gateway answers");
        let status = response.status();
        let text = response.text().await.expect("response body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("non-JSON response {status}: {text}"))
        };
        (status, body)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(self.request(Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(self.request(Method::POST, path).json(&body))
            .await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(self.request(Method::PATCH, path).json(&body))
            .await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.call(self.request(Method::DELETE, path)).await
    }

    /// Uploads a plugin component.
    pub async fn upload_plugin(
        &self,
        name: &str,
        version: &str,
        wasm: Vec<u8>,
    ) -> (StatusCode, Value) {
        let request = self
            .request(
                Method::POST,
                &format!("/v1/plugins?name={name}&version={version}"),
            )
            .header("content-type", "application/wasm")
            .body(wasm);
        self.call(request).await
    }

    /// Uploads a plugin that must be accepted; returns its id.
    pub async fn plugin(&self, name: &str) -> String {
        let (status, body) = self
            .upload_plugin(name, "1.0.0", crate::plugin_wasm(name))
            .await;
        assert!(status.is_success(), "{status} {body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// Waits until every uploaded plugin's optimised code is stored (it is
    /// compiled in the background after an upload answers), so what runs
    /// next runs on that code.
    pub async fn wait_for_optimised_plugins(&self, patience: Duration) {
        let pending = "SELECT count(*) FROM plugins WHERE artifact IS NULL OR artifact_key IS NULL";
        let deadline = std::time::Instant::now() + patience;
        while self.workspace.count(pending).await != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "optimised plugin code was not stored within {patience:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Creates an app and returns its id.
    pub async fn create_app(&self, name: &str) -> String {
        let (status, body) = self.post("/v1/apps", json!({ "name": name })).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// Registers a webhook and returns the whole creation response (which
    /// holds the secret).
    pub async fn create_webhook(&self, app: &str, body: Value) -> Value {
        let (status, created) = self.post(&format!("/v1/apps/{app}/webhooks"), body).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        created
    }

    /// Publishes an event and returns the 202 body.
    pub async fn publish(&self, app: &str, event_type: &str, payload: Value) -> Value {
        let body = json!({ "event_type": event_type, "payload": payload });
        let (status, accepted) = self.post(&format!("/v1/apps/{app}/events"), body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        accepted
    }

    /// GETs `path` until `done` holds for the body; panics after `timeout`
    /// with the body as last seen.
    pub async fn poll(
        &self,
        path: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (code, body) = self.get(path).await;
            assert_eq!(code, StatusCode::OK, "{path}: {body}");
            if done(&body) {
                return body;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("{path} never reached the expected state: {body:#}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Polls a delivery until its status is `status`.
    pub async fn wait_for_delivery(
        &self,
        app: &str,
        delivery: &str,
        status: &str,
        timeout: Duration,
    ) -> Value {
        let path = format!("/v1/apps/{app}/deliveries/{delivery}");
        self.poll(&path, timeout, |d| d["status"] == status).await
    }
}

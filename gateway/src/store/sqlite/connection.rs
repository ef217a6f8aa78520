//! SQLite connections: one writer thread that commits in groups, and a
//! small pool of readers.
//!
//! SQLite has one writer at a time, and each durable commit costs an
//! fsync. So all writes go to a single thread that owns the write
//! connection: it takes every job waiting in its queue, runs each in its
//! own savepoint inside one transaction, commits once, and only then
//! answers the callers. Under load many publishes share one fsync; a job
//! that fails rolls back only its own savepoint. Reads run on blocking
//! threads over separate connections, which WAL mode lets proceed beside
//! the writer.
//!
//! A group of only [`Durability::Relaxed`] jobs (the queue's own
//! bookkeeping: claims, attempt records, give-backs) commits without the
//! fsync. WAL mode keeps such a commit atomic and a crash of the process
//! loses none of it (it is in the OS's cache); a power loss may undo the
//! last of them, which the queue survives: a claim undone is claimed
//! again, an attempt record undone is attempted again (at least once, as
//! promised), and the next durable commit's fsync makes every earlier one
//! durable too.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use crate::store::{StoreError, StoreResult};

/// Most jobs committed in one transaction.
const MAX_GROUP: usize = 512;
/// Reader connections kept open between reads.
const MAX_IDLE_READERS: usize = 8;
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 64;

/// What a job hands back after running: called with the fate of the
/// transaction it ran in, it answers the caller.
type Completion = Box<dyn FnOnce(Result<(), &str>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> Completion + Send>;

/// Whether a write must be on disk, power loss included, before its
/// caller hears it was committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// What the API accepted or changed: events, apps, webhooks, plugins.
    Durable,
    /// The queue's bookkeeping, which a power loss may undo (see above).
    Relaxed,
}

enum Message {
    Job(Job, Durability),
    Close(oneshot::Sender<()>),
}

/// How often the WAL is folded back into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);

/// Handle to the writer thread.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Message>,
}

impl Writer {
    /// Starts the writer thread on an open connection, and beside it the
    /// checkpointer, which runs for as long as the writer does.
    pub fn start(connection: Connection, path: &Path) -> StoreResult<Self> {
        let checkpointer = open_checkpointer(path)?;
        let (queue, inbox) = mpsc::channel();
        let (writer_alive, writer_gone) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("wasmhook-sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer, writer_gone))
            .map_err(|e| StoreError::Open(format!("cannot start the checkpoint thread: {e}")))?;
        std::thread::Builder::new()
            .name("wasmhook-sqlite-writer".into())
            .spawn(move || {
                write_loop(connection, inbox);
                drop(writer_alive);
            })
            .map_err(|e| StoreError::Open(format!("cannot start the writer thread: {e}")))?;
        Ok(Self { queue })
    }

    /// Runs `work` in the next group transaction; returns once it is
    /// committed, on disk (or failed).
    pub async fn write<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        self.write_with(Durability::Durable, work).await
    }

    /// Runs `work` in the next group transaction; returns once it is
    /// committed with `durability` (or failed).
    pub async fn write_with<T, F>(&self, durability: Durability, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |connection| {
            let result = in_savepoint(connection, work);
            Box::new(move |committed: Result<(), &str>| {
                let outcome = match committed {
                    Ok(()) => result,
                    Err(why) => Err(StoreError::Commit(why.to_owned())),
                };
                let _ = answer.send(outcome);
            })
        });
        self.queue
            .send(Message::Job(job, durability))
            .map_err(|_| StoreError::WriterGone)?;
        answered.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Finishes queued work and stops the thread.
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.queue.send(Message::Close(done)).is_ok() {
            let _ = closed.await;
        }
    }
}

fn in_savepoint<T>(
    connection: &Connection,
    work: impl FnOnce(&Connection) -> StoreResult<T>,
) -> StoreResult<T> {
    run(connection, "SAVEPOINT job")?;
    let result = work(connection);
    if result.is_err() {
        run(connection, "ROLLBACK TO job")?;
    }
    run(connection, "RELEASE job")?;
    result
}

/// Runs a statement without results from the statement cache: the writer
/// runs its transaction-control statements thousands of times a second,
/// and parsing them each time showed up in profiles.
fn run(connection: &Connection, sql: &str) -> rusqlite::Result<()> {
    connection.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// The write connection's `synchronous` setting, changed only when a
/// group needs the other one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Synchronous {
    Full,
    Normal,
    Unknown,
}

impl Synchronous {
    fn set(&mut self, connection: &Connection, durability: Durability) -> rusqlite::Result<()> {
        let (wanted, sql) = match durability {
            Durability::Durable => (Self::Full, "PRAGMA synchronous = FULL"),
            Durability::Relaxed => (Self::Normal, "PRAGMA synchronous = NORMAL"),
        };
        if *self != wanted {
            // Should this fail, the setting is unknown and the next group
            // sets it again.
            *self = Self::Unknown;
            connection.execute_batch(sql)?;
            *self = wanted;
        }
        Ok(())
    }
}

/// The jobs of one transaction.
struct Group {
    jobs: Vec<Job>,
    durability: Durability,
}

impl Group {
    fn new() -> Self {
        Self {
            jobs: Vec::new(),
            durability: Durability::Relaxed,
        }
    }

    fn add(&mut self, job: Job, durability: Durability) {
        self.jobs.push(job);
        if durability == Durability::Durable {
            self.durability = Durability::Durable;
        }
    }
}

/// Gathers the next group: the next job and every job waiting behind it.
/// `closing` is set when a close request ends it.
///
/// Waiting a millisecond for more while writes flow (tried) cut the
/// commits at a steady thousand events a second by 5×, but only a quarter
/// of the CPU per delivery, and it cost 13% of the delivery rate at full
/// speed, where publishers wait on each commit.
fn gather(
    inbox: &mpsc::Receiver<Message>,
    closing: &mut Option<oneshot::Sender<()>>,
) -> Option<Group> {
    let first = inbox.recv().ok()?;
    let mut group = Group::new();
    let mut next = Some(first);
    while let Some(message) = next.take() {
        match message {
            Message::Job(job, durability) => group.add(job, durability),
            Message::Close(done) => *closing = Some(done),
        }
        if group.jobs.len() >= MAX_GROUP || closing.is_some() {
            break;
        }
        next = inbox.try_recv().ok();
    }
    Some(group)
}

fn write_loop(connection: Connection, inbox: mpsc::Receiver<Message>) {
    let mut closing = None;
    // `open_writer` leaves the connection on FULL.
    let mut synchronous = Synchronous::Full;
    while closing.is_none() {
        let Some(Group { jobs, durability }) = gather(&inbox, &mut closing) else {
            break;
        };
        match synchronous.set(&connection, durability) {
            Ok(()) => run_group(&connection, jobs, durability),
            // A relaxed group may commit durably; a durable one must not
            // commit otherwise: dropped unrun, its callers learn their
            // writes did not happen.
            Err(error) if durability == Durability::Durable => {
                tracing::error!(%error, jobs = jobs.len(), "cannot make a commit durable");
            }
            Err(error) => {
                tracing::warn!(%error, "cannot relax a commit's durability");
                run_group(&connection, jobs, Durability::Durable);
            }
        }
    }
    // Fold the WAL back into the database file so a stopped gateway leaves
    // one self-contained file.
    let _ = connection.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
    drop(connection);
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// Runs `jobs` in one transaction, committed with `durability`.
fn run_group(connection: &Connection, jobs: Vec<Job>, durability: Durability) {
    if jobs.is_empty() {
        return;
    }
    let writes = jobs.len();
    if let Err(error) = run(connection, "BEGIN IMMEDIATE") {
        // Without a transaction no job may run; dropping them unrun tells
        // each caller its write did not happen.
        tracing::error!(%error, jobs = jobs.len(), "cannot begin a write transaction");
        return;
    }
    let completions: Vec<Completion> = jobs.into_iter().map(|job| job(connection)).collect();
    let committed = run(connection, "COMMIT").map_err(|e| e.to_string());
    if committed.is_err() {
        let _ = run(connection, "ROLLBACK");
    }
    if committed.is_ok() {
        crate::telemetry::sqlite_committed(writes, durability == Durability::Durable);
    }
    for complete in completions {
        complete(committed.as_ref().map(|_| ()).map_err(String::as_str));
    }
}

/// Commits never checkpoint (that would put the database file's fsync on
/// the publish path); this thread does, beside the writer, until the writer
/// stops.
fn checkpoint_loop(connection: Connection, writer_gone: mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = writer_gone.recv_timeout(CHECKPOINT_INTERVAL) {
        if let Err(error) = connection.execute_batch("PRAGMA wal_checkpoint(PASSIVE)") {
            tracing::warn!(%error, "WAL checkpoint failed; retrying");
        }
    }
}

fn open_checkpointer(path: &Path) -> StoreResult<Connection> {
    let connection = Connection::open(path)?;
    connection.busy_timeout(BUSY_TIMEOUT)?;
    connection.execute_batch("PRAGMA synchronous = FULL;")?;
    Ok(connection)
}

/// Read connections, opened on demand and kept for reuse.
#[derive(Clone)]
pub struct Readers {
    path: Arc<PathBuf>,
    idle: Arc<Mutex<Vec<Connection>>>,
}

impl Readers {
    pub fn new(path: &Path) -> Self {
        Self {
            path: Arc::new(path.to_owned()),
            idle: Arc::default(),
        }
    }

    /// Runs `work` on a reader connection on a blocking thread.
    pub async fn read<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let readers = self.clone();
        tokio::task::spawn_blocking(move || {
            let connection = readers.take()?;
            let result = work(&connection);
            readers.give_back(connection);
            result
        })
        .await
        .map_err(|e| StoreError::Open(format!("read task failed: {e}")))?
    }

    fn take(&self) -> StoreResult<Connection> {
        if let Some(connection) = self.idle.lock().expect("reader pool poisoned").pop() {
            return Ok(connection);
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connection = Connection::open_with_flags(self.path.as_ref(), flags)?;
        connection.busy_timeout(BUSY_TIMEOUT)?;
        tune(&connection)?;
        Ok(connection)
    }

    fn give_back(&self, connection: Connection) {
        let mut idle = self.idle.lock().expect("reader pool poisoned");
        if idle.len() < MAX_IDLE_READERS {
            idle.push(connection);
        }
    }

    pub fn close(&self) {
        self.idle.lock().expect("reader pool poisoned").clear();
    }
}

/// Opens the write connection: WAL, FULL sync (an event answered 202 is on
/// disk, power loss included), foreign keys on, checkpoints left to the
/// checkpoint thread.
pub fn open_writer(path: &Path) -> StoreResult<Connection> {
    create_private(path)?;
    let connection =
        Connection::open(path).map_err(|e| StoreError::Open(format!("{}: {e}", path.display())))?;
    connection.busy_timeout(BUSY_TIMEOUT)?;
    tune(&connection)?;
    connection.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
         PRAGMA wal_autocheckpoint = 0;",
    )?;
    Ok(connection)
}

/// Settings every connection gets. The query-planner stability guarantee
/// keeps cached statements prepared: without it SQLite re-prepares any
/// statement whose bound values it compared against a partial index's
/// condition (the claim and the subscribed-webhooks query among them), on
/// every run. A cache large enough for every hot statement of the writer.
fn tune(connection: &Connection) -> rusqlite::Result<()> {
    connection.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(())
}

/// The file path of a `sqlite://path` (or `sqlite:path`) URL.
/// Creates the database file, if it is new, readable and writable by the
/// gateway's user only: it holds signing secrets. SQLite gives the WAL
/// and shared-memory files it creates beside it the same permissions. A
/// file that others may read is left as the operator made it, with a
/// warning.
fn create_private(path: &Path) -> StoreResult<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mode = std::fs::metadata(path).map(|m| m.permissions().mode());
            if mode.is_ok_and(|mode| mode & 0o077 != 0) {
                tracing::warn!(
                    path = %path.display(),
                    "the database file, which holds signing secrets, may be read by other users; chmod 600 it"
                );
            }
            Ok(())
        }
        Err(e) => Err(StoreError::Open(format!("{}: {e}", path.display()))),
    }
}

pub fn path_of(database_url: &str) -> StoreResult<PathBuf> {
    let rest = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))
        .ok_or_else(|| StoreError::Open(format!("`{database_url}` is not a sqlite:// URL")))?;
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Err(StoreError::Open(
            "the SQLite database must be a file path".into(),
        ));
    }
    Ok(PathBuf::from(path))
}

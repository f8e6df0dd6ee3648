//! The Redis tier: one checksummed string per key on a Redis server or a
//! Redis Cluster, shared by every engine that points at it.
//!
//! # URLs
//!
//! | URL | meaning |
//! |---|---|
//! | `redis://[[user]:password@]host[:port][/db]` | one server (port 6379 by default, database 0 by default) |
//! | `redis+unix:///path/to/redis.sock[?db=N&pass=P]` (or `unix://…`) | one server on a Unix socket |
//! | `redis+cluster://[[user]:password@]host1[:port1],host2[:port2][,…][/]` | a Redis Cluster, given any of its masters as seeds |
//!
//! In the cluster form the comma-separated list names seed nodes (one live
//! seed is enough: the rest of the cluster is found with `CLUSTER SLOTS`);
//! IPv6 hosts go in brackets (`[::1]:7000`); the credentials, if any, apply to
//! every node; a path other than `/` or `/0` and a query string are refused
//! (a cluster has only database 0). `rediss://` (TLS) is refused with an
//! error: this build enables neither the `tls-rustls` nor the
//! `tls-native-tls` feature of the `redis` crate. The tier always speaks
//! RESP2 (a `protocol` query parameter is ignored).
//!
//! # Values
//!
//! Each value is stored under `key_prefix` + the key's 32 hex digits (no hash
//! tag, so keys spread over the cluster's slots; a prefix holding `{…}` would
//! pin them all to one slot) as
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `CGREDIS1` |
//! | 8 | value length `n`, u64 little-endian |
//! | n | value |
//! | 8 | xxh3-64 of the value, u64 little-endian |
//!
//! so a truncated or altered value is detected: `get` deletes it (only if it
//! is still the same bytes, so a concurrent `put` is never lost) and returns
//! [`StoreError::Corrupt`]; the next `get` sees it absent. A Redis string
//! holds at most 512 MiB, so a value whose frame would exceed that is
//! [`StoreError::TooLarge`]. There is no client-side budget: Redis bounds its
//! memory itself (`maxmemory` and its eviction policy), and
//! [`RedisOptions::ttl`] optionally expires entries.
//!
//! # Connections, failures and timeouts
//!
//! [`RedisTier::open`] only parses the URL: it never connects, so an engine
//! starts while Redis is down. Each operation takes an idle connection from a
//! small pool (or connects), and puts it back only if the operation
//! succeeded; any error drops it. When a pooled connection fails with an I/O
//! error other than a timeout (e.g. the server restarted and closed it), the
//! whole pool is dropped and the operation is retried once on a fresh
//! connection, so the first operation after a restart succeeds.
//!
//! Connecting, each socket read and each socket write are bounded by
//! [`RedisOptions::timeout`], the handshake included: `AUTH` and `SELECT` are
//! sent by this module after the timeouts are set, and the `redis` crate's
//! `disable-client-setinfo` feature (enabled in Cargo.toml) keeps it from
//! sending `CLIENT SETINFO` before them. So an operation against a dead or
//! hung server fails with [`StoreError::Io`] after about one timeout:
//! - a refused connection (server down) fails at once;
//! - a single server costs at most two timeouts (a stale pooled connection,
//!   then a fresh one), plus, when a large value is written to a server that
//!   stopped reading, one timeout per write call that still moved some bytes
//!   into the socket buffers (a few: the buffers are a few MB);
//! - a cluster connection also retries once internally and contacts every
//!   master when it (re)connects, so allow a few timeouts there.
//!
//! Nothing panics on a network failure.
//!
//! # Statistics
//!
//! `stats()` never queries the server: `hits`, `misses` and `puts` count this
//! instance's operations; `evictions`, `bytes` and `entries` are 0, because
//! what the server holds (written by other instances too, evicted and
//! expired by Redis itself) is not known to this instance without a round
//! trip (`INFO`/`DBSIZE`), and a stats call must stay cheap.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use ::redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConnection, Connect};
use ::redis::{
    ConnectionAddr, ConnectionInfo, ConnectionLike, IntoConnectionInfo, ProtocolVersion,
    RedisError, RedisResult, Value,
};
use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_64;

use super::{key_hex, Counters, Key, StoreError, Tier, TierStats};

const MAGIC: &[u8; 8] = b"CGREDIS1";
/// Bytes of framing around each value (magic, length, checksum).
const OVERHEAD: u64 = 24;
/// The largest string Redis stores (its default `proto-max-bulk-len`).
const MAX_FRAME: u64 = 512 * 1024 * 1024;
/// Idle connections kept for reuse; more are closed when given back.
const MAX_IDLE: usize = 16;

/// Deletes `KEYS[1]` only if it still holds `ARGV[1]` (the corrupt bytes
/// that were read), so a value written meanwhile by a `put` survives.
const DELETE_IF_SAME: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// Options of [`RedisTier::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// Bound on connecting and on each socket read and write (default 500 ms).
    /// Must not be zero.
    pub timeout: Duration,
    /// Prepended to the key's 32 hex digits to form the Redis key (default
    /// `"cachegen:"`).
    pub key_prefix: String,
    /// Expiry set on every `put` (`SET … PX`), rounded up to whole
    /// milliseconds; `None` (the default) keeps entries until Redis evicts
    /// them.
    pub ttl: Option<Duration>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            timeout: Duration::from_millis(500),
            key_prefix: "cachegen:".to_string(),
            ttl: None,
        }
    }
}

/// A tier on a Redis server or cluster; see the [module docs](self).
pub struct RedisTier {
    target: Target,
    opts: RedisOptions,
    /// The URL with any credentials masked, for error messages.
    shown: String,
    pool: Mutex<Vec<Conn>>,
    counters: Counters,
}

enum Target {
    Single(ConnectionInfo),
    Cluster(ClusterClient),
}

enum Conn {
    Single(TimedConnection),
    Cluster(ClusterConnection<TimedConnection>),
}

impl Conn {
    fn as_dyn(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster(c) => c,
        }
    }
}

/// A connection whose handshake already runs under the timeouts, and whose
/// read and write timeouts can never be switched off (a cluster connection
/// asks for "no write timeout" by default; that becomes our timeout).
struct TimedConnection {
    inner: ::redis::Connection,
    timeout: Duration,
}

impl TimedConnection {
    fn open(info: &ConnectionInfo, timeout: Duration) -> RedisResult<Self> {
        // `redis::connect` sends its handshake (AUTH, SELECT, HELLO and, unless
        // the crate's `disable-client-setinfo` feature is on, CLIENT SETINFO)
        // before any read timeout is set, so a hung server would block it
        // forever. Connect bare (an empty handshake: no round trip, which is
        // why Cargo.toml enables that feature), set the timeouts, then
        // authenticate and select the database ourselves.
        let mut bare = info.clone();
        bare.redis.db = 0;
        bare.redis.username = None;
        bare.redis.password = None;
        bare.redis.protocol = ProtocolVersion::RESP2;
        let inner = <::redis::Connection as Connect>::connect(bare, Some(timeout))?;
        inner.set_read_timeout(Some(timeout))?;
        inner.set_write_timeout(Some(timeout))?;
        let mut conn = TimedConnection { inner, timeout };
        if let Some(password) = &info.redis.password {
            let mut auth = ::redis::cmd("AUTH");
            if let Some(user) = &info.redis.username {
                auth.arg(user);
            }
            auth.arg(password).exec(&mut conn.inner)?;
        }
        if info.redis.db != 0 {
            ::redis::cmd("SELECT")
                .arg(info.redis.db)
                .exec(&mut conn.inner)?;
        }
        Ok(conn)
    }
}

impl ConnectionLike for TimedConnection {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        self.inner.req_packed_command(cmd)
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        self.inner.req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }

    fn check_connection(&mut self) -> bool {
        self.inner.check_connection()
    }

    fn is_open(&self) -> bool {
        self.inner.is_open()
    }
}

impl Connect for TimedConnection {
    fn connect<T: IntoConnectionInfo>(info: T, timeout: Option<Duration>) -> RedisResult<Self> {
        let timeout = timeout.unwrap_or(RedisOptions::default().timeout);
        TimedConnection::open(&info.into_connection_info()?, timeout)
    }

    fn send_packed_command(&mut self, cmd: &[u8]) -> RedisResult<()> {
        self.inner.send_packed_command(cmd)
    }

    fn set_write_timeout(&self, dur: Option<Duration>) -> RedisResult<()> {
        self.inner
            .set_write_timeout(Some(dur.unwrap_or(self.timeout)))
    }

    fn set_read_timeout(&self, dur: Option<Duration>) -> RedisResult<()> {
        self.inner
            .set_read_timeout(Some(dur.unwrap_or(self.timeout)))
    }

    fn recv_response(&mut self) -> RedisResult<Value> {
        self.inner.recv_response()
    }
}

fn invalid(shown: &str, why: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("invalid Redis URL {shown}: {why}"))
}

/// The URL with the credentials of `scheme://user:pass@…` masked, and a
/// query string (`?pass=…` of the Unix socket form) left out.
fn mask_credentials(url: &str) -> String {
    let (url, query) = match url.split_once('?') {
        Some((base, _)) => (base, "?***"),
        None => (url, ""),
    };
    let masked = match url.split_once("://") {
        Some((scheme, rest)) => {
            let host_part_end = rest.find(['/', '#']).unwrap_or(rest.len());
            match rest[..host_part_end].rfind('@') {
                Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    };
    masked + query
}

/// Parses `redis+cluster://[auth@]h1[:p1],h2[:p2][/]` into a client.
fn cluster_client(rest: &str, shown: &str, timeout: Duration) -> Result<ClusterClient, StoreError> {
    if rest.contains(['?', '#']) {
        return Err(invalid(
            shown,
            "a cluster URL takes no query string or fragment",
        ));
    }
    let (auth, hosts) = match rest.rfind('@') {
        Some(at) => (&rest[..at + 1], &rest[at + 1..]),
        None => ("", rest),
    };
    let (hosts, path) = hosts.split_once('/').unwrap_or((hosts, ""));
    if !(path.is_empty() || path == "0") {
        return Err(invalid(shown, "a Redis Cluster only has database 0"));
    }
    let mut nodes = Vec::new();
    for host in hosts.split(',').map(str::trim) {
        if host.is_empty() {
            return Err(invalid(shown, "empty node in the list"));
        }
        let info = format!("redis://{auth}{host}/")
            .into_connection_info()
            .map_err(|e| invalid(shown, format_args!("node {host}: {e}")))?;
        nodes.push(info);
    }
    ClusterClientBuilder::new(nodes)
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .use_protocol(ProtocolVersion::RESP2)
        // One retry is enough to follow a MOVED/ASK redirect or reconnect a
        // dropped node connection; more would multiply the time to fail.
        .retries(1)
        .min_retry_wait(10)
        .max_retry_wait(timeout.as_millis().clamp(11, 1000) as u64)
        .build()
        .map_err(|e| invalid(shown, e))
}

/// Appends one RESP bulk string.
fn push_bulk(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.push(b'$');
    out.extend_from_slice(len.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for p in parts {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(b"\r\n");
}

/// Checks a stored frame and turns it into the value in place; on failure
/// returns why, with the frame untouched.
fn unframe(mut frame: Vec<u8>) -> Result<Vec<u8>, (String, Vec<u8>)> {
    let total = frame.len() as u64;
    if total < OVERHEAD {
        return Err((format!("{total} bytes, less than the framing"), frame));
    }
    if &frame[..8] != MAGIC {
        return Err(("bad magic".into(), frame));
    }
    let len = u64::from_le_bytes(frame[8..16].try_into().unwrap());
    if len != total - OVERHEAD {
        let why = format!(
            "length field says {len} bytes, the entry holds {}",
            total - OVERHEAD
        );
        return Err((why, frame));
    }
    let n = len as usize;
    let sum = u64::from_le_bytes(frame[16 + n..].try_into().unwrap());
    if xxh3_64(&frame[16..16 + n]) != sum {
        return Err(("checksum mismatch".into(), frame));
    }
    frame.copy_within(16..16 + n, 0);
    frame.truncate(n);
    Ok(frame)
}

impl RedisTier {
    /// Parses `url` (see the [module docs](self) for the forms) and returns
    /// the tier without connecting: the first operation connects. Fails only
    /// on an invalid URL or options.
    pub fn open(url: &str, opts: RedisOptions) -> Result<RedisTier, StoreError> {
        let url = url.trim();
        let shown = mask_credentials(url);
        if opts.timeout.is_zero() {
            return Err(StoreError::Io(
                "invalid Redis options: the timeout must not be zero".into(),
            ));
        }
        if opts.ttl.is_some_and(|t| t.is_zero()) {
            return Err(StoreError::Io(
                "invalid Redis options: the ttl must not be zero".into(),
            ));
        }
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid(&shown, "no scheme (redis://…)"))?;
        let target = match scheme {
            "redis" | "redis+unix" | "unix" => {
                let info = url.into_connection_info().map_err(|e| invalid(&shown, e))?;
                if matches!(info.addr, ConnectionAddr::TcpTls { .. }) {
                    return Err(invalid(&shown, "TLS is not supported"));
                }
                Target::Single(info)
            }
            "redis+cluster" => Target::Cluster(cluster_client(rest, &shown, opts.timeout)?),
            "rediss" | "rediss+cluster" => {
                return Err(invalid(
                    &shown,
                    "TLS (rediss://) is not supported: this build enables neither the \
                     tls-rustls nor the tls-native-tls feature of the redis crate",
                ))
            }
            other => {
                return Err(invalid(
                    &shown,
                    format_args!(
                        "unknown scheme {other}://; expected redis://, redis+unix:// or redis+cluster://"
                    ),
                ))
            }
        };
        Ok(RedisTier {
            target,
            opts,
            shown,
            pool: Mutex::new(Vec::new()),
            counters: Counters::default(),
        })
    }

    /// The Redis key that holds `key`: the prefix and the key's 32 hex digits.
    pub fn redis_key(&self, key: &Key) -> String {
        format!("{}{}", self.opts.key_prefix, key_hex(key))
    }

    pub fn options(&self) -> &RedisOptions {
        &self.opts
    }

    fn connect(&self) -> RedisResult<Conn> {
        match &self.target {
            Target::Single(info) => {
                TimedConnection::open(info, self.opts.timeout).map(Conn::Single)
            }
            Target::Cluster(client) => {
                let conn = client.get_generic_connection::<TimedConnection>()?;
                conn.set_write_timeout(Some(self.opts.timeout))?;
                conn.set_read_timeout(Some(self.opts.timeout))?;
                Ok(Conn::Cluster(conn))
            }
        }
    }

    fn io_err(&self, what: &str, key: &str, e: &RedisError) -> StoreError {
        StoreError::Io(format!("redis {what} {key} at {}: {e}", self.shown))
    }

    /// Runs `op` on a pooled or fresh connection; see the module docs for
    /// the retry rule. `op` must be idempotent.
    fn run<T>(
        &self,
        what: &str,
        key: &str,
        mut op: impl FnMut(&mut dyn ConnectionLike) -> RedisResult<T>,
    ) -> Result<T, StoreError> {
        let pooled = self.pool.lock().pop();
        let reused = pooled.is_some();
        let mut conn = match pooled {
            Some(c) => c,
            None => self.connect().map_err(|e| self.io_err(what, key, &e))?,
        };
        let err = match op(conn.as_dyn()) {
            Ok(v) => {
                self.give_back(conn);
                return Ok(v);
            }
            Err(e) => e,
        };
        drop(conn);
        if !(reused && err.is_io_error() && !err.is_timeout()) {
            return Err(self.io_err(what, key, &err));
        }
        // The server probably went away since the connection was pooled: the
        // other idle connections are as stale as this one.
        let stale = std::mem::take(&mut *self.pool.lock());
        drop(stale);
        let mut conn = self.connect().map_err(|e| self.io_err(what, key, &e))?;
        match op(conn.as_dyn()) {
            Ok(v) => {
                self.give_back(conn);
                Ok(v)
            }
            Err(e) => Err(self.io_err(what, key, &e)),
        }
    }

    fn give_back(&self, conn: Conn) {
        let mut pool = self.pool.lock();
        if pool.len() < MAX_IDLE {
            pool.push(conn);
        }
    }

    /// Removes `rkey` if it still holds `bad`; falls back to a plain DEL
    /// where the server refuses scripts (e.g. an ACL without EVAL).
    fn delete_corrupt(&self, rkey: &str, bad: &[u8]) -> Result<(), StoreError> {
        self.run("delete corrupt", rkey, |c| {
            let eval = ::redis::cmd("EVAL")
                .arg(DELETE_IF_SAME)
                .arg(1)
                .arg(rkey)
                .arg(bad)
                .query::<i64>(c);
            match eval {
                Err(e) if !e.is_io_error() => {
                    ::redis::cmd("DEL").arg(rkey).query::<i64>(c).map(drop)
                }
                other => other.map(drop),
            }
        })
    }
}

impl Tier for RedisTier {
    fn name(&self) -> &str {
        "redis"
    }

    fn get(&self, key: &Key) -> Result<Option<Vec<u8>>, StoreError> {
        let rkey = self.redis_key(key);
        let frame: Option<Vec<u8>> =
            self.run("GET", &rkey, |c| ::redis::cmd("GET").arg(&rkey).query(c))?;
        let Some(frame) = frame else {
            self.counters.misses.fetch_add(1, Relaxed);
            return Ok(None);
        };
        match unframe(frame) {
            Ok(v) => {
                self.counters.hits.fetch_add(1, Relaxed);
                Ok(Some(v))
            }
            Err((why, bad)) => {
                self.counters.misses.fetch_add(1, Relaxed);
                let removed = match self.delete_corrupt(&rkey, &bad) {
                    Ok(()) => "entry removed".to_string(),
                    Err(e) => format!("removing it failed: {e}"),
                };
                Err(StoreError::Corrupt(format!(
                    "redis key {rkey} at {}: {why} ({removed})",
                    self.shown
                )))
            }
        }
    }

    fn put(&self, key: &Key, value: &[u8]) -> Result<(), StoreError> {
        let size = value.len() as u64 + OVERHEAD;
        if size > MAX_FRAME {
            return Err(StoreError::TooLarge {
                size,
                budget: MAX_FRAME,
            });
        }
        let rkey = self.redis_key(key);
        let ttl_ms = self
            .opts
            .ttl
            .map(|t| t.as_nanos().div_ceil(1_000_000).to_string());
        // The RESP command is built by hand so that the value is copied once.
        let mut packed = Vec::with_capacity(size as usize + rkey.len() + 64);
        packed.extend_from_slice(if ttl_ms.is_some() {
            b"*5\r\n"
        } else {
            b"*3\r\n"
        });
        push_bulk(&mut packed, &[b"SET"]);
        push_bulk(&mut packed, &[rkey.as_bytes()]);
        let len = (value.len() as u64).to_le_bytes();
        let sum = xxh3_64(value).to_le_bytes();
        push_bulk(&mut packed, &[MAGIC, &len, value, &sum]);
        if let Some(ms) = &ttl_ms {
            push_bulk(&mut packed, &[b"PX"]);
            push_bulk(&mut packed, &[ms.as_bytes()]);
        }
        self.run("SET", &rkey, |c| {
            c.req_packed_command(&packed)?.extract_error().map(drop)
        })?;
        self.counters.puts.fetch_add(1, Relaxed);
        Ok(())
    }

    fn contains(&self, key: &Key) -> Result<bool, StoreError> {
        let rkey = self.redis_key(key);
        self.run("EXISTS", &rkey, |c| {
            ::redis::cmd("EXISTS").arg(&rkey).query::<i64>(c)
        })
        .map(|n| n > 0)
    }

    fn remove(&self, key: &Key) -> Result<(), StoreError> {
        let rkey = self.redis_key(key);
        self.run("DEL", &rkey, |c| {
            ::redis::cmd("DEL").arg(&rkey).query::<i64>(c)
        })
        .map(drop)
    }

    fn stats(&self) -> TierStats {
        self.counters.snapshot(0, 0)
    }
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<RedisTier>();
}
